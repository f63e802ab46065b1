"""verl drop-in: the GRO objective as verl policy losses, and gro_kernels as verl's fused log-prob kernel.

    from gro_kernels.integrations.verl import register
    register()                       # then: actor_rollout_ref.actor.policy_loss.loss_mode=gro_vanilla
    register(fused_kernels=True)     # also: use_fused_kernels=True runs on gro_kernels (FSDP backend: "torch" and
                                     # "triton" impl_backend; Megatron backend: with its tensor-parallel group)

verl hands a policy loss per-token log-probs, so the registered losses call `gro_objective` (the
objective on `[B,T]` log-probs) with verl's clip ratios and verl's loss aggregation, including its
global-batch normalization (`config.global_batch_info`: data-parallel size, global token and
sequence counts). Each registered loss equals verl's own function of the same name on the same
inputs (tests/test_integration_verl.py). verl configs that the objective cannot reproduce raise a
`ValueError` naming the option; `VERL_NOT_COVERED` lists verl's losses that are not registered, and why.

Known differences: verl clamps log-ratios for numerical safety (|l - lo| <= 20 in vanilla and sapo,
GSPO's sequence log-ratio <= 10); the objective does not, so the two differ only past those ratios
(e^10, e^20). verl's geo_mean divides each row's log-ratio sum by (length + 1e-8), the objective by
the length: a relative difference below 1e-8 in the ratio.
"""
from __future__ import annotations

import math

import torch

from . import missing_dependency

try:
    from verl.trainer.ppo import core_algos
except ImportError as e:
    raise missing_dependency(__name__, e, "pip install --no-deps verl==0.9.1 && pip install 'gro_kernels[integrations]'"
                                          "   (from a clone: '.[integrations]'; --no-deps: verl's own pins "
                                          "would replace torch and transformers)") from e

from ..logprobs import token_logprobs
from ..objective import gro_objective
from ..objective.inputs import read_inputs
from .sharded import gathered

__all__ = ["register", "VERL_LOSSES", "VERL_NOT_COVERED", "gro_policy_loss", "gro_linear_cross_entropy"]

# ================================================================================================
# The map. verl loss -> gro options. Extend here when the objective grows.
# ================================================================================================
VERL_LOSSES = {
    # verl name: gro options. The keys besides the options say how verl's inputs enter:
    #   clip:     verl's clip_ratio_low / _high are the objective's eps_low / eps_high;
    #   sequence: one advantage per sequence (verl's row mean for geo_mean; else constant along the row);
    #   agg:      verl's aggregation: None = the loss_agg_mode given, a mode = that mode whatever is given,
    #             "rows" = torch.mean over the local rows (geo_mean);
    #   weights:  rollout_is_weights w: "token" = advantages A * w (verl multiplies each token's loss by w),
    #             "geo_mean" = each row's advantage times the geometric mean of its w (verl's geo_mean),
    #             None = refused (clip_cov / kl_cov select tokens by the covariance of the advantages).
    "vanilla": dict(gro=dict(surrogate="ratio_clip", importance_sampling="token"), clip=True),
    "gspo": dict(gro=dict(surrogate="ratio_clip", importance_sampling="sequence"), clip=True, sequence=True),
    "gpg": dict(gro=dict(surrogate="logp")),
    "sapo": dict(gro=dict(surrogate="sapo"), agg="seq-mean-token-mean"),
    # verl's cispo clips sg[r] on both sides: the logp surrogate with advantages sg[clip(r, 1-low, 1+high)] A
    "cispo": dict(gro=dict(surrogate="logp")),
    "clip_cov": dict(gro=dict(surrogate="clip_cov"), clip=True, weights=None),
    "kl_cov": dict(gro=dict(surrogate="kl_cov"), weights=None),
    "geo_mean": dict(gro=dict(surrogate="geo_mean"), clip=True, sequence=True, agg="rows", weights="geo_mean"),
}

# verl's registered losses the objective does not reproduce, and why.
VERL_NOT_COVERED = {
    "dppo_kl": "DPPO (its divergence-based trust region) is not in the objective",
    "dppo_tv": "DPPO (its divergence-based trust region) is not in the objective",
    "dro": "DRO is not in the objective", "bypass_mode": "bypass mode is not in the objective",
}

