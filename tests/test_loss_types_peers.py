"""The issue-9 loss types against the peer libraries themselves, on the same inputs.

Liger-Kernel's fused GRPO loss (hidden states in, loss out); TRL's GRPOTrainer, DPOTrainer and
KTOTrainer loss code run through stand-in trainers; verl's policy losses and KL penalties;
OpenRLHF's PolicyLoss. `make install` installs them all (Liger and TRL through the `test` extra,
verl and OpenRLHF without their dependencies); each is imported with importorskip, so a machine
without one skips its tests.
Liger computes its log-probs in float32, so it is matched to 1e-5 relative; TRL and verl work in
the inputs' float64 and are matched to 1e-7 or better.
"""
import pytest
import torch

from gro_kernels.loss import gro_loss
from gro_kernels.objective import gro_objective
from gro_kernels.objective import corrections
from gro_kernels.objective.options import resolve_options
from gro_kernels.objective.surrogates import kl_estimate

B, T, D, V = 6, 5, 8, 24
LIGER_TOL = dict(rtol=1e-5, atol=1e-6)   # Liger's float32 log-probs


def _batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype)
    weight = 0.5 * torch.randn(V, D, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[4, 2:] = False
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
    old = torch.where(mask, logp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype), 0.0)
    ref = torch.where(mask, logp + 0.2 * torch.randn(B, T, generator=g, dtype=dtype), 0.0)
    rollout = torch.where(mask, old + 0.8 * torch.randn(B, T, generator=g, dtype=dtype), 0.0)
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.3], dtype=dtype)
    return hidden, weight, targets, mask, old, ref, rollout, adv


# ---- Liger-Kernel 0.8.5: LigerFusedLinearGRPOLoss --------------------------------------------

LIGER_CASES = [  # (liger kwargs, gro method, gro options, with KL)
    (dict(loss_type="bnpo"), "bnpo", {}, False),
    (dict(loss_type="sapo"), "sapo", {}, False),
    (dict(loss_type="sapo", sapo_temperature_pos=2.0, sapo_temperature_neg=0.5), "sapo",
     dict(sapo_temperature_pos=2.0, sapo_temperature_neg=0.5), False),
    (dict(loss_type="luspo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4), "luspo", {}, False),
    (dict(loss_type="vespo"), "vespo", {}, False),
    (dict(loss_type="dapo", delta=1.2, epsilon_high=0.28), "dapo", dict(delta=1.2), False),
    (dict(loss_type="grpo", use_bias_correction_kl=True), "grpo", dict(use_bias_correction_kl=True), True),
    (dict(loss_type="dapo", epsilon_high=0.28, use_bias_correction_kl=True), "dapo",
     dict(use_bias_correction_kl=True, kl_coef=0.04), True),
]


@pytest.mark.parametrize("case", LIGER_CASES, ids=lambda c: c[1] + "-" + "-".join(f"{k}={v}" for k, v in c[2].items()))
def test_against_liger_grpo(case):
    liger = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    kwargs, method, options, with_kl = case
    hidden, weight, targets, mask, old, ref, _, adv = _batch()
    beta = 0.04 if with_kl else 0.0
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    peer = liger.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=with_kl, chunk_size=1, **kwargs)
    want, _ = peer(h1, w1, targets, mask.long(), adv, ref_per_token_logps=ref if with_kl else None,
                   old_per_token_logps=old)
    want_grads = torch.autograd.grad(want, (h1, w1))

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    extra = dict(ref_logp=ref) if with_kl else {}
    if method == "grpo":
        options = dict(options, kl_coef=beta)
    out = gro_loss(h2, w2, targets, method=method, mask=mask, advantages=adv, old_logp=old, backend="naive",
                   **extra, **options)
    got_grads = torch.autograd.grad(out.loss, (h2, w2))
    torch.testing.assert_close(out.loss, want.to(out.loss.dtype), **LIGER_TOL)
    for got, ref_g in zip(got_grads, want_grads):
        assert ref_g.abs().max() > 1e-6
        torch.testing.assert_close(got, ref_g, **LIGER_TOL)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_rollout_correction_against_liger_with_trl_ratio(mode):
    """TRL's importance_sampling_ratio (formula copied from no peer: computed here as TRL documents it)
    given to Liger as vllm_is_ratio, against gro_objective's own rollout_correction from rollout_logp."""
    liger = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    hidden, weight, targets, mask, old, _, rollout, adv = _batch(seed=1)
    d = (old - rollout) * mask
    ratio = torch.exp(d.sum(-1, keepdim=True)) if mode.startswith("sequence") else torch.exp(d)
    ratio = ratio.clamp(max=3.0) if mode.endswith("truncate") else ratio.masked_fill(ratio > 3.0, 0.0)
    assert mode.endswith("truncate") or (ratio == 0).any()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    peer = liger.LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, loss_type="dapo",
                                          epsilon_high=0.28)
    want, _ = peer(h1, w1, targets, mask.long(), adv, old_per_token_logps=old, vllm_is_ratio=ratio)
    want_grads = torch.autograd.grad(want, (h1, w1))

    from gro_kernels.logprobs import token_logprobs
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = token_logprobs(h2, w2, targets, backend="naive").logp
    out = gro_objective(logp, method="dapo", mask=mask, advantages=adv, old_logp=old, rollout_logp=rollout,
                        rollout_correction=mode)
    got_grads = torch.autograd.grad(out.loss, (h2, w2))
    torch.testing.assert_close(out.loss, want.to(out.loss.dtype), **LIGER_TOL)
    for got, ref_g in zip(got_grads, want_grads):
        torch.testing.assert_close(got, ref_g, **LIGER_TOL)


