"""The chunked engine every fast backend runs on: vendor GEMMs for the FLOPs, an epilogue for the rest.

Per chunk of `ct` tokens (the non-ignored rows only):

    z   = h_c @ W^T + b            the vendor GEMM (cuBLAS / MKL), fp32 out: never rounded to 16 bits
    tau = kept_threshold(z)        only when truncated (top_k / top_p / min_p): torch ops on the chunk
    stats(z)                       one read: lse, target logit, entropy, with a reference chunk the exact KL
    dz  = grad(z; coefficients)    one read-write, in place (16-bit for 16-bit inputs, fp32 math)
    dh_c = dz @ W,  dW += dz^T @ h_c,  db += sum dz     the vendor GEMM, dW/db accumulated in fp32

with u = softcap(z) / T per row and p the softmax of u over the row's kept set (`transform.py`).
The epilogue (`epilogues.py`) is torch ops or two Triton kernels; the engine never knows which.
Three ways through it:

    forward_stats     the statistics only (1 GEMM per chunk): `token_logprobs` forward, forward-only passes
    backward_grads    recompute z, dz from upstream per-token gradients (3 GEMMs): `token_logprobs` backward
    fused_pass        statistics, then the per-token coefficients from a callback (the objective's
                      token-local loss), then dz and the gradients, in one sweep (3 GEMMs in all)

Math (p = the kept-set softmax of u, ur the reference head's transformed logits, w the class
weights (1 without), W = sum_v w_v):
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

Head precision: "native" keeps today's GEMMs (16-bit inputs: fp32-output GEMMs where the device has
them, else fp32 GEMMs on upcast weights; dz in the weight's dtype for the gradient GEMMs); "fp32"
and "tf32" run all three on fp32 copies (the weight whole when it fits FP32_COPY_ELEMENTS, else
cast a vocabulary slice at a time per use) with dz in fp32; `transform.gemm_precision` sets TF32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .transform import Transform, kept_threshold

# Workspace per chunk, in fp32 logits. At most four chunk-sized buffers are alive at once (z, the
# torch epilogue's p, the reference chunk, one transient), so the workspace is bounded whatever N.
# GPU: 768 MiB, big enough that the GEMMs run at full speed and the per-chunk fp32 dW update is
# amortized, small enough that with the fp32 dW sum of a bf16 Qwen-size head (2.3 GiB) the extra
# memory stays under 2 GiB beyond the gradients (bench/README.md). CPU: 4M logits (16 MiB):
# cache-sized chunks win there (N=2048, d=512, V=32768 on 2 quiet cores: 0.82x plain PyTorch).
GPU_CHUNK_ELEMENTS = 3 << 26
CPU_CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_TOKENS = 16
# The fp32 dW update of 16-bit inputs goes through temporaries of at most this many elements.
DW_SLICE_ELEMENTS = 1 << 26
# A 16-bit weight that takes fp32 GEMMs (head_precision fp32 / tf32, or a device without fp32-output
# 16-bit GEMMs) is upcast whole when it has at most this many elements (1 GiB of fp32: a 32k x 8k
# head), else one vocabulary slice of at most DW_SLICE_ELEMENTS at a time, per GEMM (a Qwen-size
# 151936 x 4096 head is never held whole in fp32 beside the gradients).
FP32_COPY_ELEMENTS = 1 << 28


def chunk_tokens(n: int, vocab: int, device: torch.device, chunk_elements: Optional[int] = None) -> int:
    """Tokens per chunk: `chunk_elements` logits (a chunk holds at least one token's whole row).
    By default the device's budget above, at least 16 tokens, whole 64-row tiles from 128 up."""
    if chunk_elements is not None:
        return max(1, min(n, chunk_elements // max(vocab, 1)))
    budget = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    ct = max(MIN_CHUNK_TOKENS, budget // max(vocab, 1))
    if ct >= 128:
        ct -= ct % 64
    return max(1, min(n, ct))


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


@dataclass(frozen=True)
class Divergence:
    """What the statistics pass computes against the second head (module docstring): `reverse_kl`
    (a reference head's exact KL, or a teacher's reverse KL), `forward_kl`, or `jsd` with mixture weight
    `beta` in (0, 1) (TRL's / Liger's generalized JSD; their end points 0 and 1 are the two KLs)."""

    kind: str = "reverse_kl"
    beta: float = 0.5

    def __post_init__(self):
        if self.kind not in ("reverse_kl", "forward_kl", "jsd"):
            raise ValueError(f"divergence must be reverse_kl, forward_kl or jsd, got {self.kind!r}")
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

    def dz_times_w(self, dz: torch.Tensor) -> torch.Tensor:
        """dz @ W in the statistics dtype (dz in the statistics dtype), slice by slice when sliced."""
        if self.w_stat is not None:
            return dz @ self.w_stat
        out = None
        for a, ws in self.w_slices():
            part = dz[:, a:a + ws.shape[0]]
            out = part @ ws if out is None else out.addmm_(part, ws)
        return out


class Grads:
    """dh rows written per chunk; dW and db accumulated across chunks in fp32 (or float64).

    For 16-bit weights the fp32 dW sum is held in vocabulary slices (at most DW_SLICE_ELEMENTS
    each), so that `result` casts it to the weight's dtype a slice at a time and frees the fp32
    slices as it goes: the sum and the returned gradient never both exist whole."""

    def __init__(self, head: Head, need_dh: bool, need_dw: bool, need_db: bool):
        n, d = head.h.shape
        vocab = head.w.shape[0]
        dev, stat = head.h.device, head.stat
        self.head = head
        self.dh = torch.empty(n, d, dtype=head.h.dtype, device=dev) if need_dh else None
        self.dw = self.dw_parts = None
        if need_dw and head.w.dtype == stat:
            # The first chunk writes dW (beta = 0) rather than adding to a zero-filled buffer.
            self.dw = torch.empty(vocab, d, dtype=stat, device=dev)
        elif need_dw:
            step = max(1, DW_SLICE_ELEMENTS // max(d, 1))
            self.dw_parts = [(a, torch.zeros(min(step, vocab - a), d, dtype=stat, device=dev))
                             for a in range(0, vocab, step)]
        self._dw_written = False
        self.db = torch.zeros(vocab, dtype=stat, device=dev) if (need_db and head.b is not None) else None

    def add(self, dz: torch.Tensor, s: int, e: int) -> None:
        """The gradients of chunk rows s..e from its logits gradient dz [e - s, V]."""
        head = self.head
        if self.dh is not None:
            if dz.dtype == head.w.dtype:
                torch.mm(dz, head.w, out=self.dh[s:e])
            else:
                self.dh[s:e] = head.dz_times_w(dz.to(head.stat)).to(self.dh.dtype)
        if self.dw is not None:
            self._add_dw(dz, head.h[s:e].to(self.dw.dtype))
        if self.dw_parts is not None:
            self._add_dw_parts(dz, head.h[s:e])
        if self.db is not None:
            self.db += dz.sum(0, dtype=self.db.dtype)

    def _add_dw(self, dz, hc):
        first, self._dw_written = not self._dw_written, True
        if dz.dtype != self.dw.dtype:
            dz = dz.to(self.dw.dtype)  # a 16-bit dz of fp32 weights (not made by the epilogues)
        if first:
            torch.mm(dz.T, hc, out=self.dw)
        else:
            self.dw.addmm_(dz.T, hc)  # accumulates inside the GEMM

    def _add_dw_parts(self, dz, hc):
        native, in_gemm = self.head.native, _gemm_accumulates_fp32(dz.device, dz.dtype)
        hc_stat = None if native else hc.to(self.head.stat)
        for a, part in self.dw_parts:
            dza = dz[:, a:a + part.shape[0]]
            if native and in_gemm:
                # 16-bit dz and h, fp32 sum: cuBLAS adds into it in the GEMM's epilogue (beta = 1).
                torch.addmm(part, dza.T, hc, out_dtype=torch.float32, out=part)
            elif native:
                # The same without that overload: an fp32-output GEMM, then the add.
                part += torch.mm(dza.T, hc, out_dtype=torch.float32)
            else:  # no fp32-output GEMM for 16-bit inputs here (CPU): upcast
                part.addmm_(dza.T.to(part.dtype), hc_stat)

    def result(self):
        """(dh, dW, db): dW in the weight's dtype for 16-bit weights, else the statistics dtype
        (zero when no chunk ran)."""
        dw = self.dw
        if dw is not None and not self._dw_written:
            dw.zero_()
        if self.dw_parts is not None:
            parts, self.dw_parts = self.dw_parts, None
            cast = []
            while parts:  # cast a slice, drop its fp32 sum
                cast.append(parts.pop(0)[1].to(self.head.w.dtype))
            dw = torch.cat(cast) if len(cast) > 1 else cast[0]
        return self.dh, dw, self.db


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
                  epilogue, ct: int, want_sum_p2: bool = False, want_mean_logp: bool = False,
                  class_weight: Optional[torch.Tensor] = None, div: Divergence = REVERSE_KL) -> Stats:
    """Statistics of every row, one GEMM (two with a second head) per chunk."""
    n = y.shape[0]
    st = Stats.zeros(n, dtype=head.stat, device=y.device, entropy=want_entropy, ref=ref is not None,
                     sum_p2=want_sum_p2, mean_logp=want_mean_logp, div=div)
    with_thresholds(tf, n, head.stat, y.device)
    for s in range(0, n, ct):
        e = min(s + ct, n)
        z = head.logits(s, e)
        zr = None if ref is None else ref.logits(s, e)
        epilogue.stats(z, zr, y[s:e], _chunk_transform(tf, z, s, e, epilogue), st, s, class_weight, div=div)
    return st


@dataclass
class Extra:
    """The second head's gradient term beyond p (alpha + beta u + gamma ur), for forward_kl and jsd
    (module docstring): per-row delta (scaled by 1/T), the second head's lse, and the divergence."""

    div: Divergence
    delta: torch.Tensor
    lse_r: torch.Tensor

    def rows(self, sl: slice) -> "Extra":
        return Extra(self.div, self.delta[sl], self.lse_r[sl])


def coefficients_from_upstream(st: Stats, gl, gh, gk, gs, tf: Transform, gm=None, class_weight=None, vocab=None,
                               div: Divergence = REVERSE_KL):
    """(gl, alpha, beta, gamma, eta, extra) of the module docstring, each scaled by 1/T (dz is wrt the raw z);
    extra is None unless gk is the gradient of a forward_kl or jsd divergence."""
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
    return tuple(tf.scale(t) for t in (gl, alpha, beta, gamma, eta)) + (extra,)


def _part(t, sl):
    return None if t is None else t[sl]


def backward_grads(head: Head, ref: Optional[Head], y: torch.Tensor, coefs, *, tf: Transform, lse: torch.Tensor,
                   grads: Grads, epilogue, ct: int, class_weight=None) -> None:
    """Recompute each chunk's logits and accumulate the gradients for fixed per-token coefficients."""
    gl, alpha, beta, gamma, eta, extra = coefs
    n = y.shape[0]
    for s in range(0, n, ct):
        e = min(s + ct, n)
        z = head.logits(s, e)
        zr = None if gamma is None and extra is None else ref.logits(s, e)
        sl = slice(s, e)
        dz = epilogue.grad(z, zr, y[sl], tf.rows(sl), lse[sl], gl[sl], alpha[sl], _part(beta, sl),
                           _part(gamma, sl), out_dtype=head.dz_dtype, eta=_part(eta, sl), class_weight=class_weight,
                           extra=None if extra is None else extra.rows(sl))
        grads.add(dz, s, e)


CoefficientFn = Callable[[int, int, Stats], tuple]


def fused_pass(head: Head, ref: Optional[Head], y: torch.Tensor, *, tf: Transform, want_entropy: bool,
               coefficients: CoefficientFn, grads: Grads, epilogue, ct: int, want_mean_logp: bool = False,
               class_weight=None, div: Divergence = REVERSE_KL) -> Stats:
    """Statistics, coefficients and gradients in one sweep: 3 GEMMs per chunk (plus the reference's).

    `coefficients(s, e, chunk_stats)` gets the chunk's Stats (rows s..e) and returns the upstream
    per-token gradients (g_logp, g_entropy or None, g_kl or None, g_lse or None, g_mean_logp or None)
    of the loss for those rows.
    """
    n = y.shape[0]
    st = Stats.zeros(n, dtype=head.stat, device=y.device, entropy=want_entropy, ref=ref is not None,
                     mean_logp=want_mean_logp, div=div)
    with_thresholds(tf, n, head.stat, y.device)
    vocab = vocab_size(head, epilogue)
    for s in range(0, n, ct):
        e = min(s + ct, n)
        z = head.logits(s, e)
        zr = None if ref is None else ref.logits(s, e)
        tc = _chunk_transform(tf, z, s, e, epilogue)
        epilogue.stats(z, zr, y[s:e], tc, st, s, class_weight, for_grad=True, div=div)
        sl = slice(s, e)
        chunk = st.rows(sl)
        gl, gh, gk, gs, gm = coefficients(s, e, chunk)
        c_gl, alpha, beta, gamma, eta, extra = coefficients_from_upstream(chunk, gl, gh, gk, gs, tc, gm, class_weight,
                                                                          vocab, div)
        dz = epilogue.grad(z, zr, y[sl], tc, chunk.lse, c_gl, alpha, beta, gamma, out_dtype=head.dz_dtype,
                           eta=eta, class_weight=class_weight, extra=extra)
        grads.add(dz, s, e)
    return st
