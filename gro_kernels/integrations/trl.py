"""TRL drop-in: GRPOTrainer, DPOTrainer, KTOTrainer, DistillationTrainer and (experimental) GKDTrainer whose
log-prob step and loss run on gro_kernels.

    from gro_kernels.integrations.trl import GROGRPOTrainer     # same constructor as trl.GRPOTrainer
    trainer = GROGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    # or, on a trainer you already built:
    trainer = patch_trainer(GRPOTrainer(...))

TRL keeps everything around the loss (generation, rewards, advantages, old / reference log-probs,
gradient accumulation, `steps_per_generation`, `num_iterations`, distribution, logging). Two
things move to gro_kernels: TRL's fused LM head (`model(..., fused_lm_head=True)`, the per-token
log-prob / entropy step) becomes `token_logprobs`, and the loss becomes one `gro_loss` call from
the backbone's final hidden states and the `lm_head` weight, run inside the model's forward.

The model's `final_logit_softcapping` (Gemma 2/3) is applied as the loss's `softcap`, as TRL's own
head does; TRL's `cast_lm_head_to_fp32` is `head_precision="fp32"`; TRL's top_k / top_p / min_p shape
generation only, as in TRL, unless `sampler_logprobs=True` (`GROGRPOTrainer`, `patch_trainer`) makes
the policy's log-probs those of the truncated distribution the sampler drew from.

Every config option that changes the loss is either mapped below (`GRPO_LOSS_TYPES` with
`grpo_options`, `DPO_LOSS_TYPES` with `dpo_options`, `KTO_LOSS_TYPES`) or listed in an
`*_UNSUPPORTED` table that raises a `ValueError` naming it; nothing is ignored. The tests check loss
and gradients against TRL's own trainers on the same batches (tests/test_integration_trl.py).

Distillation: `DistillationTrainer` (on-policy, TRL's chunked hidden-state loss) and GKDTrainer (its
`generalized_jsd_loss` on materialized logits) compute the generalized JSD between the student and a
teacher model; patched, it is one `gro_loss(method="distill", divergence="jsd", jsd_beta=beta)` call
from both models' final hidden states and heads (the teacher's hidden size may differ). Logit
scales and soft-capping (which TRL applies to either head) are refused, naming the config field.
"""
from __future__ import annotations

import torch

from ..loss import gro_loss
from ..objective.options import DEFAULTS
from . import missing_dependency

try:
    from trl import DistillationTrainer, DPOTrainer, GRPOTrainer, KTOTrainer
    from trl.trainer.utils import nanmax, nanmin

    from .hf_head import GROCall, _head_weights, add_gro_head, check_plain_head
except ImportError as e:
    raise missing_dependency(__name__, e, "pip install 'gro_kernels[integrations]'   (from a clone: pip install "
                                          "'.[integrations]'; or only TRL: pip install trl==1.16.0)") from e

__all__ = ["GROGRPOTrainer", "GRODPOTrainer", "GROKTOTrainer", "GRODistillationTrainer", "patch_trainer", "GRPO_LOSS_TYPES",
           "GRPO_UNSUPPORTED", "DPO_LOSS_TYPES", "DPO_UNSUPPORTED", "KTO_LOSS_TYPES", "KTO_UNSUPPORTED"]

# ================================================================================================
# The option map. Extend here when the objective grows: add the loss type / option to the mapping
# and drop its row from the *_UNSUPPORTED table.
# ================================================================================================

# GRPOConfig.loss_type -> gro_loss options, and how TRL normalizes the result:
#   "accumulation": gro's aggregation, then divided by the gradient-accumulation steps (grpo, bnpo, dr_grpo,
#                   sapo, luspo);
#   "num_items":    token_mean over `num_items_in_batch` rescaled to one accumulation window (dapo, cispo, vespo).
GRPO_LOSS_TYPES = {
    "grpo":    dict(surrogate="ratio_clip", loss_agg="seq_mean_token_mean",     normalizer="accumulation"),
    "bnpo":    dict(surrogate="ratio_clip", loss_agg="token_mean",              normalizer="accumulation"),
    "dr_grpo": dict(surrogate="ratio_clip", loss_agg="seq_mean_token_sum_norm", normalizer="accumulation"),
    "sapo":    dict(surrogate="sapo",       loss_agg="seq_mean_token_mean",     normalizer="accumulation"),
    # TRL's luspo: the ratio_clip loss summed over each sequence, mean over sequences (token or sequence ratio)
    "luspo":   dict(surrogate="ratio_clip", loss_agg="seq_mean_token_sum",      normalizer="accumulation"),
    "dapo":    dict(surrogate="ratio_clip", loss_agg="token_mean",              normalizer="num_items"),
    "cispo":   dict(surrogate="cispo",      loss_agg="token_mean",              normalizer="num_items"),
    "vespo":   dict(surrogate="vespo",      loss_agg="token_mean",              normalizer="num_items"),
}


