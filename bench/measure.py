"""Timing, memory and agreement of one (case, shape, implementation), and the worker loop.

Timing. Each iteration clears the gradients, times `loss = step()` (forward) and
`loss.backward()` (backward) and reports the median of `repeat` iterations after `warmup` ones.
CPU: `time.perf_counter`. CUDA: CUDA events around each part, with a 256 MB buffer written
before every iteration so no input starts out resident in the 60 MB L2 (what
`triton.testing.do_bench` does); the number of iterations is capped by a per-measurement time budget.

Memory. Both figures are taken on one extra, untimed iteration (after the warm-up, so one-time
costs such as torch.compile's compilation are not counted):
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the
  allocated bytes at the start of the step (inputs and everything else already resident).
- CPU: PyTorch's CPU allocator reports every allocation and free to the profiler when
  `torch.profiler.profile(profile_memory=True)` is on; the running sum of those `[memory]`
  events, sorted by time, is the live tensor bytes allocated during the step, and its maximum
  is the peak. This counts exactly the tensors the step allocates (inputs are allocated before
  and not counted); it misses memory that libraries allocate outside PyTorch's allocator (MKL /
  oneDNN scratch), which is small next to [N, V] logits.
`peak_bytes` is that peak; `extra_bytes = peak_bytes - grad_bytes` is the memory above the inputs
and their gradients (hidden.grad and weight.grad are outputs every row must hold; they are None at
the start of the step). As a cross-check on Linux, the worker also records the resident-set
high-water mark of the first timed iteration (`/proc/self/clear_refs` "5" resets VmHWM; the
worker runs with MALLOC_MMAP_THRESHOLD_=65536 so freed large blocks go back to the OS) as
`rss_peak_delta_bytes`; it includes allocator slack and non-PyTorch memory.
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Optional

import torch

from . import impls
from .cases import CASES, Shape, grad_bytes, input_bytes, make_inputs


# ----------------------------------------------------------------------------------------------
# memory helpers


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_profiled_peak(run) -> int:
    """Peak live bytes allocated through PyTorch's CPU allocator while `run()` executes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"):
            events.append((e.start_ns(), e.nbytes()))
    events.sort()
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------
# one measurement


def _clear_grads(inp):
    inp["hidden"].grad = None
    inp["weight"].grad = None


def _run_once(step, inp):
    _clear_grads(inp)
    loss = step()
    if loss is not None:
        loss.backward()
    return loss


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


def _reason(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text[:400]


class L2Flush:
    def __init__(self, device):
        self.buf = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device) if device == "cuda" else None

    def __call__(self):
        if self.buf is not None:
            self.buf.zero_()


def time_iterations(step, inp, device, repeat, max_seconds, flush: L2Flush, rss: bool):
    fwd, bwd, rss_delta = [], [], None
    start = time.perf_counter()
    for i in range(repeat):
        _clear_grads(inp)
        if device == "cuda":
            flush()
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            loss = step()
            e1.record()
            if loss is not None:
                loss.backward()
            e2.record()
            torch.cuda.synchronize()
            fwd.append(e0.elapsed_time(e1))
            bwd.append(e1.elapsed_time(e2))
        else:
            measure_rss = rss and i == 0 and _reset_hwm()
            rss0 = _proc_status_kb("VmRSS") if measure_rss else None
            t0 = time.perf_counter()
            loss = step()
            t1 = time.perf_counter()
            if loss is not None:
                loss.backward()
            t2 = time.perf_counter()
            if rss0 is not None:
                hwm = _proc_status_kb("VmHWM")
                rss_delta = (hwm - rss0) * 1024 if hwm is not None else None
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
        if i + 1 >= 3 and time.perf_counter() - start > max_seconds:
            break
    tot = [a + b for a, b in zip(fwd, bwd)]
    return {
        "fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd), "total_ms": statistics.median(tot),
        "total_ms_min": min(tot), "n": len(tot),
    }, loss, rss_delta


def measure_peak(step, inp, device) -> int:
    _clear_grads(inp)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run_once(step, inp)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_profiled_peak(lambda: _run_once(step, inp))


