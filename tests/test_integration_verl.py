"""gro_kernels.integrations.verl against verl 0.9.1 itself: each registered GRO loss equals verl's own
policy-loss function of the same name on the same inputs (loss, gradient of the log-probs, metrics),
for every aggregation mode and verl's global-batch normalization; the fused log-prob + entropy equals
verl's FusedLinearForPPO."""
import math

import pytest
import torch

pytest.importorskip("verl")

from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config.actor import ActorConfig, PolicyLossConfig  # noqa: E402

from gro_kernels.integrations.verl import VERL_LOSSES, VERL_NOT_COVERED, register  # noqa: E402

MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


# Clip-Cov / KL-Cov select a few tokens of these small batches (verl's defaults select one of ~25, or none)
POLICY_LOSS = dict(clip_cov_ratio=0.1, clip_cov_lb=0.05, clip_cov_ub=3.0, kl_cov_ratio=0.15, ppo_kl_coef=0.5)


def actor_config(policy_loss=POLICY_LOSS, **kw):
    base = dict(strategy="fsdp", ppo_micro_batch_size_per_gpu=2, rollout_n=1, ppo_mini_batch_size=4,
                clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=0.8, tau_neg=1.5,
                policy_loss=PolicyLossConfig(**policy_loss))
    base.update(kw)
    return ActorConfig(**base)


def per_sequence(name):
    return VERL_LOSSES[name].get("sequence", False)


def inputs(per_sequence_advantages, seed=0, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0).requires_grad_()
    lengths = torch.tensor([9, 5, 1, 0, 7, 3])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    adv = torch.randn(B, 1 if per_sequence_advantages else T, generator=g, dtype=torch.float64).expand(B, T)
    adv = adv.contiguous()
    adv[0], adv[4] = -adv[0].abs(), adv[4].abs()
    with torch.no_grad():  # ratios of 4.5 on a negative and a positive advantage: dual clip and clip bind
        logp[0, :2] = old[0, :2] + 1.5
        logp[4, :2] = old[4, :2] + 1.5
    return old, logp, adv, mask


def run(fn, old, logp, adv, mask, mode, config, weights=None):
    logp.grad = None
    torch.manual_seed(7)  # clip_cov draws its tokens with torch.randperm on the default generator, as verl
    loss, metrics = fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                       config=config, rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), logp.grad.clone(), metrics


# clip_ratio_c only matters to vanilla: dual-clip PPO on (verl's default, 3.0) and off
LOSSES = [(name, c) for name in VERL_LOSSES for c in ([3.0, math.inf] if name == "vanilla" else [3.0])]


@pytest.mark.parametrize("name,clip_c", LOSSES, ids=[f"{n}-c{c}" for n, c in LOSSES])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("global_info", [{}, dict(dp_size=2, batch_num_tokens=40, global_batch_size=10,
                                                  loss_scale_factor=12)])
