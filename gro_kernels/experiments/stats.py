"""Statistics over seeds: mean and sd, paired differences against `gro`, steps to 90% of the maximum."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

MAX_REWARD = 1.0   # every regime's reward is in [0, 1]
SMOOTH = 10        # steps in the moving average a curve is read through
# two-sided 95% critical values of Student's t by degrees of freedom (n - 1)
T95 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def sd(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single value."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def moving_average(xs: Sequence[float], window: int = SMOOTH) -> List[float]:
    out = []
    for i in range(len(xs)):
        chunk = xs[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def final_value(curve: Sequence[float]) -> float:
    """The reward at the end of training: the mean over the last 10% of the steps (at least one)."""
    w = max(1, len(curve) // 10)
    return mean(curve[-w:])


def steps_to(curve: Sequence[float], fraction: float = 0.9, maximum: float = MAX_REWARD) -> Optional[int]:
    """First step (1-based) whose moving average reaches fraction * maximum; None if never."""
    for i, v in enumerate(moving_average(curve)):
        if v >= fraction * maximum:
            return i + 1
    return None


def t_critical(df: int) -> float:
    if df in T95:
        return T95[df]
    below = [k for k in T95 if k <= df]
    return T95[max(below)] if below else T95[1]


def paired(xs: Sequence[float], ys: Sequence[float]) -> Dict[str, float]:
    """Paired differences x - y (same seed): mean, sd, wins/losses/ties of x, and a 95% verdict.

    verdict: 'higher' / 'lower' when the paired t-test rejects equality at 5%, else 'tie'.
    """
    if len(xs) != len(ys):
        raise ValueError(f"paired samples need the same seeds, got {len(xs)} and {len(ys)}")
    d = [x - y for x, y in zip(xs, ys)]
    m, s, n = mean(d), sd(d), len(d)
    if n < 2:
        verdict = "tie"
    elif s == 0:
        verdict = "tie" if m == 0 else ("higher" if m > 0 else "lower")
    else:
        t = m / (s / math.sqrt(n))
        verdict = "higher" if t > t_critical(n - 1) else "lower" if t < -t_critical(n - 1) else "tie"
    return {"mean": m, "sd": s, "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d),
            "ties": sum(x == 0 for x in d), "verdict": verdict}
