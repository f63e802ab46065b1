"""Tensor (vocabulary) parallelism: each rank of `tp_group` holds a contiguous slice of the LM head's rows.

Every rank computes, per chunk of tokens, the statistics of its own slice of the vocabulary with the
same epilogue as one device (`VocabParallelEpilogue` wraps it); they are then combined across the
group before anything is read from them, so everything downstream (the objective, the per-token
coefficients) sees the statistics of the whole vocabulary, the same on every rank:

    one MAX all-reduce of each row's lse_r (and the reference head's, and the slice's largest logit
    for top-1), then one packed SUM all-reduce of
        e_r = exp(lse_r - M),  u_y - M on the rank holding the target,  e_r a_r,  e_r H_r,  e_r KL_r,
        er_r = exp(lseref_r - Mr),  e_r ar_r,  e_r^2 sum_p2_r,  V_r mean_r + W_r a_r,  top-1 of the target
                                                                                   (a_r = lse_r - M)

(only the vectors asked for: 3 floats per row for log-probs and top-1, 5 with the entropy, 7 with
the exact KL, one more for sum p^2, one for the mean log-prob; the MAX 2 floats per row, 3 with a
reference head). With S = sum e_r and w_r = e_r / S (the probability mass on slice r):
lse = M + log S, logp = (u_y - M) - log S, and, written with w_r so that no two large numbers cancel,
    H = sum_r w_r H_r - sum_r w_r log w_r                      (the entropy of a mixture of slices)
    KL(p || q) = sum_r w_r (KL_r + log w_r - log v_r),  v_r = er_r / sum er   (the reference's mass)
    sum_v p_v^2 = sum_r w_r^2 sum_p2_r
    mean_logp = (1/V) sum_v w_v (u_v - lse) = (sum_r (V_r mean_r + W_r a_r) - W log S) / V
                (V_r, W_r: the slice's vocabulary size and class-weight sum; V, W the whole's)
    top-1: the target's (soft-capped) logit >= the largest of every slice (ties count, as on one device).
The head options act per logit (soft cap, temperature, head_precision's GEMMs) and pass through; the
kept set of top_k / min_p is found over the whole vocabulary (`kept_threshold`: the k-th largest
logit among every rank's k largest, min_p's floor from the whole row's max) and then applied to each
slice; top_p is refused with tp_group (api.py). The gradient then stays local: dz = gl onehot +
p (alpha + beta u + gamma ur) + eta w on this rank's columns with the whole vocabulary's lse and
coefficients (gl only on the rank holding the target; class weights indexed by global ids, sliced
here), dW and db for this rank's rows, and dh a partial sum over the slices, all-reduced over the
group (left as this rank's part with `sequence_parallel=True`, for the caller's gather to
reduce-scatter).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from .engine import Stats
from .transform import CANDIDATE_FRACTION, Transform, softcap, transform


class VocabShard:
    """This rank's rows [start, start + size) of a vocabulary of `vocab` rows split over `group`.
    `masked`: some rank's bias masks vocabulary rows with -inf (every rank knows it, so that every
    rank refuses what needs a row without masked entries)."""

    def __init__(self, group, start: int, size: int, vocab: int, max_size: int, sequence_parallel: bool,
                 masked: bool = False):
        self.group, self.start, self.size, self.vocab = group, start, size, vocab
        self.max_size, self.sequence_parallel, self.masked = max_size, sequence_parallel, masked

    @classmethod
    def build(cls, group, size: int, vocab_start: Optional[int], device, sequence_parallel: bool = False,
              masked: bool = False):
        """Every rank's (start, size, masked), gathered: `vocab_start` by default from the ranks' sizes in
        rank order (shards may be uneven); the shards must tile [0, V) exactly."""
        if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                        or vocab_start < 0):
            raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
        world = dist.get_world_size(group)
        mine = torch.tensor([-1 if vocab_start is None else vocab_start, size, int(bool(masked))], dtype=torch.long,
                            device=device)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=group)
        starts, sizes, flags = (torch.stack(every).cpu().T.tolist())
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
        return cls(group, starts[rank], sizes[rank], edge, max(sizes), bool(sequence_parallel), any(flags))

    def localize(self, y: torch.Tensor):
        """(targets as columns of this shard, 0 where not held here; whether this rank holds them)."""
        own = (y >= self.start) & (y < self.start + self.size)
        return torch.where(own, y - self.start, torch.zeros_like(y)), own

    def part(self, class_weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """This shard's entries of a per-vocabulary tensor indexed by global ids (class weights)."""
        return None if class_weight is None else class_weight[self.start:self.start + self.size]

    def kept_threshold(self, z: torch.Tensor, tf: Transform) -> torch.Tensor:
        """tau [rows] of this slice: its part of the kept set of the whole vocabulary is {v : z_v >= tau}
        (`transform.kept_threshold`'s definitions; -inf: the row is not truncated, +inf: the slice keeps
        none of its tokens but the target). The bound is found in u = transform(z) as on one device: the
        k-th largest u among every rank's k largest, min_p's floor from the whole row's max; tau is then
        the smallest logit of the slice whose u clears it."""
        n, width = z.shape
        bound = torch.full((n,), -math.inf, dtype=z.dtype, device=z.device)
        kmax = 0 if tf.top_k is None else int(tf.top_k.max())   # the same on every rank: they hold the same tokens
        if kmax > 0:   # (0: this chunk's rows have top_k off)
            k = tf.top_k
            cand = z.topk(min(kmax, width), dim=1).values
            if cand.shape[1] < kmax:  # a slice narrower than k: pad with logits that never count
                cand = torch.cat([cand, cand.new_full((n, kmax - cand.shape[1]), -math.inf)], 1)
            every = [torch.empty_like(cand) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(every, cand.contiguous(), group=self.group)
            kth = torch.cat(every, 1).topk(kmax, dim=1).values.gather(1, (k - 1).clamp(min=0)[:, None])
            bound = torch.where(k > 0, transform(kth, tf)[:, 0], bound)
        if tf.min_p is not None:
            top = z.amax(1)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
            floor = transform(top[:, None], tf)[:, 0] + torch.log(tf.min_p.to(z.dtype))   # log(0) = -inf: off
            bound = torch.maximum(bound, floor)
        if bool(torch.isneginf(bound).all()):   # nothing truncated in this chunk
            return bound
        tau = torch.full_like(bound, math.inf)
        step = max(1, width // CANDIDATE_FRACTION)   # bounded transients, as transform.kept_threshold
        for a in range(0, width, step):
            zb = z[:, a:a + step]
            clears = transform(zb, tf) >= bound[:, None]
            tau = torch.minimum(tau, torch.where(clears, zb, torch.full_like(zb, math.inf)).amin(1))
        return torch.where(torch.isneginf(bound), bound, tau)

    def combine(self, local: Stats, own: torch.Tensor, into: Stats, *, u_y, z_max, z_y, lref=None,
                mean_weights=None) -> None:
        """`into` (the chunk's rows of the result) from this rank's statistics of its slice (module
        docstring). u_y: the target's transformed logit (read where `own`); z_max, z_y: the slice's
        largest and the target's soft-capped logits (top-1); lref: the reference's lse over the slice,
        when it cannot be read off the KL; mean_weights: (W_r, W) for the mean log-prob."""
        lse = local.lse
        has_ref, want_h = local.kl is not None, local.entropy is not None
        want_p2, want_mean = local.sum_p2 is not None, local.mean_logp is not None
        if has_ref and lref is None:
            lref = local.kl + lse - local.ekl   # KL_r = E_p[u - ur] - lse_r + lse_ref_r
        top = torch.stack([lse, z_max] + ([lref] if has_ref else []))
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)

        def finite(m):
            return torch.where(torch.isfinite(m), m, torch.zeros_like(m))

        def rel(v, m):  # (exp(v - m), v - m), both 0 where this slice holds no mass (v = -inf, or NaN)
            w = torch.exp(v - finite(m))
            held = w > 0
            return torch.where(held, w, torch.zeros_like(w)), torch.where(held, v - finite(m), torch.zeros_like(v))

        def times(w, x):  # w x, 0 where w is 0 (x may be NaN or inf there)
            return torch.where(w > 0, w * x, torch.zeros_like(x))

        zero = torch.zeros_like(lse)
        e, a = rel(lse, top[0])
        parts = {"total": e, "target": torch.where(own, u_y - finite(top[0]), zero),
                 "top1": torch.where(own & (z_y >= top[1]), torch.ones_like(lse), zero)}
        if want_h or has_ref:  # sum_r w_r log w_r, a term of both
            parts["e_a"] = times(e, a)
        if want_h:
            parts["entropy"] = times(e, local.entropy)
        if has_ref:
            er, ar = rel(lref, top[2])
            parts.update(kl=times(e, local.kl), ref_total=er, ref_a=times(e, ar))
        if want_p2:
            parts["sum_p2"] = times(e * e, local.sum_p2)
        if want_mean:  # sum_{v in slice} w_v (u_v - M); the mean needs every row unmasked (api.check_mean_logp)
            parts["mean"] = local.mean_logp * self.size + mean_weights[0] * a
        stacked = torch.stack(list(parts.values()))
        dist.all_reduce(stacked, group=self.group)
        sums = dict(zip(parts, stacked))
        total, log_total = sums["total"], sums["total"].log()
        into.lse.copy_(top[0] + log_total)
        into.logp.copy_(sums["target"] - log_total)
        into.top1.copy_(sums["top1"])
        if want_h or has_ref:
            mean_log_w = sums["e_a"] / total - log_total             # sum_r w_r log w_r
        if want_h:
            into.entropy.copy_(sums["entropy"] / total - mean_log_w)
        if has_ref:
            kl = sums["kl"] / total + mean_log_w - (sums["ref_a"] / total - sums["ref_total"].log())
            into.ekl.copy_(kl + into.lse - (top[2] + sums["ref_total"].log()))   # E_p[u - ur] = KL + lse - lse_ref
            into.kl.copy_(kl.clamp_min(0))
        if want_p2:
            into.sum_p2.copy_(sums["sum_p2"] / (total * total))
        if want_mean:
            into.mean_logp.copy_((sums["mean"] - mean_weights[1] * log_total) / self.vocab)

    def reduce_dh(self, dh: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """dh summed over the group (each rank's is the part through its slice of the vocabulary)."""
        if dh is not None and not self.sequence_parallel:
            dist.all_reduce(dh, group=self.group)
        return dh


class VocabParallelEpilogue:
    """An epilogue (`epilogues.py`) on this rank's slice of the vocabulary: the statistics of the
    slice, combined across the group (`VocabShard.combine`); the logits gradient of the slice. The
    engine reads `vocab` (the whole vocabulary's size, the mean log-prob's V) and `kept_threshold`
    (the kept set over the whole vocabulary) from it.

    `padding`: the slice is all padding (a -inf bias on every row of it, as the last rank of a
    padded vocabulary may hold): the policy puts no mass there, so the slice adds nothing but the
    reference's normalizer, and its logits gradient is 0."""

    def __init__(self, inner, shard: VocabShard, padding: bool = False):
        self.inner, self.shard, self.padding = inner, shard, padding
        self.in_place = inner.in_place
        self.vocab = shard.vocab
        self.kept_threshold = shard.kept_threshold
        self._chunk = None

    def _targets(self, z, y, tf, z_max=None, arg=None):
        """(targets as columns of this slice, own, empty). The epilogues always keep a row's target; where
        this rank does not hold it and the row is truncated, the slice's largest logit stands in for it,
        which is kept anyway when the slice keeps any token. `empty`: the rows whose slice keeps none
        (no mass here: their statistics are dropped and their logits gradient is 0), or None."""
        y_local, own = self.shard.localize(y)
        if tf.tau is None:
            return y_local, own, None
        if z_max is None:
            z_max, arg = z.max(1)
        return torch.where(own, y_local, arg), own, (z_max < tf.tau) & ~own

    def stats(self, z, zr, y, tf, st, s, class_weight=None, for_grad=False, div=None):
        # the second head here is a reference (its reverse KL): a teacher's divergences are refused with
        # tp_group before any collective (api.refuse_teacher_with_tp_group)
        _only_reverse_kl(div)
        e = s + z.shape[0]
        local = Stats.zeros(e - s, dtype=st.lse.dtype, device=z.device, entropy=st.entropy is not None,
                            ref=zr is not None, sum_p2=st.sum_p2 is not None, mean_logp=st.mean_logp is not None)
        # read before the inner epilogue transforms z in place: top-1 compares soft-capped logits, as it does
        z_max, arg = z.max(1)
        y_local, own, empty = self._targets(z, y, tf, z_max, arg)
        z_y = softcap(z.gather(1, y_local[:, None])[:, 0], tf.cap)
        z_max = softcap(z_max, tf.cap)
        u_y = tf.scale(z_y)
        lref = None
        if zr is not None and (self.padding or tf.tau is not None):
            # the reference's lse over the slice, which the KL of a slice without policy mass (all padding,
            # or keeping none of its tokens) cannot give: its full, never truncated distribution
            lref = torch.logsumexp(transform(zr, tf.without_truncation()), 1)
        cw = self.shard.part(class_weight)
        state = None
        if self.padding:
            local.lse.fill_(float("-inf"))
        else:
            state = self.inner.stats(z, zr, y_local, tf, local, 0, cw, for_grad)
            if empty is not None:
                local.lse.masked_fill_(empty, float("-inf"))
        # for `grad` on the same chunk (the fused pass), which may find z transformed in place
        self._chunk = (z, y_local, own, empty) if for_grad else None
        weights = None
        if local.mean_logp is not None:
            weights = ((cw.sum(dtype=z.dtype), class_weight.sum(dtype=z.dtype)) if class_weight is not None
                       else (float(self.shard.size), float(self.vocab)))
        self.shard.combine(local, own, st.rows(slice(s, e)), u_y=u_y, z_max=z_max, z_y=z_y, lref=lref,
                           mean_weights=weights)
        return state

    def grad(self, z, zr, y, tf, lse, gl, alpha, beta, gamma, out, eta=None, class_weight=None, state=None,
             extra=None):
        _only_reverse_kl(None if extra is None else extra.div)
        if self.padding:
            return z.zero_() if out is None else out.zero_()
        cached, self._chunk = self._chunk, None
        if cached is not None and cached[0] is z:   # the fused pass: stats ran on this chunk
            _, y_local, own, empty = cached
        else:   # z is the raw chunk (the composable backward)
            y_local, own, empty = self._targets(z, y, tf)
        dz = self.inner.grad(z, zr, y_local, tf, lse, torch.where(own, gl, torch.zeros_like(gl)), alpha, beta,
                             gamma, out, eta=eta, class_weight=self.shard.part(class_weight), state=state)
        if empty is not None:
            dz[empty] = 0
        return dz


def _only_reverse_kl(div) -> None:
    if div is not None and div.kind != "reverse_kl":
        raise ValueError(f"divergence={div.kind!r} (a teacher head) does not take tp_group")
