"""Every option is read or refused (issue 15 item 3): for every option of the table and a set of
representative configurations, setting it to a value other than the configuration's own either
changes what `gro_loss` returns (the loss, a gradient, or the reported KL) or is an error that
names the option. Options accepted and ignored (the loss and gradient bit-identical with and
without them) are the silent wrong answers this guards against.

Data-driven: the audit iterates over `OPTIONS` and fails for an option it has no values for, so an
option added later is audited too (add its values to AUDIT_VALUES)."""
import pytest
import torch

from gro_kernels import gro_loss, gro_objective
from gro_kernels.objective.inputs import read_inputs
from gro_kernels.objective.options import OPTIONS, resolve_options

F64 = dict(dtype=torch.float64)
B, T, D, V = 8, 5, 6, 11

# Values to try per option: the first that differs from the configuration's own value is used.
AUDIT_VALUES = {
    "score": ["implicit", "reward"], "anchor": ["batch_mean", "group_mean"], "anchor_value": [0.3, 0.0],
    "separation": ["positive", "anchor"], "weighting": ["constant", "linear"], "scale": ["batch_std", "none"],
    "std_eps": [0.5], "beta": [0.37], "margin": [0.4], "label_smoothing": [0.15], "pos_coef": [1.7],
    "neg_coef": [0.6], "offline_coef": [0.4], "length_normalize": [True, False],
    "surrogate": ["cispo", "logp"], "importance_sampling": ["sequence", "token"], "eps_low": [0.05],
    "eps_high": [0.05], "delta": [1.05], "clip_ratio_c": [1.01], "sapo_temperature_pos": [2.5],
    "sapo_temperature_neg": [2.5], "vespo_k_pos": [1.5], "vespo_lambda_pos": [1.5], "vespo_k_neg": [1.5],
    "vespo_lambda_neg": [1.5], "clip_cov_ratio": [0.5], "clip_cov_lb": [-5.0], "clip_cov_ub": [50.0],
    "kl_cov_ratio": [0.5], "ppo_kl_coef": [3.0], "rollout_correction": ["token_truncate"],
    "rollout_clip_min": [0.9], "rollout_clip_max": [1.1], "off_policy_mask_threshold": [0.01],
    "top_entropy_quantile": [0.5], "mask_truncated_completions": [True], "pair_loss": ["hinge"],
    "loss_weights": [(2.0,)], "discopop_tau": [0.2], "use_weighting": [True], "ld_alpha": [0.5],
    "f_divergence_type": ["js_divergence"], "f_alpha_divergence_coef": [0.3], "kl_coef": [0.3],
    "kl_estimator": ["k2", "k1"], "kl_placement": ["reward", "loss"], "use_bias_correction_kl": [True],
    "entropy_coef": [0.05], "entropy_agg": ["token_mean", "loss"],
    "loss_agg": ["seq_mean_token_sum", "token_mean"], "max_completion_length": [17], "temperature": [0.7],
    "z_loss_coef": [0.05], "reduction": ["sum", "mean"],
    # issue 19: offline rows and teachers
    "offline_role": ["sft", "group"], "offline_surrogate": ["shaping", "logp"], "shaping_gamma": [0.3], "mu": [0.4],
    "switch_threshold": [0.0, 0.5], "offline_neg_coef": [0.0], "nll_coef": [0.5], "distill_coef": [0.5],
    "divergence": ["forward_kl", "reverse_kl"], "jsd_beta": [0.3],
}

# (name, method, options every call of it carries, given advantages instead of rewards / labels). hpt: a
# threshold at which the offline row's group learns it by SFT (at 0 every group here is RL, and the
# offline-row options have nothing to act on in this batch).
CONFIGS = [
    ("grpo", "grpo", {}, False), ("dapo", "dapo", {}, False), ("dr_grpo", "dr_grpo", {}, False),
    ("gspo", "gspo", {}, False), ("cispo", "cispo", {}, False), ("rloo", "rloo", {}, False),
    ("remax", "remax", {}, False), ("reinforce_pp", "reinforce_pp", {}, False), ("gro", "gro", {}, False),
    ("dpo", "dpo", {}, False), ("ipo", "ipo", {}, False), ("simpo", "simpo", {}, False),
    ("kto", "kto", {"anchor_value": 0.1}, False), ("sft", "sft", {}, False),
    ("dapo+advantages", "dapo", {}, True), ("rloo+advantages", "rloo", {}, True),
    ("luffy", "luffy", {}, False), ("chord", "chord", {}, False), ("hpt", "hpt", {"switch_threshold": 0.45}, False),
    ("orpo", "orpo", {}, False), ("cpo", "cpo", {}, False), ("distill", "distill", {}, False),
    ("distill-jsd", "distill", {"divergence": "jsd"}, False),
]


