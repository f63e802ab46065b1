"""A regime's full comparison: tune each method's knob, run every method on every seed, summarize.

Tuning (same effort for every method that has a knob): each grid value of `methods.KNOBS` is
trained on `tune_seeds` (seeds never used for the reported numbers) and scored by the greedy
reward on the validation prompts (disjoint from training and evaluation prompts); the best value
is then run on the reported seeds. Runs go to a pool of worker processes, one thread each.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Callable, Dict, List, Optional

from .methods import KNOBS, METHODS, default_knob
from .runner import RunConfig, run
from .stats import final_value, mean, paired, sd, steps_to
from .tasks import REGIMES, regime_data, split_prompts

TUNE_SEEDS = (1000,)


def _init_worker():
    import torch

    torch.set_num_threads(1)


def make_pool(workers: int) -> Optional[ProcessPoolExecutor]:
    """`workers` spawned processes with one torch thread each (None for 1: run in this process)."""
    if workers <= 1:
        return None
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker)


def run_many(configs: List[RunConfig], workers: int, pool: Optional[ProcessPoolExecutor] = None) -> List[dict]:
    """`run` on every config, in `pool` (or a pool of `workers` made here; 1: in this process), in order."""
    if pool is not None:
        return list(pool.map(run, configs))
    if workers <= 1:
        _init_worker()
        return [run(c) for c in configs]
    with make_pool(workers) as own:
        return list(own.map(run, configs))


def tune(base: RunConfig, methods, workers: int, tune_seeds=TUNE_SEEDS, pool=None) -> Dict[str, dict]:
    """{method: {"name", "grid", "validation": {value: score}, "value"}} for the methods with a knob."""
    jobs = [(m, v, s) for m in methods if m in KNOBS for v in KNOBS[m][1] for s in tune_seeds]
    results = run_many([replace(base, method=m, knob=v, seed=s, eval_split="valid") for m, v, s in jobs], workers, pool)
    out = {}
    for m in methods:
        if m not in KNOBS:
            continue
        name, grid = KNOBS[m]
        score = {v: mean([r["final"]["greedy_reward"] for (mm, vv, _), r in zip(jobs, results) if mm == m and vv == v])
                 for v in grid}
        best = max(grid, key=lambda v: score[v])  # ties: the first (smallest) value
        out[m] = {"name": name, "grid": list(grid), "validation": {str(v): score[v] for v in grid}, "value": best,
                  "tune_seeds": list(tune_seeds), "criterion": "greedy reward on the validation prompts"}
    return out


def summarize_method(results: List[dict], k: int) -> dict:
    finals = [final_value(r["curve"]) for r in results]
    held = [r["final"]["greedy_reward"] for r in results]
    reach = [steps_to(r["curve"]) for r in results]
    reached = [s for s in reach if s is not None]
    out = {
        "final_reward": mean(finals), "final_reward_sd": sd(finals),
        "heldout_reward": mean(held), "heldout_reward_sd": sd(held),
        "seeds": len(results),
        "initial_reward": mean([r["curve"][0] for r in results]),
        "heldout_initial_reward": mean([r["initial"]["greedy_reward"] for r in results]),
        "steps_to_90": mean(reached) if reached else None,
        "steps_to_90_sd": sd(reached) if reached else None,
        "steps_to_90_reached": len(reached),
        "per_seed": {"final_reward": finals, "heldout_reward": held, "steps_to_90": reach},
        "seconds": mean([r["seconds"] for r in results]),
        "curve": [mean(c) for c in zip(*[r["curve"] for r in results])],
    }
    for key in ("sampled_reward", f"pass_at_{k}", "distinct_correct", "coverage"):
        vals = [r["final"][key] for r in results]
        name = "heldout_" + key if key == "sampled_reward" else key
        out[name], out[name + "_sd"] = mean(vals), sd(vals)
    return out


def run_regime(name: str, *, seeds: int = 5, steps: int = 300, workers: int = 2, methods=METHODS,
               tune_knobs: bool = True, base: Optional[RunConfig] = None,
               log: Callable[[str], None] = print, pool: Optional[ProcessPoolExecutor] = None) -> dict:
    """Tune, run `seeds` seeds of every method, and return the regime's summary (the JSON schema)."""
    if name not in REGIMES:
        raise ValueError(f"regime must be one of {', '.join(REGIMES)}; got {name!r}")
    if seeds < 1 or steps < 1:
        raise ValueError(f"seeds and steps must be >= 1, got seeds={seeds}, steps={steps}")
    t0 = time.time()
    base = replace(base or RunConfig(), regime=name, steps=steps)
    if tune_knobs:
        knobs = tune(base, methods, workers, pool=pool)
        log(f"[{name}] tuned: " + ", ".join(f"{m} {k['name']}={k['value']}" for m, k in knobs.items()))
    else:
        knobs = {m: {"name": KNOBS[m][0], "grid": list(KNOBS[m][1]), "value": default_knob(m), "validation": None,
                     "criterion": "not tuned (the grid's middle value)"} for m in methods if m in KNOBS}
    jobs = [(m, s) for m in methods for s in range(seeds)]
    results = run_many([replace(base, method=m, knob=knobs[m]["value"] if m in knobs else None, seed=s)
                        for m, s in jobs], workers, pool)
    by_method = {m: [r for (mm, _), r in zip(jobs, results) if mm == m] for m in methods}
    summary = {m: summarize_method(by_method[m], base.generations) for m in methods}
    for m in methods:
        summary[m]["knob"] = knobs.get(m)
        if "gro" in methods and m != "gro":
            summary[m]["vs_gro"] = {
                key: paired(summary[m]["per_seed"][key], summary["gro"]["per_seed"][key])
                for key in ("final_reward", "heldout_reward")}
    split = split_prompts()
    data = [regime_data(name, s)["train"] for s in range(seeds)]
    offline = [r for rows in data for r in rows if r["offline"] is not None]
    reward = REGIMES[name].reward
    return {
        "description": REGIMES[name].description,
        "methods": summary,
        "steps": steps, "prompts_per_step": base.prompts_per_step, "generations": base.generations,
        "lr": base.lr, "model": f"Llama, hidden {base.hidden}, {base.layers} layers",
        "prompts": {"train": len(split["train"]), "valid": len(split["valid"]), "eval": len(split["eval"]),
                    "eval_disjoint_from_train": not (set(split["eval"]) & set(split["train"]))},
        "offline": {"rows_per_seed": len(offline) / seeds,
                    "mean_reward": mean(reward(None, [r["offline"] for r in offline],
                                               answer=[r["answer"] for r in offline])) if offline else None},
        "seconds": time.time() - t0,
    }
