"""The chunked engine every fast backend runs on: vendor GEMMs for the FLOPs, an epilogue for the rest.

The rows (the compacted tokens that count) are cut into chunks of `ct` tokens and the chunks into
groups (`Layout`). Per group of chunks:

    for each chunk c of the group:
        z     = h_c @ W^T + b          GEMM 1, fp32 out (never rounded to 16 bits); the only fp32 chunk alive
        tau   = kept_threshold(z)      only when truncated (top_k / top_p / min_p): torch ops on the chunk
        stats(z)                       one read: lse, target logit, entropy, with a reference chunk the exact KL
        coefficients(c)                the per-token gradients of the loss for these rows (the caller's)
        dz[c] = grad(z; coefficients)  one read of z, one write into the group's own dz buffer
    dh[group] = dz @ W                 GEMM 2, M = the group's tokens: fp32 accumulation and output, cast once
    dW (+)= dz^T @ h[group]            GEMM 3, K = the group's tokens: fp32 accumulation inside the GEMM
    db (+)= sum_rows dz

dz is in the head's dtype for native precision (16-bit for a 16-bit head: fp32 math, one
rounding), fp32 for head_precision fp32 / tf32. A 16-bit head's dW is written once when the whole
batch is one group (one GEMM whose split-K pieces, if any, are added in fp32: `fp32_reductions`);
with several groups it is summed across them in fp32, in vocabulary slices, inside each GEMM
(cuBLAS beta = 1). dh's GEMM (K = V, the one cuBLAS is likely to split) returns fp32 and is cast
once. fp16 has a 5-bit exponent: its dz carries a power-of-two scale per row (`fp16_row_scale`),
undone exactly on the fp32 outputs of GEMMs 2 and 3.

Workspace beyond the inputs and gradients: one fp32 logits chunk (and a reference head's), the
group's dz buffer, and for a 16-bit head the fp32 dW sum (several groups) or, for fp16 after the
last chunk, one fp32 vocabulary slice of dW's GEMM output (one group); the torch epilogue adds
exp(z - max) and one transient of the chunk's size. With the default groups (`layout`) the dz
buffer and the dW sum's cost beyond the gradient it becomes stay within 4 V d bytes for any N.

The epilogue (`epilogues.py`) is torch ops or two Triton kernels; the engine never knows which.
Three ways through it:

    forward_stats     the statistics only (GEMM 1): `token_logprobs` forward, forward-only passes
    backward_grads    recompute z, dz from upstream per-token gradients (3 GEMMs): `token_logprobs` backward
    fused_pass        statistics, then the per-token coefficients from a callback (the objective's
                      token-local loss), then dz and the gradients, in one sweep (3 GEMMs in all)

Math (u = softcap(z) / T per row, p the softmax of u over the row's kept set (`transform.py`),
ur the reference head's transformed logits, w the class weights (1 without), W = sum_v w_v):
    logp = u_y - lse,  H = lse - E_p[u],  KL = E_p[u - ur] - lse + lse_ref,
    M = (1/V) sum_v w_v (u_v - lse)   (the mean log-prob over the vocabulary, label smoothing's term)
    d/du of gl*logp + gH*H + gK*KL + gs*lse + gM*M  =  gl*onehot + p*(alpha + beta*u + gamma*ur) + eta*w
    alpha = gs - gl + gH*E_p[u] - gK*E_p[u - ur] - gM*W/V,  beta = gK - gH,  gamma = -gK,  eta = gM/V;
    dz = du / T * (1 - tanh^2(z / c))   (the last factor with a soft cap c), 0 outside the kept set
    but for the onehot and eta terms' own tokens (the target is always kept; eta only without truncation).

The second head is a frozen reference (the exact KL above) or a teacher, whose divergence D
(`Divergence`) replaces KL in the statistics ("kl") and in gK (a teacher takes no soft cap and
no truncation: api.py refuses them):
    reverse_kl  D = KL(p || q), as above (q = softmax(ur))
    forward_kl  D = KL(q || p) = E_q[ur - u] - lse_ref + lse,      dD/du = p - q
    jsd         D = b KL(q || m) + (1 - b) KL(p || m),  m = (1 - b) p + b q,
                dD/du = (1 - b) p (log p - log m - E_p[log p - log m])
so that gK*dD/du = p*(alpha' + ...) + extra with alpha' += gK (forward) or -gK (1 - b) E_p[log(p/m)]
(jsd), and extra = -delta q (forward) or delta p log(p/m) (jsd), delta = gK or gK (1 - b).

Head precision: "native" keeps the GEMMs above (16-bit inputs: fp32-output GEMMs where the device
has them, else fp32 GEMMs on upcast weights; dz in the weight's dtype); "fp32" and "tf32" run all
three on fp32 copies (the weight whole when it fits FP32_COPY_ELEMENTS, else cast a vocabulary
slice at a time per use) with dz in fp32; `transform.gemm_precision` sets TF32.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Tuple

import torch

from .transform import Transform, kept_threshold

# The fp32 logits chunk (GEMM 1's output, the epilogue's input). GPU: 768 MiB, 1280 tokens of a
# 151936-token vocabulary: GEMM 1 at full speed (M = 1280, 45 waves), and few chunks, since each
# chunk also costs ~70 small launches of the objective's coefficients (bench/README.md). CPU: 4M
# logits (16 MiB): cache-sized chunks win there (N=2048, d=512, V=32768 on 2 quiet cores: 0.82x
# plain PyTorch); on the CPU a group is one chunk, its dz written in place over z.
GPU_CHUNK_ELEMENTS = 3 << 26
CPU_CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_TOKENS = 16
# The fp32 outputs of 16-bit dW GEMMs go through vocabulary slices of at most this many elements.
DW_SLICE_ELEMENTS = 1 << 26
# A 16-bit weight that takes fp32 GEMMs (head_precision fp32 / tf32, or a device without fp32-output
# 16-bit GEMMs) is upcast whole when it has at most this many elements (1 GiB of fp32: a 32k x 8k
# head), else one vocabulary slice of at most DW_SLICE_ELEMENTS at a time, per GEMM (a Qwen-size
# 151936 x 4096 head is never held whole in fp32 beside the gradients).
FP32_COPY_ELEMENTS = 1 << 28
# fp16 dz: each row's coefficients are scaled into [2^6, 2^7). Entries down to 2^-30 of them stay
# representable (the summed loss of the smallest is ~V * 2^-31, < fp16's rounding), and dz may
# reach 2^9 times them (the entropy's factor is at most log V + 1) before fp16's 65504.
FP16_COEF_EXPONENT = 7
# fp16 dh and dW rows are kept scaled into [2^14, 2^15) until the upstream gradient (a loss scale)
# is known (`GradsOut`): one fp16 rounding of the final value.
FP16_OUT_EXPONENT = 15


def chunk_tokens(n: int, vocab: int, device: torch.device, chunk_elements: Optional[int] = None) -> int:
    """Tokens per chunk: `chunk_elements` logits (a chunk holds at least one token's whole row).
    By default the device's budget above, at least 16 tokens; whole 64-row tiles from 128 up and
    256-row tiles from 512 up (GEMM 1's M without a ragged tile)."""
    if chunk_elements is not None:
        return max(1, min(n, chunk_elements // max(vocab, 1)))
    budget = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    ct = max(MIN_CHUNK_TOKENS, budget // max(vocab, 1))
    if ct >= 512:
        ct -= ct % 256
    elif ct >= 128:
        ct -= ct % 64
    return max(1, min(n, ct))


@dataclass(frozen=True)
class Layout:
    """n rows cut into chunks of `chunk` tokens, the chunks into groups of `group` tokens (whole chunks)."""

    n: int
    chunk: int
    group: int

    def groups(self) -> Iterator[Tuple[int, int]]:
        for g0 in range(0, self.n, self.group):
            yield g0, min(g0 + self.group, self.n)

    def chunks(self, g0: int, g1: int) -> Iterator[Tuple[int, int]]:
        for s in range(g0, g1, self.chunk):
            yield s, min(s + self.chunk, g1)

    @property
    def n_groups(self) -> int:
        return -(-self.n // self.group) if self.n else 0


def layout(n: int, vocab: int, dim: int, device: torch.device, dz_dtype: torch.dtype, *,
           chunk_elements: Optional[int] = None, group_elements: Optional[int] = None) -> Layout:
    """Chunks (`chunk_tokens`) and groups. A group's dz is held until its gradient GEMMs, so the
    group is sized by memory: `group_elements` dz entries when given; by default on a GPU every
    token (one group: dW written once, no fp32 sum) while their dz costs at most an fp32 [V, d]
    (4 V d bytes: N <= 2d for a 16-bit head), else d tokens per group (a 16-bit dz of 2 V d bytes
    plus the fp32 dW sum, whose cost beyond the 16-bit gradient it becomes is another 2 V d), so
    the workspace beyond one chunk stays at most 4 V d bytes for any N. On a CPU: one chunk."""
    ct = chunk_tokens(n, vocab, device, chunk_elements)
    itemsize = torch.empty((), dtype=dz_dtype).element_size()
    if group_elements is not None:
        g = group_elements // max(vocab, 1)
    elif device.type != "cuda":
        g = ct
    elif n * vocab * itemsize <= 4 * vocab * dim:
        g = n
    else:
        g = dim
    g = n if g >= n else max(ct, g - g % ct)
    return Layout(n=n, chunk=ct, group=max(g, 1))


def _mm_fp32_out_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """torch.mm(a, b, out_dtype=torch.float32) for fp16/bf16 inputs: CUDA, torch >= 2.8."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 8)


_ACCUMULATE_PROBE: dict = {}


def _gemm_accumulates_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(c32, a16, b16, out_dtype=float32, out=c32)` accumulates correctly here.
    The overload exists from torch 2.8 on CUDA, but its early `out=` form was broken (torch issue
    154086), so it is checked once per device and dtype on tiny matrices against the slow path."""
    key = (str(device), dtype)
    if key not in _ACCUMULATE_PROBE:
        ok = False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(5, 7, generator=g, device=device).to(dtype)
            b = torch.randn(7, 3, generator=g, device=device).to(dtype)
            c = torch.randn(5, 3, generator=g, device=device)
            want = c + a.float() @ b.float()
            torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            ok = bool(torch.allclose(c, want, atol=1e-3, rtol=1e-3))
        except (RuntimeError, TypeError):
            ok = False
        _ACCUMULATE_PROBE[key] = ok
    return _ACCUMULATE_PROBE[key]


DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


@dataclass(frozen=True)
class Divergence:
    """What the statistics pass computes against the second head (module docstring): `reverse_kl`
    (a reference head's exact KL, or a teacher's reverse KL), `forward_kl`, or `jsd` with mixture weight
    `beta` in (0, 1) (TRL's / Liger's generalized JSD; their end points 0 and 1 are the two KLs)."""

    kind: str = "reverse_kl"
    beta: float = 0.5

    def __post_init__(self):
        if self.kind not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.kind!r}")
        if self.kind == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"the jsd kernel takes 0 < beta < 1 (0 and 1 are forward_kl / reverse_kl), got {self.beta}")

    @classmethod
    def named(cls, kind: str, jsd_beta: float = 0.5) -> "Divergence":
        """The user-facing (divergence, jsd_beta): jsd's end points beta 0 / 1 are forward / reverse KL,
        as TRL's and Liger's generalized JSD define them."""
        if kind == "jsd" and jsd_beta in (0.0, 1.0):
            return cls("forward_kl" if jsd_beta == 0.0 else "reverse_kl")
        if kind == "jsd" and not 0.0 <= jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta!r}")
        return cls(kind, float(jsd_beta))


REVERSE_KL = Divergence()


@contextmanager
def fp32_reductions():
    """16-bit GEMMs whose split-K pieces (if cuBLAS splits K) are added in fp32, not in 16 bits.
    Each tile accumulates in fp32 anyway; torch's default lets cuBLAS reduce the pieces in bf16/fp16."""
    m = torch.backends.cuda.matmul
    saved = m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction
    m.allow_bf16_reduced_precision_reduction = m.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = saved


def _mm_stat(a: torch.Tensor, b: torch.Tensor, stat: torch.dtype) -> torch.Tensor:
    """a @ b accumulated and returned in the statistics dtype (16-bit inputs: out_dtype=float32,
    so no K-split is ever added up in 16 bits)."""
    return a @ b if a.dtype == stat else torch.mm(a, b, out_dtype=stat)


@dataclass
class Head:
    """One linear head on the compacted rows: h [n, d], W [V, d], b [V] or None."""

    h: torch.Tensor
    w: torch.Tensor
    b: Optional[torch.Tensor]
    stat: torch.dtype          # float32 (float64 for float64 inputs)
    precision: str = "native"  # native | fp32 | tf32 (transform.HEAD_PRECISIONS)

    def __post_init__(self):
        upcast = self.w.dtype != self.stat and (
            self.precision != "native" or not _mm_fp32_out_supported(self.w.device, self.w.dtype))
        # native: the weight's own dtype (or a 16-bit GEMM with fp32 output) runs the GEMMs
        self.native = not upcast
        # fp32 / tf32: dz and the gradient GEMMs in fp32 too; native: dz in the weight's dtype
        self.dz_dtype = self.stat if self.precision != "native" else self.w.dtype
        self.w_stat = self.w if not upcast else (
            self.w.to(self.stat) if self.w.numel() <= FP32_COPY_ELEMENTS else None)
        self.b_stat = None if self.b is None else self.b.to(self.stat)

    def w_slices(self):
        """(start, W[start:start+k] in the statistics dtype) covering the vocabulary: the weight itself
        or its fp32 copy, or fp32 casts of vocabulary slices made one at a time (bounded memory)."""
        if self.w_stat is not None:
            yield 0, self.w_stat
            return
        vocab, d = self.w.shape
        step = max(1, DW_SLICE_ELEMENTS // max(d, 1))
        for a in range(0, vocab, step):
            yield a, self.w[a:a + step].to(self.stat)

    def logits(self, s: int, e: int) -> torch.Tensor:
        """z = h[s:e] @ W^T + b, in the statistics dtype."""
        hc = self.h[s:e]
        if not self.native:
            hc = hc.to(self.stat)
            if self.w_stat is None:  # a vocabulary slice of the fp32 weight at a time
                z = torch.empty(hc.shape[0], self.w.shape[0], dtype=self.stat, device=hc.device)
                for a, ws in self.w_slices():
                    z[:, a:a + ws.shape[0]] = hc @ ws.T
                return z if self.b_stat is None else z.add_(self.b_stat)
        if self.w_stat is not None and self.w_stat.dtype == self.stat:
            hc = hc.to(self.stat)
            if self.b_stat is None:
                return hc @ self.w_stat.T
            return torch.addmm(self.b_stat, hc, self.w_stat.T)
        z = torch.mm(hc, self.w.T, out_dtype=torch.float32)
        return z if self.b_stat is None else z.add_(self.b_stat)

    def gemm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b of gradient-GEMM operands (dz, h) in the statistics dtype: 16-bit operands of a native
        head with fp32 accumulation and output; otherwise on fp32 (upcast) operands."""
        if self.native:
            return _mm_stat(a, b, self.stat)
        return a.to(self.stat) @ b.to(self.stat)

    def dz_times_w(self, dz: torch.Tensor) -> torch.Tensor:
        """dz @ W in the statistics dtype (fp32 accumulation), slice by slice when sliced."""
        if self.native:
            return _mm_stat(dz, self.w, self.stat)   # K = V: never added up in 16 bits
        dz = dz.to(self.stat)
        if self.w_stat is not None:
            return dz @ self.w_stat
        out = None
        for a, ws in self.w_slices():
            part = dz[:, a:a + ws.shape[0]]
            out = part @ ws if out is None else out.addmm_(part, ws)
        return out


def fp16_row_scale(size: torch.Tensor) -> torch.Tensor:
    """Powers of two s with size * s in [2^6, 2^7) (`FP16_COEF_EXPONENT`); rows without a gradient
    get 2^64, so that they never set a group's common scale (the smallest s of its rows)."""
    _, exponent = torch.frexp(size)
    s = torch.exp2((FP16_COEF_EXPONENT - exponent).clamp(max=64).to(size.dtype))
    return torch.where(size > 0, s, 2.0 ** 64)


def _to_fp16_rows(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = t * r in fp16, r a power of two per row putting the row's largest entry in
    [2^14, 2^15) (all of fp16's precision, 2x headroom); returns 1 / r, the rows' inverse scales."""
    _, exponent = torch.frexp(t.abs().amax(1))
    r = torch.exp2((FP16_OUT_EXPONENT - exponent).clamp(max=100).to(t.dtype))
    torch.mul(t, r[:, None], out=out)
    return 1.0 / r


@dataclass
class GradsOut:
    """dh, dW, db as the engine leaves them. fp16 dh and dW carry an inverse scale per row
    (`inv_dh`, `inv_dw`): the gradient is value * inv, applied by `finish` together with the
    upstream gradient, so that fp16 rounds the final value once, after any loss scale. db stays
    in the statistics dtype (the caller casts it)."""

    dh: Optional[torch.Tensor]
    dw: Optional[torch.Tensor]
    db: Optional[torch.Tensor]
    inv_dh: Optional[torch.Tensor] = None
    inv_dw: Optional[torch.Tensor] = None

    def finish(self, g: Optional[torch.Tensor] = None):
        """(dh, dW, db) times the upstream gradient g (a 0-d tensor, or None for 1), in place."""
        def apply(t, inv):
            if t is None or (inv is None and g is None):
                return t
            if inv is None:
                return t.mul_(g)   # a 0-d g stays fp32 (g.to(fp16) would be inf at GradScaler's 65536)
            k = inv if g is None else inv * g.to(inv.dtype)
            return t.mul_(k[:, None])   # fp32 product, one rounding to fp16

        return apply(self.dh, self.inv_dh), apply(self.dw, self.inv_dw), apply(self.db, None)


class Grads:
    """dh, dW, db from each group's dz: GEMMs 2 and 3 with fp32 accumulation, and the sums across
    groups. For 16-bit weights dW is cast to their dtype a vocabulary slice at a time (and with
    several groups its fp32 sum is held in slices, freed as they are cast), so the fp32 dW and
    the returned gradient never both exist whole. fp16 results keep per-row scales (`GradsOut`)."""

    def __init__(self, head: Head, need_dh: bool, need_dw: bool, need_db: bool, lay: Layout):
        n, d = head.h.shape
        vocab = head.w.shape[0]
        dev, stat = head.h.device, head.stat
        self.head, self.n_groups = head, lay.n_groups
        self.scaled = head.dz_dtype == torch.float16
        self.dh = torch.empty(n, d, dtype=head.h.dtype, device=dev) if need_dh else None
        self.inv_dh = torch.empty(n, dtype=stat, device=dev) if (need_dh and self.scaled) else None
        self.need_dw = need_dw
        self.dw = None                # the gradient itself (fp32/fp64 weights, or one group)
        self.dw_parts = None          # [fp32 sum of each vocabulary slice] across groups
        self.inv_dw = None
        self.db = torch.zeros(vocab, dtype=stat, device=dev) if (need_db and head.b is not None) else None
        step = max(1, DW_SLICE_ELEMENTS // max(d, 1))
        self.slices = [(a, min(a + step, vocab)) for a in range(0, vocab, step)]
        self._groups_done = 0

    def add(self, dz: torch.Tensor, g0: int, g1: int, scale: Optional[torch.Tensor] = None) -> None:
        """The gradients of rows g0..g1 from their dz [g1 - g0, V]; `scale`: fp16 dz rows were
        multiplied by these powers of two (`fp16_row_scale`)."""
        head, stat = self.head, self.head.stat
        h = head.h[g0:g1] if head.native else head.h[g0:g1].to(stat)
        inv_rows = inv_group = None
        if scale is not None:
            # dW sums over rows: one common scale S (the smallest), the rows' own folded into h as
            # S / s <= 1 (exact powers of two; a row so much smaller than the group's largest that
            # it underflows adds nothing fp16 could show).
            common = scale.min()
            h = h * (common / scale).to(h.dtype)[:, None]
            inv_rows, inv_group = 1.0 / scale, 1.0 / common
        if self.dh is not None:
            self._add_dh(dz, g0, g1, inv_rows)
        if self.need_dw:
            self._add_dw(dz, h, inv_group)
        if self.db is not None:
            if scale is None:
                self.db += dz.sum(0, dtype=stat)
            else:
                self.db += head.gemm((common / scale).to(dz.dtype)[None, :], dz)[0] * inv_group
        self._groups_done += 1

    def _add_dh(self, dz, g0, g1, inv_rows):
        out, head = self.dh[g0:g1], self.head
        if head.native and dz.dtype == out.dtype == head.stat:
            torch.mm(dz, head.w, out=out)
            return
        t = head.dz_times_w(dz)        # K = V: accumulated in fp32 and returned in fp32, never in 16 bits
        if inv_rows is None:
            out.copy_(t)
        else:
            self.inv_dh[g0:g1] = _to_fp16_rows(t, out) * inv_rows

    def _add_dw(self, dz, h, inv_group):
        head, stat = self.head, self.head.stat
        first = self._groups_done == 0
        if head.w.dtype == stat:  # fp32 (fp64) weights: the gradient is its own sum
            if first:
                self.dw = torch.mm(dz.T, h)
            else:
                self.dw.addmm_(dz.T, h)  # accumulates inside the GEMM
            return
        if self.n_groups == 1 and head.native and inv_group is None:
            # One group of a bf16 head: dW written once by one GEMM, its fp32 sums (over K = the
            # group's tokens, split or not) rounded once to bf16: no fp32 copy of dW, no cast pass.
            with fp32_reductions():
                self.dw = torch.mm(dz.T, h)
            return
        if self.n_groups == 1:  # fp16 (kept scaled per row) or no 16-bit GEMM here: fp32 slices, cast once
            self.dw = torch.empty(head.w.shape, dtype=head.w.dtype, device=dz.device)
            if inv_group is not None:
                self.inv_dw = torch.empty(head.w.shape[0], dtype=stat, device=dz.device)
            for a, b in self.slices:
                t = head.gemm(dz[:, a:b].T, h)
                if inv_group is None:
                    self.dw[a:b].copy_(t)
                else:
                    self.inv_dw[a:b] = _to_fp16_rows(t, self.dw[a:b]) * inv_group
            return
        in_gemm = inv_group is None and head.native and _gemm_accumulates_fp32(dz.device, dz.dtype)
        if first:
            self.dw_parts = []
        for i, (a, b) in enumerate(self.slices):
            dza = dz[:, a:b].T
            if first:
                part = head.gemm(dza, h)
                self.dw_parts.append(part if inv_group is None else part.mul_(inv_group))
            elif in_gemm:  # 16-bit dz and h, fp32 sum: cuBLAS adds into it in the GEMM's epilogue (beta = 1)
                part = self.dw_parts[i]
                torch.addmm(part, dza, h, out_dtype=stat, out=part)
            elif not head.native and inv_group is None:  # fp32 operands: accumulates inside the GEMM
                self.dw_parts[i].addmm_(dza.to(stat), h)
            else:  # an fp32-output GEMM, then the add (with the fp16 scale undone)
                t = head.gemm(dza, h)
                self.dw_parts[i].add_(t if inv_group is None else t.mul_(inv_group))

    def result(self) -> GradsOut:
        """The gradients (dW zero when no row counted); see `GradsOut`."""
        head = self.head
        dw, inv_dw = self.dw, self.inv_dw
        if self.need_dw and self._groups_done == 0:
            dtype = head.stat if head.w.dtype == head.stat else head.w.dtype
            dw, inv_dw = torch.zeros(head.w.shape, dtype=dtype, device=head.w.device), None
        elif self.dw_parts is not None:
            parts, self.dw_parts = self.dw_parts, None
            cast, invs = [], []
            while parts:  # cast a slice, drop its fp32 sum
                part = parts.pop(0)
                if self.scaled:
                    cast.append(torch.empty(part.shape, dtype=head.w.dtype, device=part.device))
                    invs.append(_to_fp16_rows(part, cast[-1]))
                else:
                    cast.append(part.to(head.w.dtype))
                del part
            dw = torch.cat(cast) if len(cast) > 1 else cast[0]
            inv_dw = (torch.cat(invs) if len(invs) > 1 else invs[0]) if invs else None
        return GradsOut(self.dh, dw if self.need_dw else None, self.db, self.inv_dh, inv_dw)


@dataclass
class Stats:
    """Per-token statistics of the compacted rows, in the statistics dtype. The entropy and KL are
    formed from sums relative to each row's max (no cancellation of two large lse values)."""

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: Optional[torch.Tensor] = None  # H = lse - E_p[u]
    kl: Optional[torch.Tensor] = None       # exact KL(p || p_ref), >= 0
    ekl: Optional[torch.Tensor] = None      # E_p[u - ur], for the KL's gradient
    sum_p2: Optional[torch.Tensor] = None   # sum_v p_v^2 (verl's optimal token baseline), no gradient
    mean_logp: Optional[torch.Tensor] = None  # (1/V) sum_v w_v log p_v (label smoothing's term)
    top1: Optional[torch.Tensor] = None     # 1.0 where the target's logit is the row's largest, no gradient
    lse_r: Optional[torch.Tensor] = None    # the second head's lse (forward_kl, jsd: q in the gradient)
    e_pm: Optional[torch.Tensor] = None     # E_p[log p - log m] (jsd's gradient)

    @classmethod
    def zeros(cls, n, *, dtype, device, entropy: bool, ref: bool, sum_p2: bool = False,
              mean_logp: bool = False, div: Divergence = REVERSE_KL) -> "Stats":
        """Room for n rows: the vectors asked for, the others None."""
        def vec(want=True):
            return torch.zeros(n, dtype=dtype, device=device) if want else None

        kind = div.kind if ref else None
        return cls(logp=vec(), lse=vec(), entropy=vec(entropy), kl=vec(ref), ekl=vec(kind == "reverse_kl"),
                   sum_p2=vec(sum_p2), mean_logp=vec(mean_logp), top1=vec(),
                   lse_r=vec(kind in ("forward_kl", "jsd")), e_pm=vec(kind == "jsd"))

    def rows(self, sl: slice) -> "Stats":
        """A view of rows `sl` (the chunk's part)."""
        def part(t):
            return None if t is None else t[sl]

        return Stats(logp=self.logp[sl], lse=self.lse[sl], entropy=part(self.entropy), kl=part(self.kl),
                     ekl=part(self.ekl), sum_p2=part(self.sum_p2), mean_logp=part(self.mean_logp),
                     top1=part(self.top1), lse_r=part(self.lse_r), e_pm=part(self.e_pm))


@dataclass
class Extra:
    """The second head's gradient term beyond p (alpha + beta u + gamma ur), for forward_kl and jsd
    (module docstring): per-row delta (scaled by 1/T), the second head's lse, and the divergence."""

    div: Divergence
    delta: torch.Tensor
    lse_r: torch.Tensor

    def rows(self, s: int, e: int) -> "Extra":
        return Extra(self.div, self.delta[s:e], self.lse_r[s:e])


@dataclass
class Coefs:
    """The per-token coefficients of dz = gl onehot + p (alpha + beta u + gamma ur) + eta w (+ a teacher's
    forward_kl / jsd term, `extra`), already scaled by 1/T; `size` = max |upstream gradient| / T per token
    (what sets an fp16 row's scale)."""

    gl: torch.Tensor
    alpha: torch.Tensor
    beta: Optional[torch.Tensor] = None
    gamma: Optional[torch.Tensor] = None
    eta: Optional[torch.Tensor] = None
    size: Optional[torch.Tensor] = None
    extra: Optional[Extra] = None

    def rows(self, s: int, e: int) -> "Coefs":
        def part(t):
            return None if t is None else t[s:e]

        return Coefs(*(part(t) for t in (self.gl, self.alpha, self.beta, self.gamma, self.eta, self.size)),
                     extra=None if self.extra is None else self.extra.rows(s, e))

    def times(self, k: torch.Tensor) -> "Coefs":
        """Every coefficient multiplied by k per row (dz scales with them)."""
        def mul(t):
            return None if t is None else t * k

        extra = None if self.extra is None else replace(self.extra, delta=self.extra.delta * k)
        return replace(self, gl=mul(self.gl), alpha=mul(self.alpha), beta=mul(self.beta), gamma=mul(self.gamma),
                       eta=mul(self.eta), extra=extra)


def coefficients_from_upstream(st: Stats, gl, gh, gk, gs, tf: Transform, gm=None, class_weight=None, vocab=None,
                               div: Divergence = REVERSE_KL, *, with_size: bool = False) -> Coefs:
    """The `Coefs` of the module docstring's math for upstream per-token gradients (None = 0); `extra`
    is None unless gk is the gradient of a teacher's forward_kl or jsd divergence."""
    zeros = torch.zeros_like(st.lse)
    gl = zeros if gl is None else gl.to(st.lse.dtype)
    alpha = -gl if gs is None else gs.to(st.lse.dtype) - gl
    beta = gamma = eta = extra = None
    if gh is not None:
        alpha = alpha + gh * (st.lse - st.entropy)   # E_p[u]
        beta = -gh
    if gk is not None and div.kind == "reverse_kl":
        alpha = alpha - gk * st.ekl
        beta = gk if beta is None else beta + gk
        gamma = -gk
    elif gk is not None:
        delta = gk if div.kind == "forward_kl" else gk * (1 - div.beta)
        alpha = alpha + (gk if div.kind == "forward_kl" else -delta * st.e_pm)
        extra = Extra(div, tf.scale(delta), st.lse_r)
    if gm is not None:
        total = float(vocab) if class_weight is None else class_weight.sum(dtype=st.lse.dtype)
        alpha = alpha - gm * (total / vocab)
        eta = gm / vocab
    size = None
    if with_size:
        size = gl.abs()
        for g in (gh, gk, gs):
            if g is not None:
                size = torch.maximum(size, g.abs())
        if gm is not None:
            # the mean log-prob's terms of dz, p gM W/V and gM w_v/V, reach |gM| W/V: class weights
            # of a large mean would overflow an fp16 dz scaled by |gM| alone
            mean_w = torch.as_tensor(total / vocab, dtype=gm.dtype, device=gm.device)
            size = torch.maximum(size, gm.abs() * mean_w.clamp(min=1.0))
        size = tf.scale(size)
    return Coefs(*(tf.scale(t) for t in (gl, alpha, beta, gamma, eta)), size=size, extra=extra)


def _chunk_transform(tf: Transform, z: torch.Tensor, s: int, e: int, epilogue) -> Transform:
    """The chunk's transform; a truncated one gets its rows' kept-set thresholds (from z, before the
    epilogue transforms it in place) written into tf.tau for the backward. An epilogue over one slice
    of the vocabulary (`vocab_parallel.py`) finds them over the whole vocabulary itself."""
    tc = tf.rows(slice(s, e))
    if tf.truncates:
        tc.tau.copy_(getattr(epilogue, "kept_threshold", kept_threshold)(z, tc))
    return tc


def vocab_size(head: Head, epilogue) -> int:
    """V of the mean log-prob: the whole vocabulary's when the epilogue covers a slice of it."""
    return getattr(epilogue, "vocab", None) or head.w.shape[0]


def with_thresholds(tf: Transform, n: int, dtype, device) -> Transform:
    """tf with room for n kept-set thresholds when it truncates (filled by the forward sweep)."""
    if tf.truncates and tf.tau is None:
        tf.tau = torch.full((n,), -float("inf"), dtype=dtype, device=device)
    return tf


def forward_stats(head: Head, ref: Optional[Head], y: torch.Tensor, *, tf: Transform, want_entropy: bool,
                  epilogue, lay: Layout, want_sum_p2: bool = False, want_mean_logp: bool = False,
                  class_weight: Optional[torch.Tensor] = None, div: Divergence = REVERSE_KL) -> Stats:
    """Statistics of every row, GEMM 1 (and the second head's) per chunk."""
    n = y.shape[0]
    st = Stats.zeros(n, dtype=head.stat, device=y.device, entropy=want_entropy, ref=ref is not None,
                     sum_p2=want_sum_p2, mean_logp=want_mean_logp, div=div)
    with_thresholds(tf, n, head.stat, y.device)
    for s, e in lay.chunks(0, n):
        _chunk_stats(head, ref, y, s, e, tf, st, epilogue, class_weight, div)
    return st


def _chunk_stats(head, ref, y, s, e, tf, st, epilogue, class_weight, div):
    # A function, so that z dies at its return: the next chunk's z is never allocated beside it.
    z = head.logits(s, e)
    zr = None if ref is None else ref.logits(s, e)
    epilogue.stats(z, zr, y[s:e], _chunk_transform(tf, z, s, e, epilogue), st, s, class_weight, div=div)


ChunkCoefs = Callable[[int, int, Stats, Transform], Coefs]


def _sweep(head: Head, ref: Optional[Head], y: torch.Tensor, st: Stats, chunk_coefs: ChunkCoefs, *,
           tf: Transform, grads: Grads, epilogue, lay: Layout, stats: bool, class_weight=None,
           div: Divergence = REVERSE_KL) -> None:
    """The loop of the module docstring: per group, each chunk's z (its statistics when `stats`),
    coefficients and dz into the group's buffer; then the group's gradient GEMMs."""
    n, vocab = y.shape[0], head.w.shape[0]
    rows = min(lay.group, n)
    # The torch epilogue may leave dz in z's own memory (torch ops run in order) when a group is one
    # chunk of the statistics dtype; otherwise every group's dz has a buffer of its own.
    in_place = epilogue.in_place and lay.group == lay.chunk and head.dz_dtype == head.stat
    dz_buf = None if in_place else torch.empty(rows, vocab, dtype=head.dz_dtype, device=y.device)
    scale_buf = torch.empty(rows, dtype=head.stat, device=y.device) if grads.scaled else None
    for g0, g1 in lay.groups():
        dz = None
        for s, e in lay.chunks(g0, g1):
            out = None if dz_buf is None else dz_buf[s - g0:e - g0]
            sc = None if scale_buf is None else scale_buf[s - g0:e - g0]
            dz = _chunk_grad(head, ref, y, st, chunk_coefs, s, e, tf, epilogue, stats, out, sc, class_weight, div)
        if dz_buf is not None:
            dz = dz_buf[:g1 - g0]
        grads.add(dz, g0, g1, None if scale_buf is None else scale_buf[:g1 - g0])
        del dz


def _chunk_grad(head, ref, y, st, chunk_coefs, s, e, tf, epilogue, stats, out, scale_out, class_weight, div):
    # A function, so that z, zr and the epilogue's state die at its return (only dz lives on).
    z = head.logits(s, e)
    zr = None if ref is None else ref.logits(s, e)
    if stats:
        tc = _chunk_transform(tf, z, s, e, epilogue)
        state = epilogue.stats(z, zr, y[s:e], tc, st, s, class_weight, for_grad=True, div=div)
    else:
        tc, state = tf.rows(slice(s, e)), None
    chunk = st.rows(slice(s, e))
    coefs = chunk_coefs(s, e, chunk, tc)
    if scale_out is not None:
        scale_out.copy_(fp16_row_scale(coefs.size))
        coefs = coefs.times(scale_out)
    if coefs.gamma is None and coefs.extra is None:
        zr = None  # the second head's chunk matters only through gamma (a teacher's: its extra term)
    return epilogue.grad(z, zr, y[s:e], tc, chunk.lse, coefs.gl, coefs.alpha, coefs.beta, coefs.gamma, out,
                         eta=coefs.eta, class_weight=class_weight, state=state, extra=coefs.extra)


def backward_grads(head: Head, ref: Optional[Head], y: torch.Tensor, coefs: Coefs, *, tf: Transform,
                   lse: torch.Tensor, grads: Grads, epilogue, lay: Layout, class_weight=None) -> None:
    """Recompute each chunk's logits and accumulate the gradients for fixed per-token coefficients."""
    st = Stats(logp=lse, lse=lse)
    second = ref if (coefs.gamma is not None or coefs.extra is not None) else None
    _sweep(head, second, y, st, lambda s, e, _, __: coefs.rows(s, e),
           tf=tf, grads=grads, epilogue=epilogue, lay=lay, stats=False, class_weight=class_weight)


CoefficientFn = Callable[[int, int, Stats], tuple]


def fused_pass(head: Head, ref: Optional[Head], y: torch.Tensor, *, tf: Transform, want_entropy: bool,
               coefficients: CoefficientFn, grads: Grads, epilogue, lay: Layout, want_mean_logp: bool = False,
               class_weight=None, div: Divergence = REVERSE_KL) -> Stats:
    """Statistics, coefficients and gradients in one sweep: 3 GEMMs per token (plus the second head's).

    `coefficients(s, e, chunk_stats)` gets the chunk's Stats (rows s..e) and returns the upstream
    per-token gradients (g_logp, g_entropy or None, g_kl or None, g_lse or None, g_mean_logp or None)
    of the loss for those rows.
    """
    n = y.shape[0]
    st = Stats.zeros(n, dtype=head.stat, device=y.device, entropy=want_entropy, ref=ref is not None,
                     mean_logp=want_mean_logp, div=div)
    with_thresholds(tf, n, head.stat, y.device)
    vocab = vocab_size(head, epilogue)

    def chunk_coefs(s, e, chunk, tc):
        gl, gh, gk, gs, gm = coefficients(s, e, chunk)
        return coefficients_from_upstream(chunk, gl, gh, gk, gs, tc, gm, class_weight, vocab, div,
                                          with_size=grads.scaled)

    _sweep(head, ref, y, st, chunk_coefs, tf=tf, grads=grads, epilogue=epilogue, lay=lay, stats=True,
           class_weight=class_weight, div=div)
    return st