# verl's loss_agg_mode -> the objective's aggregation (verl's global normalization is applied on top)
AGGREGATION = {
    "token-mean": "token_mean",
    "token-sum": "token_mean",               # with num_items_in_batch = 1
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-sum-norm": "seq_mean_token_sum_norm",
}


def _clip_range(config):
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return low, high


def _normalization(mode, mask, info):
    """(options, factor): gro's aggregation options and the constant that turns its loss into verl's
    `agg_loss(..., dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)`."""
    dp = info.get("dp_size", 1)
    opts = dict(loss_agg=AGGREGATION[mode])
    if mode == "token-mean":
        tokens = info.get("batch_num_tokens")
        if tokens is None and dp > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        if tokens is not None:
            opts["num_items_in_batch"] = float(tokens) / dp
        return opts, 1.0
    if mode == "token-sum":
        opts["num_items_in_batch"] = 1.0
        return opts, float(dp)
    # seq-mean-*: gro divides by all B rows; verl by the global count of non-empty sequences
    sequences = info.get("global_batch_size")
    if sequences is None:
        if dp > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        sequences = float((mask.sum(-1) > 0).sum())
    if mode == "seq-mean-token-sum-norm":
        horizon = info.get("loss_scale_factor") or mask.shape[-1]
        if float(horizon) != int(horizon):
            raise ValueError(f"loss_scale_factor must be a whole number for the objective, got {horizon!r}")
        opts["max_completion_length"] = int(horizon)
    return opts, (mask.shape[0] * dp / float(sequences) if sequences else 0.0)


def gro_policy_loss(name):
    """A verl policy-loss function (verl's signature) computing verl's `name` loss with the GRO objective."""
    spec = VERL_LOSSES[name]
    surrogate = spec["gro"]["surrogate"]

    def loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
        if config is None:
            raise ValueError(f"gro_{name}: config (verl's ActorConfig) is required")
        low, high = _clip_range(config)
        options = dict(spec["gro"])
        clip_c = config.get("clip_ratio_c", 3.0)
        if name == "vanilla" and math.isfinite(clip_c):
            # Dual-clip PPO bounds a negative advantage's ratio at clip_ratio_c: the objective's `delta`
            # (min(min(r, delta) A, clip(r) A)) is the same function whenever delta >= 1 + clip_ratio_high.
            if clip_c < 1 + high:
                raise ValueError(f"gro_vanilla: clip_ratio_c={clip_c!r} below 1 + clip_ratio_high={1 + high!r} is "
                                 "not the objective's delta")
            options["delta"] = clip_c
        if spec.get("clip"):  # clip bounds only where the surrogate reads them (the objective refuses unread options)
            options.update(eps_low=low, eps_high=high)
        options.update(_surrogate_options(name, config))
        mask = response_mask.bool()
        adv = advantages
        if name == "cispo":
            ratio = torch.exp((log_prob.detach() - old_log_prob).clamp(-20.0, 20.0))
            adv = adv * ratio.clamp(1 - low, 1 + high)
        weights = spec.get("weights", "token")
        if rollout_is_weights is not None:
            if weights is None:
                raise ValueError(f"gro_{name}: rollout_is_weights are not supported: verl's {name} selects tokens by "
                                 "the covariance of the unweighted advantages")
            if (rollout_is_weights < 0).any():
                raise ValueError(f"gro_{name}: rollout_is_weights must be non-negative")
            if weights == "token":
                # verl multiplies each token's loss by a non-negative rollout-correction weight w: for the
                # token-level losses that is the objective with advantages A * w
                adv = adv * rollout_is_weights
        if spec.get("sequence"):
            adv = _sequence_advantages(name, adv, mask)
            if rollout_is_weights is not None and weights == "geo_mean":
                n = mask.sum(-1)
                adv = adv * torch.exp((torch.log(rollout_is_weights + 1e-10) * mask).sum(-1) / (n + 1e-8))
        if spec.get("agg") == "rows":  # torch.mean of the per-row losses over the local rows, whatever is asked
            agg, factor = dict(loss_agg="seq_mean_token_mean"), 1.0
        else:
            agg, factor = _normalization(spec.get("agg") or loss_agg_mode, mask, config.global_batch_info)
        num_items = agg.pop("num_items_in_batch", None)
        # old_logp only where the surrogate reads it (gpg, cispo: the logp surrogate; the objective refuses it there)
        call = read_inputs("gro", dict(mask=mask, advantages=adv, old_logp=old_log_prob, num_items_in_batch=num_items,
                                       kl_coef=0.0, entropy_coef=0.0, **options, **agg))
        out = gro_objective(log_prob, method="gro", **call)
        return out.loss * factor, _metrics(name, old_log_prob, log_prob, advantages, mask, low, high, clip_c, out)

    loss_fn.__name__ = f"gro_policy_loss_{name}"
    return loss_fn


