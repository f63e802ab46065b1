"""Trainer settings: one flat dataclass, every field documented where it is declared."""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, Optional

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
    top_k: int = 0                      # 0: full distribution (what the importance ratios assume)
    top_p: float = 1.0

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    def check_for(self, *, online: bool, world_size: int) -> None:
        """Settings the trainer would ignore, or fail on only at the first step: a ValueError naming the
        setting, at construction. `online`: reward functions given (sampling), else pure offline."""
        opts = self.resolved_options()
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        changed = [name for name, value in defaults.items() if getattr(self, name) != value]
        if not online:
            read_offline = ("max_new_tokens",) if opts.loss_agg == "seq_mean_token_sum_norm" else ()
            for name in ("num_generations", "max_new_tokens", "top_k", "top_p", "offline_column", "offline_per_group",
                         "offline_reward"):
                if name in changed and name not in read_offline:
                    raise ValueError(f"GROConfig.{name} is read only when sampling (reward functions given); this "
                                     "trainer trains offline from the dataset's rows")
        elif self.offline_column is None:
            for name in ("offline_per_group", "offline_reward"):
                if name in changed:
                    raise ValueError(f"GROConfig.{name} applies to the gold rows of offline_column, which is not set")
        if online and opts.separation == "label":
            raise ValueError(f"GROConfig.method={self.method!r} learns from labelled rows (pairs or desirable / "
                             "undesirable completions): train it offline, from a dataset of {prompt, chosen, rejected} "
                             "(or {prompt, completion, label}) rows and no reward functions; with reward functions "
                             "use a reward-scored method (grpo, rloo, dapo, gro, ...)")
        if online and self.num_generations == 1 and self.offline_column is None and (
                opts.anchor in ("group_mean", "leave_one_out") or opts.scale == "group_std"):
            raise ValueError(f"GROConfig.num_generations=1 makes every group one sample: method={self.method!r} compares "
                             f"each sample with its group (anchor={opts.anchor!r}), so every weight would be 0")
        if opts.rollout_correction is not None:
            raise ValueError("loss_options['rollout_correction'] corrects for a sampler other than the trained model "
                             "(e.g. vLLM) from its log-probs; GROTrainer samples with the model itself and has none")
        if opts.mask_truncated_completions and not online:
            raise ValueError("loss_options['mask_truncated_completions'] drops sampled completions cut at "
                             "max_new_tokens; offline rows are never truncated")
        if opts.off_policy_mask_threshold is not None and self.num_iterations == 1:
            raise ValueError("loss_options['off_policy_mask_threshold'] masks rows that drifted from the policy that "
                             "sampled them; with num_iterations=1 every update is on-policy and nothing is masked "
                             "(set num_iterations > 1)")
        if "kl_estimator" in self.loss_options and opts.kl_coef == 0 and not self.needs_reference():
            raise ValueError("loss_options['kl_estimator'] is not read: kl_coef is 0 and there is no reference model "
                             "(use_reference=True reports the KL)")
        selects = ("top_entropy_quantile" if opts.top_entropy_quantile < 1 else
                   f"method={self.method!r}" if opts.surrogate in ("clip_cov", "kl_cov") else None)
        if selects:
            rows = self.prompts_per_step // world_size * (
                (self.num_generations + (self.offline_per_group if self.offline_column else 0)) if online else 2)
            if world_size > 1 or self.micro_batch_size < rows:
                raise ValueError(f"{selects} selects tokens over the whole batch, and the trainer would split it "
                                 f"(micro_batch_size={self.micro_batch_size} < {rows} rows per step, or "
                                 f"{world_size} processes): use one process and micro_batch_size >= {rows}")
