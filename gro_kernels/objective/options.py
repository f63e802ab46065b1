"""GRO options: their names, defaults, allowed values, and the preset table (docs/options.md).

An option's value is resolved as: DEFAULTS <- PRESETS[method] <- what the caller passed.
"""
from __future__ import annotations

import difflib
import numbers

METHODS = (
    "reinforce", "rloo", "remax", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce_pp",
    "dpo", "ipo", "cpl", "simpo", "kto", "sft", "gro",
    # issue 9: the trainers' other loss types (docs/methods.md has each one's definition and source)
    "bnpo", "sapo", "luspo", "vespo", "gpg", "clip_cov", "kl_cov", "geo_mean", "apo_zero_unpaired", "dft",
    # issue 19: offline data and teachers (docs/methods.md, "Offline data and teachers")
    "luffy", "chord", "hpt", "orpo", "cpo", "distill",
)

# Options whose value is one of a fixed set of names. `surrogate`, score `token_return`/`none` and
# separation `positive` are this package's names for table cells the unification table describes in words
# (the surrogate column, REINFORCE++'s token rewards, SFT's "all +1").
CHOICES = {
    "score": ("reward", "implicit", "token_return", "none"),
    "anchor": ("group_mean", "leave_one_out", "batch_mean", "baseline", "pair", "constant", "none"),
    "separation": ("anchor", "label", "positive"),
    "weighting": ("linear", "sigmoid", "sigmoid_bell", "squared", "constant", "odds_ratio"),
    "scale": ("group_std", "batch_std", "none", "nonzero_fraction"),
    "surrogate": ("logp", "ratio_clip", "cispo", "sapo", "vespo", "geo_mean", "clip_cov", "kl_cov", "dft"),
    "importance_sampling": ("token", "sequence"),
    # `+`: verl's straight-through variants (the base estimator's value, k2's gradient)
    "kl_estimator": ("k1", "k2", "k3", "low_var_kl", "abs", "k1+", "k3+", "low_var_kl+", "abs+", "full"),
    "entropy_agg": ("loss", "token_mean"),
    "f_divergence_type": ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
    "rollout_correction": (None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask",
                           "icepop", "seq_mask_tis"),
    "kl_placement": ("loss", "reward"),
    "loss_agg": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm", "token_sum"),
    "reduction": (None, "mean", "sum", "none"),
    # how offline rows enter: members of their prompt's group (GRO, LUFFY) or SFT rows beside it (CHORD, HPT)
    "offline_role": ("group", "sft"),
    "offline_surrogate": ("logp", "shaping", "phi"),
    # the per-token divergence to a teacher head (on-policy distillation)
    "divergence": ("reverse_kl", "forward_kl", "jsd"),
}

# Options applied where the log-probs and the teacher's divergence are computed (gro_loss, token_logprobs):
# gro_objective receives those computed and refuses these.
COMPUTED_WITH_LOGP = ("temperature", "divergence", "jsd_beta")

