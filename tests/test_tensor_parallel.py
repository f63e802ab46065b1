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
  sequence_parallel=True with hidden gathered by an all-gather whose backward reduce-scatters.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gro_kernels import gro_loss, gro_objective, token_logprobs
from gro_kernels.objective.options import METHODS
from gro_kernels.trainer.distributed import free_port

from test_one_pass import IGNORE, batch, options

WORLD = 4
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
    s, e = rows
    opts = options(method)
    if opts.get("kl_estimator") == "full":
        inputs["ref_weight"] = inputs["ref_weight"][s:e]
    else:
        inputs.pop("ref_hidden"), inputs.pop("ref_weight")
    h, w, b = hidden.clone().requires_grad_(), weight[s:e].clone().requires_grad_(), bias[s:e].clone().requires_grad_()
    torch.manual_seed(0)  # clip_cov draws its tokens from the default generator
    out = gro_loss(h, w, targets, method=method, bias=b, backend=backend, tp_group=group, **inputs, **opts, **kw)
    return (out.loss.detach(), out.logp, *torch.autograd.grad(out.loss, (h, w, b)))


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
            for method in METHODS:
                result[(k, method)] = worst(preset_run(method, rows40, group), preset_run(method, (0, 40)), rows40)
            result[(k, "composable")] = worst(composable_run(rows40, group), composable_run((0, 40)), rows40)
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
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


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
        expected = sum(1 for k in SHARDS if rank < k) * (len(METHODS) + 3) + (3 if rank < 2 else 0)
        assert len(result) == expected
        bad = {k: v for k, v in result.items() if not v < (1e-5 if k == "triton" else 1e-12)}
        assert not bad, bad


def test_tp_arguments_are_checked():
    h, w, b, rh, rw, rb, y, up = logprobs_case()
    with pytest.raises(ValueError, match="need tp_group"):
        token_logprobs(h, w, y, vocab_start=0)
    with pytest.raises(ValueError, match="need tp_group"):
        gro_loss(h[None], w, y[None], method="sft", sequence_parallel=True)
