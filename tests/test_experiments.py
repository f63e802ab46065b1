"""`gro_kernels.experiments`: the regimes' data, that every method sees the same data, that luffy's
shaping and grpo_sft's loss are what they claim (against formulas written here, float64), that the
distillation teacher is the sft arm's model, the statistics, and the command line's JSON schema
(tiny runs: a few steps, two seeds)."""
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gro_kernels.loss")

from gro_kernels.experiments import KNOBS, METHODS, REGIMES, RunConfig, run  # noqa: E402
from gro_kernels.experiments import __main__ as cli  # noqa: E402
from gro_kernels.experiments import runner, stats, suite  # noqa: E402
from gro_kernels.experiments.methods import ABLATIONS, method_loss  # noqa: E402
from gro_kernels.experiments.tasks import correct_answers, regime_data, split_prompts  # noqa: E402

TINY = dict(steps=4, prompts_per_step=4, generations=2, hidden=16, layers=1)


# ---- data ----------------------------------------------------------------------------------------
def test_evaluation_and_validation_prompts_are_disjoint_from_training_prompts():
    split = split_prompts()
    train, valid, ev = set(split["train"]), set(split["valid"]), set(split["eval"])
    assert not (train & ev) and not (train & valid) and not (valid & ev)
    assert len(train | valid | ev) == 1000 and len(ev) == 200
    for name in REGIMES:
        data = regime_data(name, seed=3)
        assert not ({r["prompt"] for r in data["train"]} & {r["prompt"] for r in data["eval"]})
        assert all(r["offline"] is None for r in data["eval"] + data["valid"])


def test_a_run_evaluates_only_on_prompts_it_never_trained_on(monkeypatch):
    seen, trained = [], set()
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda model, tok, rows, *a: seen.extend(rows) or real(model, tok, rows, *a))
    run(RunConfig(regime="clean", method="gro", knob=1.0, **TINY), on_step=lambda rec: trained.update(rec["prompts"]))
    assert seen and trained and not ({r["prompt"] for r in seen} & trained)


