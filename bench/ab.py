"""A/B timing of two source trees on a shared machine: alternating worker processes, side by side.

    python bench/ab.py --base /path/to/old/checkout [--new .] [--rounds 6] [--cases dapo,grpo_ent]
        [--impls plain,gro_loss_torch] [--iters 2]

Each round starts one worker per tree (in alternating order) that imports gro_kernels and bench/
from its own tree, builds the foundation shape (N=2048, d=512, V=32768, fp32), runs one warm-up and
`--iters` timed fwd+bwd of every impl per case, and prints its times. Ratios are taken over plain
PyTorch of the same worker, so a load that changes between rounds cancels out; the medians over
rounds are printed last. Load on the other cores still moves the ratios: read them next to the
load average the script prints.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_WORKER = r"""
import json, sys, time
from bench.cases import CASES, FOUNDATION, make_inputs
from bench.impls import build
from bench.measure import _run_once
cases, impls, iters = sys.argv[1].split(","), sys.argv[2].split(","), int(sys.argv[3])
out = {}
for c in cases:
    inp = make_inputs(CASES[c], FOUNDATION, "cpu")
    for name in impls:
        step = build(name, CASES[c], inp, "cpu")
        _run_once(step, inp)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            _run_once(step, inp)
            times.append((time.perf_counter() - t0) * 1e3)
        out[f"{c}/{name}"] = min(times)
print(json.dumps(out))
"""


def _worker(tree, cases, impls, iters) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", _WORKER, cases, impls, str(iters)], cwd=tree, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the old tree (a checkout of the base commit)")
    ap.add_argument("--new", default=".", help="the new tree")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--cases", default="dapo,grpo_ent")
    ap.add_argument("--impls", default="plain,gro_loss_torch")
    ap.add_argument("--iters", type=int, default=2, help="timed fwd+bwd per worker (the minimum is kept)")
    args = ap.parse_args(argv)
    trees = {"base": args.base, "new": args.new}
    ratios = {t: {} for t in trees}
    for r in range(args.rounds):
        order = ["base", "new"] if r % 2 == 0 else ["new", "base"]
        for t in order:
            times = _worker(trees[t], args.cases, args.impls, args.iters)
            for key, ms in times.items():
                case, impl = key.split("/")
                if impl != "plain":
                    ratios[t].setdefault(key, []).append(ms / times[f"{case}/plain"])
            print(f"round {r} {t}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in times.items())
                  + f"; load {os.getloadavg()[0]:.1f}", flush=True)
    for t in trees:
        for key, rs in ratios[t].items():
            print(f"{t} {key}: median {statistics.median(rs):.3f}x plain (rounds: {', '.join(f'{x:.2f}' for x in rs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
