"""The results as a markdown table and one plot per regime."""
from __future__ import annotations

import os
from typing import Optional

from .stats import moving_average


def _pm(m, key, digits=3):
    v, s = m.get(key), m.get(key + "_sd")
    return "-" if v is None else f"{v:.{digits}f} ± {s:.{digits}f}"


def table(summary: dict) -> str:
    """One markdown table per regime: every method's numbers and its paired difference against gro."""
    lines = []
    for name, reg in summary["regimes"].items():
        methods = reg["methods"]
        k = reg["generations"]
        lines += [f"**{name}**: {reg['description']} ({reg['steps']} steps, {next(iter(methods.values()))['seeds']} seeds)",
                  "",
                  f"| method | knob | train reward (end) | held-out greedy | held-out pass@{k} | distinct correct / prompt "
                  "| steps to 0.9 (reached) | held-out vs gro (mean, W/L, verdict) |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for m, r in methods.items():
            knob = f"{r['knob']['name']}={r['knob']['value']}" if r.get("knob") else "-"
            reach = (f"{r['steps_to_90']:.0f} ({r['steps_to_90_reached']}/{r['seeds']})" if r["steps_to_90"] is not None
                     else f"- (0/{r['seeds']})")
            vs = r.get("vs_gro", {}).get("heldout_reward")
            vs_txt = f"{vs['mean']:+.3f}, {vs['wins']}/{vs['losses']}, {vs['verdict']}" if vs else "-"
            lines.append(f"| {m} | {knob} | {_pm(r, 'final_reward')} | {_pm(r, 'heldout_reward')} | "
                         f"{_pm(r, f'pass_at_{k}', 2)} | {_pm(r, 'distinct_correct', 2)} | {reach} | {vs_txt} |")
        lines.append("")
    return "\n".join(lines)


def plot(name: str, regime: dict, path: str) -> Optional[str]:
    """Mean training reward against steps, one line per method; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for m, r in regime["methods"].items():
        curve = moving_average(r["curve"], max(1, len(r["curve"]) // 40))
        ax.plot(range(1, len(curve) + 1), curve, label=f"{m} ({r['heldout_reward']:.2f} held-out)",
                lw=2.2 if m == "gro" else 1.4)
    ax.set_xlabel("step")
    ax.set_ylabel(f"sampled reward (mean of {next(iter(regime['methods'].values()))['seeds']} seeds)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{name}: {regime['description']}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
