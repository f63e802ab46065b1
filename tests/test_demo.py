"""`python -m gro_kernels.demo` end to end in a tiny configuration, its command line and Ctrl-C
(the examples: tests/test_examples.py)."""
import json
import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gro_kernels.loss")

from gro_kernels import demo  # noqa: E402
from gro_kernels.experiments import METHODS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps", "2", "--prompts", "2", "--generations", "2", "--hidden", "16", "--layers", "1", "--no-progress"]


def test_demo_runs_every_method_and_writes_summary_plot_and_metrics(tmp_path):
    out, js = tmp_path / "demo", tmp_path / "summary.json"
    summary = demo.main(TINY + ["--out", str(out), "--json", str(js)])
    data = json.loads(js.read_text())
    assert list(data["methods"]) == list(demo.DEMO_METHODS) == list(summary["methods"])
    assert set(demo.DEMO_METHODS) <= set(METHODS)
    assert data["regime"] == "graded" and data["steps"] == 2 and data["interrupted"] is False
    for name, m in data["methods"].items():
        assert m["steps"] == 2 and m["finished"] and m["seconds"] > 0
        for k in ("initial_reward", "final_reward", "heldout_initial_reward", "heldout_reward", "pass_at_2"):
            assert 0.0 <= m[k] <= 1.0, (name, k)
        assert (m["knob"] is None) == (name in ("grpo", "sft", "luffy"))
        assert m["knob"] is None or m["knob"]["value"] == demo.TUNED["graded"][name]   # the experiments' picks
        assert len((out / f"metrics_{name}.jsonl").read_text().splitlines()) == 2
    pytest.importorskip("matplotlib")
    assert (out / "reward.png").stat().st_size > 1000


def test_ctrl_c_leaves_the_partial_results_on_disk(tmp_path, monkeypatch):
    """KeyboardInterrupt in the middle of the second method: the first method's results, the second's
    steps so far, the plot and the summary are written, and the exit status is 130."""
    real, calls = demo.log_step, []

    def interrupt_on_second_method_third_step(f, record):
        real(f, record)
        calls.append(record["step"])
        if len(calls) == 4 + 3:  # 4 steps of grpo, then 3 steps of sft
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "log_step", interrupt_on_second_method_third_step)
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exc:
        demo.main(["--steps", "4", "--prompts", "2", "--generations", "2", "--hidden", "16", "--layers", "1",
                   "--methods", "grpo,sft,gro", "--no-progress", "--out", str(out)])
    assert exc.value.code == 130
    data = json.loads((out / "summary.json").read_text())
    assert data["interrupted"] is True and list(data["methods"]) == ["grpo", "sft"]
    assert data["methods"]["grpo"]["finished"] and data["methods"]["grpo"]["steps"] == 4
    sft = data["methods"]["sft"]
    assert not sft["finished"] and sft["steps"] == 3 and sft["heldout_reward"] is None
    assert 0.0 <= sft["final_reward"] <= 1.0
    assert len((out / "metrics_sft.jsonl").read_text().splitlines()) == 3
    pytest.importorskip("matplotlib")
    assert (out / "reward.png").stat().st_size > 1000


def test_steps_zero_is_a_clear_error_naming_the_argument(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--steps", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err


def test_a_bad_backend_fails_before_the_model_is_built(capsys, tmp_path, monkeypatch):
    import transformers

    def no_model(*a, **k):
        raise AssertionError("the model was built before --backend was checked")

    monkeypatch.setattr(transformers, "LlamaForCausalLM", no_model)
    with pytest.raises(SystemExit) as exc:
        demo.main(TINY + ["--backend", "cuda_magic", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--backend" in err and "cuda_magic" in err


def test_without_transformers_it_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(SystemExit) as exc:
        demo.main(TINY + ["--out", str(tmp_path)])
    msg = str(exc.value.code)
    assert "transformers" in msg and "pip install" in msg


def test_reversal_reward_only_gives_full_credit_to_the_exact_answer():
    r = demo.reversal_reward(None, ["321", "32", "3210", "123", "_21", ""], answer=["321"] * 6)
    assert r == [1.0, 2 / 3, 0.75, 1 / 3, 2 / 3, 0.0]
    tok = demo.CharTokenizer()
    assert tok.decode(tok.encode("12>", add_special_tokens=True) + [tok.eos_token_id]) == "_12>"


def test_the_demo_uses_the_knobs_the_committed_experiments_picked():
    path = os.path.join(ROOT, "docs", "experiments", "results.json")
    if not os.path.exists(path):
        pytest.skip("no committed experiment results")
    with open(path) as f:
        regimes = json.load(f)["regimes"]
    picked = {r: {m: x["knob"]["value"] for m, x in reg["methods"].items() if x.get("knob")} for r, reg in regimes.items()}
    assert picked == demo.TUNED