def test_the_regimes_offline_data_is_what_their_names_say():
    def teacher_reward(name, seed=0):
        data = regime_data(name, seed)["train"]
        off = [r for r in data if r["offline"] is not None]
        return len(off) / len(data), REGIMES[name].reward(None, [r["offline"] for r in off],
                                                          answer=[r["answer"] for r in off])
    frac, r = teacher_reward("clean")
    assert frac == 1.0 and set(r) == {1.0}
    frac, r = teacher_reward("scarce")
    assert 0.05 < frac < 0.15 and set(r) == {1.0}
    frac, r = teacher_reward("noisy")
    assert frac == 1.0 and 0.3 <= sum(r) / len(r) <= 0.5  # the teacher is right 30-50% of the time
    frac, r = teacher_reward("graded")
    assert frac == 1.0 and {0.0, 1 / 3, 2 / 3, 1.0} <= set(r) and 0.3 < sum(r) / len(r) < 0.7
    frac, r = teacher_reward("diverse")
    assert frac == 1.0 and set(r) == {1.0}
    assert correct_answers("permute", "123") == ["123", "132", "213", "231", "312", "321"]
    assert REGIMES["diverse"].reward(None, ["321", "312", "322", "12"], answer=["123"] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_every_method_sees_the_same_prompts_offline_data_samples_and_steps(monkeypatch):
    """Same prompts, offline answers and number of samples at every step, the same number of steps;
    what each loss trains on is what the method says (online rows, offline rows, or both)."""
    trained = {}
    real_step = runner.train_step

    def spy(cfg, model, opt, tok, step, P, C, G, OFF, R, teacher=None):
        trained.setdefault(cfg.method, []).append((step, set(OFF)))
        return real_step(cfg, model, opt, tok, step, P, C, G, OFF, R, teacher=teacher)

    monkeypatch.setattr(runner, "train_step", spy)
    # (the teacher's own SFT steps are not the distill arm's: a stand-in teacher here)
    monkeypatch.setattr(runner, "train_teacher", lambda cfg, data, tok: runner.build_model(len(tok), cfg.seed, 16, 1))
    records = {}
    for m in METHODS + ABLATIONS:
        knob = 0.5 if m == "sft_then_grpo" else (KNOBS[m][1][0] if m in KNOBS else None)
        recs = records[m] = []
        run(RunConfig(regime="noisy", method=m, knob=knob, seed=1, **TINY), on_step=recs.append)
    ref = records["gro"]
    for m in METHODS + ABLATIONS:
        assert len(records[m]) == TINY["steps"]
        for a, b in zip(records[m], ref):
            assert a["prompts"] == b["prompts"] and a["offline_answers"] == b["offline_answers"]
            assert a["samples"] == b["samples"] == TINY["prompts_per_step"] * TINY["generations"]
    assert all(off == {False} for _, off in trained["grpo"])
    assert all(off == {False} for _, off in trained["distill"])
    assert all(off == {True} for _, off in trained["sft"])
    assert [off for _, off in trained["sft_then_grpo"]] == [{True}, {True}, {False}, {False}]
    for m in ("grpo_sft", "luffy", "chord", "hpt", "gro", "gro_nodown"):
        assert all(off == {False, True} for _, off in trained[m])


def test_the_distillation_teacher_is_the_sft_arms_model():
    """train_teacher repeats the sft arm's updates (same init, offline rows, order and steps) without sampling."""
    cfg = RunConfig(regime="graded", method="sft", seed=2, **TINY)
    captured = {}
    real_eval = runner.evaluate

    def grab(model, tok, rows, *a):
        captured["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_eval(model, tok, rows, *a)

    import unittest.mock as mock
    with mock.patch.object(runner, "evaluate", grab):
        run(cfg)
    teacher = runner.train_teacher(cfg, regime_data("graded", 2), runner.CharTokenizer())
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, captured["state"][k], rtol=0, atol=0)
    assert not any(p.requires_grad for p in teacher.parameters())


# ---- the losses against formulas written here ------------------------------------------------------
def group_advantages(rewards, groups, std_eps=1e-4):
    out = []
    for r, g in zip(rewards, groups):
        rg = [x for x, h in zip(rewards, groups) if h == g]
        m = sum(rg) / len(rg)
        s = math.sqrt(sum((x - m) ** 2 for x in rg) / (len(rg) - 1)) if len(rg) > 1 else 0.0
        out.append((r - m) / (s + std_eps))
    return out


def test_luffy_shapes_offline_tokens_with_p_over_p_plus_gamma_and_leaves_online_tokens_linear():
    """The experiments' luffy arm (gro_loss(method="luffy")) on a batch, against the formula by hand."""
    torch.manual_seed(0)
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0]
    groups = [0, 0, 0, 0, 1, 1, 1]
    offline = [False, False, False, True, False, False, True]
    hidden = torch.randn(7, 3, 5, dtype=torch.float64)
    weight = torch.randn(14, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 14, (7, 3))
    targets[1, 2] = targets[5, 1] = targets[5, 2] = -100
    mask = targets != -100
    loss = method_loss("luffy", None, hidden=hidden, weight=weight, targets=targets, rewards=torch.tensor(rewards),
                       group_ids=torch.tensor(groups), offline=torch.tensor(offline), step=0, steps=1)
    loss.backward()
    logp = torch.log_softmax(hidden @ weight.detach().T, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    A, n, gamma = group_advantages(rewards, groups), int(mask.sum()), 0.1
    value, dlogp = 0.0, torch.zeros(7, 3, dtype=torch.float64)
    for i in range(7):
        for t in range(3):
            if not mask[i, t]:
                continue
            p = math.exp(float(logp[i, t]))
            if offline[i]:  # d/dlogp of A * p / (p + gamma) = A * gamma * p / (p + gamma)^2
                value += A[i] * p / (p + gamma)
                dlogp[i, t] = -A[i] * gamma * p / (p + gamma) ** 2 / n
            else:  # ratio = 1 at the one update per batch: A * exp(l - sg l), gradient A
                value += A[i]
                dlogp[i, t] = -A[i] / n
    assert float(loss.detach()) == pytest.approx(-value / n, rel=1e-6)
    w = weight.detach().clone().requires_grad_()
    lp = torch.log_softmax(hidden @ w.T, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    (want,) = torch.autograd.grad((lp * dlogp).sum(), w)
    torch.testing.assert_close(weight.grad, want, rtol=1e-6, atol=1e-9)


def test_grpo_sft_is_grpo_on_online_rows_plus_weight_times_sft_on_offline_rows():
    torch.manual_seed(1)
    B, T, d, V, lam = 6, 3, 5, 7, 0.3
    hidden = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, d, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    targets[2, 2] = -100
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    offline = torch.tensor([False, False, True, False, False, True])
    loss = method_loss("grpo_sft", lam, hidden=hidden, weight=weight, targets=targets, rewards=rewards,
                       group_ids=groups, offline=offline, step=0, steps=1, backend="naive")
    (g_loss,) = torch.autograd.grad(loss, hidden)

    # reference: GRPO (group mean/std over the online rows, sequence mean of token means) at ratio 1,
    # plus lam * the token-mean negative log-likelihood of the offline rows
    h = hidden.detach().requires_grad_(True)
    logp_all = torch.log_softmax(h @ weight.T, -1)
    valid = targets != -100
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid
    on = [i for i in range(B) if not offline[i]]
    A = group_advantages([float(rewards[i]) for i in on], [int(groups[i]) for i in on])
    grpo = -sum(a * (logp[i] - logp[i].detach() + 1).sum() / valid[i].sum() for a, i in zip(A, on)) / len(on)
    off = [i for i in range(B) if offline[i]]
    sft = -sum(logp[i].sum() for i in off) / sum(valid[i].sum() for i in off)
    ref = grpo + lam * sft
    (g_ref,) = torch.autograd.grad(ref, h)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(g_loss, g_ref, rtol=1e-6, atol=1e-9)


# ---- statistics ------------------------------------------------------------------------------------
def test_statistics_against_hand_computed_values():
    assert stats.sd([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 3))
    curve = [0.0] * 10 + [1.0] * 20
    assert stats.steps_to(curve) == 19  # first 10-step mean >= 0.9: nine ones and one zero
    assert stats.steps_to([0.5] * 30) is None
    assert stats.final_value(list(range(20))) == pytest.approx(18.5)
    p = stats.paired([0.9, 0.8, 0.95, 0.85, 0.9], [0.5, 0.45, 0.6, 0.5, 0.55])
    assert p["mean"] == pytest.approx(0.36) and p["wins"] == 5 and p["verdict"] == "higher"
    p = stats.paired([0.5, 0.6, 0.4], [0.55, 0.5, 0.45])
    assert p["verdict"] == "tie" and p["wins"] == 1 and p["losses"] == 2
    assert stats.paired([0.1, 0.2], [0.3, 0.4])["verdict"] == "lower"  # sd 0: every seed lower


# ---- tuning and the command line --------------------------------------------------------------------
def test_tuning_gives_every_method_with_a_knob_the_same_grid_on_validation_prompts(monkeypatch):
    seen = []
    real = runner.run
    monkeypatch.setattr(suite, "run", lambda cfg: seen.append(cfg) or real(cfg))
    knobs = suite.tune(RunConfig(regime="scarce", **{**TINY, "steps": 2}), METHODS, workers=1, tune_seeds=(1000,))
    assert set(knobs) == set(KNOBS) & set(METHODS)
    for m, k in knobs.items():
        assert k["grid"] == list(KNOBS[m][1]) and k["value"] in k["grid"] and len(k["validation"]) == 3
    assert all(c.eval_split == "valid" and c.seed == 1000 for c in seen)
    assert all(len([c for c in seen if c.method == m]) == 3 for m in set(KNOBS) & set(METHODS))


def test_cli_writes_the_json_schema_and_a_plot_per_regime(tmp_path):
    path = tmp_path / "out" / "results.json"
    cli.main(["--regime", "clean,diverse", "--seeds", "2", "--steps", "3", "--prompts", "2", "--generations", "2",
              "--workers", "1", "--no-tune", "--json", str(path)])
    data = json.loads(path.read_text())
    assert list(data["regimes"]) == ["clean", "diverse"]
    for name, reg in data["regimes"].items():
        assert reg["prompts"]["eval_disjoint_from_train"] is True
        assert list(reg["methods"]) == list(METHODS)
        for m, r in reg["methods"].items():
            assert r["seeds"] == 2 and len(r["per_seed"]["heldout_reward"]) == 2
            for key in ("final_reward", "final_reward_sd", "heldout_reward", "heldout_reward_sd", "pass_at_2",
                        "distinct_correct", "initial_reward"):
                assert isinstance(r[key], float) and r[key] >= 0.0, (m, key)
            assert "steps_to_90" in r and "steps_to_90_reached" in r and len(r["curve"]) == 3
            if m != "gro":
                assert set(r["vs_gro"]) == {"final_reward", "heldout_reward"}
        pytest.importorskip("matplotlib")
        assert reg["plot"] == f"{name}.png" and (path.parent / f"{name}.png").stat().st_size > 1000


def test_a_second_json_gets_its_own_plots(tmp_path):
    """The ablation's JSON beside results.json: its plots are ablation_NAME.png, never NAME.png."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "ablation.json"
    cli.main(["--regime", "noisy", "--seeds", "1", "--steps", "2", "--prompts", "2", "--generations", "2",
              "--workers", "1", "--no-tune", "--methods", "gro,gro_nodown", "--json", str(path)])
    assert json.loads(path.read_text())["regimes"]["noisy"]["plot"] == "ablation_noisy.png"
    assert (tmp_path / "ablation_noisy.png").exists() and not (tmp_path / "noisy.png").exists()


@pytest.mark.parametrize("argv, arg", [(["--regime", "nope"], "--regime"), (["--regime", "clean", "--seeds", "0"], "--seeds"),
                                       (["--regime", "clean", "--methods", "ppo"], "--methods")])
def test_cli_rejects_bad_arguments_naming_them(argv, arg, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert arg in capsys.readouterr().err


def test_without_transformers_the_command_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(SystemExit) as exc:
        cli.main(["--regime", "clean", "--seeds", "1", "--steps", "1", "--workers", "1", "--no-tune"])
    assert "transformers" in str(exc.value.code) and "pip install" in str(exc.value.code)