def _data():
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(B, T, D, generator=g, **F64), torch.randn(V, D, generator=g, **F64)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.arange(T)[None, :] >= torch.tensor([5, 4, 5, 3, 5, 5, 2, 4])[:, None]] = -100
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    noise = lambda s: s * torch.randn(B, T, generator=g, **F64)  # noqa: E731
    return dict(hidden=hidden, weight=weight, targets=targets, old_logp=logp + noise(0.4),
                ref_logp=logp + noise(0.5), rollout_logp=logp + noise(0.4), advantages=torch.randn(B, T, generator=g, **F64),
                ref_hidden=hidden + 0.3 * torch.randn(B, T, D, generator=g, **F64),
                ref_weight=weight + 0.3 * torch.randn(V, D, generator=g, **F64),
                teacher_hidden=torch.randn(B, T, D + 3, generator=g, **F64),
                teacher_weight=torch.randn(V, D + 3, generator=g, **F64))


DATA = _data()


def _call(method, base, options, advantages):
    """gro_loss with the inputs the resolved configuration reads: (loss, grads, kl metric)."""
    o = resolve_options(method, {**base, **options})
    d = DATA
    kw = dict(group_ids=torch.arange(B) // 2, old_logp=d["old_logp"], ref_logp=d["ref_logp"],
              offline=torch.tensor([False] * 7 + [True]))
    if advantages:
        kw["advantages"] = d["advantages"]
    else:
        kw.update(rewards=torch.tensor([1.0, 0.2, 0.5, 0.9, 0.0, 0.7, 0.4, 0.3], **F64),
                  labels=torch.tensor([1, -1] * 4))
        if o.anchor == "baseline":
            kw["baselines"] = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.6, 0.4, 0.0, 0.8], **F64)
    if o.rollout_correction is not None or o.off_policy_mask_threshold is not None:
        kw["rollout_logp"] = d["rollout_logp"]
    if o.mask_truncated_completions:
        kw["truncated"] = torch.tensor([True, False, False, False, False, True, False, False])
    if o.kl_estimator == "full":
        kw.update(ref_hidden=d["ref_hidden"], ref_weight=d["ref_weight"])
    if o.distill_coef != 0:
        kw.update(teacher_hidden=d["teacher_hidden"], teacher_weight=d["teacher_weight"])
    kw = {k: v for k, v in kw.items() if k in read_inputs(method, {**kw, **base, **options})}  # else refused
    h, w = d["hidden"].clone().requires_grad_(), d["weight"].clone().requires_grad_()
    out = gro_loss(h, w, d["targets"], method=method, backend="naive", return_entropy=True, **kw, **base, **options)
    return out.loss.detach(), torch.autograd.grad(out.loss, (h, w)), out.metrics.get("kl")


def _same(a, b):
    loss_a, grads_a, kl_a = a
    loss_b, grads_b, kl_b = b
    return (torch.equal(loss_a, loss_b) and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))
            and ((kl_a is None and kl_b is None) or (kl_a is not None and kl_b is not None and torch.equal(kl_a, kl_b))))


def test_every_option_has_audit_values():
    missing = sorted(set(OPTIONS) - set(AUDIT_VALUES))
    assert not missing, f"options without audit values (add them to AUDIT_VALUES): {missing}"