def _surrogate_options(name, config):
    """The options of verl's config that the surrogate reads (verl's fallbacks for unset ones)."""
    pl = config.policy_loss
    if name == "sapo":
        return dict(sapo_temperature_pos=config.tau_pos, sapo_temperature_neg=config.tau_neg)
    if name == "clip_cov":
        return dict(clip_cov_ratio=pl.clip_cov_ratio if pl.clip_cov_ratio is not None else 2e-4,
                    clip_cov_lb=pl.clip_cov_lb if pl.clip_cov_lb is not None else 1.0,
                    clip_cov_ub=pl.clip_cov_ub if pl.clip_cov_ub is not None else 5.0)
    if name == "kl_cov":
        return dict(kl_cov_ratio=pl.kl_cov_ratio if pl.kl_cov_ratio is not None else 2e-4,
                    ppo_kl_coef=pl.ppo_kl_coef if pl.ppo_kl_coef is not None else 1.0)
    return {}


def _sequence_advantages(name, adv, mask):
    """One advantage per sequence: geo_mean takes verl's row mean (its epsilon included); the sequence
    ratio of GSPO needs the advantage constant along each row (GSPO's outcome advantages)."""
    if name == "geo_mean":
        return (adv * mask).sum(-1) / (mask.sum(-1) + 1e-8)
    row = (adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    if ((adv - row[:, None]).abs() * mask).max() > 1e-6 * (1 + row.abs().max()):
        raise ValueError(f"gro_{name}: advantages (times rollout_is_weights, if given) vary along a "
                         "sequence; the objective's sequence-level ratio needs one value per sequence")
    return row


@torch.no_grad()
def _metrics(name, old_log_prob, log_prob, advantages, mask, low, high, clip_c, out):
    """verl's pg metrics for the loss, from detached log-probs."""
    if name == "gpg":
        return {}
    m = mask.float()

    def masked_mean(x):
        return ((x * m).sum() / m.sum()).item()

    log_ratio = (log_prob - old_log_prob).detach()
    if name == "kl_cov":
        return {"actor/ppo_kl": masked_mean(log_ratio.abs())}
    if name == "clip_cov":  # the share of tokens the covariance rule dropped (the objective's policy weight 0),
        kept = out.metrics.get("policy_weight_mean")    # as verl's float32 masked mean of the dropped tokens
        tokens = mask.sum().float()
        dropped = torch.zeros(()) if kept is None else torch.round((1.0 - float(kept)) * tokens)
        clipfrac = (dropped.float() / (tokens + 1e-8)).item()
        return {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": masked_mean(-log_ratio)}
    if name == "geo_mean":
        clipped = (log_ratio != log_ratio.clamp(-low, high)).float()
        return {"actor/pg_clipfrac": masked_mean(clipped * (advantages > 0)), "actor/ppo_kl": masked_mean(-log_ratio),
                "actor/pg_clipfrac_lower": masked_mean(clipped * (advantages < 0))}
    if name in ("sapo", "cispo"):  # verl clamps the log-ratio here
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        ratio = torch.exp(log_ratio)
        clipfrac = masked_mean((ratio != ratio.clamp(1 - low, 1 + high)).float()) if name == "cispo" else 0.0
        return {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": masked_mean(-log_ratio), "actor/pg_clipfrac_lower": 0.0}
    ppo_kl = masked_mean(-log_ratio)
    if name == "gspo":
        seq = (log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1)
        ratio = torch.exp(seq.clamp(max=10.0))[:, None].expand_as(log_ratio)
    else:
        ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - low, 1 + high)
    lower = 0.0
    if name == "vanilla":  # where the dual clip binds (negative advantages past clip_ratio_c)
        lower = masked_mean((torch.maximum(unclipped, clipped) > -advantages * clip_c).float() * (advantages < 0))
    return {"actor/pg_clipfrac": masked_mean((clipped > unclipped).float()),
            "actor/ppo_kl": ppo_kl, "actor/pg_clipfrac_lower": lower}


def _gro_fused_forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
    """verl's FusedLinearForPPO.forward on gro_kernels: (log_probs, entropy) shaped like input_ids, float32.
    Only the "torch" implementation is replaced; "liger" stays Liger's. `temperature` may also be a tensor
    shaped like input_ids (per token) or like its first dim (per sequence); the head options given to
    `register` (soft cap, precision, truncation) apply."""
    if self.impl_backend != "torch":
        if _HEAD_OPTIONS or isinstance(temperature, torch.Tensor):
            raise ValueError(f"verl's fused kernel impl_backend={self.impl_backend!r} is not gro_kernels': the head "
                             f"options {sorted(_HEAD_OPTIONS) or ['a tensor temperature']} need impl_backend='torch'")
        return _ORIGINAL_FUSED_FORWARD(self, hidden_states, vocab_weights, input_ids, temperature)
    # verl's FSDP2 policy makes an untied lm_head a unit of its own: the weight can arrive as a sharded DTensor
    stats = token_logprobs(hidden_states, gathered(vocab_weights), input_ids.to(torch.int64), temperature=temperature,
                           return_entropy=True, **_HEAD_OPTIONS)
    return stats.logp, stats.entropy


_ORIGINAL_FUSED_FORWARD = None
_HEAD_OPTIONS: dict = {}
_ORIGINAL_LINEAR_CE = None
# verl's fused kernel (`verl.utils.kernel.linear_cross_entropy`) is read from its module at call time by
# the FSDP backend's model patches (impl_backend "triton"), and bound at import by the Megatron backend's
# fused forward (`use_fused_kernels`), which passes its tensor-parallel group as dist_process_group.
_LINEAR_CE_MODULES = ("verl.utils.kernel.linear_cross_entropy", "verl.models.mcore.model_forward_fused")


def gro_linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """verl's `linear_cross_entropy` on gro_kernels: (log_probs, entropy) per token of `labels` (flattened),
    float32, from `hidden [..., d]` and `weight`, this rank's contiguous slice of the vocabulary when
    `dist_process_group` is the tensor-parallel group (Megatron's equal shards, in rank order).

    The contract is verl's kernel's: `reduction` ("none", "sum", "mean") applies to the log-probs;
    with a group, the hidden-state gradient is this rank's partial sum over its slice
    (`sequence_parallel=True`): verl's Megatron backend gathers the hidden states from
    sequence-parallel slices (it enables sequence parallelism whenever the tensor-parallel size is
    above 1), and that gather's backward reduce-scatters them. `temperature`: a float, or a tensor
    shaped like labels (per token); the head options given to `register` apply (top_p refused with
    a group: docs/options.md)."""
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean' (verl's), got {reduction!r}")
    tp = {} if dist_process_group is None else dict(tp_group=dist_process_group, sequence_parallel=True)
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        if tuple(temperature.shape) != tuple(labels.shape):
            raise ValueError(f"temperature as a tensor must be shaped like labels {tuple(labels.shape)}, got "
                             f"{tuple(temperature.shape)}")
        temperature = temperature.reshape(-1)
    else:
        temperature = float(temperature)
    stats = token_logprobs(hidden.reshape(-1, hidden.shape[-1]), gathered(weight), labels.reshape(-1).to(torch.int64),
                           temperature=temperature, return_entropy=True, **tp, **_HEAD_OPTIONS)
    logp = stats.logp if reduction == "none" else (stats.logp.sum() if reduction == "sum" else stats.logp.mean())
    return logp, stats.entropy


def register(*, fused_kernels: bool = False, softcap=None, head_precision: str = "native", top_k=None, top_p=None,
             min_p=None) -> list:
    """Register `gro_<name>` for every verl loss in VERL_LOSSES (verl's `register_policy_loss`); with
    `fused_kernels=True`, also route verl's fused log-prob + entropy through `token_logprobs`: the FSDP
    backend's `FusedLinearForPPO` (`use_fused_kernels=True`, `impl_backend="torch"`) and verl's fused
    kernel `linear_cross_entropy` (the FSDP backend's `impl_backend="triton"`, and the Megatron
    backend's fused forward with its tensor-parallel group: `gro_linear_cross_entropy`). Returns the names.

    The fused path's head options (verl's own fused kernel has none of them; it sees neither the model's
    config nor the rollout's sampling settings, so they are given here, for every model it runs):
        softcap: the model's final_logit_softcapping (Gemma 2/3; verl's kernel leaves the cap out).
        head_precision: "native" | "fp32" | "tf32" (gro_loss's): "fp32" to match a rollout engine's fp32 head.
        top_k, top_p, min_p: the rollout's truncation (actor_rollout_ref.rollout.top_k / top_p / min_p), so
            that the actor's log-probs are those of the distribution vLLM sampled from (its processed_logprobs).
            With Megatron's tensor-parallel group, top_k and min_p combine across the vocabulary shards;
            top_p is refused there (docs/options.md).
    """
    options = {k: v for k, v in dict(softcap=softcap, head_precision=head_precision, top_k=top_k, top_p=top_p,
                                     min_p=min_p).items() if v is not None and v != "native"}
    if options and not fused_kernels:
        raise ValueError(f"the head options {sorted(options)} apply to verl's fused kernel: pass fused_kernels=True")
    names = []
    for name in VERL_LOSSES:
        core_algos.register_policy_loss(f"gro_{name}")(gro_policy_loss(name))
        names.append(f"gro_{name}")
    if fused_kernels:
        global _ORIGINAL_FUSED_FORWARD, _ORIGINAL_LINEAR_CE
        from verl.utils.experimental.torch_functional import FusedLinearForPPO
        from verl.utils.kernel import linear_cross_entropy as kernel_module
        if _ORIGINAL_FUSED_FORWARD is None:
            _ORIGINAL_FUSED_FORWARD = FusedLinearForPPO.forward
        FusedLinearForPPO.forward = _gro_fused_forward
        if _ORIGINAL_LINEAR_CE is None:
            _ORIGINAL_LINEAR_CE = kernel_module.linear_cross_entropy
        _set_linear_ce(gro_linear_cross_entropy)
        _HEAD_OPTIONS.clear()
        _HEAD_OPTIONS.update(options)
    return names


def _set_linear_ce(fn) -> None:
    """`fn` as linear_cross_entropy in verl's kernel module and in the modules that bound it at import
    (only those already imported: one imported later binds the kernel module's, already `fn`)."""
    import sys
    for name in _LINEAR_CE_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "linear_cross_entropy"):
            module.linear_cross_entropy = fn


def unregister_fused_kernels() -> None:
    """Give verl back its own FusedLinearForPPO.forward and linear_cross_entropy."""
    global _ORIGINAL_FUSED_FORWARD, _ORIGINAL_LINEAR_CE
    _HEAD_OPTIONS.clear()
    if _ORIGINAL_FUSED_FORWARD is not None:
        from verl.utils.experimental.torch_functional import FusedLinearForPPO
        FusedLinearForPPO.forward = _ORIGINAL_FUSED_FORWARD
        _ORIGINAL_FUSED_FORWARD = None
    if _ORIGINAL_LINEAR_CE is not None:
        _set_linear_ce(_ORIGINAL_LINEAR_CE)
        _ORIGINAL_LINEAR_CE = None
