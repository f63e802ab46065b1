"""The single fused pass of `gro_loss` (docs/objective.md, "One pass or two": three GEMMs).

1. For every preset, with entropy bonus, exact KL to a reference head, temperature, bias, ignored
   tokens and chunks whose boundaries fall inside sequences and groups: loss and gradients wrt
   hidden, weight and bias of `gro_loss` (torch backend: the fused pass for token-local presets)
   equal the composable autograd path (`token_logprobs` + `gro_objective`, naive backend), float64,
   1e-8. (tests/test_unification.py compares the same calls with the textbook losses.)
2. The matrix-product FLOPs of one forward + backward, counted in a TorchDispatchMode of our own
   (every mm / addmm / in-place / out= / bmm variant): 6 N d V for token-local presets, 8 N d V
   for the others.
3. Upstream gradients scale the precomputed gradients; no gradient is computed without need.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gro_kernels import gro_loss, gro_objective, token_logprobs
from gro_kernels.objective.inputs import read_inputs
from gro_kernels.objective.options import resolve_options
from gro_kernels.objective.split import needs_policy_logp

IGNORE = -100
B, T, D, V = 8, 6, 12, 40
# The unification table's presets (README, Methods); the loss types of issue 9 are below.
METHODS = ("reinforce", "rloo", "remax", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce_pp",
           "dpo", "ipo", "cpl", "simpo", "kto", "sft", "gro")
TOKEN_LOCAL = {"reinforce", "rloo", "remax", "grpo", "dr_grpo", "dapo", "cispo", "reinforce_pp", "sft", "gro"}
GROUPS = torch.tensor([3, 7, 3, 7, 7, 3, 3, 7])
PAIRS = torch.tensor([5, 9, 5, 2, 9, 2, 0, 0])


def batch(method, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype)
    weight = 0.5 * torch.randn(V, D, generator=g, dtype=dtype)
    bias = 0.3 * torch.randn(V, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([6, 5, 4, 6, 3, 6, 2, 5])
    targets[torch.arange(T)[None, :] >= lengths[:, None]] = IGNORE
    targets[1, 0] = IGNORE
    kw = dict(ref_hidden=hidden + 0.1 * torch.randn(B, T, D, generator=g, dtype=dtype),
              ref_weight=weight + 0.1 * torch.randn(V, D, generator=g, dtype=dtype))
    kw["ref_logp"] = torch.log_softmax(kw["ref_hidden"] @ kw["ref_weight"].T, -1).gather(
        -1, targets.clamp(min=0)[..., None])[..., 0]
    kw["rewards"] = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.3], dtype=dtype)
    kw["group_ids"] = GROUPS
    if method == "remax":
        kw["baselines"] = torch.tensor([0.2, 0.5, 0.1, 0.9, 0.0, 0.4, 0.7, 0.3], dtype=dtype)
    if method in ("dpo", "ipo", "cpl", "simpo", "orpo", "cpo"):
        kw.pop("rewards")
        kw["group_ids"] = PAIRS
        kw["labels"] = torch.tensor([1, -1, -1, 1, 1, -1, -1, 1])
    if method == "kto":
        kw.pop("rewards"), kw.pop("group_ids")
        kw["labels"] = torch.tensor([1, -1, 1, 1, -1, -1, 1, -1])
        kw["anchor_value"] = 0.2   # KTO's z0
    if method == "sft":
        kw.pop("rewards"), kw.pop("group_ids")
    if method == "gro":
        kw["offline"] = torch.tensor([False, False, True, False, False, False, False, True])
    with torch.no_grad():  # behaviour log-probs near the policy's, so that some ratios clip
        logp = torch.log_softmax((hidden @ weight.T + bias) / 0.9, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        noise = torch.tensor([0.0, 1e-4, 0.3, 2.0, 5e-4, 0.1, 0.5, 1e-3], dtype=dtype)[:, None]
        kw["old_logp"] = logp + noise * torch.randn(B, T, generator=g, dtype=dtype)
    return hidden, weight, bias, targets, kw


# Options that touch every token-local term: entropy bonus, exact KL from the reference head in the
# same pass, temperature; RL-free presets take the entropy bonus and temperature.
def options(method):
    opts = dict(temperature=0.9, entropy_coef=0.03)
    if method in ("grpo", "gro", "dapo", "cispo"):
        opts.update(kl_coef=0.05, kl_estimator="full")
    if method in ("reinforce", "rloo", "remax", "reinforce_pp", "dr_grpo"):
        opts.update(kl_coef=0.05)   # k1 / k3 from ref_logp (in the reward or in the loss)
    return opts


def only_read(method, kw, opts=None):
    """kw without the per-row inputs the configuration does not read (batch() gives them to every method)."""
    read = read_inputs(method, {**kw, **(opts or {})})
    return {k: v for k, v in kw.items() if k in read}


def run(method, backend, *, chunk_elements=None, inputs=None, **extra):
    hidden, weight, bias, targets, kw = batch(method)
    kw.update(inputs or {})
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    opts = {**options(method), **extra}
    if opts.get("kl_estimator") != "full":
        kw.pop("ref_hidden"), kw.pop("ref_weight")
    bo = {"chunk_elements": chunk_elements} if chunk_elements else None
    kw = only_read(method, kw, opts)
    out = gro_loss(h, w, targets, method=method, bias=b, backend=backend, backend_options=bo, **kw, **opts)
    return (out.loss, *torch.autograd.grad(out.loss, (h, w, b))), out


def composable(method, inputs=None, **extra):
    """token_logprobs (naive) + gro_objective, autograd through both: the reference path."""
    hidden, weight, bias, targets, kw = batch(method)
    kw.update(inputs or {})
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    opts = {**options(method), **extra}
    ref = dict(ref_hidden=kw.pop("ref_hidden"), ref_weight=kw.pop("ref_weight"))
    full = opts.get("kl_estimator") == "full"
    st = token_logprobs(h, w, targets, bias=b, temperature=opts.pop("temperature"), return_entropy=True,
                        backend="naive", **(ref if full else {}))
    kw = only_read(method, kw, opts)
    out = gro_objective(st.logp, mask=targets != IGNORE, entropy=st.entropy, kl=st.kl, method=method, **kw, **opts)
    return (out.loss, *torch.autograd.grad(out.loss, (h, w, b))), out


def assert_same(got, want, tol=1e-8):
    for name, g, r in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, want):
        torch.testing.assert_close(g, r, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk_elements", [None, 3 * V, 5 * V])   # 3 and 5 tokens: boundaries inside rows and groups
def test_fused_pass_equals_autograd_path(method, chunk_elements):
    got, out = run(method, "torch", chunk_elements=chunk_elements)
    want, ref = composable(method)
    assert_same(got, want)
    assert got[2].abs().max() > 1e-4, "degenerate case: zero gradient"
    for k in ("kl", "entropy", "clip_frac"):
        if k in ref.metrics:
            torch.testing.assert_close(out.metrics[k], ref.metrics[k], atol=1e-10, rtol=1e-10)


def test_token_local_presets_are_the_ones_the_split_says():
    for method in METHODS:
        opts = resolve_options(method, {})
        assert needs_policy_logp(opts, has_old_logp=True, has_advantages=False) == (method not in TOKEN_LOCAL), method
    # Without old_logp a reward-placed KL reads sg[l]: a forward-only pass first.
    assert needs_policy_logp(resolve_options("rloo", {"kl_coef": 0.1}), has_old_logp=False, has_advantages=False)
    assert not needs_policy_logp(resolve_options("rloo", {}), has_old_logp=False, has_advantages=False)


def test_given_advantages_and_offline_rows_in_one_pass():
    got, _ = run("gro", "torch", chunk_elements=4 * V, kl_coef=0.0, entropy_coef=0.0)
    want, _ = composable("gro", kl_coef=0.0, entropy_coef=0.0)
    assert_same(got, want)
    hidden, weight, bias, targets, kw = batch("dapo")
    adv = torch.randn(B, T, dtype=torch.float64)
    res = []
    for backend in ("torch", "naive"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = gro_loss(h, w, targets, method="dapo", advantages=adv, old_logp=kw["old_logp"], backend=backend,
                       backend_options={"chunk_elements": 2 * V} if backend == "torch" else None)
        res.append((out.loss, *torch.autograd.grad(out.loss, (h, w))))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_upstream_gradient_scales_and_no_grad_computes_none():
    hidden, weight, bias, targets, kw = batch("dapo")
    kw = {k: kw[k] for k in ("rewards", "group_ids", "old_logp")}
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = gro_loss(h, w, targets, method="dapo", backend="torch", **kw)
    (3.0 * out.loss).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    gro_loss(h2, w2, targets, method="dapo", backend="naive", **kw).loss.backward()
    torch.testing.assert_close(h.grad, 3 * h2.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w.grad, 3 * w2.grad, atol=1e-10, rtol=1e-10)
    # A frozen hidden: only the weight's gradient; under no_grad: the value alone.
    w3 = weight.clone().requires_grad_()
    out = gro_loss(hidden, w3, targets, method="dapo", backend="torch", **kw)
    out.loss.backward()
    torch.testing.assert_close(w3.grad, w2.grad, atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        val = gro_loss(hidden, weight, targets, method="dapo", backend="torch", **kw).loss
    torch.testing.assert_close(val, out.loss.detach(), atol=1e-12, rtol=1e-12)


# ---- FLOPs: three GEMMs for token-local presets, four for the others ------------------------

class MatmulFlops(TorchDispatchMode):
    """2 * m * n * k for every matrix product that reaches the dispatcher, whatever its form."""

    OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "dot", "mv", "addmv"}

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__.rstrip("_")
        if name in self.OPS:
            self.seen.add(str(func))
            if name in ("mv", "addmv", "dot"):  # matrix (or vector) times vector: 2 m k
                a = [t for t in args if isinstance(t, torch.Tensor)][-2]
                self.flops += 2 * a.numel()
                return func(*args, **kwargs)
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            a, b = mats[-2], mats[-1]   # addmm(bias, a, b), mm(a, b), bmm(a, b)
            batch_size = a.shape[0] if a.dim() == 3 else 1
            m, k = a.shape[-2], a.shape[-1]
            self.flops += 2 * batch_size * m * k * b.shape[-1]
        return func(*args, **kwargs)


@pytest.mark.parametrize("method", ["dapo", "grpo", "cispo", "rloo", "sft", "gro", "dpo", "kto", "gspo", "orpo", "cpo"])
def test_gemm_flops_of_one_forward_and_backward(method):
    hidden, weight, _, targets, kw = batch(method, dtype=torch.float32)
    for k in ("ref_hidden", "ref_weight"):
        kw.pop(k)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))  # every token counts
    n = targets.numel()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    kw = only_read(method, kw)
    with MatmulFlops() as counter:
        out = gro_loss(h, w, targets, method=method, backend="torch", backend_options={"chunk_elements": 7 * V}, **kw)
        out.loss.backward()
    gemms = 3 if method in TOKEN_LOCAL else 4
    assert counter.flops == gemms * 2 * n * D * V, (counter.flops / (2 * n * D * V), counter.seen)


def test_flop_counter_sees_in_place_and_out_forms():
    a, b = torch.randn(4, 5), torch.randn(5, 3)
    c, out = torch.zeros(4, 3), torch.empty(4, 3)
    with MatmulFlops() as counter:
        c.addmm_(a, b)
        torch.mm(a, b, out=out)
        torch.addmm(c, a, b, out=out)
        torch.bmm(a[None], b[None])
    assert counter.flops == 4 * 2 * 4 * 5 * 3


def test_second_backward_is_a_clear_error():
    hidden, weight, _, targets, kw = batch("dapo")
    h = hidden.clone().requires_grad_()
    out = gro_loss(h, weight, targets, method="dapo", rewards=kw["rewards"], group_ids=kw["group_ids"],
                   old_logp=kw["old_logp"], backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="hands its gradients back once"):
        out.loss.backward()


# Issue 9's token-local loss types and corrections take the same single pass (three GEMMs).
def _rollout():
    _, _, _, _, kw = batch("dapo")
    g = torch.Generator().manual_seed(9)
    return kw["old_logp"] + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)


NEW_TOKEN_LOCAL = [
    ("bnpo", {}), ("sapo", {}), ("gpg", {}), ("dft", {}), ("dapo", {"clip_ratio_c": 1.5}),
    ("grpo", {"kl_estimator": "k3+", "use_bias_correction_kl": True}),
    ("grpo", {"kl_estimator": "low_var_kl"}),
    ("dapo", {"rollout_correction": "token_truncate"}), ("dapo", {"rollout_correction": "sequence_mask"}),
    ("dapo", {"rollout_correction": "icepop"}),
]


@pytest.mark.parametrize("config", NEW_TOKEN_LOCAL, ids=lambda c: c[0] + "-" + "-".join(f"{k}={v}" for k, v in c[1].items()))
def test_issue9_token_local_types_in_the_fused_pass(config):
    method, extra = config
    opts = resolve_options(method, extra)
    assert not needs_policy_logp(opts, has_old_logp=True, has_advantages=False)
    inputs = {"rollout_logp": _rollout()} if "rollout_correction" in extra else {}
    if method in ("sft", "dft"):
        inputs.update(rewards=None, group_ids=None)
    extra = dict(extra, entropy_coef=0.0) if method == "dft" else extra
    got, _ = run(method, "torch", chunk_elements=3 * V, inputs=inputs, **extra)
    want, _ = composable(method, inputs=inputs, **extra)
    assert_same(got, want)
    hidden, weight, _, targets, kw = batch(method, dtype=torch.float32)
    kw = {k: v.float() if v.is_floating_point() else v for k, v in {**kw, **inputs}.items()
          if k not in ("ref_hidden", "ref_weight") and v is not None}
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    h, w, kw = hidden.clone().requires_grad_(), weight.clone().requires_grad_(), only_read(method, kw, extra)
    with MatmulFlops() as counter:
        gro_loss(h, w, targets, method=method, backend="torch", **kw, **extra).loss.backward()
    assert counter.flops == 3 * 2 * targets.numel() * D * V


@pytest.mark.parametrize("method", ["reinforce", "rloo"])
def test_reward_kl_with_offline_rows(method):
    # The reward KL reads the behaviour log-prob, which is sg[l] on offline rows: not token-local
    # then (a forward-only pass first). Found by tests/test_fuzz_gro_loss.py.
    offline = torch.tensor([False, True, False, False, False, False, True, False])
    got, _ = run(method, "torch", chunk_elements=3 * V, inputs={"offline": offline})
    want, _ = composable(method, inputs={"offline": offline})
    assert_same(got, want)
    opts = resolve_options(method, {"kl_coef": 0.05})
    assert needs_policy_logp(opts, has_old_logp=True, has_advantages=False, has_offline=True)
    assert not needs_policy_logp(opts, has_old_logp=True, has_advantages=False, has_offline=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_dw_sum_in_vocabulary_slices(monkeypatch, dtype):
    # 16-bit weights: the fp32 dW sum lives in vocabulary slices, cast to the weight's dtype one at a
    # time. Slices of 7 vocabulary rows (6 slices over V=40, the last ragged) must give one slice's result.
    from gro_kernels.logprobs import engine
    hidden, weight, _, targets, kw = batch("dapo", dtype=torch.float32)
    kw = {k: kw[k].float() if k == "old_logp" else kw[k] for k in ("rewards", "group_ids", "old_logp")}
    results = []
    for slice_elements in (engine.DW_SLICE_ELEMENTS, 7 * D):
        monkeypatch.setattr(engine, "DW_SLICE_ELEMENTS", slice_elements)
        h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        out = gro_loss(h, w, targets, method="dapo", backend="torch", backend_options={"chunk_elements": 3 * V}, **kw)
        out.loss.backward()
        assert w.grad.dtype == dtype
        results.append((h.grad.float(), w.grad.float()))
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    ref_h, ref_w = hidden.to(dtype).double().requires_grad_(), weight.to(dtype).double().requires_grad_()
    kw64 = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    gro_loss(ref_h, ref_w, targets, method="dapo", backend="naive", **kw64).loss.backward()
    scale = ref_w.grad.abs().max()
    assert (results[1][1].double() - ref_w.grad).abs().max() <= 1e-2 * scale   # one 16-bit rounding of dW


def test_wpo_takes_its_log_sum_p2_from_the_statistics_pass():
    # use_weighting reads log sum_v p_v^2: the composable path's own statistics pass returns it, so
    # WPO costs the same four GEMMs as DPO (no extra forward-only pass).
    hidden, weight, _, targets, kw = batch("dpo", dtype=torch.float32)
    kw = {k: kw[k].float() if k == "ref_logp" else kw[k] for k in ("group_ids", "labels", "ref_logp")}
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with MatmulFlops() as counter:
        gro_loss(h, w, targets, method="dpo", pair_loss="sigmoid", use_weighting=True, backend="torch",
                 **kw).loss.backward()
    assert counter.flops == 4 * 2 * targets.numel() * D * V


# ---- issue 15 item 1: the sequence plan of the one pass reads only what exists before the pass ----

REWARD_KL = [("reinforce", {}), ("rloo", {}), ("remax", {}), ("reinforce_pp", {}),
             ("dr_grpo", {"kl_placement": "reward"}), ("grpo", {"kl_placement": "reward"})]


@pytest.mark.parametrize("config", REWARD_KL, ids=lambda c: c[0])
def test_exact_kl_in_the_reward_with_old_logp(config):
    # The exact KL of the policy's own head enters the reward: the weights read the policy's
    # statistics, so the configuration is not token-local. It used to take the one pass, whose plan
    # read the KL as zeros: the gradient of kl_coef=0 with the loss value of kl_coef=0.05.
    method, extra = config
    extra = dict(extra, kl_estimator="full", kl_coef=0.5)
    got, out = run(method, "torch", chunk_elements=3 * V, **extra)
    want, ref = composable(method, **extra)
    assert_same(got, want)
    torch.testing.assert_close(out.per_token["advantages"], ref.per_token["advantages"], atol=1e-10, rtol=1e-10)
    without, _ = composable(method, kl_coef=0.0)
    assert (got[1] - without[1]).abs().max() > 1e-3   # the KL moves the gradient
    assert needs_policy_logp(resolve_options(method, extra), has_old_logp=True, has_advantages=False)


def test_issue15_reproducer_exact_reward_kl():
    # The issue's numbers: rloo, B=4, T=5, d=6, V=9, float64; naive |grad_h| 3.4775, the one pass
    # gave 3.3638 (= naive with kl_coef=0).
    g = torch.Generator().manual_seed(15)
    Bq, Tq, dq, Vq = 4, 5, 6, 9
    f64 = dict(dtype=torch.float64)
    hidden, weight = torch.randn(Bq, Tq, dq, generator=g, **f64), torch.randn(Vq, dq, generator=g, **f64)
    ref = dict(ref_hidden=hidden + 0.3 * torch.randn(Bq, Tq, dq, generator=g, **f64),
               ref_weight=weight + 0.3 * torch.randn(Vq, dq, generator=g, **f64))
    targets = torch.randint(0, Vq, (Bq, Tq), generator=g)
    kw = dict(method="rloo", rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), group_ids=torch.tensor([0, 0, 1, 1]),
              kl_estimator="full", **ref)
    # The old_logp that sent it to the one pass is not read by rloo (logp surrogate, the exact KL in the
    # reward is the policy's own): refused now.
    with pytest.raises(ValueError, match="old_logp"):
        gro_loss(hidden, weight, targets, backend="torch", kl_coef=0.5, old_logp=torch.full((Bq, Tq), -2.5, **f64), **kw)
    grads = {}
    for backend, kl_coef in (("naive", 0.5), ("torch", 0.5), ("naive", 0.0)):
        h = hidden.clone().requires_grad_()
        gro_loss(h, weight, targets, backend=backend, kl_coef=kl_coef, **kw).loss.backward()
        grads[backend, kl_coef] = h.grad
    torch.testing.assert_close(grads["torch", 0.5], grads["naive", 0.5], atol=1e-10, rtol=1e-10)
    assert (grads["torch", 0.5] - grads["naive", 0.0]).abs().max() > 1e-3


@pytest.mark.parametrize("method,extra", [("dpo", {}), ("dapo", {"top_entropy_quantile": 0.5}),
                                          ("rloo", {"kl_estimator": "full", "kl_coef": 0.5})])
def test_a_plan_that_reads_the_pass_statistics_is_an_error(monkeypatch, method, extra):
    # Should needs_policy_logp ever miss a configuration, the one pass must fail loudly: its plan is
    # formed before the pass and gets no log-probs, entropies or KL to read (it used to get zeros).
    import gro_kernels.loss as loss_module
    monkeypatch.setattr(loss_module, "needs_policy_logp", lambda *a, **k: False)
    hidden, weight, bias, targets, kw = batch(method)
    if extra.get("kl_estimator") != "full":
        kw.pop("ref_hidden"), kw.pop("ref_weight")
    h, kw = hidden.clone().requires_grad_(), only_read(method, kw, extra)
    with pytest.raises(RuntimeError, match="not token-local"):
        gro_loss(h, weight, targets, method=method, backend="torch", return_entropy=True, **kw, **extra)


# ---- issue 19: offline rows (LUFFY, CHORD, HPT) and a teacher head in the fused pass ------------
OFFLINE = torch.tensor([False, False, True, False, False, False, False, True])
DT = 9   # the teacher's hidden size differs from the policy's


def _teacher(dtype=torch.float64):
    g = torch.Generator().manual_seed(19)
    return dict(teacher_hidden=torch.randn(B, T, DT, generator=g, dtype=dtype),
                teacher_weight=0.6 * torch.randn(V, DT, generator=g, dtype=dtype),
                teacher_bias=0.2 * torch.randn(V, generator=g, dtype=dtype))


ISSUE19 = [
    ("luffy", {}, {"offline": OFFLINE}),
    ("chord", {"mu": 0.4}, {"offline": OFFLINE}),
    ("hpt", {"switch_threshold": 0.6}, {"offline": OFFLINE}),
    ("gro", {"offline_neg_coef": 0.0}, {"offline": OFFLINE}),
    ("distill", {}, "teacher"),
    ("distill", {"divergence": "forward_kl"}, "teacher"),
    ("distill", {"divergence": "jsd", "jsd_beta": 0.3}, "teacher"),
]


def _issue19_inputs(method, inputs, dtype=torch.float64):
    return _teacher(dtype) if inputs == "teacher" else inputs


@pytest.mark.parametrize("config", ISSUE19, ids=lambda c: c[0] + "-" + "-".join(f"{k}={v}" for k, v in c[1].items()))
def test_issue19_token_local_presets_in_the_fused_pass(config):
    """Fused pass (torch, chunk boundaries inside rows and groups) == token_logprobs (naive) + gro_objective,
    and 6 N d V FLOPs for the policy (plus the teacher's own forward GEMM, 2 N d_teacher V)."""
    method, extra, inputs = config
    inputs = _issue19_inputs(method, inputs)
    opts = resolve_options(method, extra)
    assert not needs_policy_logp(opts, has_old_logp=True, has_advantages=False, has_offline=True)
    extra = dict(extra, kl_coef=0.0)   # (the exact KL to a reference with a teacher: the test below)
    got, _ = run(method, "torch", chunk_elements=3 * V, inputs=dict(inputs), **extra)
    if "teacher_hidden" in inputs:   # the reference path: both heads' statistics from the naive backend
        hidden, weight, bias, targets, kw = batch(method)
        kw = {k: kw[k] for k in ("rewards", "group_ids", "old_logp")}
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        o = {**options(method), **extra}
        st = token_logprobs(h, w, targets, bias=b, temperature=o.pop("temperature"), return_entropy=True, backend="naive",
                            divergence=o.pop("divergence", "reverse_kl"), jsd_beta=o.pop("jsd_beta", 0.5), **inputs)
        out = gro_objective(st.logp, mask=targets != IGNORE, entropy=st.entropy, distill=st.distill, method=method,
                            **kw, **o)
        want = (out.loss, *torch.autograd.grad(out.loss, (h, w, b)))
    else:
        want, _ = composable(method, inputs=inputs, **extra)
    assert_same(got, want)
    assert got[2].abs().max() > 1e-4

    hidden, weight, _, targets, kw = batch(method, dtype=torch.float32)
    kw = {k: kw[k] for k in ("rewards", "group_ids", "old_logp")}
    kw.update({k: (v.float() if v.is_floating_point() else v) for k, v in _issue19_inputs(method, config[2]).items()})
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with MatmulFlops() as counter:
        gro_loss(h, w, targets, method=method, backend="torch", **kw, **config[1]).loss.backward()
    n = targets.numel()
    teacher = 2 * n * DT * V if "teacher_hidden" in kw else 0
    assert counter.flops == 3 * 2 * n * D * V + teacher, counter.flops / (2 * n * D * V)


def test_teacher_and_exact_reference_kl_take_two_sweeps_and_stay_exact():
    """Both second heads (the exact KL to a reference, the teacher's divergence): each its own statistics
    sweep on the composable path, equal to the naive path; with a sampled-token KL the one pass stays."""
    teacher = _teacher()
    got, _ = run("distill", "torch", chunk_elements=3 * V, inputs=dict(teacher), divergence="jsd",
                 kl_coef=0.05, kl_estimator="full")
    want, _ = run("distill", "naive", inputs=dict(teacher), divergence="jsd", kl_coef=0.05, kl_estimator="full")
    assert_same(got, want)
    hidden, weight, _, targets, kw = batch("distill", dtype=torch.float32)
    kw = {k: (v.float() if v.is_floating_point() else v) for k, v in kw.items() if k in ("ref_hidden", "ref_weight", "rewards", "group_ids")}
    kw.update({k: v.float() for k, v in _teacher().items()})
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    n = targets.numel()
    for estimator, policy_gemms in (("full", 4 + 4), ("k3", 3)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with MatmulFlops() as counter:
            gro_loss(h, w, targets, method="distill", backend="torch", kl_coef=0.05, kl_estimator=estimator,
                     **kw).loss.backward()
        # full: forward + backward recompute of each sweep (2 x (1 + 3) policy GEMMs, and each second head's
        # logits twice); k3: the one pass, plus the reference's own no-grad forward for ref_logp.
        heads = 2 * (2 * n * D * V + 2 * n * DT * V) if estimator == "full" else 2 * n * D * V + 2 * n * DT * V
        assert counter.flops == policy_gemms * 2 * n * D * V + heads, (estimator, counter.flops / (2 * n * D * V))
