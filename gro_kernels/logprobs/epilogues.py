"""The two epilogues of the chunked engine: what happens to a logits chunk between the GEMMs.

Both implement
    stats(z, zr, y, inv_t, st, s) -> state    fill st.logp / lse / entropy / kl / ekl / sum_p2 at rows s..
                                              from z [ct, V]; `state` is what `grad` may reuse (or None)
    grad(z, zr, state, y, inv_t, lse, coefs, out) -> dz [ct, V]
                                              into `out` (a buffer of its own, in dz's dtype); with
                                              out=None only where `in_place`: in z's memory
with the math of `engine.py`'s docstring. `TorchEpilogue` is torch ops (any device: the CPU path);
`TritonEpilogue` launches the Triton kernels of `gro_kernels.kernels` (the GPU path, or the CPU
under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch


def _rowdot(a, b):
    """Per-row dot product. (einsum "nv,nv->n" lowers to a batched GEMM of 1x1 outputs: 8-10x
    slower on the CPU, measured at [128, 32768].)"""
    return torch.linalg.vecdot(a, b)


class TorchEpilogue:
    """Torch ops, in place on the chunk: `stats` turns z into d = u - max u (and zr likewise) and
    returns exp(d) with its row sums, so that the fused pass's `grad` on the same chunk does not
    recompute them (one exp per logit in all, one chunk-sized buffer when neither entropy nor KL
    is asked for). Torch ops run in order, so dz may be left in z's memory (`in_place`)."""

    in_place = True

    def stats(self, z, zr, y, inv_t, st, s):
        e = s + z.shape[0]
        zy = z.gather(1, y[:, None])[:, 0]
        m = z.amax(1, keepdim=True)
        d = z.sub_(m)                                # in place: z is d = u - max u from here on
        if inv_t != 1.0:
            d.mul_(inv_t)
        need_rel = st.entropy is not None or zr is not None
        p = d.exp() if need_rel else d.exp_()        # exp(d); in place when d is not read again
        se = p.sum(1)
        log_se = se.log()
        mu = m[:, 0] * inv_t                         # max u
        lse = mu + log_se
        st.lse[s:e] = lse
        st.logp[s:e] = zy * inv_t - lse
        pd = _rowdot(p, d) / se if need_rel else None   # E_p[u - max u]
        if st.entropy is not None:   # H = log se - E_p[u - max u]: no large lse to cancel
            st.entropy[s:e] = log_se - pd
        mur = None
        if zr is not None:
            mr = zr.amax(1, keepdim=True)
            dr = zr.sub_(mr)                         # in place: zr is ur - max ur from here on
            if inv_t != 1.0:
                dr.mul_(inv_t)
            mur = mr[:, 0] * inv_t
            ekl_rel = pd - _rowdot(p, dr) / se       # E_p[(u - max u) - (ur - max ur)]
            log_se_r = dr.exp().sum(1).log()
            st.ekl[s:e] = ekl_rel + (mu - mur)
            # Clamp tiny negative round-off: KL is non-negative by definition.
            st.kl[s:e] = (ekl_rel - log_se + log_se_r).clamp_min(0)
        if st.sum_p2 is not None:
            st.sum_p2[s:e] = _rowdot(p, p) / (se * se)
        return p, se, mu, mur

    def grad(self, z, zr, state, y, inv_t, lse, coefs, out):
        # dz = gl onehot + p (alpha + beta u + gamma ur); the coefficients are already scaled by 1/T.
        gl, alpha, beta, gamma = coefs.gl, coefs.alpha, coefs.beta, coefs.gamma
        if state is not None:  # after `stats`: z holds d = u - max u, zr holds ur - max ur, p = exp(d)
            p, se, mu, mur = state
            if beta is None:
                dz = p.mul_((alpha / se)[:, None])
            else:
                shift = alpha + beta * mu + (0.0 if gamma is None else gamma * mur)
                t = z.mul_(beta[:, None]).add_(shift[:, None])
                if gamma is not None:
                    t.add_(zr.mul_(gamma[:, None]))
                dz = t.mul_(p.div_(se[:, None]))
        elif beta is None:  # z is the raw logits chunk (the composable backward)
            dz = (z.mul_(inv_t) if inv_t != 1.0 else z).sub_(lse[:, None]).exp_().mul_(alpha[:, None])
        else:
            p = torch.mul(z, inv_t).sub_(lse[:, None]).exp_()
            t = z.mul_((beta * inv_t)[:, None]).add_(alpha[:, None])   # alpha + beta u
            if gamma is not None:
                t.add_(zr.mul_((gamma * inv_t)[:, None]))               # + gamma ur
            dz = t.mul_(p)
        dz.scatter_add_(1, y[:, None], gl[:, None].to(dz.dtype))       # gl * onehot
        return dz if out is None else out.copy_(dz)


class TritonEpilogue:
    """The Triton kernels: row statistics (`kernels/row_stats.py`), the logits gradient into its
    own buffer (`kernels/logits_grad.py`)."""

    in_place = False

    def __init__(self):
        # imported here: triton is optional for the torch path
        from ..kernels import logits_grad, row_stats
        self.row_stats, self.logits_grad = row_stats.row_stats, logits_grad.logits_grad

    def stats(self, z, zr, y, inv_t, st, s):
        e = s + z.shape[0]

        def part(t):
            return None if t is None else t[s:e]

        self.row_stats(z, zr, y, inv_t, lse=part(st.lse), logp=part(st.logp), ent=part(st.entropy),
                       kl=part(st.kl), ekl=part(st.ekl), sum_p2=part(st.sum_p2))
        return None

    def grad(self, z, zr, state, y, inv_t, lse, coefs, out):
        return self.logits_grad(z, zr, y, inv_t, lse=lse, gl=coefs.gl, alpha=coefs.alpha, beta=coefs.beta,
                                gamma=coefs.gamma, out=out)
