"""What happens to a raw logit before the softmax: soft cap, temperature, truncation; and the head's precision.

For each token (row) with raw logits z = W h + b:

    s = c * tanh(z / c)                 the soft cap (Gemma 2/3 `final_logit_softcapping`), when softcap=c
    u = s / T                           the temperature T of the row (a float, per sequence or per token)
    K = the kept set of the sampler     top_k / top_p / min_p (vLLM's order: min_p and top_k, then
                                        top_p on what they keep, renormalized)
    q = softmax(u) restricted to K and renormalized (the distribution the sampler drew from)

and every statistic (log-prob, entropy, KL, lse) is q's. The kept set is a threshold on the raw
logits: K = {v : z_v >= tau} (the soft cap and 1/T are increasing, so a threshold on u is one on z;
deciding on u with torch ops once per chunk and applying it to z makes every backend, kernel or
not, keep exactly the same tokens). Definitions (ties at a boundary are kept together):

    top_k:  u_v >= the k-th largest u of the row           (0, -1 or k >= V: off)
    min_p:  u_v >= max u + log(min_p), i.e. p_v >= min_p * max p   (0: off)
    top_p:  the mass of the kept tokens with a strictly larger u is < top_p of the kept mass
            (the smallest set of largest tokens whose mass reaches top_p; 1: off)

A target outside K (an offline row's token, or a sample from another sampler) joins its row's kept
set: its row's distribution is q over K + {y}, so logp is finite (<= 0) and differentiable. The
kept set is a constant of the gradient. The reference head (KL, ref_logp) is soft-capped and
tempered, never truncated: the full distribution, so the KL stays finite.

A -inf raw logit (a padded vocabulary row masked by a -inf bias) stays -inf under the soft cap
(c * tanh(-inf) would be -c and unmask it).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

HEAD_PRECISIONS = ("native", "fp32", "tf32")
# The candidates the kept-set search starts from (the largest logits of a row); grown x4 until the
# boundary lies strictly inside them. Memory: at most CANDIDATE_FRACTION of the chunk at once.
FIRST_CANDIDATES = 256
CANDIDATE_FRACTION = 4


@dataclass
class Transform:
    """The per-row logit transform of the compacted rows (n of them); `rows(sl)` views a chunk.

    inv_t: 1 / temperature, a float or an [n] tensor; cap: the soft cap c or None; top_k [n] int64
    (0 = off), top_p [n] (1 = off), min_p [n] (0 = off), each None when off for every row; tau [n]:
    the raw-logit threshold of each row's kept set, filled by the forward pass (-inf = keep all)."""

    inv_t: Union[float, torch.Tensor] = 1.0
    cap: Optional[float] = None
    top_k: Optional[torch.Tensor] = None
    top_p: Optional[torch.Tensor] = None
    min_p: Optional[torch.Tensor] = None
    tau: Optional[torch.Tensor] = None

    @property
    def truncates(self) -> bool:
        return self.top_k is not None or self.top_p is not None or self.min_p is not None

    def rows(self, sl) -> "Transform":
        """The transform of rows `sl` (a slice or an index tensor); tau is a view for a slice."""
        def part(t):
            if not isinstance(t, torch.Tensor):
                return t
            return t[sl] if isinstance(sl, slice) else t.index_select(0, sl)

        return Transform(inv_t=part(self.inv_t), cap=self.cap, top_k=part(self.top_k), top_p=part(self.top_p),
                         min_p=part(self.min_p), tau=part(self.tau))

    def scale(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """t / T per row (a coefficient of dz: the chain rule through u = s / T)."""
        return None if t is None else t * self.inv_t

    def without_truncation(self) -> "Transform":
        """The reference head's transform: soft cap and temperature, the full distribution."""
        return replace(self, top_k=None, top_p=None, min_p=None, tau=None)


# ---- checking the arguments --------------------------------------------------------------------

def _per_row(name, value, lead, device, *, dtype, check, what):
    """A scalar or a tensor shaped like targets or like its first dim -> a flat per-token tensor [N]
    (None for a scalar equal to `off`). `check(t)` is True where values are valid."""
    n = math.prod(lead)
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise ValueError(f"{name} is a constant of the sampler: pass a tensor without requires_grad (detach it)")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but targets are on {device}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        if dtype == torch.int64 and value.is_floating_point():
            if not bool((value == value.round()).all()):
                raise TypeError(f"{name} must hold integers, got dtype {value.dtype} with fractions")
        shape = tuple(value.shape)
        if value.dim() == 0:
            flat = value.reshape(1).expand(n)
        elif len(lead) >= 1 and shape == (lead[0],):
            flat = value.reshape(lead[0], *([1] * (len(lead) - 1))).expand(lead).reshape(-1)
        elif shape == tuple(lead):
            flat = value.reshape(-1)
        else:
            first = f"({lead[0]},) or " if len(lead) >= 1 else ""
            raise ValueError(f"{name} must be a number or a tensor of shape {first}{tuple(lead)} (targets), "
                             f"got shape {shape}")
        flat = flat.to(dtype)
    else:
        kind = numbers.Integral if dtype == torch.int64 else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"{name} must be {what}, got {value!r}")
        flat = torch.full((n,), value, dtype=dtype, device=device)
    if not bool(check(flat).all()):
        bad = flat[~check(flat)][:3].tolist()
        raise ValueError(f"{name} must be {what}, got {bad}")
    return flat