def measure_one(case, shape: Shape, impl: str, inp, device, cfg, ref) -> dict:
    rec = {"case": case.name, "impl": impl, "shape": shape.to_dict(), "device": device, "status": "ok",
           "reason": "", "note": "", "comparable": True}
    try:
        step = impls.build(impl, case, inp, device)
    except impls.Skip as e:
        rec.update(status="skipped", reason=str(e))
        return rec
    rec["note"], rec["comparable"] = step.note, step.comparable
    # warm-up: the first call also tells whether the implementation runs here at all
    try:
        t0 = time.perf_counter()
        for _ in range(max(1, cfg["warmup"])):
            _run_once(step, inp)
        if device == "cuda":
            torch.cuda.synchronize()
        rec["warmup_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported with its error
        rec.update(status="oom" if _is_oom(e) else "skipped", reason=_reason(e))
        return rec
    try:
        if cfg.get("check_only"):
            loss = _run_once(step, inp)
            rec["time"] = None
        else:
            peak = measure_peak(step, inp, device)
            gb = grad_bytes(inp)
            rec["mem"] = {"peak_bytes": peak, "extra_bytes": peak - gb, "grad_bytes": gb,
                          "input_bytes": input_bytes(inp),
                          "method": "cuda.max_memory_allocated" if device == "cuda" else "profiler CPU allocator"}
            flush = L2Flush(device)
            times, loss, rss = time_iterations(step, inp, device, cfg["repeat"], cfg["max_seconds"], flush,
                                               rss=device == "cpu")
            del flush
            rec["mem"]["rss_peak_delta_bytes"] = rss
            if impl == "matmul3":
                times["fwd_ms"], times["bwd_ms"] = times["total_ms"], 0.0
            rec["time"] = times
            rec["tflops"] = shape.flops() / (times["total_ms"] * 1e-3) / 1e12
        if ref is not None and step.comparable:
            rec["agreement"] = impls.agreement(loss, inp, ref)
            if cfg.get("check_only") and impl in ("gro_torch", "gro_triton"):
                rec["agreement"].update(_token_agreement(case, inp, impl, ref))
        elif loss is not None:
            rec["loss"] = float(loss.detach())
    except Exception as e:  # noqa: BLE001
        rec.update(status="oom" if _is_oom(e) else "failed", reason=_reason(e))
        if not _is_oom(e):
            rec["traceback"] = traceback.format_exc()[-2000:]
    finally:
        _clear_grads(inp)
    return rec


def _token_agreement(case, inp, impl, ref) -> dict:
    from gro_kernels.logprobs import token_logprobs

    with torch.no_grad():
        st = token_logprobs(inp["hidden"], inp["weight"], inp["targets"], return_entropy=True,
                            backend=impl.split("_")[1])
    ref_logp, ref_ent = ref[3], ref[4]
    out = {"logp_max_abs_diff": (st.logp - ref_logp).abs().max().item()}
    if ref_ent is not None:
        out["entropy_max_abs_diff"] = (st.entropy - ref_ent).abs().max().item()
    return out


# ----------------------------------------------------------------------------------------------
# the worker: one plan (case, shapes, impls) in this process, one JSON line per measurement


def run_worker(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    device = spec["device"]
    cfg = spec["cfg"]
    case = CASES[spec["case"]]
    out = open(spec["out"], "a")
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    impls.COMPILE_DYNAMIC = cfg.get("compile_dynamic")
    oom_impls = set()
    for sd in spec["shapes"]:
        shape = Shape(**{k: sd[k] for k in ("tokens", "hidden", "vocab", "seq_len", "dtype")})
        try:
            inp = make_inputs(case, shape, device, seed=cfg.get("seed", 0))
        except Exception as e:  # noqa: BLE001
            for impl in spec["impls"]:
                _emit(out, {"case": case.name, "impl": impl, "shape": shape.to_dict(), "device": device,
                            "status": "oom" if _is_oom(e) else "failed",
                            "reason": "inputs: " + _reason(e), "plan_note": spec.get("note", "")})
            continue
        ref = None
        if cfg.get("check", True) and shape.tokens <= cfg.get("ref_max_tokens", math.inf):
            try:
                t0 = time.perf_counter()
                ref = impls.reference(case, inp)
                ref_s = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                print(f"reference failed: {_reason(e)}", file=sys.stderr)
                ref, ref_s = None, None
        for impl in spec["impls"]:
            if impl in oom_impls:
                rec = {"case": case.name, "impl": impl, "shape": shape.to_dict(), "device": device,
                       "status": "oom", "reason": "not run: out of memory at a smaller shape"}
            else:
                rec = measure_one(case, shape, impl, inp, device, cfg, ref)
                if rec["status"] == "oom":
                    oom_impls.add(impl)
            rec["plan_note"] = spec.get("note", "")
            if ref is not None:
                rec["reference_s"] = ref_s
            _emit(out, rec)
            print(_line(rec), file=sys.stderr, flush=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        del inp, ref
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    for impl, reason in spec.get("skip", {}).items():
        for sd in spec["shapes"]:
            _emit(out, {"case": case.name, "impl": impl, "shape": sd, "device": device, "status": "skipped",
                        "reason": reason, "plan_note": spec.get("note", "")})
    out.close()
    return 0


def _emit(out, rec):
    out.write(json.dumps(rec) + "\n")
    out.flush()


def _line(rec) -> str:
    s = rec["shape"]
    head = f"[{rec['case']} N={s['tokens']} d={s['hidden']} V={s['vocab']} {s['dtype']}] {rec['impl']:>16}: "
    if rec["status"] != "ok":
        return head + f"{rec['status']} ({rec.get('reason', '')[:160]})"
    t = rec.get("time") or {}
    m = rec.get("mem") or {}
    a = rec.get("agreement") or {}
    parts = []
    if t:
        parts.append(f"total {t['total_ms']:.1f} ms (fwd {t['fwd_ms']:.1f}, bwd {t['bwd_ms']:.1f}, n={t['n']})")
    if m:
        parts.append(f"extra {m['extra_bytes'] / 2**20:.1f} MiB")
    if a.get("loss_abs_diff") is not None:
        parts.append(f"dloss {a['loss_abs_diff']:.2e} dgh {a.get('grad_hidden_max_abs_diff', float('nan')):.2e} "
                     f"dgw {a.get('grad_weight_max_abs_diff', float('nan')):.2e}")
    return head + "; ".join(parts)

