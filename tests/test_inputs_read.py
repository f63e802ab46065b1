"""Every tensor input is read or refused: the inputs' counterpart of test_options_read.py. For every method
(and the configurations of test_options_read with given advantages), each input of INPUTS either changes
what `gro_loss` returns (the loss, a gradient, or the reported KL) or is an error that names it.

Data-driven: which inputs a configuration reads is learned here by computing, with the refusal switched
off (`inputs.unread_inputs` patched to refuse nothing), the naive float64 result with and without each
input on a call that passes every one of them. Then, with the refusal on, the call with exactly the read
inputs must succeed and adding any one unread input must raise a ValueError naming it and the method."""
import pytest
import torch

from gro_kernels import GROLoss, gro_loss, gro_objective
from gro_kernels.objective import inputs as inputs_module
from gro_kernels.objective.options import METHODS, resolve_options

from test_options_read import DATA, B, F64, _same

# Methods whose loss needs an option of their own; clip_cov draws the tokens it drops at random (not comparable).
BASE = {"kto": {"anchor_value": 0.1}, "apo_zero_unpaired": {}, "hpt": {"switch_threshold": 0.45}}
CONFIGS = [(m, m, BASE.get(m, {}), False) for m in METHODS if m != "clip_cov"]
CONFIGS += [("dapo+advantages", "dapo", {}, True), ("rloo+advantages", "rloo", {}, True),
            ("sft+advantages", "sft", {}, True), ("dpo+advantages", "dpo", {}, True)]
# The tensor inputs audited (the reference head as one: ref_hidden with ref_weight).
INPUTS = {
    "old_logp": lambda: DATA["old_logp"],
    "ref_logp": lambda: DATA["ref_logp"],
    "rewards": lambda: torch.tensor([1.0, 0.2, 0.5, 0.9, 0.0, 0.7, 0.4, 0.3], **F64),
    "labels": lambda: torch.tensor([1, -1] * 4),
    "group_ids": lambda: torch.arange(B) // 2,
    "offline": lambda: torch.tensor([False] * 7 + [True]),
    "baselines": lambda: torch.tensor([0.5, 0.1, 0.3, 0.2, 0.6, 0.4, 0.0, 0.8], **F64),
    "ref_hidden": lambda: (DATA["ref_hidden"], DATA["ref_weight"]),
}


def _call(method, base, names, advantages):
    kw = {}
    for name in names:
        if name == "ref_hidden":
            kw["ref_hidden"], kw["ref_weight"] = INPUTS[name]()
        else:
            kw[name] = INPUTS[name]()
    if advantages:
        kw["advantages"] = DATA["advantages"]
    o = resolve_options(method, base)
    if o.distill_coef:
        kw.update(teacher_hidden=DATA["teacher_hidden"], teacher_weight=DATA["teacher_weight"])
    h, w = DATA["hidden"].clone().requires_grad_(), DATA["weight"].clone().requires_grad_()
    out = gro_loss(h, w, DATA["targets"], method=method, backend="naive", return_entropy=True, **kw, **base)
    return out.loss.detach(), torch.autograd.grad(out.loss, (h, w)), out.metrics.get("kl")


def _candidates(advantages):
    return [n for n in INPUTS if not (advantages and n == "rewards")]  # rewards beside advantages: its own error


def _unread(method, base, advantages, monkeypatch):
    """The inputs that change nothing (bit-identical loss, gradients, KL) next to all the others, with the
    refusal switched off; an input whose absence is an error is read, one whose presence is an error unread."""
    with monkeypatch.context() as m:
        m.setattr(inputs_module, "unread_inputs", lambda *a, **k: {}, raising=False)
        names, unread = _candidates(advantages), []
        while True:  # with every input present, an error names one that is refused whatever the switch says
            try:
                full = _call(method, base, names, advantages)
                break
            except ValueError as e:
                named = [n for n in names if n in str(e)]
                if not named:
                    raise
                names.remove(named[0])
                unread.append(named[0])
        for name in names:
            try:
                without = _call(method, base, [n for n in names if n != name], advantages)
            except (ValueError, TypeError):
                continue  # required
            if _same(without, full):
                unread.append(name)
    return unread


