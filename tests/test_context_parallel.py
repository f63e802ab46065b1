"""Packed sequences (`sequence_ids`) and context parallelism (`cp_group`, `positions`) against one
padded batch in one process (float64).

Packed: the rows of the padded batch of tests/test_one_pass.py laid end to end in one `[1, L]` row, out
of order and with padding tokens between them (sequence id -1, a real token id as target); the
per-sequence inputs stay indexed by sequence. Every preset: the loss, the log-probs and the
gradients of hidden (at each token), weight and bias equal the padded batch's.

Context parallel (gloo, 3 processes, groups of 2 and 3): each rank holds a slice of the tokens of the
same rows, contiguous (Ulysses) or zigzag (ring attention: chunks r and 2cp-1-r, with `positions`),
of the padded batch and of the packed row; every rank's loss is the one process's loss, its hidden
gradient the one process's at its tokens, and the weight and bias gradients summed over the group
are the one process's. The token accuracy (a metric over every rank's tokens) too.

The head options in both layouts (HEAD_CASES): a per-token temperature [B, T] follows the tokens (taken
with them); a per-sequence one [B] is indexed by sequence id in the packed row, like the other
per-sequence inputs; the soft cap and top_k / min_p act per token; SFT's label smoothing, class weights
and z-loss read per-token statistics that move with the tokens, and reduction="none" returns each
rank's own tokens' losses. Issue 19's presets: luffy / chord / hpt get offline rows; distill a teacher
head whose hidden states [B, T, dt] move with the tokens (its divergence is per token), also under a
per-token and a per-sequence temperature, which divides both heads' logits."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gro_kernels import gro_loss
from gro_kernels.objective.options import METHODS
from gro_kernels.objective.inputs import read_inputs
from gro_kernels.trainer.distributed import free_port

from test_one_pass import IGNORE, OFFLINE, B, T, _teacher, batch, options

ORDER = [3, 0, 6, 1, 7, 2, 5, 4]  # the packed row holds the sequences in this order


def config(method, extra=None):
    """(hidden, weight, bias, targets, per-token and per-sequence inputs, options) of the padded batch."""
    hidden, weight, bias, targets, kw = batch("kto" if method == "apo_zero_unpaired" else method)
    opts = {**options(method), **(extra or {})}
    kw.update({k: opts.pop(k) for k in list(opts) if isinstance(opts[k], torch.Tensor)})  # taken with the tokens
    if method in ("luffy", "chord", "hpt"):  # offline rows in the groups (gro's batch has them already)
        kw["offline"] = OFFLINE
    if method == "distill":  # the teacher head: its hidden states [B, T, dt] are taken with the tokens
        kw.update(_teacher())
    if method == "dr_grpo":  # packed rows have no padded width: the normalizer is given
        opts.setdefault("max_completion_length", T)
    if opts.get("kl_estimator") != "full":
        kw.pop("ref_hidden"), kw.pop("ref_weight")
    if opts.get("rollout_correction") or opts.get("off_policy_mask_threshold") is not None:
        kw["rollout_logp"] = kw["old_logp"] + 0.2 * torch.cos(kw["old_logp"])
    read = read_inputs(method, {**kw, **opts})  # the inputs the method reads (the rest are refused)
    return hidden, weight, bias, targets, {k: v for k, v in kw.items() if k in read}, opts


# Beyond the presets: options that read whole rows or the whole batch (LD-DPO reads the order of the
# tokens, WPO sum p^2, the top-entropy selection a quantile over every token, the sequence corrections
# sums over each row)
EXTRA = [("dpo", dict(pair_loss="sigmoid", ld_alpha=0.5)), ("dpo", dict(pair_loss="sigmoid", use_weighting=True)),
         ("grpo", dict(top_entropy_quantile=0.5)), ("dapo", dict(rollout_correction="sequence_truncate")),
         ("dapo", dict(off_policy_mask_threshold=0.01)), ("simpo", dict(margin=0.2))]
# The head options (docs/head.md) and SFT's cross-entropy options
HEAD_CASES = [("grpo", dict(temperature=torch.linspace(0.7, 1.3, B * T, dtype=torch.float64).reshape(B, T),
                            softcap=2.5, top_k=3, min_p=0.05)),
              ("dpo", dict(temperature=torch.linspace(0.8, 1.2, B, dtype=torch.float64), softcap=2.0, top_k=5)),
              ("sft", dict(label_smoothing=0.1, z_loss_coef=1e-3,
                           class_weight=torch.linspace(0.5, 1.5, 40, dtype=torch.float64))),
              ("sft", dict(reduction="none", label_smoothing=0.2, z_loss_coef=1e-2)),
              # a teacher's divergence under the student's temperature (both heads divided by it, as TRL's GKD)
              ("distill", dict(temperature=torch.linspace(0.7, 1.3, B * T, dtype=torch.float64).reshape(B, T),
                               divergence="jsd", jsd_beta=0.3)),
              ("distill", dict(temperature=torch.linspace(0.8, 1.2, B, dtype=torch.float64), divergence="forward_kl"))]
CASES = [(m, {}) for m in METHODS] + EXTRA + HEAD_CASES
CP_CASES = [c for c in CASES if c[0] != "clip_cov"]  # refused with cp_group (it draws tokens at random)


def is_token(v):
    return isinstance(v, torch.Tensor) and tuple(v.shape[:2]) == (B, T)


def packed_places():
    """(row, column, sequence id) of each token of the packed row: each sequence's tokens up to its last
    scored one, in ORDER, a padding token after each."""
    lengths = (targets_of() != IGNORE).int().cumsum(1).argmax(1) + 1
    rows, cols, ids = [], [], []
    for s in ORDER:
        n = int(lengths[s])
        rows += [s] * n + [0]
        cols += list(range(n)) + [T - 1]
        ids += [s] * n + [-1]
    return torch.tensor(rows), torch.tensor(cols), torch.tensor(ids)


def targets_of():
    return batch("grpo")[3]


def reference(method, extra):
    """(loss, logp [B,T], d_hidden, d_weight, d_bias) of the padded batch in one process."""
    hidden, weight, bias, targets, kw, opts = config(method, extra)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    torch.manual_seed(0)  # clip_cov draws its tokens from the default generator
    out = gro_loss(h, w, targets, method=method, bias=b, backend="torch", **kw, **opts)
    return _outputs(out, (h, w, b))


def _outputs(out, params):
    """(loss, logp, d_hidden, d_weight, d_bias, token accuracy); reduction="none": the per-token losses' sum
    is differentiated."""
    total = out.loss if out.loss.dim() == 0 else out.loss.sum()
    return (out.loss.detach(), out.logp, *torch.autograd.grad(total, params), out.metrics["token_accuracy"])


def run(method, extra, tokens, *, packed, **layout):
    """gro_loss on the tokens `tokens` (a [B, T] column selection, or packed indices) of the batch."""
    hidden, weight, bias, targets, kw, opts = config(method, extra)
    if packed:
        rows, cols, ids = (t[tokens] for t in packed_places())
        pick = lambda v: v[rows, cols][None]  # noqa: E731
        layout["sequence_ids"] = ids[None]
    else:
        pick = lambda v: v[:, tokens]  # noqa: E731
    kw = {k: (pick(v) if is_token(v) else v) for k, v in kw.items()}
    y = pick(targets).clone()
    if packed:
        y[layout["sequence_ids"] < 0] = 5  # a real token id at padding: sequence_ids drops it
    h, w, b = pick(hidden).clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
    torch.manual_seed(0)
    out = gro_loss(h, w, y, method=method, bias=b, backend="torch", **kw, **opts, **layout)
    return _outputs(out, (h, w, b))


def errors(got, want, tokens, *, packed, summed):
    """Largest differences: (loss, logp, d_hidden at the tokens, d_weight, d_bias), the last two summed
    over the group by `summed`; and whether padding tokens got exactly 0."""
    loss, logp, dh, dw, db, accuracy = got
    if packed:
        rows, cols, ids = (t[tokens] for t in packed_places())
        real = ids >= 0
        zero = bool((logp[0][~real] == 0).all() and (dh[0][~real] == 0).all())
        at = lambda v: v[rows, cols][real]  # noqa: E731
        mine = lambda v: v[0][real]  # noqa: E731
    else:
        zero, at, mine = True, (lambda v: v[:, tokens]), (lambda v: v)
    dw, db = summed(dw), summed(db)
    if loss.dim():  # reduction="none": each token's loss, as the log-probs
        loss, want = mine(loss), (at(want[0]),) + tuple(want[1:])
    diffs = [(accuracy - want[5]).abs(), (loss - want[0]).abs().max(), (mine(logp) - at(want[1])).abs().max(), (mine(dh) - at(want[2])).abs().max(),
             (dw - want[3]).abs().max(), (db - want[4]).abs().max()]
    return max(float(d) for d in diffs), zero


@pytest.mark.parametrize("method,extra", CASES, ids=[f"{m}-{'-'.join(e)}" for m, e in CASES])
def test_packed_row_equals_the_padded_batch(method, extra):
    L = len(packed_places()[0])
    got = run(method, extra, torch.arange(L), packed=True)
    err, zero = errors(got, reference(method, extra), torch.arange(L), packed=True, summed=lambda t: t)
    assert err < 1e-12 and zero, (err, zero)


def test_layout_errors():
    hidden, weight, bias, targets, kw, opts = config("dr_grpo")
    opts.pop("max_completion_length")
    ids = torch.arange(B)[:, None].expand(B, T)
    with pytest.raises(ValueError, match="max_completion_length"):
        gro_loss(hidden, weight, targets, method="dr_grpo", sequence_ids=ids, **kw, **opts)
    hidden, weight, bias, targets, kw, opts = config("grpo")
    with pytest.raises(ValueError, match="per-sequence inputs have 8 entries"):
        gro_loss(hidden, weight, targets, method="grpo", sequence_ids=ids + 1, **kw, **opts)
    with pytest.raises(ValueError, match="positions give two tokens"):
        gro_loss(hidden, weight, targets, method="grpo", positions=torch.zeros(B, T, dtype=torch.long), **kw, **opts)
    with pytest.raises(TypeError, match="sequence_ids must be an integer tensor"):
        gro_loss(hidden, weight, targets, method="grpo", sequence_ids=ids.double(), **kw, **opts)
    with pytest.raises(ValueError, match="sequence_ids must have the shape"):
        gro_loss(hidden, weight, targets, method="grpo", sequence_ids=ids[:, :2], **kw, **opts)


# ---- context parallel ----------------------------------------------------------------------------

def splits(n, cp, zigzag):
    """The token indices of each rank: cp contiguous parts, or 2cp chunks with chunks r and 2cp-1-r on rank r."""
    if not zigzag:
        return list(torch.tensor_split(torch.arange(n), cp))
    chunks = torch.tensor_split(torch.arange(n), 2 * cp)
    return [torch.cat([chunks[r], chunks[2 * cp - 1 - r]]) for r in range(cp)]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=3)
    try:
        groups = {2: dist.new_group([0, 1]), 3: dist.new_group([0, 1, 2])}
        worst = {}
        L = len(packed_places()[0])
        for cp, group in groups.items():
            if rank >= cp:
                continue

            def summed(t, group=group):
                t = t.clone()
                dist.all_reduce(t, group=group)
                return t

            for method, extra in CP_CASES:
                want = reference(method, extra)
                for packed in (False, True):
                    for zigzag in (False, True):
                        tokens = splits(L if packed else T, cp, zigzag)[rank]
                        layout = dict(cp_group=group)
                        if zigzag:  # each token's place in its sequence
                            place = packed_places()[1][tokens] if packed else tokens
                            layout["positions"] = place[None] if packed else place[None].expand(B, -1)
                        got = run(method, extra, tokens, packed=packed, **layout)
                        key = (cp, method, tuple(extra), packed, zigzag)
                        worst[key] = errors(got, want, tokens, packed=packed, summed=summed)
            with pytest.raises(ValueError, match="clip_cov"):
                run("clip_cov", {}, splits(T, cp, False)[rank], packed=False, cp_group=group)
        torch.save(worst, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_context_parallel_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        worst = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(worst) == (2 if rank < 2 else 1) * len(CP_CASES) * 4
        bad = {k: v for k, v in worst.items() if not (v[0] < 1e-12 and v[1])}
        assert not bad, bad
