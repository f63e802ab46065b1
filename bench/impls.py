"""Implementations compared by the benchmark, each computing a case's loss from the same inputs.

Every implementation is a `build(case, inp, device) -> step` function: `step()` runs the forward
and returns the 0-d loss (the harness calls `loss.backward()`), or returns None when it does its
whole job in the call (the `matmul3` floor). A build that cannot run here raises `Skip(reason)`;
an exception on the first call is also reported as a skip with its text, never dropped.

Rows:
- `plain`: textbook PyTorch with materialized logits: `logits = (h @ W.T).float()`,
  `log_softmax`, `gather`, then the loss below (`F.cross_entropy` for SFT).
- `torch_compile`: the same function under `torch.compile` (default mode).
- `liger`: Liger-Kernel's chunked fused-linear losses (`LigerFusedLinearGRPOLoss`,
  `LigerFusedLinearDPOLoss`, `LigerFusedLinearCrossEntropyLoss` for SFT). The chunked losses
  compute the gradients inside the forward call, so their "forward" time holds fwd+bwd.
- `cce`, `cce_compile`: Apple's Cut Cross-Entropy `linear_cross_entropy` for the log-prob part
  (`reduction="none"` gives `-logp` per token; impl "cce" = Triton kernels with the default
  gradient filtering, impl "torch_compile" = its compiled materializing path), then the loss below.
- `gro_torch`, `gro_triton`: `gro_kernels.logprobs.token_logprobs` (backend "torch" / "triton")
  then the loss below: the primitive alone, with the benchmark's own loss math.
- `gro_loss_torch`, `gro_loss_triton`: the package's full `gro_kernels.loss.gro_loss(method=...)`.
- `torch_lce` (SFT only): PyTorch core's `torch.nn.functional.linear_cross_entropy` (torch >= 2.13)
  with `options=LinearCrossEntropyOptions()`, its chunked path (the logits never whole).
- `matmul3`: the three bare matmuls of any fwd+bwd, `logits = H @ W^T`, `dH = G @ W`,
  `dW = G^T @ H`, on all N rows: the floor of the rows that compute every token (`gro_torch`,
  `gro_triton`, plain). `matmul3_rows`: the same on the rows `gro_loss` computes (the mask's,
  minus ignored targets): its like-for-like floor.
- `gro_loss_{triton,torch}_c<C>[_g<G>]`: `gro_loss` with chunks of C tokens and groups of G
  (default C: gradient GEMMs per chunk) tokens, for the chunk / group sweep of the GPU suite.
"""
from __future__ import annotations

import importlib
import re
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .cases import IGNORE_INDEX, Case, chunked_logp

GRO_IMPLS = ("gro_torch", "gro_triton", "gro_loss_torch", "gro_loss_triton")


def is_gro(impl: str) -> bool:
    """A gro_kernels row (never a peer in the ratios)."""
    return impl in GRO_IMPLS or _VARIANT.match(impl) is not None

# `torch.compile(dynamic=...)` for the torch_compile row; the worker sets it from its config
# (--quick compiles once with dynamic shapes: CPU compilation costs ~30 s per graph on 2 cores).
COMPILE_DYNAMIC = None


class Skip(Exception):
    """This implementation cannot run this case here; the message says why."""


class Step:
    """A built implementation: `fn()` returns the loss; `comparable` says whether its loss is the
    case's loss (agreement is checked) or a peer doing less work (agreement reported n/a)."""

    def __init__(self, fn: Callable[[], Optional[torch.Tensor]], comparable: bool = True, note: str = ""):
        self.fn = fn
        self.comparable = comparable
        self.note = note

    def __call__(self):
        return self.fn()


# ----------------------------------------------------------------------------------------------
# The loss math on [B, T] float32 log-probs (one copy, used by every row but the peers' own losses)


def opts(case: Case) -> dict:
    return dict(case.options)


