"""Fair comparisons of offline data in the online group (`python -m gro_kernels.experiments`).

Layers: `tasks` (prompts, rewards, the five regimes of offline data) -> `methods` (one loss per
method) -> `runner` (one training run) -> `suite` (tuning, seeds, statistics) -> `report` (table
and plots) -> `__main__` (the command line).
"""
from .methods import KNOBS, METHODS
from .runner import RunConfig, run
from .suite import run_regime
from .tasks import REGIMES

__all__ = ["KNOBS", "METHODS", "REGIMES", "RunConfig", "run", "run_regime"]
