"""Property-based fuzzing of `gro_loss` (hypothesis, float64): for random methods, shapes, masks,
options and chunk sizes, the chunked torch backend agrees with the naive backend (which builds
the logits and lets autograd differentiate) on the loss, the log-probs and the gradients of the
hidden states, the head weight and the bias; and nothing is NaN. Deterministic (derandomized) so
CI sees the same examples every run; 400 examples in about 20 s on 2 cores. The cases include the
exact KL placed in the reward with old_logp given, and vocabulary rows masked with a -inf bias
(issue 15 items 1 and 2: each made the torch backend disagree with naive, or gave NaN)."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from gro_kernels import gro_loss  # noqa: E402
from gro_kernels.objective.inputs import read_inputs  # noqa: E402

# The unification table's presets (the strategies below know their inputs); issue 9's loss types
# have their own formula and peer tests (tests/test_loss_types*.py).
METHODS = ("reinforce", "rloo", "remax", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce_pp",
           "dpo", "ipo", "cpl", "simpo", "kto", "sft", "gro",
           "luffy", "chord", "hpt", "orpo", "cpo", "distill")   # issue 19

PAIRWISE = ("dpo", "ipo", "cpl", "simpo", "orpo", "cpo")
REWARD = ("reinforce", "rloo", "remax", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce_pp", "gro",
          "luffy", "chord", "hpt", "distill")
LOSS_AGG = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
IGNORE = -100


@st.composite
def cases(draw, reference_head=False):
    """A random configuration; `reference_head`: a reward-scored method with the exact KL of a
    reference head (in the loss or the reward, old_logp given) and often masked vocabulary rows."""
    method = draw(st.sampled_from(REWARD if reference_head else METHODS))
    pairs = method in PAIRWISE
    B = 2 * draw(st.integers(1, 3)) if pairs else draw(st.integers(2, 6))
    case = dict(
        method=method, B=B, T=draw(st.integers(1, 6)), d=draw(st.integers(1, 8)), V=draw(st.integers(2, 40)),
        seed=draw(st.integers(0, 2**31 - 1)),
        chunk_elements=draw(st.sampled_from([1, 3, 17, 64, 2**21])),
        group_elements=draw(st.sampled_from([None, 1, 40, 2**21])),   # dz of several chunks per gradient GEMM
        mask_kind=draw(st.sampled_from(["none", "bool", "float01"])),
        bias=draw(st.booleans()),
        # vocabulary rows masked with a -inf bias (in the reference head too); issue 15 item 2
        masked_rows=draw(st.sampled_from([0, 1, 3] if reference_head else [0, 0, 1, 3])),
        options={},
    )
    o = case["options"]
    if draw(st.booleans()):
        o["temperature"] = draw(st.sampled_from([0.5, 1.0, 1.7]))
    if method in REWARD:
        o["kl_coef"] = draw(st.sampled_from([0.05, 0.5] if reference_head else [0.0, 0.05]))
        if o["kl_coef"]:  # (the objective refuses KL options it does not read)
            o["kl_estimator"] = "full" if reference_head else draw(st.sampled_from(["k1", "k2", "k3", "full"]))
            # the reward KL with the given old_logp below, the exact one included (issue 15 item 1)
            o["kl_placement"] = draw(st.sampled_from(["loss", "reward"]))
        if method != "reinforce_pp" and draw(st.booleans()):
            o["loss_agg"] = draw(st.sampled_from(LOSS_AGG))
        o["entropy_coef"] = draw(st.sampled_from([0.0, 0.01]))
        if method not in ("reinforce", "rloo", "remax", "cispo"):
            # (cispo reads eps_high alone and has no sequence ratio or delta: the objective refuses them)
            o["eps_low"] = draw(st.sampled_from([0.1, 0.2]))
            o["importance_sampling"] = draw(st.sampled_from(["token", "sequence"]))
            if draw(st.booleans()):
                o["delta"] = 1.5
        if method not in ("reinforce", "rloo", "remax", "dr_grpo"):  # the methods with a std scale
            o["std_eps"] = draw(st.sampled_from([0.0, 1e-4]))
        case["offline"] = draw(st.booleans())
        case["equal_rewards"] = draw(st.booleans())  # constant groups: weight exactly 0, never NaN
        if method == "chord":
            o["mu"] = draw(st.sampled_from([0.0, 0.3, 1.0]))
        if method == "hpt":
            o["switch_threshold"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
        if method == "luffy":
            o["shaping_gamma"] = draw(st.sampled_from([0.1, 1.0]))
        if method == "gro" and draw(st.booleans()):
            o["offline_neg_coef"] = draw(st.sampled_from([0.0, 0.5]))
        if method == "distill":
            o["divergence"] = draw(st.sampled_from(["reverse_kl", "forward_kl", "jsd"]))
            if o["divergence"] == "jsd":
                o["jsd_beta"] = draw(st.sampled_from([0.0, 0.3, 1.0]))
            case["no_rewards"] = draw(st.booleans())
    elif method in PAIRWISE:
        o["beta"] = draw(st.sampled_from([0.1, 0.5]))
        if method in ("orpo", "cpo"):
            o["nll_coef"] = draw(st.sampled_from([0.0, 1.0]))
        if method in ("dpo", "cpl", "simpo", "cpo"):
            o["label_smoothing"] = draw(st.sampled_from([0.0, 0.1]))
    elif method == "kto":
        o["beta"] = draw(st.sampled_from([0.1, 0.5]))
        o["anchor_value"] = draw(st.sampled_from([0.0, 0.3]))   # z0
    return case


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, T, d, V = c["B"], c["T"], c["d"], c["V"]
    f64 = dict(dtype=torch.float64)
    hidden = torch.randn(B, T, d, generator=g, **f64)
    weight = torch.randn(V, d, generator=g, **f64)
    bias = 0.3 * torch.randn(V, generator=g, **f64) if c["bias"] or c["masked_rows"] else None
    ref_bias = None
    kept = torch.arange(V)
    if c["masked_rows"] and V > c["masked_rows"] + 1:
        rows = torch.randperm(V, generator=g)
        masked, kept = rows[:c["masked_rows"]], rows[c["masked_rows"]:]
        ref_bias = bias + 0.1 * torch.randn(V, generator=g, **f64)
        bias[masked], ref_bias[masked] = float("-inf"), float("-inf")
    targets = kept[torch.randint(0, len(kept), (B, T), generator=g)]   # never a masked row
    targets[torch.rand(B, T, generator=g) < 0.2] = IGNORE
    if B > 2:
        targets[-1] = IGNORE  # a fully ignored row
    kw = {}
    if c["mask_kind"] != "none":
        keep = torch.rand(B, T, generator=g) < 0.8
        kw["mask"] = keep if c["mask_kind"] == "bool" else keep.double()
    method, o = c["method"], c["options"]
    ref_hidden = hidden + 0.1 * torch.randn(B, T, d, generator=g, **f64)
    ref_weight = weight + 0.1 * torch.randn(V, d, generator=g, **f64)
    if method in PAIRWISE:
        kw["group_ids"] = torch.arange(B) // 2
        kw["labels"] = torch.tensor([1, -1] * (B // 2))
    elif method == "kto":
        kw["labels"] = torch.where(torch.rand(B, generator=g) < 0.5, 1, -1)
    elif method in REWARD:
        groups = (torch.arange(B) >= B // 2).long() if B >= 4 else torch.zeros(B, dtype=torch.long)  # sizes >= 2
        kw["group_ids"] = groups
        r = torch.ones(B) if c["equal_rewards"] else torch.rand(B, generator=g).round(decimals=1)
        kw["rewards"] = r
        if method == "remax":
            kw["baselines"] = torch.rand(B, generator=g)
        if c["offline"] and method not in ("rloo",):
            kw["offline"] = torch.rand(B, generator=g) < 0.3
        kw["old_logp"] = -torch.rand(B, T, generator=g, **f64) * 3  # behaviour log-probs, ratios far from 1
        if c.get("no_rewards"):  # pure distillation
            kw.pop("rewards")
    if method == "distill":  # a teacher of another hidden size, masking the policy's masked rows
        kw.update(teacher_hidden=torch.randn(B, T, d + 2, generator=g, **f64),
                  teacher_weight=torch.randn(V, d + 2, generator=g, **f64))
        if bias is not None:
            kw["teacher_bias"] = torch.where(torch.isneginf(bias), bias, 0.2 * torch.randn(V, generator=g, **f64))
    if method in ("dpo", "ipo", "kto") or o.get("kl_coef"):
        if o.get("kl_estimator") == "full":
            kw.update(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
        else:
            kw["ref_logp"] = -torch.rand(B, T, generator=g, **f64) * 3
    return hidden, weight, bias, targets, kw


def _run(c, backend, backend_options):
    hidden, weight, bias, targets, kw = _inputs(c)
    kw = {k: v for k, v in kw.items() if k in read_inputs(c["method"], {**kw, **c["options"]})}  # else refused
    leaves = [hidden.requires_grad_(), weight.requires_grad_()] + ([bias.requires_grad_()] if bias is not None else [])
    out = gro_loss(hidden, weight, targets, bias=bias, method=c["method"], backend=backend,
                   backend_options=backend_options, return_entropy=True, **kw, **c["options"])
    grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(leaves, grads)]
    return out, grads


@settings(max_examples=400, deadline=None, derandomize=True, print_blob=True)
@given(cases())
def test_torch_backend_matches_naive(c):
    _check_against_naive(c)


@settings(max_examples=60, deadline=None, derandomize=True, print_blob=True)
@given(cases(reference_head=True))
def test_reference_heads_match_naive(c):
    # The draws above reach an exact KL placed in the reward with old_logp too rarely to be sure of
    # it (that one pass read the KL as zeros: issue 15 item 1): here every case has a reference head.
    _check_against_naive(c)


def _check_against_naive(c):
    want, want_grads = _run(c, "naive", None)
    options = {k: c[k] for k in ("chunk_elements", "group_elements") if c[k] is not None}
    got, got_grads = _run(c, "torch", options)
    assert torch.isfinite(want.loss) and torch.isfinite(got.loss), c
    assert all(torch.isfinite(gr).all() for gr in got_grads), c
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-9, atol=1e-10, msg=str(c))
    torch.testing.assert_close(got.logp, want.logp, rtol=1e-9, atol=1e-10, msg=str(c))
    for name, a, b in zip(("hidden", "weight", "bias"), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"grad {name}: {c}")
    for k in ("kl", "entropy"):
        if k in want.metrics:
            torch.testing.assert_close(got.metrics[k], want.metrics[k], rtol=1e-9, atol=1e-10, msg=f"{k}: {c}")
