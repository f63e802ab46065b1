"""The two epilogues of the chunked engine: what happens to a logits chunk between the GEMMs.

Both implement
    stats(z, zr, y, inv_t, st, s)   fill st.logp / lse / ent / kl / ekl / sum_p2 at rows s.. from z [ct, V]
    grad(z, zr, y, inv_t, lse, gl, alpha, beta, gamma, out_dtype) -> dz [ct, V] (may reuse z's memory)
with the math of `engine.py`'s docstring. `TorchEpilogue` is torch ops (any device: the CPU path);
`TritonEpilogue` launches the two fused kernels of `gro_kernels.kernels.epilogue` (the GPU path,
or the CPU under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch


def _rowdot(a, b):
    """Per-row dot product. (einsum "nv,nv->n" lowers to a batched GEMM of 1x1 outputs: 8-10x
    slower on the CPU, measured at [128, 32768].)"""
    return torch.linalg.vecdot(a, b)


class TorchEpilogue:
    """Torch ops. Keeps the chunk's exp(u - max) from `stats` so that the fused pass's `grad` on
    the same chunk does not recompute it (one exp per logit in all)."""

    def __init__(self):
        self._cache = None  # (z, unnormalized p, row sums) of the last stats call

    def stats(self, z, zr, y, inv_t, st, s):
        e = s + z.shape[0]
        m = z.amax(1, keepdim=True)
        d = torch.sub(z, m)
        if inv_t != 1.0:
            d.mul_(inv_t)                            # u - max u, u = z / T
        need_rel = st.ent is not None or zr is not None
        p = d.exp() if need_rel else d.exp_()        # in place when d is not needed again
        se = p.sum(1)
        log_se = se.log()
        lse = m[:, 0] * inv_t + log_se
        st.lse[s:e] = lse
        st.logp[s:e] = z.gather(1, y[:, None])[:, 0] * inv_t - lse
        pd = _rowdot(p, d) / se if need_rel else None   # E_p[u - max u]
        del d
        if st.ent is not None:   # H = log se - E_p[u - max u]: no large lse to cancel
            st.ent[s:e] = log_se - pd
        if zr is not None:
            mr = zr.amax(1, keepdim=True)
            dr = torch.sub(zr, mr)
            if inv_t != 1.0:
                dr.mul_(inv_t)                       # ur - max ur
            ekl_rel = pd - _rowdot(p, dr) / se       # E_p[(u - max u) - (ur - max ur)]
            log_se_r = dr.exp_().sum(1).log()
            st.ekl[s:e] = ekl_rel + (m[:, 0] - mr[:, 0]) * inv_t
            # Clamp tiny negative round-off: KL is non-negative by definition.
            st.kl[s:e] = (ekl_rel - log_se + log_se_r).clamp_min(0)
        if st.sum_p2 is not None:
            st.sum_p2[s:e] = _rowdot(p, p) / (se * se)
        self._cache = (z, p, se)

    def grad(self, z, zr, y, inv_t, lse, gl, alpha, beta, gamma, out_dtype):
        cached = self._cache is not None and self._cache[0] is z
        if cached:
            _, p, se = self._cache
            self._cache = None
        if beta is None:  # log-prob (and lse) only: dz = p * alpha
            if cached:
                dz = p.mul_((alpha / se)[:, None])
            else:
                dz = (z.mul_(inv_t) if inv_t != 1.0 else z).sub_(lse[:, None]).exp_().mul_(alpha[:, None])
        else:
            if cached:
                p.div_(se[:, None])
            else:
                p = torch.mul(z, inv_t).sub_(lse[:, None]).exp_()
            t = z.mul_((beta * inv_t)[:, None]).add_(alpha[:, None])   # alpha + beta u
            if gamma is not None:
                t.add_(zr.mul_((gamma * inv_t)[:, None]))               # + gamma ur
            dz = t.mul_(p)
        dz.scatter_add_(1, y[:, None], gl[:, None].to(dz.dtype))       # gl * onehot
        return dz if dz.dtype == out_dtype or out_dtype == torch.float64 else dz.to(out_dtype)


class TritonEpilogue:
    """The two fused Triton kernels (row statistics; logits gradient written in place)."""

    def __init__(self):
        from ..kernels import epilogue as kernels  # imported here: triton is optional for the torch path
        self.k = kernels

    def stats(self, z, zr, y, inv_t, st, s):
        e = s + z.shape[0]

        def part(t):
            return None if t is None else t[s:e]

        self.k.launch_row_stats(z, zr, y, inv_t, lse=part(st.lse), logp=part(st.logp), ent=part(st.ent),
                                kl=part(st.kl), ekl=part(st.ekl), sum_p2=part(st.sum_p2))

    def grad(self, z, zr, y, inv_t, lse, gl, alpha, beta, gamma, out_dtype):
        return self.k.launch_logits_grad(z, zr, y, inv_t, lse=lse, gl=gl, alpha=alpha, beta=beta, gamma=gamma,
                                         out_dtype=out_dtype)