DEFAULTS = {
    # weights (docs/objective.md, "How the weights are formed")
    "score": "reward",
    "anchor": "group_mean",
    "anchor_value": 0.0,
    "separation": "anchor",
    "weighting": "linear",
    "scale": "group_std",
    "std_eps": 1e-4,
    "beta": 0.1,
    "margin": 0.0,
    "label_smoothing": 0.0,
    "pos_coef": 1.0,
    "neg_coef": 1.0,
    "offline_coef": 1.0,
    "length_normalize": False,
    # surrogate
    "surrogate": "ratio_clip",
    "importance_sampling": "token",
    "eps_low": 0.2,
    "eps_high": 0.2,
    "delta": None,
    "clip_ratio_c": None,              # dual-clip PPO lower bound for A < 0 (verl, OpenRLHF dual_clip)
    "sapo_temperature_pos": 1.0,       # SAPO gate temperatures (TRL / verl tau_pos, tau_neg)
    "sapo_temperature_neg": 1.05,
    "vespo_k_pos": 2.0,                # VESPO gamma weight phi(w) = exp(lambda) w^k exp(-lambda w)
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
    "clip_cov_ratio": 2e-4,            # Clip-Cov / KL-Cov token selection (verl)
    "clip_cov_lb": 1.0,
    "clip_cov_ub": 5.0,
    "kl_cov_ratio": 2e-4,
    "ppo_kl_coef": 1.0,
    # train/inference mismatch (needs rollout_logp) and token selection
    "rollout_correction": None,
    "rollout_clip_min": None,          # None: the mode's own default (TRL: none; OpenRLHF: 0.5)
    "rollout_clip_max": None,          # None: the mode's own default (TRL: 3.0; OpenRLHF: 5.0)
    "off_policy_mask_threshold": None,
    "top_entropy_quantile": 1.0,
    "mask_truncated_completions": False,
    # preference losses (TRL DPOTrainer loss_type / loss_weights)
    "pair_loss": None,
    "loss_weights": None,
    "discopop_tau": 0.05,
    "use_weighting": False,
    "ld_alpha": None,                    # LD-DPO: weight of the tokens beyond the pair's shared length              # WPO: each pair's loss times w_chosen w_rejected (needs log_sum_sq_probs)
    "f_divergence_type": "reverse_kl",   # TRL's f-DPO: the divergence whose f'(ratio) scores each completion
    "f_alpha_divergence_coef": 0.5,
    # KL and entropy
    "kl_coef": 0.0,
    "kl_estimator": "k3",
    "kl_placement": "loss",
    "use_bias_correction_kl": False,
    "entropy_coef": 0.0,
    "entropy_agg": "loss",   # "loss": the loss's own c[i,t]; "token_mean": TRL's mean over the (selected) tokens
    # aggregation
    "loss_agg": "token_mean",
    "max_completion_length": None,
    "reduction": None,                 # SFT: torch's F.cross_entropy reduction (mean | sum | none); None = mean
    # z-loss (PaLM, Liger's lse_square_scale): z_loss_coef * sum c lse^2, lse the head's log normalizer
    "z_loss_coef": 0.0,
    # read by gro_loss (applied inside token_logprobs); accepted here so presets can carry it. A float,
    # or a positive tensor [B] / [B, T] (per sequence / per token)
    "temperature": 1.0,
    # offline rows (objective/offline.py)
    "offline_role": "group",           # "sft": SFT rows outside the group statistics (CHORD, HPT)
    "offline_surrogate": "logp",       # "shaping": A p / (p + shaping_gamma) (LUFFY); "phi": sg[p (1 - p)] A l (CHORD)
    "shaping_gamma": 0.1,              # LUFFY's policy shaping constant
    "mu": None,                        # CHORD: (1 - mu) x the online loss + mu x the offline (SFT) loss
    "switch_threshold": None,          # HPT: a group at or below this mean online reward learns its offline rows by SFT
    "offline_neg_coef": 1.0,           # scales the weight of offline rows below their group's anchor (0: never pushed down)
    # preference losses with an NLL term (ORPO, CPO)
    "nll_coef": 0.0,                   # weight of the chosen rows' token-mean negative log-likelihood
    # distillation from a teacher head
    "distill_coef": 0.0,               # weight of the per-token divergence to the teacher
    "divergence": "reverse_kl",        # KL(student || teacher), KL(teacher || student), or generalized JSD
    "jsd_beta": 0.5,                   # JSD's mixture weight (0: forward KL, 1: reverse KL, as TRL / Liger)
}
OPTIONS = tuple(DEFAULTS)

