#!/usr/bin/env python
"""Benchmark command line: fused RLHF losses vs plain PyTorch, torch.compile, Liger-Kernel, CCE.

    python bench/run.py --quick                      # CPU set, a few minutes on 2 cores
    python bench/run.py --foundation                 # DAPO, GRPO + entropy, DPO at N=2048 d=512 V=32768 fp32 (CPU)
    python bench/run.py --case dapo --tokens 2048 --hidden 512 --vocab 32768 --impls plain,gro_torch --device cpu
    python bench/run.py --gpu                        # the full GPU table (bf16, peers' shapes)
    python bench/run.py --correctness                # GPU: bf16 kernels vs a float32 reference at real sizes

Each group of measurements (one case, its shapes, its implementations) runs in a fresh worker
process (`--isolate impl`: one per implementation), so a crash, an OOM or a compiled cache stays
there. Results go to ./bench-results/ (`--out-dir`; also to $OUT when set) as
<date>_<device>_<suite>.json / .md / _time.png / _memory.png; the Markdown table is printed at the
end. The figures the README quotes live in bench/results/: write there (`--out-dir bench/results`)
only to update them.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import cases as C  # noqa: E402


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "numpy", "liger_kernel", "cut-cross-entropy", "gro_kernels"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed" if dist != "gro_kernels" else "source tree"
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        out["gro_kernels_commit"] = rev.stdout.strip() or "uncommitted"
    except OSError:
        pass
    return out


def _device_info(device: str):
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        return name, name.replace("NVIDIA ", "").replace(" ", "-"), torch.get_num_threads()
    threads = torch.get_num_threads()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores", f"cpu-{os.cpu_count()}cores", threads


def _parse_ints(s: str):
    return [int(x) for x in s.split(",") if x]


def build_plans(args):
    if args.quick:
        return "quick", C.quick_plans()
    if args.foundation:
        return "foundation", C.foundation_plan()
    if args.gpu:
        return "gpu", C.gpu_plans()
    if args.correctness:
        shapes = C.correctness_shapes()
        return "correctness", [
            C.Plan("logprob_entropy", shapes, ["gro_torch", "gro_triton"],
                   note="bf16 inputs vs float32 PyTorch reference"),
            C.Plan("dapo", [s for s in shapes if s.tokens == 16384], ["gro_triton", "gro_loss_triton"],
                   note="bf16 inputs vs float32 PyTorch reference"),
        ]
    if not args.case:
        raise SystemExit("choose a suite (--quick, --foundation, --gpu, --correctness) or --case with shapes")
    plans = []
    for case in args.case.split(","):
        if case not in C.CASES:
            raise SystemExit(f"unknown case {case!r}; known: {sorted(C.CASES)}")
        shapes = []
        for n in _parse_ints(args.tokens):
            t = args.seq_len or max(1, min(512, n // 4))
            shapes.append(C.Shape(n, args.hidden, args.vocab, t, args.dtype))
        impls = args.impls.split(",") if args.impls else C.CASE_IMPLS[case]
        plans.append(C.Plan(case, shapes, impls))
    return args.name or "custom", plans


class Worker:
    """Runs one spec in a fresh interpreter; echoes its progress and keeps the tail of stderr."""

    def __init__(self, spec: dict, tmp: str, idx: int, timeout: float):
        self.spec, self.timeout = spec, timeout
        self.spec_path = os.path.join(tmp, f"spec{idx}.json")
        spec["out"] = os.path.join(tmp, f"out{idx}.jsonl")
        with open(self.spec_path, "w") as f:
            json.dump(spec, f)
        self.tail = collections.deque(maxlen=15)
        self.interrupted = False

    def run(self):
        env = dict(os.environ)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed large blocks return to the OS (RSS cross-check)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", self.spec_path]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)

        def pump():
            for line in proc.stdout:
                line = line.rstrip("\n")
                if "USDT:" in line or "unknown size was allocated before the profiling" in line:
                    continue  # profiler chatter
                self.tail.append(line)
                print("   " + line, flush=True)

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        try:
            rc = proc.wait(timeout=self.timeout)
            reason = f"worker exited with status {rc}" if rc else ""
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc, reason = -9, f"worker killed after its time limit of {self.timeout:.0f} s"
        except KeyboardInterrupt as e:  # SIGTERM from an outer timeout, or Ctrl-C: stop the worker too
            proc.kill()
            proc.wait()
            rc, reason = -15, f"run interrupted ({e})"
            self.interrupted = True
        th.join(timeout=5)
        records = []
        if os.path.exists(self.spec["out"]):
            with open(self.spec["out"]) as f:
                records = [json.loads(line) for line in f if line.strip()]
        if rc:  # anything the worker did not report is recorded as failed, with why
            done = {(r["impl"], r["shape"]["tokens"], r["shape"]["hidden"], r["shape"]["vocab"]) for r in records}
            tail = " / ".join(list(self.tail)[-4:])[-400:]
            for sd in self.spec["shapes"]:
                for impl in self.spec["impls"]:
                    if (impl, sd["tokens"], sd["hidden"], sd["vocab"]) not in done:
                        records.append({"case": self.spec["case"], "impl": impl, "shape": sd,
                                        "device": self.spec["device"],
                                        "status": "interrupted" if self.interrupted else "failed",
                                        "reason": f"{reason}; last output: {tail}"})
        return records


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite = p.add_mutually_exclusive_group()
    suite.add_argument("--quick", action="store_true", help="small CPU set (float32), a few minutes on 2 cores")
    suite.add_argument("--foundation", action="store_true",
                       help="CPU, float32, N=2048 d=512 V=32768: DAPO, GRPO + entropy bonus and DPO, gro_kernels "
                            "against plain PyTorch, with the time and memory goals (DAPO <= 0.9x plain's time)")
    suite.add_argument("--gpu", action="store_true", help="the full GPU table (bf16)")
    suite.add_argument("--correctness", action="store_true", help="GPU correctness sweep (bf16 vs fp32 reference)")
    suite.add_argument("--render", metavar="JSON", help="rewrite the .md and plots of a results JSON file")
    suite.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--case", help=f"comma list of cases: {','.join(C.CASES)}")
    p.add_argument("--tokens", default="2048", help="comma list of token counts (a sweep)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default min(512, tokens/4))")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--impls", default="", help=f"comma list of implementations (default: all for the case)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=0, help="timed iterations (default 3 on CPU, 10 on CUDA)")
    p.add_argument("--max-seconds", type=float, default=0, help="stop repeating a measurement after this long")
    p.add_argument("--no-check", action="store_true", help="skip the float32 reference (agreement columns)")
    p.add_argument("--ref-max-tokens", type=int, default=0, help="no reference above this many tokens")
    p.add_argument("--isolate", choices=["case", "impl"], default="case",
                   help="one worker per case group (default) or per implementation")
    p.add_argument("--budget", type=float, default=0, help="overall seconds; later groups are skipped past it")
    p.add_argument("--worker-timeout", type=float, default=900)
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers")
    p.add_argument("--out-dir", default="bench-results",
                   help="folder for the results (default: ./bench-results; bench/results holds the figures the "
                        "README quotes: write there only to update them)")
    p.add_argument("--name", default="", help="suite name in the output file names")
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv=None):
    args = parser().parse_args(argv)

    if args.worker:
        from bench.measure import run_worker

        return run_worker(args.worker)
    if args.render:
        from bench import report

        with open(args.render) as f:
            doc = json.load(f)
        stem = args.render[:-5] if args.render.endswith(".json") else args.render
        written = report.write_all(doc["meta"], doc["results"], [os.path.dirname(stem) or "."],
                                   os.path.basename(stem), make_plots=not args.no_plots)
        print("wrote " + ", ".join(written))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.gpu or args.correctness:
        device = args.device or "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    suite_name, plans = build_plans(args)
    cuda = device == "cuda"
    cfg = {
        "warmup": args.warmup,
        "repeat": args.repeat or (10 if cuda else 3),
        "max_seconds": args.max_seconds or (1.5 if cuda else 30.0),
        "check": not args.no_check,
        "check_only": bool(args.correctness),
        "threads": args.threads,
        "ref_max_tokens": args.ref_max_tokens or (32768 if cuda else 1 << 30),
        "compile_dynamic": True if args.quick else None,
    }
    budget = args.budget or (330.0 if args.gpu else 0)
    device_name, device_slug, threads = _device_info(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = f"{date}_{device_slug}_{suite_name}"
    print(f"gro_kernels bench: suite {suite_name} on {device_name} ({len(plans)} groups), results -> {stem}.*",
          flush=True)

    t_start = time.perf_counter()
    records = []
    jobs = []

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    for plan in plans:
        groups = [plan.impls] if args.isolate == "case" else [[i] for i in plan.impls]
        for k, impl_list in enumerate(groups):
            skip = plan.skip if k == 0 else {}
            jobs.append({"case": plan.case, "shapes": [s.to_dict() for s in plan.shapes], "impls": impl_list,
                         "device": device, "cfg": cfg, "note": plan.note, "skip": skip})
    interrupted = ""
    with tempfile.TemporaryDirectory(prefix="grobench") as tmp:
        for i, spec in enumerate(jobs):
            elapsed = time.perf_counter() - t_start
            if interrupted or (budget and elapsed > budget):
                why = interrupted or f"time budget of {budget:.0f} s spent before this group started"
                records += [{"case": spec["case"], "impl": impl, "shape": sd, "device": device,
                             "status": "skipped", "reason": why}
                            for sd in spec["shapes"] for impl in spec["impls"]]
                continue
            timeout = args.worker_timeout
            if budget:
                timeout = max(30.0, min(timeout, budget - elapsed + 20.0))
            print(f"-- [{i + 1}/{len(jobs)}] {spec['case']}: {','.join(spec['impls'])} "
                  f"at N={','.join(str(s['tokens']) for s in spec['shapes'])} ({elapsed:.0f} s elapsed)", flush=True)
            worker = Worker(spec, tmp, i, timeout)
            try:
                records += worker.run()
            except KeyboardInterrupt as e:  # between workers
                worker.interrupted, interrupted = True, f"run interrupted ({e})"
            if worker.interrupted:
                interrupted = interrupted or f"run interrupted after {time.perf_counter() - t_start:.0f} s"
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
    wall = time.perf_counter() - t_start

    from bench import report

    meta = {
        "suite": suite_name, "date": date, "device": device, "device_name": device_name, "threads": threads,
        "command": "python bench/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "versions": _versions(), "cfg": cfg, "wall_s": wall,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "interrupted": interrupted,
        "mem_method": ("torch.cuda.max_memory_allocated over the step" if cuda
                       else "peak of PyTorch CPU allocator bytes during the step, from torch.profiler memory events"),
    }
    out_dirs = [args.out_dir]
    if os.environ.get("OUT") and os.path.abspath(os.environ["OUT"]) != os.path.abspath(args.out_dir):
        out_dirs.append(os.environ["OUT"])
    written = report.write_all(meta, records, out_dirs, stem, make_plots=not args.no_plots)
    print()
    print(report.markdown(meta, records))
    print()
    print(f"wall time {wall:.0f} s; wrote " + ", ".join(os.path.relpath(w, ROOT) if w.startswith(ROOT) else w
                                                       for w in written))
    if args.correctness:  # a failed row or a tolerance miss makes the sweep fail
        bad = [r for r in records if r["status"] == "failed"]
        bad += [r for r, c in report.correctness(records) if not c["pass"]]
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