# ---- TRL 1.16: GRPOTrainer's static helpers --------------------------------------------------

def test_off_policy_mask_and_vespo_weight_against_trl():
    trl = pytest.importorskip("trl.trainer.grpo_trainer")
    _, _, _, mask, old, _, rollout, adv = _batch(seed=2)
    m = mask.to(old.dtype)
    logp = old + 0.05
    opts = resolve_options("dapo", dict(off_policy_mask_threshold=0.02))
    A = adv[:, None] * m
    ours = corrections.off_policy_mask(opts, A, logp, rollout, m)
    want = trl.GRPOTrainer.get_off_policy_mask(adv[:, None], logp, rollout, m, 0.02)
    assert 0 < want.sum() < B
    torch.testing.assert_close(ours[:, 0], want[:, 0].to(ours.dtype))

    opts = resolve_options("vespo", {})
    is_ratio = torch.exp((old - rollout) * m).clamp(max=3.0)
    ours = corrections.vespo_weight(opts, A, logp, old, m, is_ratio)
    want = trl.GRPOTrainer.get_gamma_weights(adv[:, None], logp - old, m, is_ratio)
    torch.testing.assert_close(ours[:, 0], want[:, 0], rtol=1e-12, atol=1e-12)


# ---- verl 0.9.1: policy losses and KL penalties ----------------------------------------------

def _verl():
    pytest.importorskip("ray")
    algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig
    return algos, ActorConfig, PolicyLossConfig


VERL_CASES = [  # (verl policy loss, verl config, gro method, gro options)
    ("vanilla", dict(clip_ratio=0.2, clip_ratio_c=1.1), "dapo", dict(eps_high=0.2, clip_ratio_c=1.1)),
    ("gpg", {}, "gpg", {}),
    ("geo_mean", dict(clip_ratio_low=0.4, clip_ratio_high=0.4), "geo_mean", {}),
    ("sapo", {}, "sapo", {}),
    ("clip_cov", dict(clip_ratio=0.2, policy_loss=dict(clip_cov_ratio=0.15)), "clip_cov", dict(clip_cov_ratio=0.15)),
    ("kl_cov", dict(policy_loss=dict(kl_cov_ratio=0.1, ppo_kl_coef=0.5)), "kl_cov", dict(kl_cov_ratio=0.1, ppo_kl_coef=0.5)),
]