# The unification table, one row per method (docs/options.md, "Defaults by method"). "KL" is where a KL term goes when
# kl_coef != 0: "loss" adds kl_coef * k to the loss, "reward" subtracts it from the score.
_COLUMNS = ("score", "anchor", "separation", "weighting", "scale", "surrogate", "kl_placement", "loss_agg")
_TABLE = {
    # method        score           anchor            sep.        weighting       scale        surrogate     KL        aggregation
    "reinforce":    ("reward",       "none",           "anchor",   "linear",       "none",      "logp",       "reward", "seq_mean_token_sum"),
    "rloo":         ("reward",       "leave_one_out",  "anchor",   "linear",       "none",      "logp",       "reward", "seq_mean_token_sum"),
    "remax":        ("reward",       "baseline",       "anchor",   "linear",       "none",      "logp",       "reward", "seq_mean_token_sum"),
    "grpo":         ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "ratio_clip", "loss",   "seq_mean_token_mean"),
    "dr_grpo":      ("reward",       "group_mean",     "anchor",   "linear",       "none",      "ratio_clip", "loss",   "seq_mean_token_sum_norm"),
    "dapo":         ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "ratio_clip", "loss",   "token_mean"),
    "gspo":         ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "ratio_clip", "loss",   "seq_mean_token_mean"),
    "cispo":        ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "cispo",      "loss",   "token_mean"),
    "reinforce_pp": ("token_return", "batch_mean",     "anchor",   "linear",       "batch_std", "ratio_clip", "reward", "token_mean"),
    "dpo":          ("implicit",     "pair",           "label",    "sigmoid",      "none",      "logp",       "loss",   "seq_mean_token_sum"),
    "ipo":          ("implicit",     "pair",           "label",    "squared",      "none",      "logp",       "loss",   "seq_mean_token_sum"),
    "cpl":          ("implicit",     "pair",           "label",    "sigmoid",      "none",      "logp",       "loss",   "seq_mean_token_sum"),
    "simpo":        ("implicit",     "pair",           "label",    "sigmoid",      "none",      "logp",       "loss",   "seq_mean_token_sum"),
    "kto":          ("implicit",     "constant",       "label",    "sigmoid_bell", "none",      "logp",       "loss",   "seq_mean_token_sum"),
    "sft":          ("none",         "none",           "positive", "constant",     "none",      "logp",       "loss",   "token_mean"),
    "gro":          ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "ratio_clip", "loss",   "token_mean"),
    "bnpo":         ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "ratio_clip", "loss",   "token_mean"),
    "sapo":         ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "sapo",       "loss",   "seq_mean_token_mean"),
    "luspo":        ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "ratio_clip", "loss",   "seq_mean_token_sum"),
    "vespo":        ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "vespo",      "loss",   "token_mean"),
    "gpg":          ("reward",       "group_mean",     "anchor",   "linear", "nonzero_fraction", "logp",      "loss",   "token_mean"),
    "clip_cov":     ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "clip_cov",   "loss",   "token_mean"),
    "kl_cov":       ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "kl_cov",     "loss",   "token_mean"),
    "geo_mean":     ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "geo_mean",   "loss",   "seq_mean_token_mean"),
    "apo_zero_unpaired": ("implicit", "constant",      "label",    "sigmoid_bell", "none",      "logp",       "loss",   "seq_mean_token_sum"),
    "dft":          ("none",         "none",           "positive", "constant",     "none",      "dft",        "loss",   "token_mean"),
    "luffy":        ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "ratio_clip", "loss",   "token_mean"),
    "chord":        ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "ratio_clip", "loss",   "token_mean"),
    "hpt":          ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "ratio_clip", "loss",   "token_mean"),
    "orpo":         ("implicit",     "pair",           "label",    "odds_ratio",   "none",      "logp",       "loss",   "seq_mean_token_sum"),
    "cpo":          ("implicit",     "pair",           "label",    "sigmoid",      "none",      "logp",       "loss",   "seq_mean_token_sum"),
    "distill":      ("reward",       "group_mean",     "anchor",   "linear",       "group_std", "ratio_clip", "loss",   "token_mean"),
}
# Per-method values that differ from DEFAULTS outside the table's columns.
_EXTRA = {
    "reinforce": {"kl_estimator": "k1"},
    "rloo": {"kl_estimator": "k1"},
    "remax": {"kl_estimator": "k1"},
    "grpo": {"kl_coef": 0.04},
    "dapo": {"eps_high": 0.28},
    "gspo": {"importance_sampling": "sequence", "eps_low": 3e-4, "eps_high": 4e-4},
    "cispo": {"eps_high": 5.0},  # an absolute bound on the importance weight
    "reinforce_pp": {"kl_estimator": "k1"},
    "cpl": {"neg_coef": 0.5},  # lambda, CPL's conservative weight on the rejected segment
    "simpo": {"length_normalize": True},
    "luspo": {"importance_sampling": "sequence", "eps_low": 3e-4, "eps_high": 4e-4},
    "geo_mean": {"eps_low": 0.4, "eps_high": 0.4},   # GMPO's clip range, on the log-ratio
    "luffy": {"offline_surrogate": "shaping"},       # offline rows in the group, A p / (p + 0.1), no clip
    "chord": {"offline_role": "sft", "offline_surrogate": "phi", "mu": 0.1},   # CHORD-phi (Trinity-RFT defaults)
    "hpt": {"offline_role": "sft", "switch_threshold": 0.0},   # SFT for the groups no online sample solved
    "orpo": {"length_normalize": True, "nll_coef": 1.0},       # mean log-probs in the odds; NLL of the chosen rows
    "cpo": {"nll_coef": 1.0},                                  # TRL's cpo_alpha
    "distill": {"distill_coef": 1.0},
}
PRESETS = {m: {**dict(zip(_COLUMNS, row)), **_EXTRA.get(m, {})} for m, row in _TABLE.items()}

# TRL DPOTrainer loss types usable as `pair_loss` (one name, or several combined with `loss_weights`).
PAIR_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
               "apo_down", "exo_pair", "nca_pair", "discopop", "sigmoid_norm", "sft")