def check_head_options(*, temperature, softcap, top_k, top_p, min_p, head_precision, lead, device,
                       dtype: torch.dtype, vocab: int) -> Transform:
    """Validate the head options of `token_logprobs` / `gro_loss` (each error names its argument) and
    bring them to one per-token form for the N = prod(lead) tokens (before ignored rows are dropped)."""
    check_precision(head_precision, device, dtype)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not (0 < softcap < math.inf):
            raise ValueError(f"softcap must be a positive finite number (the logit cap c) or None, got {softcap!r}")
        softcap = float(softcap)
    if isinstance(temperature, torch.Tensor):
        t = _per_row("temperature", temperature, lead, device, dtype=_stat(dtype),
                     check=lambda x: (x > 0) & torch.isfinite(x), what="positive and finite")
        inv_t = t.reciprocal()
    else:
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
                or not (0 < temperature < math.inf):
            raise ValueError(f"temperature must be a positive number (or a tensor of them), got {temperature!r}")
        inv_t = 1.0 / float(temperature)
    k = p = mp = None
    if top_k is not None:
        k = _per_row("top_k", top_k, lead, device, dtype=torch.int64,
                     check=lambda x: x >= -1, what="an int >= 0 (0 or -1: off)")
        k = torch.where((k <= 0) | (k >= vocab), torch.zeros_like(k), k)
        k = k if bool((k > 0).any()) else None
    if top_p is not None:
        p = _per_row("top_p", top_p, lead, device, dtype=_stat(dtype),
                     check=lambda x: (x > 0) & (x <= 1), what="in (0, 1] (1: off)")
        p = p if bool((p < 1).any()) else None
    if min_p is not None:
        mp = _per_row("min_p", min_p, lead, device, dtype=_stat(dtype),
                      check=lambda x: (x >= 0) & (x <= 1), what="in [0, 1] (0: off)")
        mp = mp if bool((mp > 0).any()) else None
    return Transform(inv_t=inv_t, cap=softcap, top_k=k, top_p=p, min_p=mp)


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_precision(head_precision, device, dtype) -> None:
    """head_precision is native | fp32 | tf32; tf32 needs an fp32-capable CUDA GPU with TF32 (sm_80+)."""
    if head_precision not in HEAD_PRECISIONS:
        raise ValueError(f"head_precision must be one of {HEAD_PRECISIONS}, got {head_precision!r}")
    if head_precision != "tf32":
        return
    if device.type != "cuda":
        raise ValueError(f"head_precision='tf32' runs the head's GEMMs on TF32 tensor cores, which need a CUDA GPU "
                         f"(compute capability >= 8.0); got tensors on {device}. Use 'fp32' (exact fp32 GEMMs) here")
    if torch.cuda.get_device_capability(device)[0] < 8:
        raise ValueError("head_precision='tf32' needs TF32 tensor cores (compute capability >= 8.0, Ampere or "
                         f"newer); {torch.cuda.get_device_name(device)} has none. Use 'fp32'")
    if dtype == torch.float64:
        raise ValueError("head_precision='tf32' rounds fp32 GEMM inputs to TF32; the inputs are float64 "
                         "(use 'native' or 'fp32' for float64)")