@pytest.mark.parametrize("case", VERL_CASES, ids=lambda c: c[0])
def test_policy_losses_against_verl(case):
    algos, ActorConfig, PolicyLossConfig = _verl()
    name, cfg, method, options = case
    cfg = dict(cfg)
    policy = PolicyLossConfig(**cfg.pop("policy_loss", {}))
    config = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, policy_loss=policy, **cfg)
    _, _, _, mask, old, _, _, adv = _batch(seed=3)
    mask[1] = True  # verl's sequence means count only non-empty rows; here every row is non-empty
    m = mask.to(old.dtype)
    logp = (old + 0.25 * torch.randn(B, T, generator=torch.Generator().manual_seed(9), dtype=old.dtype)) * m
    A = adv[:, None] * m
    if name == "clip_cov":   # make the covariance band (1, 5) hold a few tokens
        A = A * 4
    l1 = logp.clone().requires_grad_()
    torch.manual_seed(0)
    want, _ = algos.get_policy_loss_fn(name)(old_log_prob=old, log_prob=l1, advantages=A, response_mask=m,
                                             loss_agg_mode="token-mean", config=config)
    (want_grad,) = torch.autograd.grad(want, l1)
    l2 = logp.clone().requires_grad_()
    torch.manual_seed(0)
    old_logp = {"old_logp": old} if method != "gpg" else {}  # gpg's logp surrogate has no ratio (refused)
    out = gro_objective(l2, method=method, mask=mask, advantages=A, **old_logp, **options)
    (got_grad,) = torch.autograd.grad(out.loss, l2)
    assert want_grad.abs().max() > 1e-6
    torch.testing.assert_close(out.loss, want, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-9)


def test_gpg_advantage_against_verl():
    algos, _, _ = _verl()
    import numpy as np
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0], dtype=torch.float64)
    groups = torch.tensor([0, 1, 0, 1, 1, 0])
    m = torch.ones(B, T, dtype=torch.float64)
    token_rewards = torch.zeros(B, T, dtype=torch.float64)
    token_rewards[:, -1] = rewards
    want, _ = algos.compute_gpg_outcome_advantage(token_rewards, m, np.array(groups.tolist()))
    out = gro_objective(torch.zeros(B, T, dtype=torch.float64, requires_grad=True), method="gpg",
                        rewards=rewards, group_ids=groups)
    torch.testing.assert_close(out.per_token["advantages"], want)


@pytest.mark.parametrize("ours,theirs", [("k1", "k1"), ("k2", "k2"), ("abs", "abs"), ("low_var_kl", "low_var_kl"),
                                          ("low_var_kl", "k3"), ("k1+", "k1+"), ("low_var_kl+", "k3+"),
                                          ("low_var_kl+", "low_var_kl+"), ("abs+", "abs+")])
def test_kl_estimators_against_verl(ours, theirs):
    algos, _, _ = _verl()
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(40, dtype=torch.float64, generator=g)
    logp = ref + 3 * torch.randn(40, dtype=torch.float64, generator=g)
    logp[0], logp[1] = ref[0] + 25.0, ref[1] - 25.0   # the clamps bite
    l1, l2 = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    want = algos.kl_penalty(l1, ref, theirs)
    got = kl_estimate(ours, l2, ref)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), l2)[0], torch.autograd.grad(want.sum(), l1)[0])


# ---- TRL 1.16: DPOTrainer's loss types, through its own _compute_loss ------------------------

