"""GRO options: their names, defaults, allowed values, and the preset table (GRO.md sections 2-3).

An option's value is resolved as: DEFAULTS <- PRESETS[method] <- what the caller passed.
"""
from __future__ import annotations

import numbers

METHODS = (
    "reinforce", "rloo", "remax", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "reinforce_pp",
    "dpo", "ipo", "cpl", "simpo", "kto", "sft", "gro",
)

# Options whose value is one of a fixed set of names. `surrogate`, score `token_return`/`none` and
# separation `positive` are this package's names for table cells GRO.md describes in words
# (the surrogate column, REINFORCE++'s token rewards, SFT's "all +1").
CHOICES = {
    "score": ("reward", "implicit", "token_return", "none"),
    "anchor": ("group_mean", "leave_one_out", "batch_mean", "baseline", "pair", "constant", "none"),
    "separation": ("anchor", "label", "positive"),
    "weighting": ("linear", "sigmoid", "sigmoid_bell", "squared", "constant"),
    "scale": ("group_std", "batch_std", "none"),
    "surrogate": ("logp", "ratio_clip", "cispo"),
    "importance_sampling": ("token", "sequence"),
    "kl_estimator": ("k1", "k2", "k3", "full"),
    "kl_placement": ("loss", "reward"),
    "loss_agg": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"),
}

DEFAULTS = {
    # weights (GRO.md 2, "Forming the weights")
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
    # KL and entropy
    "kl_coef": 0.0,
    "kl_estimator": "k3",
    "kl_placement": "loss",
    "entropy_coef": 0.0,
    # aggregation
    "loss_agg": "token_mean",
    "max_completion_length": None,
    # read by gro_loss (applied inside token_logprobs); accepted here so presets can carry it
    "temperature": 1.0,
}
OPTIONS = tuple(DEFAULTS)

# The unification table, one row per method (GRO.md section 3). "KL" is where a KL term goes when
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
}
PRESETS = {m: {**dict(zip(_COLUMNS, row)), **_EXTRA.get(m, {})} for m, row in _TABLE.items()}

# How the implicit score X_i uses the reference: True = D_i (ref_logp required), False = S_i
# (reference-free, ref_logp is not used for the score). Methods not listed use D_i when ref_logp is given.
IMPLICIT_REFERENCE = {"dpo": True, "ipo": True, "kto": True, "cpl": False, "simpo": False}


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


def resolve_options(method: str, options: dict) -> Options:
    """DEFAULTS <- PRESETS[method] <- options, validated. Unknown names are a TypeError listing valid ones."""
    if method not in PRESETS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; valid options are: {', '.join(sorted(OPTIONS))}")
    o = Options({**DEFAULTS, **PRESETS[method], **options})

    for name, allowed in CHOICES.items():
        if o[name] not in allowed:
            raise ValueError(f"option {name} must be one of {allowed}, got {o[name]!r}")
    for name in ("eps_low", "eps_high", "kl_coef", "entropy_coef", "std_eps", "pos_coef", "neg_coef", "offline_coef"):
        o[name] = _number(name, o[name], low=0.0)
    for name in ("anchor_value", "margin"):
        o[name] = _number(name, o[name])
    o["beta"] = _number("beta", o["beta"], low=0.0, low_open=True)
    o["temperature"] = _number("temperature", o["temperature"], low=0.0, low_open=True)
    o["label_smoothing"] = _number("label_smoothing", o["label_smoothing"], low=0.0, high=0.5)
    if o["delta"] is not None:
        o["delta"] = _number("delta", o["delta"], low=1.0, low_open=True)
    mcl = o["max_completion_length"]
    if mcl is not None and (isinstance(mcl, bool) or not isinstance(mcl, numbers.Integral) or mcl <= 0):
        raise ValueError(f"option max_completion_length must be a positive int or None, got {mcl!r}")
    if not isinstance(o["length_normalize"], bool):
        raise TypeError(f"option length_normalize must be a bool, got {o['length_normalize']!r}")

    # Combinations that have no meaning.
    if o["weighting"] in ("sigmoid", "squared") and (o["anchor"] != "pair" or o["separation"] != "label"):
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
