"""Tensor (vocabulary) parallelism (`tp_group`, `vocab_start`) against one process, float64, gloo.

One spawn of 4 processes; groups of 2, 3 and 4 ranks, each holding an uneven contiguous slice of the
vocabulary (V = 41 for token_logprobs, 40 for the presets: never an even split):
- token_logprobs: log-prob, entropy, exact KL to a vocabulary-parallel reference head, lse, sum p^2,
  with a bias and a temperature; the gradients of hidden (summed over the group) and of this rank's
  rows of weight and bias, for upstream gradients on every output;
- gro_loss, every preset (the fused one pass and the two-pass presets), with an entropy bonus, the
  exact KL and a temperature (tests/test_one_pass.py's batch and options): loss, log-probs, dh, this
  rank's rows of dW and db; token_logprobs + gro_objective (the composable path) for a one-pass preset;
- a padded vocabulary (-inf bias on its last rows: with 4 ranks the last slice is all padding);
- the triton backend's kernels (float32; Triton's interpreter), shards given by vocab_start in reverse rank order, and
  sequence_parallel=True with hidden gathered by an all-gather whose backward reduce-scatters;
- the head options (docs/head.md): a soft cap, a per-token temperature, head_precision, top_k (per row,
  down to 1, so that most slices keep none of their tokens) and min_p found over the whole vocabulary,
  targets outside the kept set; SFT's label smoothing (the mean log-prob over the vocabulary), class
  weights indexed by global ids, the z-loss and reduction="none"; top-1 (token accuracy) with a tie
  across two slices; the triton kernels with the soft cap and truncation; an fp32 head on bf16 inputs;
- what tp_group refuses: top_p (naming both), label smoothing where any rank's bias masks rows (every
  rank refuses, none waits in a collective), and a teacher head (method='distill': its divergence is not
  combined across shards; refused before any collective).
Issue 19's presets: luffy / chord / hpt with offline rows in their groups, orpo / cpo on pairs.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gro_kernels import gro_loss, gro_objective, token_logprobs
from gro_kernels.objective.options import METHODS
from gro_kernels.trainer.distributed import free_port

from test_one_pass import IGNORE, OFFLINE, _teacher, batch, only_read, options

WORLD = 4
TP_METHODS = [m for m in METHODS if m != "distill"]   # a teacher head is refused with tp_group (refusals)
SHARDS = {2: [17, 24], 3: [13, 15, 13], 4: [7, 13, 9, 12]}   # rows per rank, V = 41 (the presets: 40)


def bounds(sizes, rank, vocab):
    """This rank's rows [start, end) for the shard sizes (the last one adjusted to `vocab`)."""
    sizes = list(sizes[:-1]) + [vocab - sum(sizes[:-1])]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def logprobs_case(V=41, N=30, D=12, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(N, D, generator=g, dtype=dtype)
    w = 0.6 * torch.randn(V, D, generator=g, dtype=dtype)
    b = 0.3 * torch.randn(V, generator=g, dtype=dtype)
    rh, rw, rb = h + 0.1 * torch.randn(N, D, generator=g, dtype=dtype), w + 0.2 * torch.randn(V, D, generator=g,
                                                                                             dtype=dtype), b.flip(0)
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = IGNORE
    up = torch.randn(5, N, generator=g, dtype=dtype)  # upstream gradients of logp, entropy, kl, lse (and a spare)
    return h, w, b, rh, rw, rb, y, up


def logprobs_run(rows, group=None, **kw):
    """token_logprobs on rows [start, end) of the heads; (outputs, dh, dW rows, db rows)."""
    h, w, b, rh, rw, rb, y, up = logprobs_case()
    s, e = rows
    h, w, b = h.clone().requires_grad_(), w[s:e].clone().requires_grad_(), b[s:e].clone().requires_grad_()
    st = token_logprobs(h, w, y, bias=b, ref_hidden=rh, ref_weight=rw[s:e], ref_bias=rb[s:e], temperature=0.8,
                        return_entropy=True, return_sum_p2=True, backend="torch", tp_group=group, **kw)
    loss = (up[0] * st.logp + up[1] * st.entropy + up[2] * st.kl + up[3] * st.lse).sum()
    return (st.logp, st.entropy, st.kl, st.lse, st.sum_p2, *torch.autograd.grad(loss, (h, w, b)))


def preset_run(method, rows, group=None, backend="torch", dtype=torch.float64, padded_from=None, **kw):
    """gro_loss of `method` on rows [start, end) of the head: (loss, logp, dh, dW rows, db rows).
    `padded_from`: the rows from there on are padding (-inf bias), never a target."""
    hidden, weight, bias, targets, inputs = batch("kto" if method == "apo_zero_unpaired" else method, dtype=dtype)
    if padded_from is not None:
        bias = bias.clone()
        bias[padded_from:] = float("-inf")
        targets = torch.where(targets >= 0, targets % padded_from, targets)
    if method in ("luffy", "chord", "hpt"):   # offline rows in the groups
        inputs["offline"] = OFFLINE
    s, e = rows
    opts = options(method)
    if opts.get("kl_estimator") == "full":
        inputs["ref_weight"] = inputs["ref_weight"][s:e]
    else:
        inputs.pop("ref_hidden"), inputs.pop("ref_weight")
    h, w, b = hidden.clone().requires_grad_(), weight[s:e].clone().requires_grad_(), bias[s:e].clone().requires_grad_()
    torch.manual_seed(0)  # clip_cov draws its tokens from the default generator
    inputs = only_read(method, inputs, {**opts, **kw})
    out = gro_loss(h, w, targets, method=method, bias=b, backend=backend, tp_group=group, **inputs, **{**opts, **kw})
    total = out.loss if out.loss.dim() == 0 else out.loss.sum()   # reduction="none": per token
    return (out.loss.detach(), out.logp, out.metrics["token_accuracy"][None], *torch.autograd.grad(total, (h, w, b)))


def head_run(rows, group=None, **head):
    """token_logprobs with head options on rows [start, end) of the heads: every statistic and the
    gradients for upstream gradients on logp, entropy, kl, lse."""
    h, w, b, rh, rw, rb, y, up = logprobs_case()
    s, e = rows
    h, w, b = h.clone().requires_grad_(), w[s:e].clone().requires_grad_(), b[s:e].clone().requires_grad_()
    st = token_logprobs(h, w, y, bias=b, ref_hidden=rh, ref_weight=rw[s:e], ref_bias=rb[s:e], return_entropy=True,
                        return_sum_p2=True, backend="torch", tp_group=group, **head)
    loss = (up[0] * st.logp + up[1] * st.entropy + up[2] * st.kl + up[3] * st.lse).sum()
    return (st.logp, st.entropy, st.kl, st.lse, st.sum_p2, st.is_top1.double(), *torch.autograd.grad(loss, (h, w, b)))


def mean_run(rows, group=None):
    """token_logprobs' mean log-prob over the vocabulary with class weights [V] (global ids), and its gradient."""
    h, w, b, rh, rw, rb, y, up = logprobs_case()
    s, e = rows
    cw = torch.linspace(0.2, 2.0, w.shape[0], dtype=w.dtype)
    h, w, b = h.clone().requires_grad_(), w[s:e].clone().requires_grad_(), b[s:e].clone().requires_grad_()
    st = token_logprobs(h, w, y, bias=b, softcap=4.0, temperature=1.3, return_mean_logp=True, class_weight=cw,
                        backend="torch", tp_group=group)
    loss = (up[0] * st.logp + up[4] * st.mean_logp + up[3] * st.lse).sum()
    return (st.logp, st.mean_logp, st.lse, *torch.autograd.grad(loss, (h, w, b)))


def ties_run(rows, group=None):
    """top-1 from the bias alone, its largest value at two rows held by different ranks (ties count)."""
    h, w, b, rh, rw, rb, y, up = logprobs_case()
    b = b.clone()
    b[2] = b[30] = 5.0
    y = torch.tensor([2, 30, 7, 29, 40, 0])
    s, e = rows
    st = token_logprobs(h[:6], torch.zeros_like(w[s:e]), y, bias=b[s:e], backend="torch", tp_group=group)
    return (st.is_top1.double(), st.logp)


def head_options():
    """Per-token temperature, a soft cap, per-row top_k (0 = off, down to 1) and the head options of a run."""
    N = logprobs_case()[6].shape[0]
    temperature = torch.linspace(0.6, 1.4, N, dtype=torch.float64)
    top_k = torch.tensor([0, 1, 2, 5, 9, 40])[torch.arange(N) % 6]
    # chunks of 1-2 tokens: some hold only rows whose top_k is off
    return [dict(temperature=temperature, softcap=2.5, top_k=top_k, head_precision="fp32", chunk_elements=30),
            dict(temperature=0.8, top_k=7, min_p=0.1), dict(softcap=3.0, min_p=0.3)]


def composable_run(rows, group=None):
    """token_logprobs + gro_objective (the two-pass path) for grpo with the exact KL."""
    hidden, weight, bias, targets, inputs = batch("grpo")
    s, e = rows
    opts = options("grpo")
    h, w, b = hidden.clone().requires_grad_(), weight[s:e].clone().requires_grad_(), bias[s:e].clone().requires_grad_()
    st = token_logprobs(h, w, targets, bias=b, ref_hidden=inputs.pop("ref_hidden"), ref_weight=inputs.pop("ref_weight")[s:e],
                        temperature=opts.pop("temperature"), return_entropy=True, backend="torch", tp_group=group)
    out = gro_objective(st.logp, mask=targets != IGNORE, entropy=st.entropy, kl=st.kl, method="grpo", **inputs, **opts)
    return (out.loss.detach(), out.logp, *torch.autograd.grad(out.loss, (h, w, b)))


def worst(got, want, rows):
    """The largest difference, the weight and bias gradients compared on this rank's rows."""
    s, e = rows
    diffs = []
    for g, r in zip(got, want):
        if g is None and r is None:
            continue
        if g.shape != r.shape:   # dW [rows, d] or db [rows] against the whole head's
            r = r[s:e]
        diffs.append(float((g - r).detach().abs().max()))
    return max(diffs)


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        groups = {k: dist.new_group(list(range(k))) for k in SHARDS}
        result = {}
        for k, group in groups.items():
            if rank >= k:
                continue
            rows41, rows40 = bounds(SHARDS[k], rank, 41), bounds(SHARDS[k], rank, 40)
            result[(k, "token_logprobs")] = worst(logprobs_run(rows41, group), logprobs_run((0, 41)), rows41)
            for method in TP_METHODS:
                result[(k, method)] = worst(preset_run(method, rows40, group), preset_run(method, (0, 40)), rows40)
            result[(k, "composable")] = worst(composable_run(rows40, group), composable_run((0, 40)), rows40)
            for i, head in enumerate(head_options()):
                result[(k, "head", i)] = worst(head_run(rows41, group, **head), head_run((0, 41), **head), rows41)
            result[(k, "mean_logp")] = worst(mean_run(rows41, group), mean_run((0, 41)), rows41)
            result[(k, "ties")] = worst(ties_run(rows41, group), ties_run((0, 41)), rows41)
            for method, kw in PRESET_HEADS:
                result[(k, method, tuple(kw))] = worst(preset_run(method, rows40, group, **kw),
                                                       preset_run(method, (0, 40), **kw), rows40)
            if k == 2:
                result["refused"] = refusals(rows41, rows40, group)
            # a padded vocabulary: the last rows masked by a -inf bias; with 4 ranks the last slice is all padding
            result[(k, "padded")] = worst(preset_run("grpo", rows40, group, padded_from=29),
                                          preset_run("grpo", (0, 40), padded_from=29), rows40)
        # shards in reverse rank order (vocab_start given); the triton kernels; sequence parallelism
        if rank < 2:
            group, rows = groups[2], bounds([23, 17], 1 - rank, 40)
            result["vocab_start"] = worst(preset_run("gro", rows, group, vocab_start=rows[0]),
                                          preset_run("gro", (0, 40)), rows)
            rows = bounds(SHARDS[2], rank, 40)
            result["triton"] = worst(preset_run("dapo", rows, group, backend="triton", dtype=torch.float32),
                                     preset_run("dapo", (0, 40), dtype=torch.float32), rows)
            result["sequence_parallel"] = sequence_parallel_check(rank, group, rows)
            head = dict(softcap=2.5, top_k=3, min_p=0.05)
            result["triton_head"] = worst(preset_run("dapo", rows, group, backend="triton", dtype=torch.float32, **head),
                                          preset_run("dapo", (0, 40), dtype=torch.float32, **head), rows)
            result["fp32_head"] = worst(preset_run("grpo", rows, group, dtype=torch.bfloat16, head_precision="fp32")[:3],
                                        preset_run("grpo", (0, 40), dtype=torch.bfloat16, head_precision="fp32")[:3],
                                        rows)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# gro_loss with head options: the one pass (grpo, sft) and the two-pass path (dpo, sft's reduction="none")
PRESET_HEADS = [("grpo", dict(temperature=torch.linspace(0.7, 1.2, 48, dtype=torch.float64).reshape(8, 6),
                              softcap=2.5, top_k=torch.tensor([0, 1, 2, 3, 5, 8, 2, 1]), min_p=0.05)),
                ("dpo", dict(temperature=torch.linspace(0.7, 1.2, 8, dtype=torch.float64), softcap=2.0, top_k=4)),
                ("sft", dict(label_smoothing=0.1, z_loss_coef=1e-3, class_weight=torch.linspace(0.5, 1.5, 40,
                                                                                                 dtype=torch.float64))),
                ("sft", dict(reduction="none", label_smoothing=0.2, z_loss_coef=1e-2, softcap=3.0))]


def refusals(rows41, rows40, group):
    """1.0 for each refusal that raised on this rank naming what it should (top_p with tp_group; label
    smoothing when the bias of rank 1 only masks a row)."""
    h, w, b, rh, rw, rb, y, up = logprobs_case()
    s, e = rows41
    raised = []
    try:
        token_logprobs(h, w[s:e], y, top_p=0.9, backend="torch", tp_group=group)
    except ValueError as err:
        raised.append(float("top_p" in str(err) and "tp_group" in str(err)))
    hidden, weight, bias, targets, inputs = batch("sft")
    bias = bias.clone()
    bias[39] = float("-inf")
    s, e = rows40
    try:
        gro_loss(hidden, weight[s:e].clone().requires_grad_(), targets, method="sft", bias=bias[s:e],
                 label_smoothing=0.1, backend="torch", tp_group=group)
    except ValueError as err:
        raised.append(float("mean log-prob" in str(err) and "-inf" in str(err)))
    # a teacher head: refused on every rank before any collective, naming both
    teacher = _teacher()
    for call in (lambda: gro_loss(hidden, weight[s:e], targets, method="distill", backend="torch", tp_group=group,
                                  **teacher),
                 lambda: token_logprobs(h, w[rows41[0]:rows41[1]], y, teacher_hidden=torch.randn(h.shape[0], 5),
                                        teacher_weight=torch.randn(41, 5), backend="torch", tp_group=group)):
        try:
            call()
        except ValueError as err:
            raised.append(float("teacher" in str(err) and "tp_group" in str(err)))
    return 4.0 - sum(raised)   # 0 when all four raised as they should


def sequence_parallel_check(rank, group, rows):
    """hidden split by sequence over the group, gathered by an all-gather whose backward reduce-scatters:
    with sequence_parallel=True each rank's hidden gradient is its slice of the one process's."""
    import torch.distributed.nn.functional as dnn
    hidden, weight, bias, targets, inputs = batch("grpo")
    inputs.pop("ref_hidden"), inputs.pop("ref_weight")
    opts = {**options("grpo"), "kl_estimator": "k3"}
    mine = hidden.chunk(2)[rank].clone().requires_grad_()
    full = torch.cat(dnn.all_gather(mine, group=group))
    s, e = rows
    out = gro_loss(full, weight[s:e], targets, method="grpo", backend="torch", tp_group=group, sequence_parallel=True,
                   **inputs, **opts)
    (dh,) = torch.autograd.grad(out.loss, (mine,))
    h = hidden.clone().requires_grad_()
    want = torch.autograd.grad(gro_loss(h, weight, targets, method="grpo", backend="torch", **inputs, **opts).loss, (h,))
    return float((dh - want[0].chunk(2)[rank]).abs().max())


def test_vocabulary_parallel_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        per_group = len(TP_METHODS) + 3 + len(head_options()) + 2 + len(PRESET_HEADS)
        expected = sum(1 for k in SHARDS if rank < k) * per_group + (6 if rank < 2 else 0)
        assert len(result) == expected
        loose = {"triton": 1e-5, "triton_head": 1e-5, "fp32_head": 1e-5}
        bad = {k: v for k, v in result.items() if not v < loose.get(k, 1e-12)}
        assert not bad, bad


def test_tp_arguments_are_checked():
    h, w, b, rh, rw, rb, y, up = logprobs_case()
    with pytest.raises(ValueError, match="need tp_group"):
        token_logprobs(h, w, y, vocab_start=0)
    with pytest.raises(ValueError, match="need tp_group"):
        gro_loss(h[None], w, y[None], method="sft", sequence_parallel=True)