def _trl_dpo_loss(logp, ref, m, loss_types, loss_weights=None, beta=0.1, label_smoothing=0.0,
                  f_divergence_type="reverse_kl", f_alpha=0.5, log_sum_sq_probs=None, ld_alpha=None):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs: a stand-in trainer carries the
    options, a stand-in model returns `logp` as its fused-head log-probs. Rows: [chosen..., rejected...]."""
    from collections import defaultdict
    from types import SimpleNamespace
    from trl.trainer.dpo_trainer import DPOTrainer
    n = logp.shape[0] // 2
    R = (ref * m).sum(1)
    completion_mask = torch.cat([torch.zeros(2 * n, 1, dtype=torch.long), m.long()], 1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask,
              "ref_chosen_logps": R[:n], "ref_rejected_logps": R[n:]}
    outputs = SimpleNamespace(log_probs=logp * m, entropy=torch.zeros_like(logp), mean_logits=torch.zeros_like(logp),
                              is_top1=torch.zeros_like(m, dtype=torch.bool), log_sum_sq_probs=log_sum_sq_probs)
    identity = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x, device=logp.device)
    trainer = SimpleNamespace(
        beta=beta, loss_types=list(loss_types), loss_weights=list(loss_weights or [1.0] * len(loss_types)),
        label_smoothing=label_smoothing, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha,
        ld_alpha=ld_alpha, precompute_ref_logps=False, use_weighting=log_sum_sq_probs is not None, aux_loss_enabled=False,
        ref_model=lambda **kw: SimpleNamespace(log_probs=ref * m),
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False), accelerator=identity,
        args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1, _is_vision_dataset=False)
    return DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)


TRL_DPO_CASES = [
    (("sigmoid",), {}, {}), (("hinge",), {}, {}), (("ipo",), {}, {}), (("robust",), {"label_smoothing": 0.2}, {}),
    (("bco_pair",), {}, {}), (("sppo_hard",), {}, {}), (("aot",), {"label_smoothing": 0.1}, {}),
    (("aot_unpaired",), {}, {}), (("apo_zero",), {}, {}), (("apo_down",), {}, {}),
    (("exo_pair",), {"label_smoothing": 0.1}, {}), (("nca_pair",), {}, {}), (("discopop",), {}, {}),
    (("sigmoid_norm",), {}, {}), (("sigmoid", "bco_pair", "sft"), {"loss_weights": (0.8, 0.2, 1.0)}, {}),
    (("sigmoid",), {"f_divergence_type": "js_divergence"}, {}),
    (("hinge",), {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, {}),
    (("ipo",), {"f_divergence_type": "forward_kl"}, {}),
    # WPO: TRL 1.16 scales each per-pair loss in place, which fails for `sft` (an expanded scalar)
    # and breaks the backward of `hinge` (relu's saved output); the loss types it runs are compared.
    (("sigmoid",), {"use_weighting": True}, {}), (("ipo",), {"use_weighting": True}, {}),
    (("apo_zero", "bco_pair"), {"use_weighting": True, "loss_weights": (1.0, 0.3)}, {}),
    (("sigmoid", "sft"), {"ld_alpha": 0.4, "loss_weights": (1.0, 0.5)}, {}),
    (("ipo", "aot"), {"ld_alpha": 0.0, "label_smoothing": 0.1}, {}),
]


@pytest.mark.parametrize("case", TRL_DPO_CASES, ids=lambda c: "+".join(c[0]) + "".join(f"-{k}={v}" for k, v in c[1].items()))
def test_pair_losses_against_trl_dpo_trainer(case):
    pytest.importorskip("trl.trainer.dpo_trainer")
    kinds, options, _ = case
    g = torch.Generator().manual_seed(5)
    n, L = 4, 5
    m = torch.ones(2 * n, L, dtype=torch.float64)
    m[1, 3:] = 0
    m[6, 2:] = 0
    logp = -3 * torch.rand(2 * n, L, generator=g, dtype=torch.float64) * m
    ref = (logp + 0.5 * torch.randn(2 * n, L, generator=g, dtype=torch.float64)) * m
    # TRL keeps exo_pair's log(label_smoothing) in float32 and has no float64 clamp for the alpha
    # divergence (KeyError): those two are compared in float32 terms.
    tol = dict(rtol=1e-10, atol=1e-12)
    peer_dtype = torch.float64
    if "exo_pair" in kinds:
        tol = dict(rtol=1e-7, atol=1e-9)
    if options.get("f_divergence_type") == "alpha_divergence":
        tol, peer_dtype = dict(rtol=2e-5, atol=1e-6), torch.float32
    lssp = None
    if options.get("use_weighting"):   # a log sum_v p_v^2 per token, at least the token's own 2 l
        lssp = torch.maximum(2 * logp, logp - torch.rand(2 * n, L, generator=g, dtype=torch.float64)) * m
        options = dict(options, log_sum_sq_probs=lssp)
    l1 = logp.to(peer_dtype).requires_grad_()
    want = _trl_dpo_loss(l1, ref.to(peer_dtype), m.to(peer_dtype), kinds, loss_weights=options.get("loss_weights"),
                         log_sum_sq_probs=lssp, ld_alpha=options.get("ld_alpha"),
                         label_smoothing=options.get("label_smoothing", 0.0),
                         f_divergence_type=options.get("f_divergence_type", "reverse_kl"),
                         f_alpha=options.get("f_alpha_divergence_coef", 0.5))
    (want_grad,) = torch.autograd.grad(want, l1)
    l2 = logp.clone().requires_grad_()
    out = gro_objective(l2, method="dpo", mask=m > 0, ref_logp=ref, group_ids=torch.arange(2 * n) % n,
                        labels=torch.tensor([1] * n + [-1] * n), pair_loss=kinds if len(kinds) > 1 else kinds[0],
                        **options)
    (got_grad,) = torch.autograd.grad(out.loss, l2)
    assert want_grad.abs().max() > 1e-6
    torch.testing.assert_close(out.loss, want.to(out.loss.dtype), **tol)
    torch.testing.assert_close(got_grad, want_grad.to(got_grad.dtype), **tol)


# ---- TRL 1.16: KTOTrainer (kto with its batch KL as z0, apo_zero_unpaired; class weights) -----

@pytest.mark.parametrize("loss_type,weights", [("kto", (1.0, 1.0)), ("kto", (1.0, 1.33)), ("apo_zero_unpaired", (0.7, 1.5))])
def test_kto_losses_against_trl_kto_trainer(loss_type, weights):
    pytest.importorskip("trl.trainer.kto_trainer")
    from collections import defaultdict
    from types import SimpleNamespace
    from trl.trainer.kto_trainer import KTOTrainer
    g = torch.Generator().manual_seed(6)
    n, L = 7, 5
    m = torch.ones(n, L, dtype=torch.float64)
    m[2, 3:] = 0
    labels = torch.tensor([True, False, True, True, False, False, True])
    logp = -3 * torch.rand(n, L, generator=g, dtype=torch.float64) * m
    ref = (logp + 0.5 * torch.randn(n, L, generator=g, dtype=torch.float64)) * m
    KL_logps, ref_KL_logps = -torch.rand(n, generator=g, dtype=torch.float64) * 5, -torch.rand(n, generator=g, dtype=torch.float64) * 5
    calculate_KL = loss_type == "kto"
    z0 = float((KL_logps - ref_KL_logps).mean().clamp(min=0)) if calculate_KL else 0.0

    l1 = logp.clone().requires_grad_()
    completion_mask = torch.cat([torch.zeros(n, 1, dtype=torch.long), m.long()], 1)
    batch = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
             "completion_mask": completion_mask, "label": labels, "ref_logps": (ref * m).sum(1),
             "ref_KL_logps": ref_KL_logps}
    outputs = SimpleNamespace(log_probs=l1 * m, entropy=torch.zeros_like(l1), mean_logits=torch.zeros_like(l1))
    identity = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x, device=l1.device)
    trainer = SimpleNamespace(
        beta=0.1, loss_type=loss_type, calculate_KL=calculate_KL, desirable_weight=weights[0],
        undesirable_weight=weights[1], precompute_ref_logps=True, aux_loss_enabled=False,
        model=SimpleNamespace(training=True), accelerator=identity, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, _compute_kl_logps=lambda model, b: KL_logps if calculate_KL else None)
    want = KTOTrainer._compute_loss(trainer, lambda **kw: outputs, batch, return_outputs=False)
    (want_grad,) = torch.autograd.grad(want, l1)

    l2 = logp.clone().requires_grad_()
    options = dict(anchor_value=z0) if loss_type == "kto" else {}
    out = gro_objective(l2, method=loss_type, mask=m > 0, ref_logp=ref, labels=torch.where(labels, 1, -1),
                        pos_coef=weights[0], neg_coef=weights[1], **options)
    (got_grad,) = torch.autograd.grad(out.loss, l2)
    assert z0 > 0 or not calculate_KL
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


# ---- OpenRLHF 0.11.2: PolicyLoss (ICEPOP, seq-mask-tis, TIS, dual clip) ------------------------

def _openrlhf_policy_loss():
    """OpenRLHF's PolicyLoss class from its own source file. Importing the package pulls in
    deepspeed and peft, so loss.py is executed alone with its one helper (masked_mean) supplied."""
    import importlib.util
    import os
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openrlhf is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "loss.py")
    src = open(path).read().replace("from .utils import masked_mean", "")
    scope = {"masked_mean": lambda t, mask, dim=None: t.mean(dim=dim) if mask is None
             else (t * mask).sum(dim=dim) / mask.sum(dim=dim)}
    exec(compile(src, path, "exec"), scope)
    return scope["PolicyLoss"]


@pytest.mark.parametrize("peer,ours", [
    (dict(is_correction_level="token", is_correction_mode="mask"), dict(rollout_correction="icepop")),
    (dict(is_correction_level="seq", is_correction_mode="mask", is_correction_threshold=(0.8, 1.3)),
     dict(rollout_correction="seq_mask_tis", rollout_clip_min=0.8, rollout_clip_max=1.3)),   # drops 2 of 6 rows
    (dict(is_correction_level="token", is_correction_mode="clip"),
     dict(rollout_correction="token_truncate", rollout_clip_min=0.5, rollout_clip_max=5.0)),
    (dict(dual_clip=1.1), dict(clip_ratio_c=1.1)),
], ids=["icepop", "seq_mask_tis", "tis", "dual_clip"])
def test_rollout_corrections_against_openrlhf(peer, ours):
    PolicyLoss = _openrlhf_policy_loss()
    _, _, _, mask, old, _, rollout, adv = _batch(seed=7)
    m = mask.to(old.dtype)
    logp = (old + 0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(8), dtype=old.dtype)) * m
    A = adv[:, None] * m
    l1 = logp.clone().requires_grad_()
    want, *_ = PolicyLoss(**peer)(l1, old, A, action_mask=m, rollout_log_probs=rollout)
    (want_grad,) = torch.autograd.grad(want, l1)
    l2 = logp.clone().requires_grad_()
    extra = dict(rollout_logp=rollout) if "rollout_correction" in ours else {}
    out = gro_objective(l2, method="dapo", eps_high=0.2, mask=mask, advantages=A, old_logp=old, **extra, **ours)
    (got_grad,) = torch.autograd.grad(out.loss, l2)
    assert want_grad.abs().max() > 1e-6
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


# ---- TRL 1.16: GRPOTrainer's own loss, end to end --------------------------------------------

def _trl_is_ratio(old, sampling, m, mode, clip_min=None, clip_max=3.0):
    """TRL's importance_sampling_ratio as _generate_and_score_completions forms it (not callable alone)."""
    d = torch.nan_to_num((old - sampling) * m, nan=0.0)
    d = d.sum(-1, keepdim=True) if mode.startswith("sequence") else d
    ratio = torch.exp(d)
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -float("inf")
    hi = clip_max if clip_max is not None else float("inf")
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def _trl_grpo_loss(logp, entropy, m, adv, old, ref, sampling, *, loss_type, beta=0.0, eps_high=0.28, is_mode=None,
                   entropy_coef=0.0, top_entropy_quantile=1.0, off_policy=None, bias_kl=False, level="token"):
    """GRPOTrainer._compute_loss with a stand-in trainer and model that return the given log-probs
    and entropies; one process, no gradient accumulation."""
    from collections import defaultdict
    from types import SimpleNamespace
    from trl.trainer.grpo_trainer import GRPOTrainer
    Bn, Tn = logp.shape
    acc = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x,
                          pad_across_processes=lambda x, dim=0, pad_index=0: x, num_processes=1, sync_gradients=True)
    args = SimpleNamespace(use_bias_correction_kl=bias_kl, delta=None, sapo_temperature_pos=1.0,
                           sapo_temperature_neg=1.25, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                           vespo_lambda_neg=2.0, steps_per_generation=1)
    t = SimpleNamespace(
        top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=off_policy, importance_sampling_level=level,
        beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high, use_vllm=is_mode is not None,
        vllm_importance_sampling_correction=is_mode is not None, current_gradient_accumulation_steps=1,
        max_completion_length=Tn, model=SimpleNamespace(training=True), accelerator=acc, args=args,
        _entropy_bonus_enabled=entropy_coef != 0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, get_gamma_weights=GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, entropy, None))
    t.get_high_entropy_mask = lambda e, mk, thr: GRPOTrainer.get_high_entropy_mask(t, e, mk, thr)
    inputs = {"prompt_ids": torch.zeros(Bn, 1, dtype=torch.long), "prompt_mask": torch.ones(Bn, 1, dtype=torch.long),
              "completion_ids": torch.zeros(Bn, Tn, dtype=torch.long), "completion_mask": m.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": m.sum(), "sampling_per_token_logps": sampling}
    if is_mode is not None:
        inputs["importance_sampling_ratio"] = _trl_is_ratio(old, sampling, m, is_mode)
    return GRPOTrainer._compute_loss(t, None, inputs)


TRL_GRPO_CASES = [  # (TRL loss_type and options, gro method and options)
    (dict(loss_type="grpo", beta=0.04, bias_kl=True, entropy_coef=0.01, top_entropy_quantile=0.5, off_policy=0.02,
          is_mode="token_truncate"),
     ("grpo", dict(kl_coef=0.04, eps_high=0.28, use_bias_correction_kl=True, entropy_coef=0.01, entropy_agg="token_mean",
                   top_entropy_quantile=0.5, off_policy_mask_threshold=0.02, rollout_correction="token_truncate"))),
    (dict(loss_type="dapo", entropy_coef=0.02, is_mode="sequence_mask"),
     ("dapo", dict(entropy_coef=0.02, entropy_agg="token_mean", rollout_correction="sequence_mask"))),
    (dict(loss_type="sapo", off_policy=0.02, is_mode="token_mask"),   # tau_neg 1.25: TRL rounds it to float32
     ("sapo", dict(off_policy_mask_threshold=0.02, rollout_correction="token_mask", sapo_temperature_neg=1.25))),
    (dict(loss_type="luspo", level="sequence", beta=0.04, bias_kl=True, eps_high=4e-4),
     ("luspo", dict(kl_coef=0.04, use_bias_correction_kl=True, eps_low=0.2))),
    (dict(loss_type="vespo", entropy_coef=0.01, is_mode="token_truncate"),
     ("vespo", dict(entropy_coef=0.01, entropy_agg="token_mean", rollout_correction="token_truncate"))),
    (dict(loss_type="cispo", eps_high=5.0, is_mode="sequence_truncate"),
     ("cispo", dict(rollout_correction="sequence_truncate"))),
    (dict(loss_type="bnpo", top_entropy_quantile=0.3, entropy_coef=0.01),
     ("bnpo", dict(eps_high=0.28, top_entropy_quantile=0.3, entropy_coef=0.01, entropy_agg="token_mean"))),
    (dict(loss_type="dr_grpo", beta=0.04), ("dr_grpo", dict(kl_coef=0.04, eps_high=0.28))),
]


@pytest.mark.parametrize("case", TRL_GRPO_CASES, ids=lambda c: c[1][0] + "-" + "-".join(sorted(c[1][1])))
def test_grpo_loss_types_and_corrections_against_trl_grpo_trainer(case):
    pytest.importorskip("trl.trainer.grpo_trainer")
    trl_kw, (method, options) = case
    hidden, weight, targets, mask, old, ref, rollout, adv = _batch(seed=13)
    m = mask.to(old.dtype)
    g = torch.Generator().manual_seed(11)
    logp = (old + 0.2 * torch.randn(B, T, generator=g, dtype=old.dtype)) * m
    # float32-representable entropies: TRL takes the quantile threshold in float32, which could
    # otherwise round the token at the threshold out of the selection.
    entropy = (2 * torch.rand(B, T, generator=g, dtype=old.dtype)).float().double() * m
    l1, h1 = logp.clone().requires_grad_(), entropy.clone().requires_grad_()
    want = _trl_grpo_loss(l1, h1, m, adv, old, ref, rollout, **trl_kw)
    want_grads = torch.autograd.grad(want, (l1, h1), allow_unused=True)
    l2, h2 = logp.clone().requires_grad_(), entropy.clone().requires_grad_()
    extra = dict(rollout_logp=rollout) if ("rollout_correction" in options or "off_policy_mask_threshold" in options) else {}
    if method == "dr_grpo":
        options = dict(options, max_completion_length=T)
    out = gro_objective(l2, method=method, mask=mask, entropy=h2, advantages=adv, old_logp=old, ref_logp=ref,
                        **extra, **options)
    got_grads = torch.autograd.grad(out.loss, (l2, h2), allow_unused=True)
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    assert want_grads[0].abs().max() > 1e-6
    for name in ("rollout_correction", "off_policy_mask_threshold", "top_entropy_quantile", "use_bias_correction_kl"):
        if name in options:   # each correction is active on this batch
            without = {k: v for k, v in options.items() if k != name}
            kw = extra if ("rollout_correction" in without or "off_policy_mask_threshold" in without) else {}
            other = gro_objective(logp, method=method, mask=mask, entropy=entropy, advantages=adv, old_logp=old,
                                  ref_logp=ref, **kw, **without)
            assert abs(float(other.loss.detach()) - float(out.loss.detach())) > 1e-9, f"{name} changes nothing here"
    for got, w in zip(got_grads, want_grads):
        if w is None:
            assert got is None or got.abs().max() == 0
        else:
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)
