"""The two epilogues of the chunked engine: what happens to a logits chunk between the GEMMs.

Both implement
    stats(z, zr, y, tf, st, s, class_weight, for_grad, div) -> state
        fill st.logp / lse / entropy / kl / ekl / sum_p2 / mean_logp / top1 / lse_r / e_pm at rows s..
        from z [ct, V] (tf: the chunk's `transform.Transform`; for_grad: `grad` follows on the same
        chunk, the fused pass, and may reuse `state`, what stats computed: the torch epilogue's
        exp(z - max), or None; div: the divergence to the second head, `engine.Divergence`)
    grad(z, zr, y, tf, lse, gl, alpha, beta, gamma, out, eta, class_weight, state, extra) -> dz [ct, V]
        written into `out`, a buffer of its own in dz's dtype; out=None only where `in_place`: then
        dz may be left in z's memory (in the statistics dtype); extra: a teacher's forward_kl / jsd
        gradient term (`engine.Extra`), or None
with the math of `engine.py`'s docstring. `TorchEpilogue` is torch ops (any device: the CPU path);
`TritonEpilogue` launches the Triton kernels of `gro_kernels.kernels` (the GPU path, or the CPU
under TRITON_INTERPRET=1), which never write over memory they read.
"""
from __future__ import annotations

import math

import torch

from .transform import kept_mask, softcap_


def _rowdot(a, b):
    """Per-row dot product. (einsum "nv,nv->n" lowers to a batched GEMM of 1x1 outputs: 8-10x
    slower on the CPU, measured at [128, 32768].)"""
    return torch.linalg.vecdot(a, b)


def _scale_(t, inv_t):
    """t * (1 / T) per row, in place."""
    if isinstance(inv_t, torch.Tensor):
        return t.mul_(inv_t.to(t.dtype)[:, None])
    return t.mul_(inv_t) if inv_t != 1.0 else t


def _zero_masked(t):
    """-inf (a vocabulary row masked by its bias) -> 0, in place, once its exp (0) is taken: the
    entropy, the KL and the gradient multiply these logits by p = 0, and 0 * -inf would be NaN."""
    return t.nan_to_num_(nan=float("nan"), posinf=float("inf"), neginf=0.0)


