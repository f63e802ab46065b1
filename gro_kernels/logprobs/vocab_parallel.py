"""Tensor (vocabulary) parallelism: each rank of `tp_group` holds a contiguous slice of the LM head's rows.

Every rank computes, per chunk of tokens, the statistics of its own slice of the vocabulary with the
same epilogue as one device (`VocabParallelEpilogue` wraps it); they are then combined across the
group before anything is read from them, so everything downstream (the objective, the per-token
coefficients) sees the statistics of the whole vocabulary, the same on every rank:

    one MAX all-reduce of each row's lse_r (and the reference head's), then one packed SUM all-reduce
    of  e_r = exp(lse_r - M),  e_r [logp_r + a_r] on the rank holding the target,  e_r a_r,  e_r H_r,
        e_r KL_r,  er_r = exp(lseref_r - Mr),  e_r ar_r,  e_r^2 sum_p2_r         (a_r = lse_r - M)

(only the vectors asked for: 2 floats per row for log-probs, 4 with the entropy, 6 with the exact KL,
7 with both, one more for sum p^2; the MAX 1 float per row, 2 with a reference head). With S = sum e_r and w_r = e_r / S (the probability mass on slice r):
lse = M + log S, logp = u_y - lse, and, written with w_r so that no two large numbers cancel,
    H = sum_r w_r H_r - sum_r w_r log w_r                      (the entropy of a mixture of slices)
    KL(p || q) = sum_r w_r (KL_r + log w_r - log v_r),  v_r = er_r / sum er   (the reference's mass)
    sum_v p_v^2 = sum_r w_r^2 sum_p2_r.
The gradient then stays local: dz = gl onehot + p (alpha + beta u + gamma ur) on this rank's columns
with the whole vocabulary's lse and coefficients (gl only on the rank holding the target), dW and db
for this rank's rows, and dh a partial sum over the slices, all-reduced over the group (left as this
rank's part with `sequence_parallel=True`, for the caller's gather to reduce-scatter).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .engine import Stats


class VocabShard:
    """This rank's rows [start, start + size) of a vocabulary of `vocab` rows split over `group`."""

    def __init__(self, group, start: int, size: int, vocab: int, max_size: int, sequence_parallel: bool):
        self.group, self.start, self.size, self.vocab = group, start, size, vocab
        self.max_size, self.sequence_parallel = max_size, sequence_parallel

    @classmethod
    def build(cls, group, size: int, vocab_start: Optional[int], device, sequence_parallel: bool = False):
        """Every rank's (start, size), gathered: `vocab_start` by default from the ranks' sizes in rank
        order (shards may be uneven); the shards must tile [0, V) exactly."""
        if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                        or vocab_start < 0):
            raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
        world = dist.get_world_size(group)
        mine = torch.tensor([-1 if vocab_start is None else vocab_start, size], dtype=torch.long, device=device)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=group)
        starts, sizes = (torch.stack(every).cpu().T.tolist())
        if min(sizes) < 1:
            raise ValueError(f"tp_group: every rank needs at least one vocabulary row of weight, got sizes {sizes}")
        if all(s == -1 for s in starts):
            starts = [sum(sizes[:r]) for r in range(world)]
        elif any(s == -1 for s in starts):
            raise ValueError("vocab_start must be given on every rank of tp_group or on none")
        order = sorted(range(world), key=lambda r: starts[r])
        edge = 0
        for r in order:
            if starts[r] != edge:
                raise ValueError(f"tp_group: the ranks' vocabulary shards (vocab_start, rows) = "
                                 f"{list(zip(starts, sizes))} must tile [0, V) without gaps or overlaps")
            edge += sizes[r]
        rank = dist.get_rank(group)
        return cls(group, starts[rank], sizes[rank], edge, max(sizes), bool(sequence_parallel))

    def localize(self, y: torch.Tensor):
        """(targets as columns of this shard, 0 where not held here; whether this rank holds them)."""
        own = (y >= self.start) & (y < self.start + self.size)
        return torch.where(own, y - self.start, torch.zeros_like(y)), own

    def combine(self, local: Stats, own: torch.Tensor, into: Stats, lref: Optional[torch.Tensor] = None) -> None:
        """`into` (the chunk's rows of the result) from this rank's statistics of its slice (module
        docstring); `lref`: the reference's lse over the slice, when it cannot be read off the KL."""
        lse = local.lse
        has_ref, want_h, want_p2 = local.kl is not None, local.entropy is not None, local.sum_p2 is not None
        if has_ref and lref is None:
            lref = local.kl + lse - local.ekl   # KL_r = E_p[u - ur] - lse_r + lse_ref_r
        top = torch.stack([lse, lref]) if has_ref else lse[None].clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)

        def rel(v, m):  # (exp(v - m), v - m), both 0 where this slice holds no mass (v = -inf, or NaN)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            w = torch.exp(v - m)
            held = w > 0
            return torch.where(held, w, torch.zeros_like(w)), torch.where(held, v - m, torch.zeros_like(v))

        def times(w, x):  # w x, 0 where w is 0 (x may be NaN or inf there)
            return torch.where(w > 0, w * x, torch.zeros_like(x))

        e, a = rel(lse, top[0])
        parts = [e, torch.where(own, local.logp + a, torch.zeros_like(a))]
        if want_h or has_ref:  # sum_r w_r log w_r, a term of both
            parts.append(times(e, a))
        if want_h:
            parts.append(times(e, local.entropy))
        if has_ref:
            er, ar = rel(lref, top[1])
            parts += [times(e, local.kl), er, times(e, ar)]
        if want_p2:
            parts.append(times(e * e, local.sum_p2))
        sums = torch.stack(parts)
        dist.all_reduce(sums, group=self.group)
        total, log_total = sums[0], sums[0].log()
        into.lse.copy_(top[0] + log_total)
        into.logp.copy_(sums[1] - log_total)
        k = 2
        if want_h or has_ref:
            mean_log_w = sums[2] / total - log_total             # sum_r w_r log w_r
            k = 3
        if want_h:
            into.entropy.copy_(sums[k] / total - mean_log_w)
            k += 1
        if has_ref:
            kl_sum, ref_total, ref_a = sums[k], sums[k + 1], sums[k + 2]
            kl = kl_sum / total + mean_log_w - (ref_a / total - ref_total.log())
            into.ekl.copy_(kl + into.lse - (top[1] + ref_total.log()))   # E_p[u - ur] = KL + lse - lse_ref
            into.kl.copy_(kl.clamp_min(0))
            k += 3
        if want_p2:
            into.sum_p2.copy_(sums[k] / (total * total))

    def reduce_dh(self, dh: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """dh summed over the group (each rank's is the part through its slice of the vocabulary)."""
        if dh is not None and not self.sequence_parallel:
            dist.all_reduce(dh, group=self.group)
        return dh


class VocabParallelEpilogue:
    """An epilogue (`epilogues.py`) on this rank's slice of the vocabulary: the statistics of the
    slice, combined across the group (`VocabShard.combine`); the logits gradient of the slice.

    `padding`: the slice is all padding (a -inf bias on every row of it, as the last rank of a
    padded vocabulary may hold): the policy puts no mass there, so the slice adds nothing but the
    reference's normalizer, and its logits gradient is 0."""

    def __init__(self, inner, shard: VocabShard, padding: bool = False):
        self.inner, self.shard, self.padding = inner, shard, padding

    def stats(self, z, zr, y, inv_t, st, s):
        e = s + z.shape[0]
        y_local, own = self.shard.localize(y)
        local = Stats.zeros(e - s, dtype=st.lse.dtype, device=z.device, entropy=st.entropy is not None,
                            ref=zr is not None, sum_p2=st.sum_p2 is not None)
        if self.padding:
            local.lse.fill_(float("-inf"))
            local.logp.fill_(float("-inf"))
            lref = None if zr is None else torch.logsumexp(zr * inv_t, 1)  # the reference still has mass here
            self.shard.combine(local, own, st.rows(slice(s, e)), lref=lref)
            return None
        state = self.inner.stats(z, zr, y_local, inv_t, local, 0)
        self.shard.combine(local, own, st.rows(slice(s, e)))
        return state

    def grad(self, z, zr, y, inv_t, lse, gl, *args, **kwargs):
        if self.padding:
            out_dtype = kwargs.get("out_dtype", args[-1] if args else z.dtype)
            return z.zero_() if out_dtype in (z.dtype, torch.float64) else z.new_zeros(z.shape, dtype=out_dtype)
        y_local, own = self.shard.localize(y)
        return self.inner.grad(z, zr, y_local, inv_t, lse, torch.where(own, gl, torch.zeros_like(gl)),
                               *args, **kwargs)
