"""Layer 3: the GRO objective on per-token log-probs, and the preset table (docs/objective.md, docs/options.md)."""
from .core import GROOutput, gro_objective
from .options import DEFAULTS, METHODS, OPTIONS, PRESETS

__all__ = ["gro_objective", "GROOutput", "PRESETS", "METHODS", "OPTIONS", "DEFAULTS"]
