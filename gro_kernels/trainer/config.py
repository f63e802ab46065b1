"""Trainer settings: one flat dataclass, every field documented in its docstring and where it is declared."""
from __future__ import annotations

import functools
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, Optional

from ..logprobs.transform import HEAD_PRECISIONS
from ..objective.inputs import uses_ref_logp
from ..objective.options import OPTIONS, resolve_options, unknown_names

@dataclass
class GROConfig:
    """Settings of `GROTrainer` (docs/options.md, "GROTrainer settings").

        GROConfig(method="grpo", loss_options={"kl_coef": 0.0}, num_generations=8, steps=200)

    A misspelled setting names the closest ones; a loss option given as a setting says to put it
    in `loss_options`. The method and loss options are checked when the trainer is built.

    Args:
        method: The gro_loss preset (grpo, rloo, dapo, gro, dpo, kto, sft, ...). Default "gro".
        loss_options: Options of the objective (docs/options.md), overriding the preset. Default {}.
        backend: gro_loss's backend: auto, naive, torch, triton. Default "auto".
        num_generations: Completions sampled per prompt, one group per prompt. Default 8.
        max_new_tokens: The sampling length limit. Default 64.
        temperature: The sampling temperature, also the loss's unless loss_options sets one. Default 1.0.
        top_k: Top-k sampling (0: off). The loss's and the old log-probs are those of the truncated
            distribution the samples were drawn from (docs/head.md); the reference's stay the full one.
            Default 0.
        top_p: Nucleus sampling (1.0: off), in the loss likewise. Default 1.0.
        min_p: Min-p sampling (0.0: off), in the loss likewise; not with top_p < 1 (transformers'
            generate applies top_p first, the loss's kept set min_p first). Default 0.0.
        head_precision: The LM head's GEMMs in the loss and the log-prob passes: native, fp32 (vLLM's
            fp32 head) or tf32 (CUDA). Default "native".
        offline_column: A prompt-dataset column of gold completion(s) mixed into each prompt's
            group as offline rows. Default None.
        offline_per_group: How many offline rows join each group (when available). Default 1.
        offline_reward: The reward of an offline row; None scores it with the reward functions.
        prompts_per_step: Prompts per optimizer step, summed over all processes. Default 8.
        micro_batch_size: Rows per forward / backward. Default 64.
        num_iterations: Updates per sampled batch (importance ratios against the sampling
            log-probs when > 1). Default 1.
        learning_rate: AdamW's learning rate. Default 1e-5.
        weight_decay: AdamW's weight decay. Default 0.0.
        adam_betas: AdamW's betas. Default (0.9, 0.99).
        max_grad_norm: Gradient clipping norm; None for none. Default 1.0.
        warmup_steps: Linear learning-rate warm-up steps, then constant. Default 0.
        use_reference: A frozen reference copy of the model; None: when the method or the KL needs one.
        mu_peak: CHORD's mu schedule (methods with offline_role="sft" and mu): the peak of mu, reached
            after mu_warmup_steps, then a cosine down to mu_valley over mu_decay_steps. None: mu stays
            the loss option's value. Default None.
        mu_valley: The value mu decays to; None: mu_peak (no decay). Default None.
        mu_warmup_steps: Steps of mu's linear warm-up from 0 to mu_peak. Default 0.
        mu_decay_steps: Steps of mu's cosine from mu_peak to mu_valley. Default 0.
        steps: Optimizer steps. Default 100.
        seed: The run's seed. Default 0.
        output_dir: Where metrics and checkpoints go. Default "runs/gro".
        metrics_file: The metrics file in output_dir (None: none). Default "metrics.jsonl".
        save_every: Checkpoint every N steps; 0 only at the end. Default 0.
        save_final: Checkpoint at the end. Default True.
        save_on_interrupt: On Ctrl-C, checkpoint the last finished step (single process). Default True.
        progress: A tqdm progress bar on rank 0. Default True.
        run_name: The progress bar's label; None: the method.
        mixed_precision: auto (bf16 autocast on CUDA), bf16 or no. Default "auto".
        fsdp: Under torchrun, FSDP2 (fully_shard) instead of DDP. Default False.
        gradient_checkpointing: Recompute each decoder layer in the backward (long context). Default False.
        pack_sequences: Run a micro-batch's rows as one sequence without padding (checked at start).
            Default False.
    """

    # --- the objective -------------------------------------------------------------------------
    method: str = "gro"                 # any gro_loss preset: grpo, rloo, dapo, gro, dpo, kto, sft, ...
    loss_options: Dict[str, Any] = field(default_factory=dict)  # options of the objective (docs/options.md)
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

    # --- offline data mixed into online groups (docs/objective.md) ----------------------------
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

    # --- CHORD's mu schedule (offline_role="sft" with mu; Trinity-RFT's mu_schedule_function) ---
    # None: mu stays the loss option's value. Else per step: linear warm-up from 0 to mu_peak over
    # mu_warmup_steps, then a cosine from mu_peak down to mu_valley over mu_decay_steps, then mu_valley.
    mu_peak: Optional[float] = None
    mu_valley: Optional[float] = None   # None: mu_peak (no decay)
    mu_warmup_steps: int = 0
    mu_decay_steps: int = 0

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
        if self.mu_peak is not None:
            if self.resolved_options().offline_role != "sft":
                raise ValueError("mu_peak schedules CHORD's mu: it needs a method with offline_role='sft' (chord)")
            for name in ("mu_peak", "mu_valley"):
                v = getattr(self, name)
                if v is not None and not 0.0 <= v <= 1.0:
                    raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        elif self.mu_valley is not None or self.mu_warmup_steps or self.mu_decay_steps:
            raise ValueError("mu_valley / mu_warmup_steps / mu_decay_steps shape the mu schedule: set mu_peak")
        if self.mu_peak is not None and "mu" in self.loss_options:
            raise ValueError("loss_options['mu'] and mu_peak both set CHORD's mu: the schedule (mu_peak) replaces "
                             "it at every step; set one of them")
        if self.mu_warmup_steps < 0 or self.mu_decay_steps < 0:
            raise ValueError("mu_warmup_steps and mu_decay_steps must be >= 0")

    def mu_at(self, step: int) -> Optional[float]:
        """CHORD's mu at optimizer step `step` (0-based), or None without a schedule."""
        if self.mu_peak is None:
            return None
        peak = self.mu_peak
        valley = peak if self.mu_valley is None else self.mu_valley
        if step < self.mu_warmup_steps:
            return step / self.mu_warmup_steps * peak
        after = step - self.mu_warmup_steps
        if after >= self.mu_decay_steps:
            return valley
        return valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi * after / self.mu_decay_steps))

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

    def check_for(self, *, online: bool, world_size: int) -> None:
        """Settings the trainer would ignore, or fail on only at the first step: a ValueError naming the
        setting, at construction. `online`: reward functions given (sampling), else pure offline."""
        opts = self.resolved_options()
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        changed = [name for name, value in defaults.items() if getattr(self, name) != value]
        if not online:
            read_offline = ("max_new_tokens",) if opts.loss_agg == "seq_mean_token_sum_norm" else ()
            for name in ("num_generations", "max_new_tokens", "top_k", "top_p", "min_p", "offline_column",
                         "offline_per_group", "offline_reward"):
                if name in changed and name not in read_offline:
                    raise ValueError(f"GROConfig.{name} is read only when sampling (reward functions given); this "
                                     "trainer trains offline from the dataset's rows")
        elif self.offline_column is None:
            for name in ("offline_per_group", "offline_reward"):
                if name in changed:
                    raise ValueError(f"GROConfig.{name} applies to the gold rows of offline_column, which is not set")
        if opts.offline_role == "sft" and opts.loss_agg != "token_mean":
            raise ValueError("offline_role='sft' in GROTrainer needs loss_agg='token_mean' (its online and offline "
                             "token means are made exact across micro-batches and processes with the batch's counts)")
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

def _check_names(init):
    """A misspelled setting names the closest ones; a loss option given as a setting says where it goes."""
    settings = tuple(f.name for f in fields(GROConfig))

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        unknown = set(kwargs) - set(settings)
        options = sorted(unknown & set(OPTIONS) - {"temperature"})
        if options:
            raise TypeError(f"{', '.join(options)}: option(s) of the loss, not GROConfig settings; pass them as "
                            f"GROConfig(loss_options={{{', '.join(repr(o) + ': ...' for o in options)}}})")
        if unknown:
            raise TypeError(unknown_names("GROConfig setting", unknown, settings))
        init(self, *args, **kwargs)

    return checked


GROConfig.__init__ = _check_names(GROConfig.__init__)
