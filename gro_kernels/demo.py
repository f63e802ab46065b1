"""`python -m gro_kernels.demo`: offline data in the online group, against baselines that see the same data.

One regime of `gro_kernels.experiments` (default: `graded`, reverse 3 digits with partial credit
and offline answers of mixed quality, the regime that separates the methods most clearly over
seeds), one seed, the methods of the fair comparison from the same initialization, prompts,
samples per step and optimizer steps (by default `DEMO_METHODS`: all but `sft`, `sft_then_grpo` and
`luffy`, so that it runs in under two minutes on 2 CPU cores; `--methods` picks any):

* `grpo`          online GRPO only (never reads the offline answers);
* `sft`           supervised fine-tuning on the offline answers only;
* `sft_then_grpo` SFT first, then GRPO;
* `grpo_sft`      GRPO plus a weighted SFT loss on the offline answers;
* `luffy`         offline answers in the group with LUFFY's policy shaping f(p) = p / (p + 0.1);
* `chord`         (1 - mu) GRPO + mu SFT on the offline answers with CHORD-phi's token weight p (1 - p);
* `hpt`           per prompt, SFT on its offline answer when its samples score at or below a threshold,
                  else GRPO (HPT's switch);
* `distill`       on-policy distillation: GRPO plus the reverse KL to a teacher at every sampled token,
                  the teacher being the `sft` arm's model (trained first, inside the run);
* `gro`           offline answers in the group, scored by the same reward (this package's method):
                  an offline answer above the group's anchor is pushed up, one below it pushed down.

Each method's knob is the value the experiments picked on validation prompts (`TUNED`). It prints
the sampled reward against steps and the greedy reward on held-out prompts (never trained on),
saves `reward.png` and `metrics_<method>.jsonl` under `--out` (default `runs/demo/`), and with
`--json PATH` writes a summary. Ctrl-C stops it and still writes what it has: every finished
method, the interrupted method's steps so far, the plot and the summary.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Dict, List

import torch

from .experiments.methods import KNOBS, METHODS, default_knob

# The demo's default methods: every method of the experiments but `sft`, `sft_then_grpo` and `luffy`
# (each one `--methods` away; the sft arm's model is `distill`'s teacher), so that `make demo` stays
# under two minutes on 2 CPU cores: with luffy the seven methods took 99-132 s there (the README's
# Quick start).
DEMO_METHODS = ("grpo", "grpo_sft", "chord", "hpt", "distill", "gro")
from .experiments.runner import RunConfig, build_model, require_transformers, run  # noqa: F401  (build_model: re-exported)
from .experiments.stats import final_value, moving_average
from .experiments.tasks import N_EVAL, REGIMES, CharTokenizer, partial_reward  # noqa: F401  (CharTokenizer: re-exported)

BACKENDS = ("auto", "torch", "naive", "triton")
# Knobs picked by `python -m gro_kernels.experiments --regime all --seeds 5` (docs/experiments/results.json).
TUNED: Dict[str, Dict[str, float]] = {
    "clean": {"sft_then_grpo": 0.25, "grpo_sft": 1.0, "chord": 0.9, "hpt": 0.0, "distill": 0.5, "gro": 1.0},
    "scarce": {"sft_then_grpo": 0.75, "grpo_sft": 0.1, "chord": 0.9, "hpt": 0.25, "distill": 0.1, "gro": 2.0},
    "noisy": {"sft_then_grpo": 0.75, "grpo_sft": 0.3, "chord": 0.1, "hpt": 0.0, "distill": 0.1, "gro": 2.0},
    "graded": {"sft_then_grpo": 0.5, "grpo_sft": 0.3, "chord": 0.9, "hpt": 0.25, "distill": 0.5, "gro": 1.0},
    "diverse": {"sft_then_grpo": 0.75, "grpo_sft": 0.3, "chord": 0.9, "hpt": 0.25, "distill": 2.0, "gro": 2.0},
}

# The reversal helpers the examples and the trainer tests build on.
reversal_reward = partial_reward


def make_prompts(n: int, length: int, seed: int, alphabet: str = "0123456789") -> List[Dict[str, str]]:
    """`n` random digit strings of `length` as {"prompt": "314>", "answer": "413"} rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = "".join(rng.choice(alphabet) for _ in range(length))
        rows.append({"prompt": digits + ">", "answer": digits[::-1]})
    return rows