class TorchEpilogue:
    """Torch ops, in place on the chunk: `stats` turns z into d = u - max u (and zr likewise) and
    returns exp(d) with its row sums, so that the fused pass's `grad` on the same chunk does not
    recompute it (one exp per logit in all, one chunk-sized buffer when neither entropy nor KL is
    asked for). A soft cap adds one buffer (its derivative, kept for `grad`), truncation a bool mask
    of the kept set. Torch ops run in order, so dz may be left in z's memory (`in_place`).

    masked_rows: a bias has -inf rows (masked vocabulary). Their logits are then zeroed once their
    exp (0) is taken, a pass over the chunk that heads without such rows do not pay for (the soft
    cap keeps them -inf: `transform.softcap_`)."""

    in_place = True

    def __init__(self, masked_rows: bool = False):
        self.masked_rows = masked_rows

    def stats(self, z, zr, y, tf, st, s, class_weight=None, for_grad=False, div=None):
        e = s + z.shape[0]
        inv_t = tf.inv_t
        keep = kept_mask(z, y, tf.tau)               # on the raw logits (None: not truncated)
        # z <- c tanh(z / c); g = its derivative, kept for `grad` when it follows on this chunk
        g = None if tf.cap is None else softcap_(z, tf.cap, derivative=for_grad)
        zy = z.gather(1, y[:, None])[:, 0]
        m = z.amax(1, keepdim=True)                  # the largest logit is always kept
        st.top1[s:e] = (zy >= m[:, 0]).to(st.top1.dtype)
        d = _scale_(z.sub_(m), inv_t)                # in place: z is d = u - max u from here on
        need_rel = st.entropy is not None or zr is not None or st.mean_logp is not None
        p = d.exp() if need_rel else d.exp_()        # exp(d); in place when d is not read again
        if keep is not None:
            p.mul_(keep)
        if need_rel and self.masked_rows:
            _zero_masked(d)                          # -inf bias rows: p = 0 there, and 0 * d must be 0
        se = p.sum(1)
        log_se = se.log()
        mu = m[:, 0] * inv_t                         # max u
        lse = mu + log_se
        st.lse[s:e] = lse
        st.logp[s:e] = zy * inv_t - lse
        pd = _rowdot(p, d) / se if (st.entropy is not None or zr is not None) else None   # E_p[u - max u]
        if st.entropy is not None:   # H = log se - E_p[u - max u]: no large lse to cancel
            st.entropy[s:e] = log_se - pd
        if st.mean_logp is not None:  # (1/V) sum_v w_v (u_v - lse) = (sum w d - W log se) / V
            vocab = d.shape[1]
            if class_weight is None:
                sw, total = d.sum(1), float(vocab)
            else:
                sw, total = d @ class_weight.to(d.dtype), class_weight.sum(dtype=d.dtype)
            st.mean_logp[s:e] = (sw - total * log_se) / vocab
        mur = aux = None
        if zr is not None:
            if tf.cap is not None:                   # (a teacher head takes no cap: api.py refuses it)
                softcap_(zr, tf.cap, derivative=False)
            mr = zr.amax(1, keepdim=True)
            dr = _scale_(zr.sub_(mr), inv_t)         # in place: zr is ur - max ur from here on
            mur = mr[:, 0] * inv_t
        if zr is not None and div is not None and div.kind != "reverse_kl":   # a teacher (no cap, no truncation)
            aux = self._teacher_stats(div, p, se, log_se, d, dr, mur, st, s, e)
        elif zr is not None:
            log_se_r = dr.exp().sum(1).log()
            if self.masked_rows:                     # rows the reference masks, the policy masks too (api.py)
                _zero_masked(dr)
            ekl_rel = pd - _rowdot(p, dr) / se       # E_p[(u - max u) - (ur - max ur)]
            st.ekl[s:e] = ekl_rel + (mu - mur)
            # Clamp tiny negative round-off: KL is non-negative by definition.
            st.kl[s:e] = (ekl_rel - log_se + log_se_r).clamp_min(0)
        if st.sum_p2 is not None:
            st.sum_p2[s:e] = _rowdot(p, p) / (se * se)
        return (p, se, mu, mur, g, aux) if for_grad else None

    def _teacher_stats(self, div, p, se, log_se, d, dr, mur, st, s, e):
        """forward_kl / jsd against the teacher; returns what the gradient reuses: q (forward_kl) or
        log p - log m (jsd), one chunk-sized buffer. With -inf bias rows (the same in both heads, api.py)
        d and dr are 0 there: every term there is then finite and multiplied by p = q = 0."""
        q = dr.exp()
        if self.masked_rows:
            _zero_masked(dr)
        se_r = q.sum(1)
        log_se_r = se_r.log()
        q.div_(se_r[:, None])                        # q = softmax(ur)
        st.lse_r[s:e] = mur + log_se_r
        if div.kind == "forward_kl":                 # KL(q || p) = E_q[dr - d] - log se_r + log se
            st.kl[s:e] = (_rowdot(q, dr) - _rowdot(q, d) - log_se_r + log_se).clamp_min(0)
            return q
        b = div.beta
        log_q = dr.sub_(log_se_r[:, None])           # dr is log q from here on
        log_m = torch.logaddexp(d - log_se[:, None] + math.log1p(-b), log_q + math.log(b))
        lqm = log_q.sub_(log_m)                      # log q - log m
        s_q = _rowdot(q, lqm)
        lpm = log_m.neg_().add_(d).sub_(log_se[:, None])   # log p - log m
        s_p = _rowdot(p, lpm) / se
        st.e_pm[s:e] = s_p
        st.kl[s:e] = (b * s_q + (1 - b) * s_p).clamp_min(0)
        return lpm

    def grad(self, z, zr, y, tf, lse, gl, alpha, beta, gamma, out, eta=None, class_weight=None, state=None,
             extra=None):
        # dz = (gl onehot + p (alpha + beta u + gamma ur) + eta w) * g; the coefficients are already scaled by 1/T.
        inv_t = tf.inv_t
        keep = None
        if state is not None:  # z holds d = u - max u, zr holds ur - max ur, p = exp(d) unnormalized (0 outside the kept set)
            p, se, mu, mur, g, aux = state
            # Normalized by the lse given, which is the whole vocabulary's when this chunk is one slice
            # of it (vocab_parallel.py): p / se times `share`, this slice's part of the probability
            # mass. On one device the given lse is mu + log se bit for bit, so `share` is exactly 1
            # and the result is the same to the last bit as without it. (A teacher's forward_kl / jsd
            # term, `extra`, is single-device only: vocab_parallel refuses it.)
            share = torch.exp(mu + se.log() - lse)
            # a slice may keep none of its tokens (truncation over the whole vocabulary): p = 0 and
            # share = 0 there, and 0 / 0 must not make the row NaN (on one device se >= 1: the max is kept)
            se = torch.where(se > 0, se, torch.ones_like(se))
            if beta is None and extra is None:
                dz = p.mul_((alpha * share / se)[:, None])
            else:
                if beta is None:
                    t = z.zero_().add_((alpha * share)[:, None])
                else:
                    shift = alpha + beta * mu + (0.0 if gamma is None else gamma * mur)
                    t = z.mul_((beta * share)[:, None]).add_((shift * share)[:, None])
                if gamma is not None:
                    t.add_(zr.mul_((gamma * share)[:, None]))
                if extra is not None and extra.div.kind == "jsd":   # + delta (log p - log m), times p below
                    t.add_(aux.mul_(extra.delta[:, None]))
                dz = t.mul_(p.div_(se[:, None]))
                if extra is not None and extra.div.kind == "forward_kl":   # - delta q
                    dz.sub_(aux.mul_(extra.delta[:, None]))
        elif extra is not None:  # the composable backward with a teacher's forward_kl / jsd (no cap, no truncation)
            g = None
            dz = self._grad_recomputed(z, zr, tf.inv_t, lse, alpha, beta, gamma, extra)
        else:  # z is the raw logits chunk (the composable backward)
            keep = kept_mask(z, y, tf.tau)
            g = None if tf.cap is None else softcap_(z, tf.cap)
            if gamma is not None and tf.cap is not None:
                softcap_(zr, tf.cap, derivative=False)
            if beta is None:
                dz = _scale_(z, inv_t).sub_(lse[:, None]).exp_().mul_(alpha[:, None])
            else:
                p = _scale_(z.clone(), inv_t).sub_(lse[:, None]).exp_()
                if self.masked_rows:  # p = 0 at -inf bias rows: their u may not make inf * 0 below
                    _zero_masked(z)
                    if gamma is not None:
                        _zero_masked(zr)
                t = z.mul_(beta[:, None] * _col(inv_t)).add_(alpha[:, None])    # alpha + beta u
                if gamma is not None:
                    t.add_(zr.mul_(gamma[:, None] * _col(inv_t)))             # + gamma ur
                dz = t.mul_(p)
            if keep is not None:
                dz.mul_(keep)
        if eta is not None:  # the mean log-prob's own term: eta w_v (w = class weights, else 1)
            dz.add_(eta[:, None] if class_weight is None else eta[:, None] * class_weight.to(dz.dtype)[None, :])
        dz.scatter_add_(1, y[:, None], gl[:, None].to(dz.dtype))       # gl * onehot
        if g is not None:
            dz.mul_(g)                                                 # the soft cap's chain rule
        return dz if out is None else out.copy_(dz)

    def _grad_recomputed(self, z, zr, inv_t, lse, alpha, beta, gamma, extra):
        """p (alpha + beta u + gamma ur) + extra from the raw chunks (no cache: the composable backward)."""
        u, ur = _scale_(z, inv_t), _scale_(zr, inv_t)
        log_p, log_q = u - lse[:, None], ur - extra.lse_r[:, None]
        p = log_p.exp()
        t = alpha[:, None].expand_as(u).clone()
        if extra.div.kind == "jsd":
            b = extra.div.beta
            lpm = log_p.sub_(torch.logaddexp(log_p + math.log1p(-b), log_q + math.log(b)))
            if self.masked_rows:   # -inf - (-inf) at rows both heads mask, where p = 0
                lpm.nan_to_num_(nan=0.0)
            t.add_(lpm.mul_(extra.delta[:, None]))
        if self.masked_rows:       # p = 0 at -inf bias rows: their u may not make inf * 0 below
            _zero_masked(u)
        if beta is not None:
            t.add_(u * beta[:, None])
        if gamma is not None:
            t.add_(ur * gamma[:, None])
        dz = t.mul_(p)
        if extra.div.kind == "forward_kl":
            dz.sub_(log_q.exp_().mul_(extra.delta[:, None]))
        return dz