_SMOOTHED_PAIR_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")  # the ones that read label_smoothing
_F_DIVERGENCE_PAIR_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")

# Options that mean something only for one surrogate (or family): giving them elsewhere is an error.
_SURROGATE_OPTIONS = {
    "clip_ratio_c": ("ratio_clip",), "delta": ("ratio_clip",),
    "sapo_temperature_pos": ("sapo",), "sapo_temperature_neg": ("sapo",),
    "vespo_k_pos": ("vespo",), "vespo_lambda_pos": ("vespo",), "vespo_k_neg": ("vespo",), "vespo_lambda_neg": ("vespo",),
    "clip_cov_ratio": ("clip_cov",), "clip_cov_lb": ("clip_cov",), "clip_cov_ub": ("clip_cov",),
    "kl_cov_ratio": ("kl_cov",), "ppo_kl_coef": ("kl_cov",),
}
_TOKEN_ROLLOUT_MODES = ("token_truncate", "token_mask", "icepop")
# The surrogates that read the clip range: eps_low / eps_high given for another one is an error.
_EPS_READERS = {"eps_low": ("ratio_clip", "clip_cov", "geo_mean"), "eps_high": ("ratio_clip", "clip_cov", "geo_mean", "cispo")}

# The options that shape the weights formed from rewards, labels or implicit scores (docs/objective.md, steps
# 1-4). Given `advantages` replace those weights, so these options are then not read (an error when
# given); `offline_coef` still scales given advantages of offline rows.
WEIGHT_OPTIONS = ("score", "anchor", "anchor_value", "separation", "weighting", "scale", "std_eps", "beta", "margin",
                  "label_smoothing", "pos_coef", "neg_coef", "length_normalize", "pair_loss", "loss_weights",
                  "discopop_tau", "use_weighting", "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef")

# How the implicit score X_i uses the reference: True = D_i (ref_logp required), False = S_i
# (reference-free, ref_logp is not used for the score). Methods not listed use D_i when ref_logp is given.
IMPLICIT_REFERENCE = {"dpo": True, "ipo": True, "kto": True, "apo_zero_unpaired": True, "cpl": False, "simpo": False,
                      "orpo": False, "cpo": False}
# The pairwise weightings (each compares the two members of a labelled pair).
PAIR_WEIGHTINGS = ("sigmoid", "squared", "odds_ratio")


class Options(dict):
    """A resolved option set; read as attributes (`opts.kl_coef`)."""

    __getattr__ = dict.__getitem__