def _entropy_bonus(a):
    return a.entropy_coef != 0 or a.use_adaptive_entropy


# GRPOConfig options (or combinations) the objective cannot reproduce exactly: (option, condition on the
# config, why). Each one raises at construction / patch time.
GRPO_UNSUPPORTED = [
    ("loss_type", lambda a: a.loss_type not in GRPO_LOSS_TYPES,
     f"the GRO objective covers loss_type in {sorted(GRPO_LOSS_TYPES)}"),
    ("importance_sampling_level", lambda a: a.importance_sampling_level == "sequence"
     and (a.loss_type in ("cispo", "sapo") or (a.loss_type == "vespo" and a.beta != 0 and a.use_bias_correction_kl)),
     "the objective's sequence-level ratio (GSPO) applies to the clipped ratio only (grpo, bnpo, dr_grpo, dapo, "
     "luspo), not to cispo's or sapo's ratio, nor to vespo's bias-corrected KL (vespo's own weight is "
     "sequence-level whatever the level: with beta=0 or use_bias_correction_kl=False it is mapped)"),
    ("off_policy_mask_threshold", lambda a: a.off_policy_mask_threshold is not None and a.loss_type == "vespo"
     and a.use_vllm and a.vllm_importance_sampling_correction,
     "with vespo and the vLLM correction the objective's rollout_logp carries TRL's importance ratio into VESPO's "
     "weight, so it cannot also carry the sampler's log-probs the off-policy mask reads"),
]
# Mapped without an option of their own:
# - vLLM importance-sampling correction (every vllm_importance_sampling_mode): TRL multiplies the policy term by a
#   non-negative per-token (or per-sequence) weight w, which is the objective with advantages A * w; with vespo TRL
#   folds w into phi, which is the objective's rollout correction (see _compute_loss).
# - entropy_coef / use_adaptive_entropy: TRL's controller runs as in TRL; its coefficient of the step goes to
#   entropy_coef (entropy_agg="token_mean" for the accumulation-normalized losses, a rescaled coefficient for the
#   num_items ones).
# - Everything TRL does before the loss: scale_rewards, reward_weights, multi_objective_aggregation,
#   mask_truncated_completions (TRL zeroes the truncated rows' completion_mask), num_iterations,
#   steps_per_generation (the old log-probs), tool_mask (the mask).


def grpo_options(trainer) -> dict:
    """The gro_loss options of a GRPOTrainer's config (the per-batch ones are set in the loss)."""
    args, kind = trainer.args, GRPO_LOSS_TYPES[trainer.loss_type]
    surrogate = kind["surrogate"]
    options = dict(
        method="gro", surrogate=surrogate, loss_agg=kind["loss_agg"],
        # TRL's vespo reads the level only in its KL correction (refused with "sequence"): its phi is per sequence
        importance_sampling="token" if surrogate == "vespo" else trainer.importance_sampling_level,
        kl_coef=trainer.beta,
    )
    if trainer.beta != 0.0:  # TRL's k3 KL in the loss (the objective refuses KL options with kl_coef 0)
        options.update(kl_estimator="k3", kl_placement="loss")
    # The objective refuses options its surrogate does not read: give each only where it is read.
    if surrogate in ("ratio_clip", "cispo"):  # CISPO reads epsilon_high alone (its bound)
        options["eps_high"] = trainer.epsilon_high
    if surrogate == "ratio_clip":  # TRL applies delta to the clipped losses only
        options.update(eps_low=trainer.epsilon_low, delta=args.delta)
    if surrogate == "sapo":
        options.update(sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg)
    if surrogate == "vespo":
        options.update(vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
                       vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg)
    if kind["loss_agg"] == "seq_mean_token_sum_norm":
        options["max_completion_length"] = trainer.max_completion_length
    if trainer.beta != 0.0 and args.use_bias_correction_kl:  # TRL's default: the KL term times the ratio
        options["use_bias_correction_kl"] = True
    if trainer.off_policy_mask_threshold is not None:
        options["off_policy_mask_threshold"] = trainer.off_policy_mask_threshold
    if trainer.top_entropy_quantile < 1.0:
        options["top_entropy_quantile"] = trainer.top_entropy_quantile
    return options


# DPOConfig.loss_type: every TRL DPO loss type is the objective's `pair_loss` of the same name (TRL's
# definitions, docs/methods.md), a list of them combined with `loss_weights` (MPO). The options each one
# reads go with it; TRL ignores `label_smoothing` for the loss types that do not read it, and so does the map.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                  "apo_down", "exo_pair", "nca_pair", "discopop", "sigmoid_norm", "sft")
_SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")   # the loss types that read label_smoothing