# ---- the transform -----------------------------------------------------------------------------

def softcap(z: torch.Tensor, c: Optional[float]) -> torch.Tensor:
    """c * tanh(z / c) (a new tensor), with -inf kept -inf; z itself when c is None."""
    if c is None:
        return z
    return torch.where(torch.isneginf(z), z, torch.tanh(z / c) * c)


def softcap_(z: torch.Tensor, c: float, derivative: bool = True) -> Optional[torch.Tensor]:
    """z <- c * tanh(z / c) in place (-inf stays -inf); returns d/dz = 1 - tanh^2(z / c), a new tensor
    (None without `derivative`). 1 - t^2 loses its relative precision only where it is below the
    dtype's epsilon: those logits' gradients are that small, so their absolute error is at the level
    of the others' rounding."""
    # the mask of -inf logits only when there are some (one reduction, not a bool chunk, in the common case)
    masked = torch.isneginf(z) if z.numel() and bool(z.amin() == -math.inf) else None
    t = z.div_(c).tanh_()
    g = torch.addcmul(torch.ones_like(t), t, t, value=-1) if derivative else None
    t.mul_(c)
    if masked is not None:
        t.masked_fill_(masked, -math.inf)
    return g


def transform(z: torch.Tensor, tf: Transform) -> torch.Tensor:
    """u = softcap(z) / T per row (a new tensor; z is [rows, k] with tf's rows)."""
    u = softcap(z, tf.cap)
    inv_t = tf.inv_t
    if isinstance(inv_t, torch.Tensor):
        return u * inv_t.to(u.dtype)[:, None]
    return u * inv_t if inv_t != 1.0 else (u.clone() if u is z else u)


# ---- the kept set ------------------------------------------------------------------------------