def _col(inv_t):
    return inv_t[:, None] if isinstance(inv_t, torch.Tensor) else inv_t


class TritonEpilogue:
    """The Triton kernels: row statistics (`kernels/row_stats.py`), the logits gradient into its
    own buffer (`kernels/logits_grad.py`). Their -inf guards cost no extra pass. A teacher's forward KL
    and generalized JSD are constexpr variants of both (the JSD's statistics read both chunks twice)."""

    in_place = False

    def __init__(self):
        # imported here: triton is optional for the torch path
        from ..kernels import logits_grad, row_stats
        self.row_stats, self.logits_grad = row_stats.row_stats, logits_grad.logits_grad

    def stats(self, z, zr, y, tf, st, s, class_weight=None, for_grad=False, div=None):
        e = s + z.shape[0]

        def part(t):
            return None if t is None else t[s:e]

        teacher = {} if zr is None or div is None else dict(divergence=div.kind, jsd_beta=div.beta,
                                                             lse_r=part(st.lse_r), e_pm=part(st.e_pm))
        self.row_stats(z, zr, y, tf.inv_t, lse=part(st.lse), logp=part(st.logp), top1=part(st.top1),
                       ent=part(st.entropy), kl=part(st.kl), ekl=part(st.ekl), sum_p2=part(st.sum_p2),
                       mean_logp=part(st.mean_logp), cap=tf.cap, tau=tf.tau, class_weight=class_weight, **teacher)
        return None

    def grad(self, z, zr, y, tf, lse, gl, alpha, beta, gamma, out, eta=None, class_weight=None, state=None,
             extra=None):
        teacher = {} if extra is None else dict(divergence=extra.div.kind, delta=extra.delta, lse_r=extra.lse_r,
                                                jsd_beta=extra.div.beta)
        return self.logits_grad(z, zr, y, tf.inv_t, lse=lse, gl=gl, alpha=alpha, beta=beta, gamma=gamma,
                                cap=tf.cap, tau=tf.tau, eta=eta, class_weight=class_weight, out=out, **teacher)