def test_gro_loss_equals_verl_loss(name, mode, global_info, clip_c):
    register()
    config = actor_config(clip_ratio_c=clip_c)
    config.global_batch_info.update(global_info)
    data = inputs(per_sequence_advantages=per_sequence(name), seed=hash((name, mode)) % 100)
    theirs = run(core_algos.get_policy_loss_fn(name), *data, mode, config)
    ours = run(core_algos.get_policy_loss_fn(f"gro_{name}"), *data, mode, config)
    rtol = 1e-7 if name == "geo_mean" else 1e-9  # verl's geo_mean divides by length + 1e-8
    torch.testing.assert_close(ours[0], theirs[0], rtol=rtol, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=rtol, atol=1e-12)
    assert ours[2].keys() == theirs[2].keys()
    for key in theirs[2]:
        assert ours[2][key] == pytest.approx(theirs[2][key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_covariance_losses_select_tokens(name):
    # the comparison above is not vacuous: on these inputs the covariance rule changes verl's loss
    old, logp, adv, mask = inputs(per_sequence_advantages=False, seed=1)
    fn = core_algos.get_policy_loss_fn(name)
    on = run(fn, old, logp, adv, mask, "token-mean", actor_config())[0]
    off = run(fn, old, logp, adv, mask, "token-mean",
              actor_config(policy_loss=dict(POLICY_LOSS, clip_cov_lb=100.0, clip_cov_ub=101.0, ppo_kl_coef=0.0)))[0]
    assert (on - off).abs() > 1e-6


@pytest.mark.parametrize("name,level", [("vanilla", "token"), ("gpg", "token"), ("gspo", "sequence"),
                                        ("sapo", "token"), ("cispo", "token"), ("geo_mean", "token")])
def test_gro_loss_with_rollout_correction_weights_equals_verl(name, level):
    # rollout correction (TIS / MIS): a non-negative weight per token (or per sequence), some exactly 0
    register()
    config = actor_config()
    old, logp, adv, mask = inputs(per_sequence_advantages=per_sequence(name), seed=3)
    g = torch.Generator().manual_seed(4)
    w = torch.rand(adv.shape[0], adv.shape[1] if level == "token" else 1, generator=g, dtype=torch.float64) * 2
    w[0, 0] = 0.0
    w = w.expand_as(adv).contiguous()
    theirs = run(core_algos.get_policy_loss_fn(name), old, logp, adv, mask, "token-mean", config, w)
    ours = run(core_algos.get_policy_loss_fn(f"gro_{name}"), old, logp, adv, mask, "token-mean", config, w)
    rtol = 1e-7 if name == "geo_mean" else 1e-9
    torch.testing.assert_close(ours[0], theirs[0], rtol=rtol, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=rtol, atol=1e-12)


def test_every_verl_loss_is_mapped_or_listed():
    assert set(core_algos.POLICY_LOSS_REGISTRY) - {n for n in core_algos.POLICY_LOSS_REGISTRY if n.startswith("gro_")} \
        <= set(VERL_LOSSES) | set(VERL_NOT_COVERED)
    assert set(VERL_LOSSES).isdisjoint(VERL_NOT_COVERED)


def test_dual_clip_negative_weights_and_varying_gspo_advantages_raise():
    register()
    old, logp, adv, mask = inputs(per_sequence_advantages=False)
    fn = core_algos.get_policy_loss_fn("gro_vanilla")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        fn(old, logp, adv, mask, "token-mean", actor_config(clip_ratio_c=1.1))
    with pytest.raises(ValueError, match="rollout_is_weights"):
        fn(old, logp, adv, mask, "token-mean", actor_config(), rollout_is_weights=-torch.ones_like(mask))
    with pytest.raises(ValueError, match="vary along a sequence"):
        core_algos.get_policy_loss_fn("gro_gspo")(old, logp, adv, mask, "token-mean", actor_config())
    for name in ("clip_cov", "kl_cov"):
        with pytest.raises(ValueError, match="rollout_is_weights"):
            core_algos.get_policy_loss_fn(f"gro_{name}")(old, logp, adv, mask, "token-mean", actor_config(),
                                                         rollout_is_weights=torch.ones_like(mask))


def test_fused_logprob_entropy_equals_verl():
    from verl.utils.experimental.torch_functional import FusedLinearForPPO
    from gro_kernels.integrations.verl import unregister_fused_kernels
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(50, 16, generator=g)).requires_grad_()
    ids = torch.randint(0, 50, (2, 7), generator=g)
    w_lp, w_ent = torch.randn(2, 7, generator=g), torch.randn(2, 7, generator=g)

    def step():
        hidden.grad = weight.grad = None
        logp, ent = FusedLinearForPPO(chunk_size=4)(hidden, weight, ids, temperature=0.7)
        ((logp * w_lp).sum() + (ent * w_ent).sum()).backward()
        return logp.detach(), ent.detach(), hidden.grad.clone(), weight.grad.clone()

    theirs = step()
    register(fused_kernels=True)
    try:
        import gro_kernels.integrations.verl as v
        calls = []
        original = v.token_logprobs
        v.token_logprobs = lambda *a, **k: calls.append(1) or original(*a, **k)
        ours = step()
    finally:
        v.token_logprobs = original
        unregister_fused_kernels()
    assert calls
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)