def knob_for(regime: str, method: str):
    return TUNED.get(regime, {}).get(method, default_knob(method))


def check_backend(p: argparse.ArgumentParser, backend: str) -> None:
    """A backend that cannot run here fails now, naming the argument, before any model is built."""
    from .logprobs import token_logprobs

    try:
        token_logprobs(torch.zeros(1, 1, 4), torch.zeros(3, 4), torch.zeros(1, 1, dtype=torch.long), backend=backend)
    except Exception as e:  # noqa: BLE001  (any failure of the probe means the backend is unusable here)
        p.error(f"argument --backend: {backend!r} cannot run on this machine: {e}")


def log_step(f, record: dict) -> None:
    """One line of `metrics_<method>.jsonl`, flushed at once (an interrupted run keeps its steps)."""
    f.write(json.dumps({k: record[k] for k in ("step", "reward", "offline_reward", "loss", "seconds")}) + "\n")
    f.flush()


def run_method(name: str, args, partial: Dict[str, dict]) -> None:
    """Train `name`; fills `partial[name]` as it goes (its curve), then with the evaluation."""
    cfg = RunConfig(regime=args.regime, method=name, knob=knob_for(args.regime, name), seed=args.seed,
                    steps=args.steps, prompts_per_step=args.prompts, generations=args.generations, lr=args.lr,
                    hidden=args.hidden, layers=args.layers, backend=args.backend)
    entry = partial[name] = {"curve": [], "knob": cfg.knob, "finished": False, "seconds": 0.0}
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, desc=name, dynamic_ncols=True, leave=True)
    path = os.path.join(args.out, f"metrics_{name}.jsonl")
    try:
        with open(path, "w") as f:
            def on_step(record):
                entry["curve"].append(record["reward"])
                entry["seconds"] = record["seconds"]
                log_step(f, record)
                if bar is not None:
                    bar.set_postfix(reward=f"{record['reward']:.3f}", refresh=False)
                    bar.update(1)

            res = run(cfg, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
    entry.update(initial=res["initial"], final=res["final"], seconds=res["seconds"], finished=True)


def report(args, partial: Dict[str, dict], t_all: float, interrupted: bool) -> dict:
    """Print the table, save the plot and the summary from whatever has been trained so far."""
    methods = [m for m in partial if partial[m]["curve"]]
    k = args.generations
    window = max(1, args.steps // 10)
    marks = sorted({min(args.steps, s) for s in [1] + list(range(window, args.steps + 1, window))})
    head = f"{'step':>8} " + " ".join(f"{m:>13}" for m in methods)
    lines = [head, "-" * len(head)]
    for s in marks:
        cells = []
        for m in methods:
            c = partial[m]["curve"]
            cells.append(f"{sum(c[max(0, s - window):s]) / len(c[max(0, s - window):s]):>13.3f}" if len(c) >= s
                         else f"{'':>13}")
        lines.append(f"{s:>8} " + " ".join(cells))
    lines.append("-" * len(head))
    for key, label in (("greedy_reward", "held-out"), (f"pass_at_{k}", f"pass@{k}"),
                       ("distinct_correct", "distinct")):
        lines.append(f"{label:>8} " + " ".join(
            f"{partial[m]['final'][key]:>13.3f}" if partial[m]["finished"] else f"{'-':>13}" for m in methods))
    lines.append(f"{'sec':>8} " + " ".join(f"{partial[m]['seconds']:>13.1f}" for m in methods))
    print(f"\n{args.regime}: {REGIMES[args.regime].description}")
    print(f"sampled reward (mean over {window} steps); held-out: greedy reward on {N_EVAL} prompts never "
          f"trained on; pass@{k} and distinct correct answers among {k} samples per held-out prompt")
    print("\n".join(lines))
    if interrupted:
        print("interrupted: the table, plot and summary hold the steps run so far")

    os.makedirs(args.out, exist_ok=True)
    plot_path = os.path.join(args.out, "reward.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for m in methods:
            c = partial[m]["curve"]
            held = f", {partial[m]['final']['greedy_reward']:.2f} held-out" if partial[m]["finished"] else ""
            ax.plot(range(1, len(c) + 1), moving_average(c, max(1, args.steps // 30)), label=f"{m}{held}",
                    lw=2.2 if m == "gro" else 1.4)
        ax.set_xlabel("step")
        ax.set_ylabel("sampled reward (smoothed)")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{args.regime}: {REGIMES[args.regime].description}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_path, dpi=120)
        plt.close(fig)
        print(f"plot: {plot_path}")
    except ImportError:
        plot_path = None
        print("matplotlib is not installed: no plot")

    summary = {
        "regime": args.regime, "description": REGIMES[args.regime].description, "steps": args.steps,
        "seed": args.seed, "seconds_total": time.time() - t_all, "plot": plot_path, "interrupted": interrupted,
        "methods": {m: {
            "knob": ({"name": KNOBS[m][0], "value": partial[m]["knob"]} if m in KNOBS else None),
            "initial_reward": partial[m]["curve"][0],
            "final_reward": final_value(partial[m]["curve"]),
            "heldout_initial_reward": partial[m]["initial"]["greedy_reward"] if partial[m]["finished"] else None,
            "heldout_reward": partial[m]["final"]["greedy_reward"] if partial[m]["finished"] else None,
            f"pass_at_{k}": partial[m]["final"][f"pass_at_{k}"] if partial[m]["finished"] else None,
            "distinct_correct": partial[m]["final"]["distinct_correct"] if partial[m]["finished"] else None,
            "steps": len(partial[m]["curve"]), "finished": partial[m]["finished"], "seconds": partial[m]["seconds"],
            "reward_curve": partial[m]["curve"],
        } for m in methods},
    }
    path = args.json or os.path.join(args.out, "summary.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"summary: {path}")
    return summary


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m gro_kernels.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", default="graded", help=f"one of {', '.join(REGIMES)}")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--methods", default=",".join(DEMO_METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)} (default: {', '.join(DEMO_METHODS)})")
    p.add_argument("--generations", type=int, default=8, help="completions per prompt (K)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="torch", help=f"gro_loss backend, one of {', '.join(BACKENDS)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny matmuls: 1 is fastest; 0: torch's default)")
    p.add_argument("--out", default="runs/demo", help="folder for the plot, metrics and summary")
    p.add_argument("--json", default=None, help="write the summary here (default: OUT/summary.json)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("steps", "generations", "prompts", "hidden", "layers"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name}: must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        p.error(f"argument --threads: must be >= 0, got {args.threads}")
    if not args.lr > 0:
        p.error(f"argument --lr: must be > 0, got {args.lr}")
    if args.regime not in REGIMES:
        p.error(f"argument --regime: unknown regime {args.regime!r}; choose from {', '.join(REGIMES)}")
    if args.backend not in BACKENDS:
        p.error(f"argument --backend: unknown backend {args.backend!r}; choose from {', '.join(BACKENDS)}")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.method_list:
        p.error("argument --methods: no method given")
    for m in args.method_list:
        if m not in METHODS:
            p.error(f"argument --methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    return p, args


def main(argv=None) -> dict:
    p, args = parse(argv)
    require_transformers("python -m gro_kernels.demo")
    check_backend(p, args.backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.regime}: {REGIMES[args.regime].description}; tiny Llama (hidden {args.hidden}, {args.layers} layers), "
          f"{args.prompts} prompts x {args.generations} samples per step, {args.steps} steps, seed {args.seed}")
    partial: Dict[str, dict] = {}
    os.makedirs(args.out, exist_ok=True)
    t_all, interrupted = time.time(), False
    try:
        for m in args.method_list:
            run_method(m, args, partial)
    except KeyboardInterrupt:
        interrupted = True
    summary = report(args, partial, t_all, interrupted)
    if interrupted:
        raise SystemExit(130)
    return summary


if __name__ == "__main__":
    main()