@pytest.mark.parametrize("name,method,base,advantages", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_input_is_read_or_refused(name, method, base, advantages, monkeypatch):
    unread = _unread(method, base, advantages, monkeypatch)
    read = [n for n in _candidates(advantages) if n not in unread]
    _call(method, base, read, advantages)  # the inputs that are read are accepted
    accepted, unnamed = [], []
    for extra in unread:
        try:
            _call(method, base, read + [extra], advantages)
        except ValueError as e:
            if not (extra in str(e) and repr(method) in str(e)):
                unnamed.append(f"{extra}: {e}")
            continue
        accepted.append(extra)
    assert not accepted and not unnamed, (f"{name}: accepted and ignored (loss, gradients and KL unchanged): "
                                          f"{accepted}; refused without naming the input and the method: {unnamed}")


def test_the_brief_cases_are_refused():
    # the cases that motivated this audit, each bit-identical with and without the input on main
    r, g = INPUTS["rewards"](), INPUTS["group_ids"]()
    cases = [("dpo", dict(labels=INPUTS["labels"](), group_ids=g, ref_logp=DATA["ref_logp"]), "old_logp"),
             ("dpo", dict(labels=INPUTS["labels"](), group_ids=g, ref_logp=DATA["ref_logp"]), "rewards"),
             ("sft", {}, "group_ids"), ("grpo", dict(rewards=r, group_ids=g, kl_coef=0.0), "labels"),
             ("sft", {}, "offline"), ("gpg", dict(rewards=r, group_ids=g), "old_logp")]
    logp, mask = DATA["old_logp"], DATA["targets"] != -100
    for method, kw, extra in cases:
        h, w = DATA["hidden"].clone().requires_grad_(), DATA["weight"].clone().requires_grad_()
        given = {extra: INPUTS[extra]()}
        for backend in ("naive", "torch"):  # the torch backend's one pass and composable path check it too
            gro_loss(h, w, DATA["targets"], method=method, backend=backend, **kw)
            with pytest.raises(ValueError, match=extra):
                gro_loss(h, w, DATA["targets"], method=method, backend=backend, **kw, **given)
        options = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
        tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
        with pytest.raises(ValueError, match=extra):
            GROLoss(method=method, **options)(h, w, DATA["targets"], **tensors, **given)
        gro_objective(logp, mask=mask, method=method, **kw)
        with pytest.raises(ValueError, match=extra):
            gro_objective(logp, mask=mask, method=method, **kw, **given)


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_off_policy_mask_without_behaviour_log_probs_is_refused(backend):
    # Without rollout_logp or old_logp the behaviour policy is the current one: the mask masks nothing
    # (checked here with the refusal's own condition bypassed by passing the current log-probs as old_logp).
    r, g = INPUTS["rewards"](), INPUTS["group_ids"]()
    h, w = DATA["hidden"].clone().requires_grad_(), DATA["weight"].clone().requires_grad_()
    with torch.no_grad():
        current = torch.log_softmax(DATA["hidden"] @ DATA["weight"].T, -1).gather(
            -1, DATA["targets"].clamp(min=0)[..., None])[..., 0]
    kw = dict(method="grpo", backend=backend, rewards=r, group_ids=g, kl_coef=0.0)
    same = gro_loss(h, w, DATA["targets"], **kw, old_logp=current, off_policy_mask_threshold=0.01).loss
    plain = gro_loss(h, w, DATA["targets"], **kw, old_logp=current).loss
    assert torch.equal(same, plain)
    with pytest.raises(ValueError, match="off_policy_mask_threshold"):
        gro_loss(h, w, DATA["targets"], **kw, off_policy_mask_threshold=0.01)
    out = gro_loss(h, w, DATA["targets"], **kw, old_logp=DATA["old_logp"], off_policy_mask_threshold=0.01)
    assert not torch.equal(out.loss, plain)