def test_fused_path_takes_per_sequence_temperature_and_the_head_options():
    """verl's own fused kernel takes one scalar temperature; ours takes a [B] (or [B, T]) tensor, and the head
    options given to register (soft cap, fp32 head, the rollout's truncation). References: verl's own kernel
    row by row for the temperatures; the naive backend for the options."""
    from verl.utils.experimental.torch_functional import FusedLinearForPPO
    from gro_kernels.integrations.verl import unregister_fused_kernels
    from gro_kernels import token_logprobs
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 16, generator=g)
    weight = 0.5 * torch.randn(50, 16, generator=g)
    ids = torch.randint(0, 50, (2, 7), generator=g)
    temps = torch.tensor([0.6, 1.3])

    def run(temperature, rows=slice(None)):
        h, w = hidden[rows].clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = FusedLinearForPPO(chunk_size=4)(h, w, ids[rows], temperature=temperature)
        (logp.sum() + 0.1 * ent.sum()).backward()
        return logp.detach(), ent.detach(), h.grad, w.grad

    theirs = [run(float(t), slice(i, i + 1)) for i, t in enumerate(temps)]
    register(fused_kernels=True)
    try:
        ours = run(temps)
    finally:
        unregister_fused_kernels()
    for k in range(3):
        torch.testing.assert_close(ours[k], torch.cat([t[k] for t in theirs]).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[3], sum(t[3] for t in theirs).float(), rtol=1e-4, atol=1e-5)

    options = dict(softcap=2.0, head_precision="fp32", top_p=0.8)
    register(fused_kernels=True, **options)
    try:
        ours = run(temps)
    finally:
        unregister_fused_kernels()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    st = token_logprobs(h, w, ids, temperature=temps, return_entropy=True, backend="naive", **options)
    (st.logp.sum() + 0.1 * st.entropy.sum()).backward()
    for a, b in zip(ours, (st.logp, st.entropy, h.grad, w.grad)):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fused_kernels=True"):
        register(softcap=2.0)


def test_fused_kernel_takes_the_head_options_and_a_per_token_temperature():
    """verl's fused kernel `linear_cross_entropy` (the FSDP backend's impl "triton" patches and the Megatron
    backend's fused forward) routed to gro_linear_cross_entropy applies register's head options and a
    temperature tensor shaped like the labels. Reference: the naive backend."""
    from verl.utils.kernel import linear_cross_entropy as kernel_module
    from gro_kernels.integrations.verl import unregister_fused_kernels
    from gro_kernels import token_logprobs
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 7, 16, generator=g)
    weight = 0.5 * torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    temps = torch.linspace(0.6, 1.4, 14).reshape(2, 7)
    options = dict(softcap=2.0, head_precision="fp32", top_k=5, min_p=0.05)
    register(fused_kernels=True, **options)
    try:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = kernel_module.linear_cross_entropy(h, w, labels, temps, "none", None)
        (logp.sum() + 0.1 * ent.sum()).backward()
        with pytest.raises(ValueError, match="shaped like labels"):
            kernel_module.linear_cross_entropy(h, w, labels, temps[0], "none", None)
    finally:
        unregister_fused_kernels()
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    st = token_logprobs(hr, wr, labels, temperature=temps, return_entropy=True, backend="naive", **options)
    (st.logp.sum() + 0.1 * st.entropy.sum()).backward()
    for a, b in zip((logp, ent, h.grad, w.grad), (st.logp.reshape(-1), st.entropy.reshape(-1), hr.grad, wr.grad)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-5)
