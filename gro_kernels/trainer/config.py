"""Trainer settings: one flat dataclass, every field documented where it is declared."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from ..logprobs.transform import HEAD_PRECISIONS
from ..objective.inputs import uses_ref_logp
from ..objective.options import resolve_options

@dataclass
class GROConfig:
    # --- the objective -------------------------------------------------------------------------
    method: str = "gro"                 # any gro_loss preset: grpo, rloo, dapo, gro, dpo, kto, sft, ...
    loss_options: Dict[str, Any] = field(default_factory=dict)  # GRO.md section 2 options (kl_coef, eps_low, ...)
    backend: str = "auto"               # gro_loss backend: auto | naive | torch | triton

    # --- sampling (online) ---------------------------------------------------------------------
    num_generations: int = 8            # K completions per prompt (one group per prompt)
    max_new_tokens: int = 64
    temperature: float = 1.0            # sampling temperature; also the loss's temperature unless overridden
    # The sampler's truncation (0 / 1.0 / 0.0: off). The loss's log-probs (and old log-probs) are those of
    # the truncated distribution the samples were drawn from; the reference's stay the full distribution.
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0                  # not with top_p < 1 (generate applies them in the other order)
    head_precision: str = "native"      # the LM head's GEMMs: native | fp32 | tf32 (gro_loss's head_precision)

    # --- offline data mixed into online groups (GRO.md section 4) ------------------------------
    offline_column: Optional[str] = None  # prompt-dataset column holding gold completion(s) to mix in
    offline_per_group: int = 1          # how many offline rows join each prompt's group (when available)
    offline_reward: Optional[float] = None  # reward of a gold row; None: score it with the reward functions

    # --- batch and optimisation ----------------------------------------------------------------
    prompts_per_step: int = 8           # prompts per optimizer step, summed over all processes
    micro_batch_size: int = 64          # rows per forward/backward (whole groups are kept together)
    num_iterations: int = 1             # updates per sampled batch (ratios against old_logp when > 1)
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.99)
    max_grad_norm: Optional[float] = 1.0
    warmup_steps: int = 0               # linear warm-up of the learning rate, then constant

    # --- reference policy ----------------------------------------------------------------------
    use_reference: Optional[bool] = None  # None: a frozen copy iff the method or kl_coef needs one

    # --- run -----------------------------------------------------------------------------------
    steps: int = 100
    seed: int = 0
    output_dir: str = "runs/gro"
    metrics_file: Optional[str] = "metrics.jsonl"  # relative to output_dir; None disables
    save_every: int = 0                 # 0: only at the end (when save_final)
    save_final: bool = True
    save_on_interrupt: bool = True      # Ctrl-C: checkpoint the last finished step (single process)
    progress: bool = True               # tqdm bar (rank 0 only)
    run_name: Optional[str] = None      # the bar's label (default: the method)
    mixed_precision: str = "auto"       # auto (bf16 autocast on CUDA) | bf16 | no
    fsdp: bool = False                  # under torchrun: FSDP2 (fully_shard) instead of DDP
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward (long context)
    pack_sequences: bool = False        # rows of a micro-batch as one sequence without padding (checked at start)

    def __post_init__(self):
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.micro_batch_size < 1 or self.prompts_per_step < 1:
            raise ValueError("micro_batch_size and prompts_per_step must be >= 1")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        if self.head_precision not in HEAD_PRECISIONS:
            raise ValueError(f"head_precision must be one of {HEAD_PRECISIONS}, got {self.head_precision!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0: off), got {self.min_p!r}")
        if self.min_p > 0 and self.top_p < 1:
            raise ValueError("min_p with top_p < 1: transformers' generate applies top_p before min_p, the loss's "
                             "kept set (vLLM's order) min_p first, so the two would differ; use one of them")
        self.adam_betas = tuple(self.adam_betas)

    # Resolved settings (the objective's own option table decides, so the two never disagree) ---
    def resolved_options(self):
        """The loss options `gro_loss` will use: DEFAULTS <- preset <- loss_options (validated)."""
        return resolve_options(self.method, {"temperature": self.temperature, **self.loss_options})

    def needs_reference(self) -> bool:
        """A frozen reference copy: asked for, or the objective uses reference log-probs / the exact KL."""
        if self.use_reference is not None:
            return bool(self.use_reference)
        opts = self.resolved_options()
        return uses_ref_logp(self.method, opts) or (opts.kl_coef != 0 and opts.kl_estimator == "full")

    def sampler(self) -> dict:
        """The sampler's truncation as gro_loss / token_logprobs arguments (only what is on)."""
        out = {}
        if self.top_k > 0:
            out["top_k"] = self.top_k
        if self.top_p < 1:
            out["top_p"] = self.top_p
        if self.min_p > 0:
            out["min_p"] = self.min_p
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d