def ppo_loss(logp, old_logp, advantages, mask, *, eps_low, eps_high, kl_coef, ref_logp, agg, entropy=None,
             entropy_coef=0.0):
    """Clipped surrogate (GRPO / DAPO): -min(rho*A, clip(rho, 1-el, 1+eh)*A) + kl_coef*k3
    - entropy_coef*H, aggregated."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if kl_coef:
        x = ref_logp - logp
        per_token = per_token + kl_coef * (torch.exp(x) - x - 1)
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    if agg == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp_min(1)
    if agg == "seq_mean_token_mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()
    raise ValueError(f"unknown aggregation {agg!r}")


def dpo_loss(logp, ref_logp, mask, *, beta):
    """-log sigmoid(beta (D_w - D_l)), D = sum_t m (logp - ref_logp); rows [0,P) chosen, [P,2P) rejected."""
    d = ((logp - ref_logp) * mask).sum(-1)
    p = d.shape[0] // 2
    return -F.logsigmoid(beta * (d[:p] - d[p:])).mean()


def case_loss(case: Case, inp: Dict[str, torch.Tensor], logp, entropy=None, ref_logp=None):
    o, m = opts(case), inp["mask"]
    if case.name in ("grpo", "dapo", "grpo_ent"):
        return ppo_loss(logp, inp["old_logp"], inp["advantages"], m, ref_logp=inp["ref_logp"], entropy=entropy, **o)
    if case.name == "dpo":
        return dpo_loss(logp, ref_logp, m, **o)
    if case.name == "logprob_entropy":
        return -((inp["token_adv"] * logp + 0.01 * entropy) * m).sum() / m.sum()
    if case.name == "sft":
        return -(logp * m).sum() / m.sum()
    raise ValueError(case.name)


# ----------------------------------------------------------------------------------------------
# plain PyTorch (materialized logits) and torch.compile of the same function


def plain_stats(hidden, weight, targets, entropy: bool):
    logits = (hidden @ weight.T).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logp = logp * (targets != IGNORE_INDEX)
    ent = -(logprobs.exp() * logprobs).sum(-1) if entropy else None
    return logp, ent


def make_plain_loss(case: Case):
    def loss_fn(hidden, weight, targets, inp):
        if case.name == "sft":
            logits = (hidden @ weight.T).float()
            return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)
        ref = None
        if case.pairs:
            with torch.no_grad():
                ref, _ = plain_stats(inp["ref_hidden"], inp["ref_weight"], targets, False)
        logp, ent = plain_stats(hidden, weight, targets, case.entropy)
        return case_loss(case, inp, logp, ent, ref)

    return loss_fn


def build_plain(case, inp, device):
    fn = make_plain_loss(case)
    return Step(lambda: fn(inp["hidden"], inp["weight"], inp["targets"], inp))


def build_torch_compile(case, inp, device):
    fn = torch.compile(make_plain_loss(case), dynamic=COMPILE_DYNAMIC)
    dyn = "" if COMPILE_DYNAMIC is None else f", dynamic={COMPILE_DYNAMIC}"
    return Step(lambda: fn(inp["hidden"], inp["weight"], inp["targets"], inp),
                note=f"torch.compile(plain{dyn}); compile time excluded (warm-up)")


# ----------------------------------------------------------------------------------------------
# Liger-Kernel


def _import(module: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - report any import failure as the skip reason
        raise Skip(f"cannot import {module}: {type(e).__name__}: {e}") from None


def build_liger(case, inp, device):
    compiled = device == "cuda"  # its loss math under torch.compile: Liger's default on GPU
    cnote = "" if compiled else " (compiled=False on CPU)"
    if case.name in ("grpo", "dapo", "logprob_entropy"):
        mod = _import("liger_kernel.chunked_loss")
        if case.name == "logprob_entropy":
            loss_mod = mod.LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                                    compiled=compiled)
            adv = inp["token_adv"].mean(-1)
            fn = lambda: loss_mod(inp["hidden"], inp["weight"], inp["targets"], inp["mask"], adv)[0]  # noqa: E731
            return Step(fn, comparable=False,
                        note="LigerFusedLinearGRPOLoss (dapo, on-policy): log-prob only, no entropy" + cnote)
        o = opts(case)
        loss_mod = mod.LigerFusedLinearGRPOLoss(
            beta=o["kl_coef"], use_ref_model=o["kl_coef"] > 0, compiled=compiled,
            epsilon_low=o["eps_low"], epsilon_high=o["eps_high"],
            loss_type="grpo" if o["agg"] == "seq_mean_token_mean" else "dapo",
        )
        ref = inp["ref_logp"] if o["kl_coef"] > 0 else None

        def fn():
            return loss_mod(inp["hidden"], inp["weight"], inp["targets"], inp["mask"], inp["advantages"],
                            ref_per_token_logps=ref, old_per_token_logps=inp["old_logp"])[0]

        return Step(fn, note="LigerFusedLinearGRPOLoss; grads computed inside forward" + cnote)
    if case.name == "dpo":
        mod = _import("liger_kernel.chunked_loss")
        loss_mod = mod.LigerFusedLinearDPOLoss(beta=opts(case)["beta"], compiled=compiled, use_ref_model=True,
                                               average_log_prob=False, loss_type="sigmoid")

        def fn():
            out = loss_mod(inp["weight"], inp["hidden"], inp["targets"], ref_input=inp["ref_hidden"],
                           ref_weight=inp["ref_weight"])
            return out[0] if isinstance(out, tuple) else out

        return Step(fn, note="LigerFusedLinearDPOLoss; grads computed inside forward" + cnote)
    if case.name == "sft":
        mod = _import("liger_kernel.transformers.fused_linear_cross_entropy")
        loss_mod = mod.LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
        d = inp["hidden"].shape[-1]
        return Step(lambda: loss_mod(inp["weight"], inp["hidden"].reshape(-1, d), inp["targets"].reshape(-1)),
                    note="LigerFusedLinearCrossEntropyLoss (Triton)")
    if case.name == "grpo_ent":
        raise Skip("Liger's fused GRPO loss has no entropy bonus (one of the restrictions TRL lists)")
    raise Skip(f"no Liger loss for case {case.name}")


# ----------------------------------------------------------------------------------------------
# Cut Cross-Entropy


def _build_cce(case, inp, device, impl):
    mod = _import("cut_cross_entropy")
    lce = mod.linear_cross_entropy
    d = inp["hidden"].shape[-1]
    note = ("CCE impl=cce (Triton), default gradient filtering" if impl == "cce"
            else "CCE impl=torch_compile (materializes logits)")

    def logp_of(hidden, weight, targets):
        nll = lce(hidden.reshape(-1, d), weight, targets.reshape(-1), reduction="none", impl=impl)
        return -nll.reshape(targets.shape).float()

    if case.name == "sft":
        return Step(lambda: lce(inp["hidden"].reshape(-1, d), inp["weight"], inp["targets"].reshape(-1),
                                impl=impl), note=note)

    def fn():
        ref = None
        if case.pairs:
            with torch.no_grad():
                ref = logp_of(inp["ref_hidden"], inp["ref_weight"], inp["targets"])
        logp = logp_of(inp["hidden"], inp["weight"], inp["targets"])
        if case.entropy:  # CCE has no entropy: the peer does less work than the case asks
            return -((inp["token_adv"] * logp) * inp["mask"]).sum() / inp["mask"].sum()
        return case_loss(case, inp, logp, None, ref)

    if case.entropy:
        return Step(fn, comparable=False, note=note + "; log-prob only, no entropy")
    return Step(fn, note=note + "; log-probs, then the benchmark's loss")


def build_cce(case, inp, device):
    return _build_cce(case, inp, device, "cce")


def build_cce_compile(case, inp, device):
    return _build_cce(case, inp, device, "torch_compile")


# ----------------------------------------------------------------------------------------------
# PyTorch core's fused linear cross-entropy


def build_torch_lce(case, inp, device):
    if case.name != "sft":
        raise Skip("torch.nn.functional.linear_cross_entropy is a cross-entropy: the SFT case only")
    lce = getattr(F, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if lce is None or options is None:
        raise Skip(f"torch {torch.__version__} has no F.linear_cross_entropy with chunking options (torch >= 2.13)")
    d = inp["hidden"].shape[-1]
    return Step(lambda: lce(inp["hidden"].reshape(-1, d), inp["weight"], inp["targets"].reshape(-1),
                            ignore_index=IGNORE_INDEX, options=options()),
                note="F.linear_cross_entropy(options=LinearCrossEntropyOptions()): its chunked path")


# ----------------------------------------------------------------------------------------------
# gro_kernels


def _check_triton(device):
    if device != "cuda":
        raise Skip("backend 'triton' needs CUDA; the CPU interpreter (TRITON_INTERPRET=1) is far too slow "
                   "to benchmark")


def _build_gro(case, inp, device, backend):
    if backend == "triton":
        _check_triton(device)
    mod = _import("gro_kernels.logprobs")
    tl = mod.token_logprobs

    def fn():
        ref = None
        if case.pairs:
            with torch.no_grad():
                ref = tl(inp["ref_hidden"], inp["ref_weight"], inp["targets"], backend=backend).logp
        st = tl(inp["hidden"], inp["weight"], inp["targets"], return_entropy=case.entropy, backend=backend)
        return case_loss(case, inp, st.logp, st.entropy, ref)

    return Step(fn, note=f"token_logprobs(backend={backend!r}) + the benchmark's loss")


def build_gro_torch(case, inp, device):
    return _build_gro(case, inp, device, "torch")


def build_gro_triton(case, inp, device):
    return _build_gro(case, inp, device, "triton")


def _build_gro_loss(case, inp, device, backend, options=None):
    """gro_loss(method=case); `options`: its backend_options (chunk / group sizes of a variant)."""
    if backend == "triton":
        _check_triton(device)
    bo = dict(backend_options=options) if options else {}
    gro_loss = _import("gro_kernels.loss").gro_loss
    tl = _import("gro_kernels.logprobs").token_logprobs
    h, w, y, m = inp["hidden"], inp["weight"], inp["targets"], inp["mask"]
    o = opts(case)
    if case.name in ("grpo", "grpo_ent"):
        fn = lambda: gro_loss(h, w, y, method="grpo", mask=m, rewards=inp["rewards"],  # noqa: E731
                              group_ids=inp["group_ids"], old_logp=inp["old_logp"], ref_logp=inp["ref_logp"],
                              kl_coef=o["kl_coef"], eps_low=o["eps_low"], eps_high=o["eps_high"],
                              entropy_coef=o.get("entropy_coef", 0.0), backend=backend, **bo).loss
    elif case.name == "dapo":
        fn = lambda: gro_loss(h, w, y, method="dapo", mask=m, rewards=inp["rewards"],  # noqa: E731
                              group_ids=inp["group_ids"], old_logp=inp["old_logp"],
                              eps_low=o["eps_low"], eps_high=o["eps_high"], backend=backend, **bo).loss
    elif case.name == "dpo":
        def fn():
            with torch.no_grad():
                ref = tl(inp["ref_hidden"], inp["ref_weight"], y, backend=backend).logp
            return gro_loss(h, w, y, method="dpo", mask=m, group_ids=inp["group_ids"], labels=inp["labels"],
                            ref_logp=ref, beta=o["beta"], backend=backend, **bo).loss
    elif case.name == "sft":
        fn = lambda: gro_loss(h, w, y, method="sft", mask=m, backend=backend, **bo).loss  # noqa: E731
    else:
        raise Skip(f"gro_loss has no preset for case {case.name!r} (its primitive is the gro_{backend} row)")
    extra = f", backend_options={options}" if options else ""
    return Step(fn, note=f"gro_loss(method={case.name!r}, backend={backend!r}{extra})")


def build_gro_loss_torch(case, inp, device):
    return _build_gro_loss(case, inp, device, "torch")


def build_gro_loss_triton(case, inp, device):
    return _build_gro_loss(case, inp, device, "triton")


# `gro_loss_triton_c1280` / `gro_loss_torch_c2048_g8192`: gro_loss with chunks of c tokens and groups
# of g (default c: the gradient GEMMs per chunk, the design before issue 16) tokens.
_VARIANT = re.compile(r"(gro_loss_triton|gro_loss_torch)_c(\d+)(?:_g(\d+))?$")


def _build_variant(name, case, inp, device):
    m = _VARIANT.match(name)
    vocab = inp["weight"].shape[0]
    chunk, group = int(m.group(2)), int(m.group(3) or m.group(2))
    return _build_gro_loss(case, inp, device, m.group(1).rsplit("_", 1)[1],
                           dict(chunk_elements=chunk * vocab, group_elements=group * vocab))


# ----------------------------------------------------------------------------------------------
# the matmul floor


def build_matmul3(case, inp, device, rows=None):
    h = inp["hidden"].detach().reshape(-1, inp["hidden"].shape[-1])
    w = inp["weight"].detach()
    if rows is not None:
        h = h[rows]

    def fn():
        g = h @ w.T  # logits; reused as the logits gradient G (same shape and dtype)
        dh = g @ w
        dw = g.T @ h
        del dh, dw
        return None

    return Step(fn, comparable=False, note="three bare matmuls H@W^T, G@W, G^T@H (time floor, no loss)")


def counted_rows(inp) -> torch.Tensor:
    """The tokens gro_loss computes: in the mask, and not ignore_index."""
    return ((inp["mask"] > 0) & (inp["targets"] != IGNORE_INDEX)).reshape(-1)


def build_matmul3_rows(case, inp, device):
    rows = counted_rows(inp)
    step = build_matmul3(case, inp, device, rows=rows)
    step.note = (f"the three bare matmuls on the {int(rows.sum())} of {rows.numel()} rows gro_loss computes "
                 "(mask & targets != ignore_index): gro_loss's like-for-like floor")
    return step


BUILDERS: Dict[str, Callable] = {
    "plain": build_plain,
    "torch_compile": build_torch_compile,
    "liger": build_liger,
    "cce": build_cce,
    "cce_compile": build_cce_compile,
    "torch_lce": build_torch_lce,
    "gro_torch": build_gro_torch,
    "gro_triton": build_gro_triton,
    "gro_loss_torch": build_gro_loss_torch,
    "gro_loss_triton": build_gro_loss_triton,
    "matmul3": build_matmul3,
    "matmul3_rows": build_matmul3_rows,
}


def build(name: str, case: Case, inp, device: str) -> Step:
    if _VARIANT.match(name):
        return _build_variant(name, case, inp, device)
    if name not in BUILDERS:
        raise ValueError(f"unknown implementation {name!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[name](case, inp, device)


# ----------------------------------------------------------------------------------------------
# The float32 reference for agreement


def reference(case: Case, inp: Dict[str, torch.Tensor], max_elements: Optional[int] = None):
    """The case's loss and its gradients in float32 plain PyTorch, a block of rows at a time.

    Same math as `plain` (materialized log_softmax per block, autograd), organized so that it fits
    at any size: (1) log-probs (and entropy) for all tokens without grad; (2) the loss on those
    [B,T] tensors with autograd, giving dL/dlogp and dL/dH; (3) per block of rows, recompute the
    block's logits with autograd and backpropagate those upstream gradients into hidden and weight.
    Returns (loss: float, grad_hidden fp32, grad_weight fp32, logp [B,T] fp32, entropy [B,T] fp32 or None).
    """
    if max_elements is None:
        max_elements = 1 << 28 if inp["hidden"].is_cuda else 1 << 25
    h = inp["hidden"].detach().float()
    w = inp["weight"].detach().float()
    y = inp["targets"]
    B, T, d = h.shape
    V = w.shape[0]
    hf, yf = h.reshape(-1, d), y.reshape(-1)
    rows = max(1, max_elements // V)
    logp = torch.empty(B * T, device=h.device)
    ent = torch.empty(B * T, device=h.device) if case.entropy else None
    with torch.no_grad():
        for a in range(0, B * T, rows):
            lp, e = plain_stats(hf[a:a + rows], w, yf[a:a + rows], case.entropy)
            logp[a:a + rows] = lp
            if ent is not None:
                ent[a:a + rows] = e
        ref = chunked_logp(inp["ref_hidden"], inp["ref_weight"], y) if case.pairs else None
    logp2 = logp.reshape(B, T).requires_grad_(True)
    ent2 = ent.reshape(B, T).requires_grad_(True) if ent is not None else None
    loss = case_loss(case, inp, logp2, ent2, ref)
    grads = torch.autograd.grad(loss, [logp2] + ([ent2] if ent2 is not None else []))
    g_logp = grads[0].reshape(-1)
    g_ent = grads[1].reshape(-1) if ent2 is not None else None
    wl = w.clone().requires_grad_(True)
    gh = torch.empty_like(hf)
    for a in range(0, B * T, rows):
        hc = hf[a:a + rows].clone().requires_grad_(True)
        lp, e = plain_stats(hc, wl, yf[a:a + rows], case.entropy)
        outs, gos = [lp], [g_logp[a:a + rows]]
        if e is not None:
            outs.append(e)
            gos.append(g_ent[a:a + rows])
        torch.autograd.backward(outs, gos)
        gh[a:a + rows] = hc.grad
    return float(loss.detach()), gh.reshape(B, T, d), wl.grad, logp.reshape(B, T), None if ent is None else ent.reshape(B, T)


def agreement(loss, inp, ref) -> dict:
    ref_loss, ref_gh, ref_gw = ref[:3]
    out = {"loss": None if loss is None else float(loss.detach()), "ref_loss": ref_loss}
    out["loss_abs_diff"] = None if loss is None else abs(float(loss.detach()) - ref_loss)
    for key, t, r in (("grad_hidden", inp["hidden"].grad, ref_gh), ("grad_weight", inp["weight"].grad, ref_gw)):
        if t is None:
            out[f"{key}_max_abs_diff"] = None
            continue
        diff = (t.detach().float() - r).abs().max().item()
        out[f"{key}_max_abs_diff"] = diff
        out[f"{key}_rel_diff"] = diff / max(r.abs().max().item(), 1e-30)
    return out
