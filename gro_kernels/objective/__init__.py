"""Layer 3: the GRO objective on per-token log-probs, and the preset table (GRO.md sections 2-4)."""
from .core import GROOutput, gro_objective
from .options import DEFAULTS, METHODS, OPTIONS, PRESETS

__all__ = ["gro_objective", "GROOutput", "PRESETS", "METHODS", "OPTIONS", "DEFAULTS"]