def dpo_options(trainer) -> dict:
    """The gro_loss options of a DPOTrainer's config."""
    args, kinds = trainer.args, tuple(trainer.loss_types)
    options = dict(method="dpo", pair_loss=kinds, loss_weights=tuple(float(w) for w in trainer.loss_weights))
    if kinds != ("sft",):  # the objective refuses options a loss type does not read
        options["beta"] = trainer.beta
    if set(kinds) & set(_SMOOTHED):
        options["label_smoothing"] = args.label_smoothing
    if "discopop" in kinds:
        options["discopop_tau"] = args.discopop_tau
    if trainer.f_divergence_type != "reverse_kl":
        options["f_divergence_type"] = trainer.f_divergence_type
        if trainer.f_divergence_type == "alpha_divergence":
            options["f_alpha_divergence_coef"] = args.f_alpha_divergence_coef
    if trainer.use_weighting:   # WPO: gro_loss computes log sum_v p_v^2 in its statistics pass
        options["use_weighting"] = True
    if trainer.ld_alpha is not None:
        options["ld_alpha"] = trainer.ld_alpha
    return options


DPO_UNSUPPORTED = [
    ("loss_type", lambda a: not set(a.loss_type) <= set(DPO_LOSS_TYPES),
     f"the GRO objective covers loss_type in {list(DPO_LOSS_TYPES)} (or a list of them)"),
]

# KTOConfig.loss_type -> gro_loss options. The reference point z0 is TRL's batch KL estimate for kto;
# for apo_zero_unpaired TRL estimates no KL and z0 = 0 (1 - sigma(beta D) desirable, sigma(beta D) not).
KTO_LOSS_TYPES = {"kto": dict(method="kto"), "apo_zero_unpaired": dict(method="kto")}

KTO_UNSUPPORTED = [
    ("loss_type", lambda a: a.loss_type not in KTO_LOSS_TYPES,
     f"the GRO objective covers loss_type in {sorted(KTO_LOSS_TYPES)}"),
]


def _check(args, table, who):
    for option, is_set, why in table:
        if is_set(args):
            raise ValueError(f"{who}: {option}={getattr(args, option)!r} is not supported by gro_kernels: {why}")


def _check_trainer(trainer, table, who):
    _check(trainer.args, table, who)
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError(f"{who}: router_aux_loss_coef={trainer.args.router_aux_loss_coef!r} (the MoE load-balancing "
                         "loss) is not supported by gro_kernels' fused head; set it to 0.0")


def _unwrapped(trainer, model):
    model = trainer.accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _patch_models(trainer, *, temperature, cast_lm_head_to_fp32=False, policy_entropy=True, sampler=None):
    """Swap TRL's fused head for gro_kernels' on the policy and the reference model (the sampler's
    truncation, when given, on the policy only: the reference is the full distribution)."""
    pairs = [(trainer.model, policy_entropy, sampler)]
    if getattr(trainer, "ref_model", None) is not None:
        pairs.append((trainer.ref_model, False, None))
    for model, entropy, truncation in pairs:
        model = _unwrapped(trainer, model)
        if not getattr(model, "_gro_head", False):
            add_gro_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32, entropy=entropy,
                         sampler=truncation)
            model._gro_head = True


# generation settings that change the distribution the sampler draws from beyond temperature / top_k / top_p /
# min_p: with sampler_logprobs=True the loss could not reproduce them
_SAMPLER_CHANGING = ("temperature", "repetition_penalty", "presence_penalty", "frequency_penalty", "typical_p",
                     "epsilon_cutoff", "eta_cutoff", "suppress_tokens", "bad_words_ids", "no_repeat_ngram_size",
                     "top_n_sigma", "logit_bias", "allowed_token_ids")


def grpo_sampler(trainer) -> dict:
    """TRL's top_k / top_p / min_p (its generation_kwargs override them, as in TRL) as gro_loss arguments,
    for sampler_logprobs=True; a ValueError naming any generation setting the loss cannot follow."""
    args, who = trainer.args, type(trainer).__name__
    gen = dict(top_k=trainer.top_k, top_p=trainer.top_p, min_p=trainer.min_p)
    extra = dict(args.generation_kwargs or {})
    for name in gen:
        if name in extra:
            gen[name] = extra.pop(name)
    if trainer.repetition_penalty != 1.0:
        raise ValueError(f"{who}: sampler_logprobs=True with repetition_penalty={trainer.repetition_penalty!r}: the "
                         "penalty depends on the tokens generated so far, which the loss does not see")
    changing = sorted(set(extra) & set(_SAMPLER_CHANGING))
    if changing:
        raise ValueError(f"{who}: sampler_logprobs=True with generation_kwargs {changing}: they change the "
                         "distribution the sampler draws from in a way the loss does not reproduce")
    top_k, top_p, min_p = gen["top_k"] or 0, gen["top_p"] if gen["top_p"] is not None else 1.0, gen["min_p"] or 0.0
    if min_p > 0 and top_p < 1 and not trainer.use_vllm:
        raise ValueError(f"{who}: sampler_logprobs=True with min_p and top_p < 1 on transformers' generate: it applies "
                         "top_p before min_p, the loss (vLLM's order) min_p first; use one of them, or vLLM")
    out = {}
    if top_k > 0:
        out["top_k"] = int(top_k)
    if top_p < 1:
        out["top_p"] = float(top_p)
    if min_p > 0:
        out["min_p"] = float(min_p)
    return out