def _number(name, value, *, low=None, low_open=False, high=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"option {name} must be a number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"option {name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"option {name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"option {name} must be <= {high}, got {value!r}")
    return value


def unknown_names(what: str, unknown, valid) -> str:
    """The message for misspelled names: each with its closest valid names first, then all of them."""
    hints = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    return f"unknown {what}(s) {', '.join(hints)}; valid {what}s are: {', '.join(sorted(valid))}"


def resolve_options(method: str, options: dict) -> Options:
    """DEFAULTS <- PRESETS[method] <- options, validated. Unknown names are a TypeError naming the
    closest valid ones (did you mean ...) and listing all of them."""
    if method not in PRESETS:
        close = difflib.get_close_matches(str(method), METHODS, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}{hint}")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(unknown_names("option", unknown, OPTIONS))
    o = Options({**DEFAULTS, **PRESETS[method], **options})

    for name, allowed in CHOICES.items():
        if o[name] not in allowed:
            raise ValueError(f"option {name} must be one of {allowed}, got {o[name]!r}")
    for name in ("eps_low", "eps_high", "kl_coef", "entropy_coef", "std_eps", "pos_coef", "neg_coef", "offline_coef",
                 "z_loss_coef", "offline_neg_coef", "nll_coef", "distill_coef"):
        o[name] = _number(name, o[name], low=0.0)
    for name in ("anchor_value", "margin"):
        o[name] = _number(name, o[name])
    o["beta"] = _number("beta", o["beta"], low=0.0, low_open=True)
    o["temperature"] = _temperature(o["temperature"])
    # SFT's label smoothing is the cross-entropy's (torch: in [0, 1]); the pair losses' is in [0, 0.5]
    o["label_smoothing"] = _number("label_smoothing", o["label_smoothing"], low=0.0,
                                   high=1.0 if ce_smoothing_reader(o) else 0.5)
    if o["delta"] is not None:
        o["delta"] = _number("delta", o["delta"], low=1.0, low_open=True)
    mcl = o["max_completion_length"]
    if mcl is not None and (isinstance(mcl, bool) or not isinstance(mcl, numbers.Integral) or mcl <= 0):
        raise ValueError(f"option max_completion_length must be a positive int or None, got {mcl!r}")
    for name in ("length_normalize", "mask_truncated_completions", "use_bias_correction_kl", "use_weighting"):
        if not isinstance(o[name], bool):
            raise TypeError(f"option {name} must be a bool, got {o[name]!r}")
    _check_values(o)
    _check_policy_options(o, options)
    _check_pair_options(o, options)
    _check_sft_options(o, options)
    _check_offline_options(o, options)
    _check_teacher_options(o, options)
    _check_weight_options(o, options)

    # Combinations that have no meaning.
    if o["weighting"] in PAIR_WEIGHTINGS and (o["anchor"] != "pair" or o["separation"] != "label"):
        raise ValueError(
            f"weighting={o['weighting']!r} compares the two members of a labelled pair: it needs "
            f"anchor='pair' and separation='label' (got anchor={o['anchor']!r}, separation={o['separation']!r})"
        )
    if o["score"] == "token_return":
        if o["weighting"] != "linear" or o["anchor"] not in ("batch_mean", "constant", "none") \
                or o["scale"] not in ("batch_std", "none"):
            raise ValueError(
                "score='token_return' (per-token returns, REINFORCE++) works with weighting='linear', "
                "anchor in ('batch_mean', 'constant', 'none') and scale in ('batch_std', 'none')"
            )
    return o


def _temperature(value):
    """A positive number, or a tensor (checked for shape and values where the head reads it)."""
    import torch  # noqa: PLC0415 - options are plain values otherwise

    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise ValueError("option temperature is a constant of the sampler: pass a tensor without requires_grad")
        return value
    return _number("temperature", value, low=0.0, low_open=True)


def ce_smoothing_reader(o) -> bool:
    """Whether label_smoothing is the cross-entropy's (the SFT preset: no score, every token +1, the
    log-likelihood surrogate) rather than a preference loss's."""
    return o["score"] == "none" and o["separation"] == "positive" and o["surrogate"] == "logp"


def _check_sft_options(o: Options, given: dict) -> None:
    """reduction belongs to the SFT preset; it picks its aggregation (mean: token_mean, sum / none:
    token_sum, none also returns the per-token loss)."""
    sft = ce_smoothing_reader(o)
    if o["reduction"] is not None:
        if not sft:
            raise ValueError(f"option reduction (torch's cross-entropy reduction) applies to the SFT preset "
                             f"(method='sft'), got score={o['score']!r}, surrogate={o['surrogate']!r}")
        if "loss_agg" in given:
            raise ValueError("options reduction and loss_agg both set the aggregation: give one")
        o["loss_agg"] = "token_mean" if o["reduction"] == "mean" else "token_sum"


def _optional(o, name, **bounds):
    if o[name] is not None:
        o[name] = _number(name, o[name], **bounds)


def _pair_losses(o):
    """pair_loss as a tuple of names and loss_weights as a matching tuple of floats (or None)."""
    kinds, weights = o["pair_loss"], o["loss_weights"]
    if kinds is None:
        if weights is not None:
            raise ValueError("option loss_weights combines several pair_loss types: set pair_loss too")
        return
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or any(k not in PAIR_LOSSES for k in kinds):
        raise ValueError(f"option pair_loss must be one of {PAIR_LOSSES} or a list of them, got {o['pair_loss']!r}")
    if weights is None:
        weights = (1.0,) * len(kinds)
    weights = tuple(_number("loss_weights", w) for w in weights)
    if len(weights) != len(kinds):
        raise ValueError(f"option loss_weights needs one weight per pair_loss type ({len(kinds)}), got {len(weights)}")
    o["pair_loss"], o["loss_weights"] = kinds, weights


def _check_values(o: Options) -> None:
    """The ranges of the surrogate, correction and preference options."""
    for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg", "discopop_tau"):
        o[name] = _number(name, o[name], low=0.0, low_open=True)
    for name in ("vespo_k_pos", "vespo_k_neg", "ppo_kl_coef"):
        o[name] = _number(name, o[name], low=0.0)
    for name in ("clip_cov_ratio", "kl_cov_ratio"):
        o[name] = _number(name, o[name], low=0.0, low_open=True, high=1.0)
    o["clip_cov_lb"], o["clip_cov_ub"] = _number("clip_cov_lb", o["clip_cov_lb"]), _number("clip_cov_ub", o["clip_cov_ub"])
    if o["clip_cov_lb"] >= o["clip_cov_ub"]:
        raise ValueError(f"option clip_cov_lb must be < clip_cov_ub, got {o['clip_cov_lb']} >= {o['clip_cov_ub']}")
    _optional(o, "clip_ratio_c", low=1.0, low_open=True)
    _optional(o, "off_policy_mask_threshold", low=0.0)
    _optional(o, "rollout_clip_min", low=0.0)
    if o["rollout_clip_max"] is not None and o["rollout_clip_max"] != float("inf"):
        _optional(o, "rollout_clip_max", low=0.0, low_open=True)
    o["top_entropy_quantile"] = _number("top_entropy_quantile", o["top_entropy_quantile"], low=0.0, high=1.0)
    _optional(o, "ld_alpha", low=0.0, high=1.0)
    o["f_alpha_divergence_coef"] = _number("f_alpha_divergence_coef", o["f_alpha_divergence_coef"])
    _pair_losses(o)


def _check_policy_options(o: Options, given: dict) -> None:
    """Surrogate options given for another surrogate, the corrections' combinations. `given`: what
    the caller passed (a preset's or default value is never an error)."""
    surrogate = o["surrogate"]
    for name, surrogates in _EPS_READERS.items():
        if name in given and surrogate not in surrogates:
            raise ValueError(f"option {name} is read by surrogates {surrogates} only, got surrogate={surrogate!r}")
    for name, surrogates in _SURROGATE_OPTIONS.items():
        if name in given and given[name] is not None and surrogate not in surrogates:
            raise ValueError(f"option {name} applies to surrogate {surrogates[0]!r} only, got surrogate={surrogate!r}")
    if o["importance_sampling"] == "sequence" and surrogate != "ratio_clip":
        raise ValueError(f"importance_sampling='sequence' (GSPO's sequence ratio) applies to surrogate='ratio_clip' "
                         f"only, got surrogate={surrogate!r}")
    mode = o["rollout_correction"]
    if mode is None and (given.get("rollout_clip_min") is not None or given.get("rollout_clip_max") is not None):
        raise ValueError("options rollout_clip_min / rollout_clip_max bound the rollout_correction: set rollout_correction")
    if mode is not None:
        lo = o["rollout_clip_min"] if o["rollout_clip_min"] is not None else (0.5 if mode in ("icepop", "seq_mask_tis") else 0.0)
        hi = o["rollout_clip_max"] if o["rollout_clip_max"] is not None else (5.0 if mode in ("icepop", "seq_mask_tis") else 3.0)
        if lo >= hi:
            raise ValueError(f"option rollout_clip_min must be < rollout_clip_max, got {lo} >= {hi}")
        o["rollout_clip_min"], o["rollout_clip_max"] = lo, hi
        if surrogate == "vespo" and mode not in _TOKEN_ROLLOUT_MODES:
            raise ValueError(f"surrogate='vespo' folds the rollout correction into its sequence weight: it needs a "
                             f"token-level rollout_correction {_TOKEN_ROLLOUT_MODES}, got {mode!r}")
    reweighting = [name for name, off in (("rollout_correction", None), ("off_policy_mask_threshold", None),
                                          ("top_entropy_quantile", 1.0)) if o[name] != off]
    if reweighting and o["weighting"] in PAIR_WEIGHTINGS + ("sigmoid_bell",):
        raise ValueError(f"option {reweighting[0]} reweights sampled tokens of an RL loss; it has no meaning for "
                         f"the preference weighting {o['weighting']!r}")
    if "entropy_agg" in given and o["entropy_coef"] == 0:
        raise ValueError("option entropy_agg aggregates the entropy bonus: set entropy_coef")
    if o["use_bias_correction_kl"] and o["kl_coef"] == 0:
        raise ValueError("option use_bias_correction_kl multiplies the KL term by the importance ratio: set kl_coef")
    if o["use_bias_correction_kl"] and o["kl_placement"] != "loss":
        raise ValueError("option use_bias_correction_kl multiplies the KL term of the loss by the importance ratio: "
                         "it needs kl_placement='loss'")
    if o["scale"] == "nonzero_fraction" and (o["score"] != "reward" or o["weighting"] != "linear"):
        raise ValueError("scale='nonzero_fraction' (GPG) needs score='reward' and weighting='linear'")
    if o["mask_truncated_completions"] and o["score"] != "reward":
        raise ValueError(f"option mask_truncated_completions applies to reward-scored methods, got score={o['score']!r}")


def _check_pair_options(o: Options, given: dict) -> None:
    """pair_loss needs a pairwise preset; the options a chosen pair_loss does not read are refused."""
    kinds = o["pair_loss"]
    if kinds is not None:
        if (o["score"], o["anchor"], o["separation"], o["weighting"]) != ("implicit", "pair", "label", "sigmoid"):
            raise ValueError("option pair_loss (TRL's DPO loss types) needs a pairwise preset such as method='dpo' "
                             "(score='implicit', anchor='pair', separation='label', weighting='sigmoid')")
        for name, neutral in (("margin", 0.0), ("neg_coef", 1.0), ("pos_coef", 1.0), ("length_normalize", False)):
            if o[name] != neutral:
                raise ValueError(f"option {name} has no meaning with pair_loss={kinds!r} (TRL's DPO loss types); leave it at {neutral!r}")
        if o["label_smoothing"] != 0 and not set(kinds) & set(_SMOOTHED_PAIR_LOSSES):
            raise ValueError(f"option label_smoothing is read only by pair_loss {_SMOOTHED_PAIR_LOSSES}, got {kinds!r}")
        if "beta" in given and kinds == ("sft",):
            raise ValueError("option beta is not read by pair_loss='sft' (the chosen completions' negative log-likelihood)")
        if "exo_pair" in kinds and o["label_smoothing"] == 0:
            raise ValueError("pair_loss='exo_pair' needs label_smoothing > 0 (it takes log(label_smoothing))")
        if "robust" in kinds and o["label_smoothing"] >= 0.5:
            raise ValueError("pair_loss='robust' needs label_smoothing < 0.5 (it divides by 1 - 2 label_smoothing)")
    if o["use_weighting"]:
        if kinds is None:
            raise ValueError("option use_weighting (WPO) weights TRL's DPO loss types: set pair_loss (e.g. 'sigmoid')")
        if set(kinds) & {"aot", "aot_unpaired"}:
            raise ValueError("option use_weighting (WPO) does not apply to pair_loss 'aot' / 'aot_unpaired' (TRL refuses it)")
    if o["ld_alpha"] is not None and kinds is None:
        raise ValueError("option ld_alpha (LD-DPO) weights TRL's DPO loss types: set pair_loss (e.g. 'sigmoid')")
    if "discopop_tau" in given and (kinds is None or "discopop" not in kinds):
        raise ValueError("option discopop_tau applies to pair_loss='discopop' only")
    if o["f_divergence_type"] != "reverse_kl":
        if kinds is None or not set(kinds) <= set(_F_DIVERGENCE_PAIR_LOSSES):
            raise ValueError(f"option f_divergence_type={o['f_divergence_type']!r} applies to pair_loss types "
                             f"{_F_DIVERGENCE_PAIR_LOSSES} only (TRL), got pair_loss={kinds!r}")
    if "f_alpha_divergence_coef" in given and o["f_divergence_type"] != "alpha_divergence":
        raise ValueError("option f_alpha_divergence_coef applies to f_divergence_type='alpha_divergence' only")


def _check_offline_options(o: Options, given: dict) -> None:
    """The offline-row options (LUFFY, CHORD, HPT, the no-push-down ablation): each only where it is read."""
    o["shaping_gamma"] = _number("shaping_gamma", o["shaping_gamma"], low=0.0, low_open=True)
    _optional(o, "mu", low=0.0, high=1.0)
    _optional(o, "switch_threshold")
    if "shaping_gamma" in given and o["offline_surrogate"] != "shaping":
        raise ValueError("option shaping_gamma is LUFFY's policy shaping constant: it needs offline_surrogate='shaping', "
                         f"got {o['offline_surrogate']!r}")
    if o["offline_role"] == "sft":
        if o["score"] != "reward" or o["weighting"] != "linear":
            raise ValueError("offline_role='sft' (offline rows as SFT rows beside the online groups, CHORD / HPT) needs "
                             f"a reward-scored method with weighting='linear', got score={o['score']!r}, "
                             f"weighting={o['weighting']!r}")
        if o["offline_neg_coef"] != 1.0:
            raise ValueError("option offline_neg_coef scales offline rows below their group's anchor: it needs "
                             "offline_role='group' (with offline_role='sft' offline rows are never pushed down)")
    else:
        if o["separation"] == "positive" and "offline_neg_coef" in given:
            raise ValueError("option offline_neg_coef scales offline rows of negative weight, and separation='positive' "
                             "gives none")
        for name in ("mu", "switch_threshold"):
            if o[name] is not None:
                raise ValueError(f"option {name} mixes the online loss with offline SFT rows: it needs "
                                 f"offline_role='sft' (got offline_role={o['offline_role']!r})")


def _check_teacher_options(o: Options, given: dict) -> None:
    """nll_coef needs a pairwise preference weighting; the divergence options need distill_coef; odds_ratio's
    unread options are refused."""
    o["jsd_beta"] = _number("jsd_beta", o["jsd_beta"], low=0.0, high=1.0)
    if o["nll_coef"] != 0 and (o["weighting"] not in PAIR_WEIGHTINGS or o["pair_loss"] is not None):
        raise ValueError("option nll_coef adds the chosen rows' negative log-likelihood to a pairwise preference loss "
                         f"(weighting in {PAIR_WEIGHTINGS}, no pair_loss; TRL's pair_loss 'sft' is the same term there); "
                         f"got weighting={o['weighting']!r}, pair_loss={o['pair_loss']!r}")
    if o["distill_coef"] == 0:
        for name in ("divergence", "jsd_beta"):
            if name in given:
                raise ValueError(f"option {name} shapes the teacher term: set distill_coef (method='distill' sets 1.0)")
    if "jsd_beta" in given and o["divergence"] != "jsd":
        raise ValueError(f"option jsd_beta is read with divergence='jsd' only, got divergence={o['divergence']!r}")
    if o["weighting"] == "odds_ratio":
        for name, neutral in (("label_smoothing", 0.0), ("margin", 0.0), ("neg_coef", 1.0), ("pos_coef", 1.0)):
            if o[name] != neutral:
                raise ValueError(f"option {name} is not read by weighting='odds_ratio' (ORPO); leave it at {neutral!r}")

def _check_weight_options(o: Options, given: dict) -> None:
    """Options given that the configured weights or loss never read: an error naming each, so that
    no option is accepted and ignored (tests/test_options_read.py audits every option)."""
    weighting, separation, pair = o["weighting"], o["separation"], o["pair_loss"]

    def unread(name, why):
        # score / anchor / scale "none" say the step is absent: always accepted
        if name in given and not (name in ("score", "anchor", "scale") and given[name] == "none"):
            raise ValueError(f"option {name} is not read by this configuration: {why}")

    if o["scale"] not in ("group_std", "batch_std"):
        unread("std_eps", f"it is added to the std of scale='group_std' or 'batch_std', got scale={o['scale']!r}")
    if not (o["score"] == "implicit" or weighting in ("sigmoid", "squared", "sigmoid_bell") or pair is not None):
        unread("beta", f"it scales implicit scores and the sigmoid / squared weightings, got score={o['score']!r}, "
                       f"weighting={weighting!r}")
    if o["anchor"] != "constant":
        unread("anchor_value", f"it is the level of anchor='constant', got anchor={o['anchor']!r}")
    if weighting != "sigmoid" or pair is not None:
        unread("margin", f"it is the pairwise sigmoid's margin (weighting='sigmoid'), got weighting={weighting!r}")
        if pair is None and not ce_smoothing_reader(o):
            unread("label_smoothing", f"it smooths the pairwise sigmoid (weighting='sigmoid'), a pair_loss that "
                                      f"reads it, or the SFT preset's cross-entropy, got weighting={weighting!r}")
    if weighting != "linear":
        unread("scale", f"it divides the linear weighting's score - anchor, got weighting={weighting!r}")
    if weighting == "constant" and separation != "anchor":
        for name in ("score", "anchor"):
            unread(name, f"weighting='constant' reads only the sign, which separation={separation!r} sets")
    if weighting == "linear" and o["pos_coef"] == o["neg_coef"]:
        unread("separation", "the linear weighting's sign is that of score - anchor; separation only picks "
                             "pos_coef or neg_coef, which are equal here")
    if separation == "positive":
        unread("neg_coef", "separation='positive' makes every sign +1 (pos_coef applies)")
        unread("off_policy_mask_threshold", "the mask drops tokens of negative weight, and separation='positive' "
                                            "gives none")
    if o["kl_coef"] == 0:
        unread("kl_placement", "it places the KL term, and kl_coef is 0")
    elif o["kl_placement"] == "reward" and o["score"] not in ("reward", "token_return"):
        raise ValueError(f"option kl_placement='reward' subtracts the KL from the rewards, but score={o['score']!r} "
                         "reads no reward: use kl_placement='loss'")
    if o["loss_agg"] != "seq_mean_token_sum_norm":
        unread("max_completion_length", f"it is the normalizer of loss_agg='seq_mean_token_sum_norm', got "
                                        f"loss_agg={o['loss_agg']!r}")
