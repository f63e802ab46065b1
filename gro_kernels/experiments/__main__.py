"""`python -m gro_kernels.experiments --regime NAME|all --seeds K --json PATH`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .methods import ABLATIONS, ALL_METHODS, METHODS
from .report import plot, table
from .runner import RunConfig, require_transformers
from .suite import make_pool, run_regime
from .tasks import REGIMES


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m gro_kernels.experiments",
                                description="Offline data in the online group against baselines that see the same data.")
    p.add_argument("--regime", required=True, help=f"one of {', '.join(REGIMES)}, a comma-separated list, or 'all'")
    p.add_argument("--seeds", type=int, default=5, help="seeds per method (reported numbers)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated, from " + ", ".join(ALL_METHODS) + f" (default: all but {', '.join(ABLATIONS)})")
    p.add_argument("--workers", type=int, default=2, help="worker processes (one torch thread each)")
    p.add_argument("--no-tune", action="store_true", help="use each knob's middle grid value instead of tuning")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="samples per prompt per step (K, and k of pass@k)")
    p.add_argument("--json", default=None, help="write the summary here (plots go next to it)")
    args = p.parse_args(argv)
    regimes = list(REGIMES) if args.regime == "all" else [r.strip() for r in args.regime.split(",") if r.strip()]
    for r in regimes:
        if r not in REGIMES:
            p.error(f"argument --regime: unknown regime {r!r}; choose from {', '.join(REGIMES)} or 'all'")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ALL_METHODS:
            p.error(f"argument --methods: unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    for name in ("seeds", "steps", "workers", "prompts", "generations"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name}: must be >= 1, got {getattr(args, name)}")
    return args, regimes, methods


def plot_next_to(json_path: str, name: str, regime: dict):
    """The regime's plot beside the JSON: `NAME.png` for results.json, `STEM_NAME.png` for any other JSON
    (so a second run, e.g. the ablation, never overwrites the main run's plots). Returns the file name
    (relative to the JSON's folder), or None without matplotlib."""
    stem = os.path.splitext(os.path.basename(json_path))[0]
    file = f"{name}.png" if stem == "results" else f"{stem}_{name}.png"
    path = plot(name, regime, os.path.join(os.path.dirname(os.path.abspath(json_path)), file))
    return None if path is None else file


def write(summary: dict, path: str) -> None:
    """Write the JSON atomically (a partial file never replaces a complete one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args, regimes, methods = parse(argv)
    require_transformers("python -m gro_kernels.experiments")  # here, not in a worker process
    base = RunConfig(prompts_per_step=args.prompts, generations=args.generations)
    summary = {"command": "python -m gro_kernels.experiments " + " ".join(sys.argv[1:] if argv is None else argv),
               "seeds": args.seeds, "methods": methods, "regimes": {}}
    t0 = time.time()
    pool = make_pool(args.workers)  # one pool for every regime: the workers import torch once
    try:
        for name in regimes:
            print(f"[{name}] {REGIMES[name].description}: {len(methods)} methods x {args.seeds} seeds, "
                  f"{args.steps} steps", flush=True)
            reg = run_regime(name, seeds=args.seeds, steps=args.steps, workers=args.workers, methods=methods,
                             tune_knobs=not args.no_tune, base=base, log=lambda s: print(s, flush=True), pool=pool)
            if args.json:
                reg["plot"] = plot_next_to(args.json, name, reg)
            summary["regimes"][name] = reg
            summary["seconds_total"] = time.time() - t0
            print(table({"regimes": {name: reg}}), flush=True)
            if args.json:
                write(summary, args.json)  # after every regime: an interrupted run keeps what finished
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(summary['regimes'])} regime(s) finished"
              + (f", written to {args.json}" if args.json and summary["regimes"] else ""), flush=True)
        if args.json and summary["regimes"]:
            write(summary, args.json)
        raise SystemExit(130)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if args.json:
        print(f"summary: {args.json}")
    return summary


if __name__ == "__main__":
    main()