_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "spatial_shapes",
               "num_tiles", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _text_only(inputs, who):
    given = [k for k in _MULTIMODAL if inputs.get(k) is not None]
    if given:
        raise ValueError(f"{who} supports text-only batches; got {', '.join(given)}")


# ================================================================================================
# GRPO
# ================================================================================================

class _GROGRPOLoss:
    """GRPOTrainer._compute_loss on gro_kernels: the same loss, normalization and metrics as TRL's."""

    def _compute_loss(self, model, inputs):
        _text_only(inputs, "GROGRPOTrainer")
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-keep] = -100

        kind = GRPO_LOSS_TYPES[self.loss_type]
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        num_items = None
        if kind["normalizer"] == "num_items":
            # `num_items_in_batch` spans the generation batch: rescale it to one accumulation window (as TRL)
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * accumulation / self.args.steps_per_generation
        advantages = inputs["advantages"]
        weighted = advantages
        old_logp = inputs.get("old_per_token_logps")  # None: on-policy, the objective uses sg[logp]
        ref_logp = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        options = grpo_options(self)
        # TRL's off-policy mask measures the drift from the sampler's log-probs when it has them (vLLM)
        rollout_logp = inputs.get("sampling_per_token_logps") if self.off_policy_mask_threshold is not None else None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = inputs["importance_sampling_ratio"]
            if kind["surrogate"] == "vespo":
                # TRL folds its token ratio g into VESPO's sequence weight: the objective's rollout correction with
                # g = exp(lo - rollout_logp) unclipped, i.e. rollout_logp = lo - log g (g = 0 gives +inf, exp -> 0)
                if old_logp is None:
                    raise ValueError("GROGRPOTrainer: vespo with the vLLM correction needs old_per_token_logps")
                rollout_logp = old_logp - torch.log(ratio)
                options.update(rollout_correction="token_truncate", rollout_clip_min=0.0, rollout_clip_max=float("inf"))
            else:
                # TRL multiplies the policy term (not the KL) by this non-negative weight: weight the advantages
                rows = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
                weighted = (rows * ratio).expand(mask.shape)
        bonus = self._gro_bonus_coef()
        options["entropy_coef"] = self._gro_entropy_coef(bonus, mask, num_items, accumulation)
        if options["entropy_coef"] != 0 and num_items is None:
            options["entropy_agg"] = "token_mean"  # TRL's bonus: the mean entropy of the (selected) tokens

        # TRL's bonus over the selected tokens (and its bookkeeping) reads their entropy and count: the head then
        # computes the per-token entropy first (one more forward sweep, no gradient)
        selected = self._entropy_bonus_enabled and self.top_entropy_quantile < 1.0
        update = None
        if selected and num_items is not None and bonus != 0:
            def update(entropy):  # num_items losses: the coefficient that turns c = 1 / num_items into TRL's mean
                chosen = self.get_high_entropy_mask(entropy, mask, 1 - self.top_entropy_quantile)
                return dict(entropy_coef=bonus * float(num_items) / (chosen.sum().clamp(min=1).item() * accumulation))
        call = GROCall(keep=keep, entropy=selected, update=update, kwargs=dict(
            mask=mask, advantages=weighted, old_logp=old_logp, ref_logp=ref_logp, rollout_logp=rollout_logp,
            num_items_in_batch=num_items, return_entropy=True, **options))
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, gro=call)
        loss = out.loss / accumulation if kind["normalizer"] == "accumulation" else out.loss
        if self._entropy_bonus_enabled:
            if selected:  # TRL's own selection (its quantile rule) on the head's per-token entropy
                effective = self.get_high_entropy_mask(out.entropy, mask, 1 - self.top_entropy_quantile).float()
                entropy_stats = torch.stack([(out.entropy * effective).sum(), effective.sum()])
            else:
                tokens = mask.sum().float()
                entropy_stats = torch.stack([out.metrics["entropy"] * tokens.clamp(min=1.0), tokens])
            self._gro_entropy_bookkeeping(mode, out, entropy_stats, bonus, accumulation)
        self._gro_log_metrics(mode, out, mask, advantages, old_logp, ref_logp, options,
                              inputs.get("importance_sampling_ratio"))
        return loss

    def _gro_bonus_coef(self):
        """The entropy coefficient TRL applies this step (its adaptive controller gates it on last step's entropy)."""
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            return 0.0
        return self.entropy_coef

    def _gro_entropy_coef(self, coef, mask, num_items, accumulation):
        """TRL's bonus is `coef * token-mean entropy / accumulation`. The accumulation-normalized losses take it
        as entropy_agg="token_mean" (then / accumulation with the rest); the num_items ones weight the entropy
        with their own coefficient 1 / num_items, so rescale the coefficient to make them equal (over the
        top-entropy selection, the head's `update` rescales it by the selection's size instead)."""
        if coef == 0 or num_items is None:
            return coef
        tokens = mask.sum().clamp(min=1.0).item()
        return coef * float(num_items) / (tokens * accumulation)

    def _gro_entropy_bookkeeping(self, mode, out, stats, coef, accumulation):
        """TRL's policy_loss metric and its adaptive entropy controller, fed from the fused pass's entropy.
        stats: [sum of H, count] over the tokens the bonus acts on."""
        # TRL's policy_loss: the loss before the entropy bonus and before the accumulation division
        # the num_items losses carry the bonus inside out.loss already divided by the accumulation
        divided = GRPO_LOSS_TYPES[self.loss_type]["normalizer"] == "num_items"
        bonus = coef * stats[0] / stats[1].clamp(min=1.0) / (accumulation if divided else 1)
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(out.loss.detach() + bonus).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:  # end of the accumulation window: update for the next step
                total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (total[0] / total[1].clamp(min=1.0)).item()
                a = self.args
                if world_entropy <= a.entropy_target:  # entropy too low: raise the bonus (capped), else lower it
                    self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _gro_log_metrics(self, mode, out, mask, advantages, old_logp, ref_logp, options, is_ratio=None):
        """The metrics TRL's _compute_loss logs, from the detached log-probs."""
        logp = out.log_probs
        mask = mask.to(logp.dtype)
        old = logp if old_logp is None else old_logp
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        reduce = self.accelerator.reduce

        def global_masked_mean(x):
            if x.shape[1] == 1:  # sequence-level importance sampling: one value per sequence
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * mask).sum(), mask.sum().float()])
            totals = reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        log_ratio = logp - old
        if options["importance_sampling"] == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)
        if self.beta != 0.0:
            diff = ref_logp - logp
            kl = torch.exp(diff) - diff - 1
            if options.get("use_bias_correction_kl"):  # TRL logs the corrected KL
                kl = kl * ratio
            self._metrics[mode]["kl"].append(global_masked_mean(kl))
        tokens = mask.sum().float()
        self._metrics[mode]["entropy"].append(
            (lambda t: (t[0] / t[1].clamp(min=1.0)).item())(
                reduce(torch.stack([out.metrics["entropy"] * tokens.clamp(min=1.0), tokens]), reduction="sum")))

        if self.loss_type == "sapo":
            return
        if self.loss_type == "vespo":
            a = self.args
            phi = self.get_gamma_weights(
                advantages=advantages, log_ratio_per_token=logp - old, mask=mask, importance_sampling_ratio=is_ratio,
                k_pos=a.vespo_k_pos, lambda_pos=a.vespo_lambda_pos, k_neg=a.vespo_k_neg, lambda_neg=a.vespo_lambda_neg)
            self._metrics[mode]["vespo/phi_seq_mean"].append(global_masked_mean(phi))
            return
        if self.loss_type == "cispo":
            clipped = (ratio > self.epsilon_high) & (advantages > 0)
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))
            return
        if options.get("delta") is not None:
            ratio = ratio.clamp(max=options["delta"])
        low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
        high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
        self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
        self._metrics[mode]["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low.float()))).item())
        self._metrics[mode]["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high.float()))).item())


def _patch_grpo(trainer, sampler_logprobs=False):
    who = type(trainer).__name__
    _check_trainer(trainer, GRPO_UNSUPPORTED, who)
    if trainer.top_entropy_quantile < 1.0 and trainer.accelerator.num_processes > 1:
        raise ValueError(f"{who}: top_entropy_quantile={trainer.top_entropy_quantile!r} is not supported by "
                         "gro_kernels with more than one process: TRL takes the entropy quantile over all "
                         "processes' tokens, the objective over the local batch")
    _patch_models(trainer, temperature=trainer.temperature, cast_lm_head_to_fp32=trainer.args.cast_lm_head_to_fp32,
                  sampler=grpo_sampler(trainer) if sampler_logprobs else None)


class GROGRPOTrainer(_GROGRPOLoss, GRPOTrainer):
    """`trl.GRPOTrainer` with its log-prob step and loss on gro_kernels (same constructor, same results).

    One keyword more than TRL's: `sampler_logprobs=True` computes the policy's log-probs (the loss's and
    the old log-probs) of the truncated distribution the sampler drew from (TRL's top_k / top_p / min_p
    after the temperature, vLLM's processed log-probs) instead of TRL's full tempered distribution; the
    reference's stay the full distribution. Default False: the same numbers as TRL."""

    def __init__(self, *args, sampler_logprobs: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        _patch_grpo(self, sampler_logprobs)


# ================================================================================================
# DPO and KTO: the reference enters the objective only through its sequence sums
# ================================================================================================

def _sums_as_tokens(sums, mask):
    """A [B,T] reference log-prob whose masked row sums are `sums` [B] (placed on each row's first
    scored token). The implicit score D_i = sum_t m (l - lr) only reads these sums, so TRL's
    sequence-level (possibly precomputed) reference log-probs enter the objective exactly."""
    first = torch.zeros_like(mask, dtype=torch.bool)
    rows = mask.any(1)
    first[rows, mask[rows].float().argmax(1)] = True
    return torch.where(first, sums[:, None].to(torch.float32), torch.zeros((), device=mask.device))


def _ld_factor(mask, ld_alpha):
    """TRL's LD-DPO token factor on a [chosen; rejected] batch: 1 on each completion's first min(|y_w|, |y_l|)
    tokens, ld_alpha on the rest (the mask itself without ld_alpha)."""
    mask = mask.float()
    if ld_alpha is None:
        return mask
    lengths = mask.sum(1)
    shared = torch.minimum(*lengths.chunk(2)).repeat(2)
    return torch.where(mask.cumsum(1) <= shared[:, None], 1.0, ld_alpha) * mask


def _gather_sum(accelerator, x):
    return accelerator.gather_for_metrics(x).sum()


class _GRODPOLoss:
    """DPOTrainer._compute_loss on gro_kernels: the same loss and metrics as TRL's."""

    def _compute_loss(self, model, inputs, return_outputs):
        _text_only(inputs, "GRODPOTrainer")
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        targets = labels[:, 1:]
        mask = targets != -100
        B = targets.shape[0]
        n = B // 2  # the batch is [chosen; rejected]

        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, inputs)
        ref_sums = torch.cat([ref_chosen, ref_rejected]).detach()

        pair = torch.arange(n, device=targets.device)
        # TRL's (LD-DPO weighted) reference sums, placed where the objective's LD-DPO factor reads them at 1
        u = _ld_factor(mask, self.ld_alpha)
        first = torch.ones_like(ref_sums) if self.ld_alpha is None else u.max(1).values
        ref_token_sums = torch.where(first > 0, ref_sums / first.clamp(min=1e-30), torch.zeros_like(ref_sums))
        call = GROCall(keep=targets.shape[1], extras=True, kwargs=dict(
            group_ids=torch.cat([pair, pair]), labels=torch.cat([torch.ones(n), -torch.ones(n)]).to(targets.device),
            ref_logp=_sums_as_tokens(ref_token_sums, mask), return_entropy=True, **dpo_options(self)))
        outputs = model(**model_kwargs, labels=labels, gro=call)
        loss = outputs.loss
        self._gro_log_metrics(mode, inputs, outputs, mask, u, n)
        if return_outputs:  # as TRL: the logits only come from an extra forward
            with torch.no_grad():
                return loss, model(**model_kwargs)
        return loss

    def _gro_log_metrics(self, mode, inputs, outputs, mask, u, n):
        acc = self.accelerator
        logps = (outputs.log_probs * u).sum(1)  # TRL's (LD-DPO weighted) sequence log-probs
        chosen_logps, rejected_logps = logps[:n], logps[n:]
        tokens = mask.sum()
        entropy_sum = _gather_sum(acc, outputs.metrics["entropy"] * tokens.clamp(min=1))
        total = _gather_sum(acc, tokens)
        self._metrics[mode]["entropy"].append((entropy_sum / total).item() if total > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += _gather_sum(acc, inputs["attention_mask"].sum()).item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        chosen_mask, rejected_mask = mask[:n], mask[n:]
        for name, part, m in (("chosen", outputs.mean_logits[:n], chosen_mask),
                              ("rejected", outputs.mean_logits[n:], rejected_mask)):
            s, c = _gather_sum(acc, part[m].sum()).item(), _gather_sum(acc, m.sum()).item()
            self._metrics[mode][f"logits/{name}"].append(s / c if c > 0 else 0.0)
        correct = _gather_sum(acc, (outputs.is_top1[:n] & chosen_mask).sum())
        total_chosen = _gather_sum(acc, chosen_mask.sum())
        self._metrics[mode]["mean_token_accuracy"].append((correct / total_chosen).item() if total_chosen > 0 else 0.0)

        # gro_loss's implicit rewards beta (S - R) per row (TRL's, LD-DPO-weighted with ld_alpha). The objective
        # refuses beta with pair_loss='sft' alone (the loss does not read it) and uses its default there.
        beta = dpo_options(self).get("beta", DEFAULTS["beta"])
        chosen_rewards, rejected_rewards = (outputs.per_sequence["scores"].float() * (self.beta / beta)).split(n)
        self._metrics[mode]["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        self._metrics[mode]["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        accuracies = (chosen_rewards > rejected_rewards).float()
        self._metrics[mode]["rewards/accuracies"].append(acc.gather(accuracies).mean().item())
        self._metrics[mode]["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        self._metrics[mode]["logps/chosen"].append(acc.gather(chosen_logps).mean().item())
        self._metrics[mode]["logps/rejected"].append(acc.gather(rejected_logps).mean().item())


def _patch_dpo(trainer):
    _check_trainer(trainer, DPO_UNSUPPORTED, type(trainer).__name__)
    _patch_models(trainer, temperature=1.0)


class GRODPOTrainer(_GRODPOLoss, DPOTrainer):
    """`trl.DPOTrainer` with its log-prob step and loss on gro_kernels (every TRL loss type, `DPO_LOSS_TYPES`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _patch_dpo(self)


class _GROKTOLoss:
    """KTOTrainer._compute_loss on gro_kernels: the same loss and metrics as TRL's for loss_type='kto'."""

    def _compute_loss(self, model, inputs, return_outputs):
        _text_only(inputs, "GROKTOTrainer")
        mode = "train" if self.model.training else "eval"
        acc = self.accelerator
        batch = {k: (v.to(acc.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=acc.device)

        KL_logps = self._compute_kl_logps(model, batch)
        model_kwargs = {k: v for k, v in batch.items() if k not in {
            "completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
            "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps"}}
        model_kwargs["use_cache"] = False
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        mask = labels[:, 1:] != -100

        if self.precompute_ref_logps:
            ref_sums, ref_KL_logps = batch["ref_logps"], batch.get("ref_KL_logps")
        else:
            ref_sums, ref_KL_logps = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, batch)
        ref_sums = ref_sums.detach()
        if self.calculate_KL:  # the reference point z0 (detached, clamped at 0 across ranks), as TRL
            kl = acc.gather_for_metrics((KL_logps - ref_KL_logps).mean().detach()).mean().clamp(min=0)
        else:
            kl = torch.zeros(1, device=acc.device)

        options = dict(KTO_LOSS_TYPES[self.loss_type], beta=self.beta, anchor_value=kl.item(),
                       pos_coef=self.desirable_weight, neg_coef=self.undesirable_weight)
        call = GROCall(keep=mask.shape[1], extras=True, kwargs=dict(
            labels=torch.where(desirable, 1.0, -1.0), ref_logp=_sums_as_tokens(ref_sums, mask),
            return_entropy=True, **options))
        outputs = model(**model_kwargs, labels=labels, gro=call)
        self._gro_log_metrics(mode, batch, outputs, mask, desirable, kl)
        if return_outputs:
            with torch.no_grad():
                return outputs.loss, model(**model_kwargs)
        return outputs.loss

    def _gro_log_metrics(self, mode, batch, outputs, mask, desirable, kl):
        acc = self.accelerator
        self._metrics[mode]["kl"].append(kl.item())
        tokens = mask.sum()
        entropy_sum = _gather_sum(acc, outputs.metrics["entropy"] * tokens.clamp(min=1))
        total = _gather_sum(acc, tokens)
        self._metrics[mode]["entropy"].append((entropy_sum / total).item() if total > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += _gather_sum(acc, batch["attention_mask"].sum()).item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        logps = outputs.log_probs.sum(1)
        rewards = outputs.per_sequence["scores"].float()  # gro_loss's implicit rewards beta (S - R), as TRL's
        counts = {}
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            m = mask[rows]
            s, c = _gather_sum(acc, outputs.mean_logits[rows][m].sum()).item(), _gather_sum(acc, m.sum()).item()
            if c > 0:
                self._metrics[mode][f"logits/{name}"].append(s / c)
            counts[name] = _gather_sum(acc, rows.sum()).item()
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            if counts[name] > 0:
                self._metrics[mode][f"rewards/{name}"].append(
                    acc.gather_for_metrics(rewards[rows].nansum()).nansum().item() / counts[name])
                self._metrics[mode][f"logps/{name}"].append(
                    acc.gather_for_metrics(logps[rows].nansum()).nansum().item() / counts[name])
        if counts["chosen"] > 0 and counts["rejected"] > 0:
            self._metrics[mode]["rewards/margins"].append(
                self._metrics[mode]["rewards/chosen"][-1] - self._metrics[mode]["rewards/rejected"][-1])


def _patch_kto(trainer):
    _check_trainer(trainer, KTO_UNSUPPORTED, type(trainer).__name__)
    _patch_models(trainer, temperature=1.0)


class GROKTOTrainer(_GROKTOLoss, KTOTrainer):
    """`trl.KTOTrainer` with its log-prob step and loss on gro_kernels (loss_type='kto')."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _patch_kto(self)


# ================================================================================================
# Distillation: DistillationTrainer and GKDTrainer
# ================================================================================================

def _distill_kwargs(trainer, teacher_hidden, teacher, num_items_in_batch):
    """gro_loss options of TRL's generalized JSD (`beta`: 0 forward KL, 1 reverse KL, as TRL)."""
    weight, bias = _head_weights(teacher)  # whole under FSDP2; a clear error for a ZeRO-3 placeholder
    return dict(method="distill", divergence="jsd", jsd_beta=float(trainer.beta), teacher_hidden=teacher_hidden,
                teacher_weight=weight.to(teacher_hidden.dtype),
                teacher_bias=None if bias is None else bias.to(teacher_hidden.dtype),
                num_items_in_batch=num_items_in_batch)


class _GRODistillationLoss:
    """DistillationTrainer._compute_loss on gro_kernels: TRL's hidden states of student and teacher, then one
    gro_loss instead of TRL's chunked divergence (same loss, reduction and entropy bookkeeping)."""

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        _text_only(inputs, "GRODistillationTrainer")
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, keep)
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state,
                                                       teacher, input_ids, attention_mask, keep)
        weight, bias = _head_weights(unwrapped_student)  # FSDP2: the whole head, its gradient back on the shards
        targets = inputs["completion_ids"].to(weight.device).masked_fill(mask.to(weight.device) == 0, -100)
        hidden = hidden.to(weight.device)
        if hidden.dtype != weight.dtype:
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        out = gro_loss(hidden, weight, targets, bias=bias, temperature=self.temperature, return_entropy=True,
                       **_distill_kwargs(self, teacher_hidden.to(weight.device), teacher, num_items_in_batch))
        n_valid = (targets != -100).sum()
        return out.loss, (out.metrics["entropy"] * n_valid).detach(), n_valid


def _check_distillation_heads(trainer, models):
    """Plain heads for the teacher divergence: no logit scale (check_plain_head) and no soft cap (the
    divergence to a teacher is not offered with one)."""
    for model in models:
        model = _unwrapped(trainer, model)
        check_plain_head(model)
        cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:
            raise ValueError(f"{type(trainer).__name__}: final_logit_softcapping={cap!r} (model_type="
                             f"{model.config.model_type!r}): gro_kernels' divergence to a teacher takes no soft cap")


def _patch_distillation(trainer):
    _check_distillation_heads(trainer, (trainer.model, trainer.teacher_model))


class GRODistillationTrainer(_GRODistillationLoss, DistillationTrainer):
    """`trl.DistillationTrainer` with its divergence on gro_kernels (same constructor, same results)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _patch_distillation(self)


class _GROGKDLoss:
    """GKDTrainer.compute_loss on gro_kernels: the student's head runs gro_loss(method="distill") inside its
    forward (the teacher's final hidden states and head given), with TRL's shift, labels and reduction."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        _text_only(inputs, "GROGKDTrainer")
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = teacher.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                                use_cache=False).last_hidden_state[:, :-1]
        keep = inputs["input_ids"].shape[1] - 1
        call = GROCall(keep=keep, kwargs=_distill_kwargs(self, teacher_hidden, teacher, num_items_in_batch))
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"],
                    gro=call)
        return (out.loss, out) if return_outputs else out.loss


def _patch_gkd(trainer):
    _check_distillation_heads(trainer, (trainer.model, trainer.teacher_model))
    _patch_models(trainer, temperature=1.0, policy_entropy=False)  # GKD's loss takes the logits untempered


def _gkd_patch():
    """(GKDTrainer, its loss mixin, its patch), or None where TRL has no experimental GKD trainer."""
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        return None
    return GKDTrainer, _GROGKDLoss, _patch_gkd


# ================================================================================================
# patch_trainer
# ================================================================================================

_PATCHES = [(GRPOTrainer, _GROGRPOLoss, _patch_grpo), (DPOTrainer, _GRODPOLoss, _patch_dpo),
            (KTOTrainer, _GROKTOLoss, _patch_kto), (DistillationTrainer, _GRODistillationLoss, _patch_distillation)]


def patch_trainer(trainer, *, sampler_logprobs: bool = False):
    """Make an existing GRPOTrainer / DPOTrainer / KTOTrainer / DistillationTrainer / GKDTrainer (or a
    subclass) run on gro_kernels, in place.

    `sampler_logprobs=True` (GRPO only): the policy's log-probs of the sampler's truncated distribution
    (see `GROGRPOTrainer`). Raises a ValueError naming the first config option gro_kernels cannot
    honour. Returns the trainer."""
    if sampler_logprobs and not isinstance(trainer, GRPOTrainer):
        raise ValueError("sampler_logprobs=True applies to GRPOTrainer (DPO / KTO score dataset completions)")
    # (trl.experimental is imported only for a GKDTrainer: importing it warns)
    gkd = _gkd_patch() if any(c.__name__ == "GKDTrainer" for c in type(trainer).__mro__) else None
    for base, loss, patch in _PATCHES + ([gkd] if gkd else []):
        if isinstance(trainer, base):
            patch(trainer, sampler_logprobs) if base is GRPOTrainer else patch(trainer)
            cls = type(trainer)
            if not issubclass(cls, loss):
                trainer.__class__ = type(f"GRO{cls.__name__}", (loss, cls), {"__module__": __name__})
            return trainer
    raise TypeError("patch_trainer takes a trl GRPOTrainer, DPOTrainer, KTOTrainer, DistillationTrainer or GKDTrainer, "
                    f"got {type(trainer).__name__}")