def kept_threshold(z: torch.Tensor, tf: Transform) -> torch.Tensor:
    """tau [rows]: each row's kept set is {v : z_v >= tau} (-inf: the row is not truncated).

    Decided on u = transform(z) with torch ops over the chunk in memory, from the largest logits of
    each row (torch.topk, sorted): FIRST_CANDIDATES of them (at least top_k + 1), x4 until the
    boundary lies strictly inside; past 1/8 of the vocabulary a full sort of the row. top_p without
    top_k also takes one pass over the row for the kept mass. Rows are taken in groups so that the
    candidates never exceed 1/CANDIDATE_FRACTION of the chunk."""
    n, vocab = z.shape
    tau = torch.full((n,), -math.inf, dtype=z.dtype, device=z.device)
    active = torch.zeros(n, dtype=torch.bool, device=z.device)
    for t, off in ((tf.top_k, 0), (tf.top_p, 1), (tf.min_p, 0)):
        if t is not None:
            active |= t != off
    todo = active.nonzero()[:, 0]
    mass = _top_p_mass(z, tf, todo)
    width = FIRST_CANDIDATES
    if tf.top_k is not None:
        width = max(width, int(tf.top_k.max()) + 1)
    while todo.numel():
        width = vocab if 8 * width > vocab else width
        step = max(1, z.numel() // (CANDIDATE_FRACTION * width))
        unresolved = []
        for a in range(0, todo.numel(), step):
            rows = todo[a:a + step]
            value, done = _threshold_from_candidates(_take(z, rows), tf.rows(rows), width,
                                                     None if mass is None else mass[rows])
            tau[rows] = value
            unresolved.append(rows[~done])
        todo = torch.cat(unresolved)
        width *= 4
    return tau


def _take(z, rows):
    """z's rows `rows` (sorted, distinct): a view when they are consecutive, else a copy."""
    if rows.numel() and int(rows[-1]) - int(rows[0]) + 1 == rows.numel():
        return z[int(rows[0]):int(rows[-1]) + 1]
    return z.index_select(0, rows)


def _top_p_mass(z, tf: Transform, rows):
    """sum_v exp(u_v - max u) over the min_p set (the whole row without min_p) of the rows with top_p < 1
    and no top_k, whose kept mass can reach past any candidate list; NaN elsewhere (None: no such row)."""
    if tf.top_p is None or not rows.numel():
        return None
    need = tf.top_p[rows] < 1
    if tf.top_k is not None:
        need &= tf.top_k[rows] == 0
    rows = rows[need]
    if not rows.numel():
        return None
    mass = torch.full((z.shape[0],), math.nan, dtype=z.dtype, device=z.device)
    zr, tr = _take(z, rows), tf.rows(rows)
    u_max = transform(zr.amax(1, keepdim=True), tr)[:, 0]
    lo = u_max if tr.min_p is None else u_max + torch.log(tr.min_p.to(z.dtype))
    lo = torch.full_like(u_max, -math.inf) if tr.min_p is None else lo
    total = torch.zeros_like(u_max)
    step = max(1, z.shape[1] // CANDIDATE_FRACTION)
    for a in range(0, z.shape[1], step):
        u = transform(zr[:, a:a + step], tr)
        total += (torch.exp(u - u_max[:, None]) * (u >= lo[:, None])).sum(1)
    mass[rows] = total
    return mass


def _threshold_from_candidates(z, tf: Transform, width: int, mass=None):
    """(tau, resolved) for rows z [r, V] from their `width` largest logits; mass: _top_p_mass's rows."""
    vocab = z.shape[1]
    cand = z.topk(width, dim=1, sorted=True).values          # [r, width], descending
    u = transform(cand, tf)
    neg_inf = torch.full_like(u[:, 0], -math.inf)
    lo = neg_inf                                               # u-threshold of min_p and top_k
    if tf.top_k is not None:
        k = tf.top_k
        kth = u.gather(1, (k - 1).clamp(min=0)[:, None])[:, 0]
        lo = torch.where(k > 0, kth, lo)
    if tf.min_p is not None:
        floor = u[:, 0] + torch.log(tf.min_p.to(u.dtype))     # log(0) = -inf: off
        lo = torch.maximum(lo, floor)
    bound = lo
    if tf.top_p is not None:
        p = tf.top_p.to(u.dtype)
        e = torch.exp(u - u[:, :1])                            # masses of the candidates kept so far
        if tf.top_k is not None or tf.min_p is not None:
            e.mul_(u >= lo[:, None])
        # the kept mass: the candidates' when the min_p / top_k set ends within them, else the row's
        total = e.sum(1) if mass is None else torch.where(torch.isnan(mass), e.sum(1), mass)
        before = torch.cumsum(e, 1) - e                        # mass strictly before each candidate
        keep = (before < p[:, None] * total[:, None]) & (u >= lo[:, None])
        last = keep.sum(1).clamp(min=1) - 1                    # the max is always kept
        tp = u.gather(1, last[:, None])[:, 0]
        bound = torch.where(p < 1, torch.maximum(lo, tp), lo)
    # Resolved: the last candidate lies below the boundary (so no token outside the candidates can tie
    # with or pass it), or the candidates are the whole row.
    done = (u[:, -1] < bound) | (width >= vocab)
    # The raw-logit threshold: the smallest candidate logit whose u clears the bound (a prefix of the
    # sorted candidates; the largest always does).
    count = (u >= bound[:, None]).sum(1).clamp(min=1)
    tau = cand.gather(1, (count - 1)[:, None])[:, 0]
    tau = torch.where(torch.isneginf(bound), neg_inf, tau)
    return tau, done


def kept_mask(z: torch.Tensor, y: torch.Tensor, tau: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Bool [rows, V]: z_v >= tau of the row, or v is the row's target (None: nothing is truncated)."""
    if tau is None:
        return None
    keep = z >= tau[:, None]
    return keep.scatter_(1, y[:, None], True)


# ---- the head's precision ----------------------------------------------------------------------

@contextlib.contextmanager
def gemm_precision(head_precision: str, device: torch.device):
    """The fp32 GEMMs of the head: full fp32 for "fp32" (TF32 off, whatever torch is set to), TF32
    tensor cores for "tf32"; "native" (and any CPU) leaves torch's setting alone."""
    if head_precision == "native" or device.type != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul
    new_api = hasattr(mm, "fp32_precision")   # torch >= 2.9; mixing it with allow_tf32 is an error there
    name = "fp32_precision" if new_api else "allow_tf32"
    before = getattr(mm, name)
    want = head_precision == "tf32"
    setattr(mm, name, ("tf32" if want else "ieee") if new_api else want)
    try:
        yield
    finally:
        setattr(mm, name, before)