@pytest.mark.parametrize("name,method,base,advantages", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_option_is_read_or_refused(name, method, base, advantages):
    baseline = _call(method, base, {}, advantages)
    resolved = resolve_options(method, base)
    ignored = []
    for option in OPTIONS:
        values = [v for v in AUDIT_VALUES.get(option, []) if v != resolved[option]]
        if option in base or not values:
            continue
        try:
            result = _call(method, base, {option: values[0]}, advantages)
        except (ValueError, TypeError) as e:
            assert option in str(e), f"{name}: {option}={values[0]!r} raised an error that does not name it: {e}"
            continue
        if _same(result, baseline):
            ignored.append(f"{option}={values[0]!r}")
    assert not ignored, f"{name}: accepted and ignored (loss, gradients and KL unchanged): {ignored}"


def test_temperature_is_refused_by_gro_objective():
    # gro_objective gets log-probs computed elsewhere: a temperature there cannot apply (it did nothing).
    logp = torch.full((2, 3), -1.0, **F64)
    with pytest.raises(ValueError, match="temperature"):
        gro_objective(logp, method="sft", temperature=0.7)


@pytest.mark.parametrize("option", [{"divergence": "forward_kl"}, {"divergence": "jsd", "jsd_beta": 0.3}])
def test_the_teacher_divergence_is_refused_by_gro_objective(option):
    # gro_objective gets the per-token divergence (`distill`) computed by token_logprobs: which divergence it
    # is was chosen there, and naming another here changed nothing (loss bit-identical before the refusal).
    logp, distill = torch.full((2, 3), -1.0, **F64), torch.full((2, 3), 0.2, **F64)
    with pytest.raises(ValueError, match=next(iter(option))):
        gro_objective(logp, method="distill", distill=distill, **option)


# Issue 15 item 3: each of these was accepted and ignored (loss and gradient bit-identical).
ISSUE_CASES = [("rloo", {}, True, "kl_coef", 0.3), ("ipo", {}, False, "label_smoothing", 0.1),
               ("kto", {"anchor_value": 0.1}, False, "label_smoothing", 0.1), ("dapo", {}, False, "label_smoothing", 0.1),
               ("kto", {"anchor_value": 0.1}, False, "margin", 0.5), ("dapo", {}, False, "max_completion_length", 7),
               ("grpo", {}, False, "max_completion_length", 7)]


@pytest.mark.parametrize("method,base,advantages,option,value", ISSUE_CASES,
                         ids=[f"{c[0]}-{c[3]}" + ("-advantages" if c[2] else "") for c in ISSUE_CASES])
def test_options_the_issue_found_ignored_are_refused(method, base, advantages, option, value):
    with pytest.raises(ValueError, match=option):
        _call(method, base, {option: value}, advantages)


# ---- issue 19's options on every path ----------------------------------------------------------------------
# (method, the configuration's own options, the option, its value). Each must change the result on the naive
# path, and the torch backend's fused pass (chunks cut inside rows), the composable path (token_logprobs, then
# gro_objective with the statistics) and GROLoss must give the naive path's loss and gradients with it.
ISSUE19_PATHS = [
    ("luffy", {}, "shaping_gamma", 0.3), ("chord", {}, "mu", 0.4), ("chord", {}, "offline_surrogate", "shaping"),
    ("hpt", {"switch_threshold": 0.45}, "switch_threshold", 0.0), ("gro", {}, "offline_neg_coef", 0.0),
    ("gro", {}, "offline_role", "sft"), ("orpo", {}, "nll_coef", 0.5), ("cpo", {}, "nll_coef", 0.5),
    ("distill", {}, "distill_coef", 0.5), ("distill", {}, "divergence", "forward_kl"),
    ("distill", {"divergence": "jsd"}, "jsd_beta", 0.3),
]


def _path(path, method, options):
    """(loss, grads wrt hidden and weight) of one path, with the inputs `_call` gives."""
    from gro_kernels import GROLoss, token_logprobs

    d, o = DATA, resolve_options(method, options)
    kw = dict(group_ids=torch.arange(B) // 2, old_logp=d["old_logp"], offline=torch.tensor([False] * 7 + [True]),
              rewards=torch.tensor([1.0, 0.2, 0.5, 0.9, 0.0, 0.7, 0.4, 0.3], **F64), labels=torch.tensor([1, -1] * 4))
    teacher = dict(teacher_hidden=d["teacher_hidden"], teacher_weight=d["teacher_weight"]) if o.distill_coef else {}
    kw = {k: v for k, v in kw.items() if k in read_inputs(method, {**kw, **options})}  # else refused
    h, w = d["hidden"].clone().requires_grad_(), d["weight"].clone().requires_grad_()
    small = dict(chunk_elements=3 * V)
    if path == "module":
        loss = GROLoss(method=method, **options)(h, w, d["targets"], backend="torch", backend_options=small, **kw,
                                                 **teacher).loss
    elif path == "composable":
        st = token_logprobs(h, w, d["targets"], backend="torch", return_entropy=True, divergence=o.divergence,
                            jsd_beta=o.jsd_beta, **small, **teacher)
        given = {k: v for k, v in options.items() if k not in ("divergence", "jsd_beta")}
        loss = gro_objective(st.logp, mask=d["targets"] != -100, entropy=st.entropy, distill=st.distill,
                             method=method, **kw, **given).loss
    else:
        loss = gro_loss(h, w, d["targets"], method=method, backend=path,
                        backend_options=small if path == "torch" else None, **kw, **teacher, **options).loss
    return loss.detach(), torch.autograd.grad(loss, (h, w))


@pytest.mark.parametrize("case", ISSUE19_PATHS, ids=lambda c: f"{c[0]}-{c[2]}={c[3]}")
def test_issue19_options_are_honoured_on_every_path(case):
    method, base, option, value = case
    want = _path("naive", method, {**base, option: value})
    without = _path("naive", method, base)
    assert not torch.allclose(want[1][1], without[1][1]), f"{option} changed nothing on the naive path"
    for path in ("torch", "composable", "module"):
        loss, grads = _path(path, method, {**base, option: value})
        torch.testing.assert_close(loss, want[0], rtol=1e-9, atol=1e-10, msg=f"{path}: loss")
        for g, wg in zip(grads, want[1]):
            torch.testing.assert_close(g, wg, rtol=1e-8, atol=1e-10, msg=f"{path}: gradient")
