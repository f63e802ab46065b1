"""`python -m gro_kernels.demo` end to end in a tiny configuration (the examples: tests/test_examples.py)."""
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gro_kernels.loss")

from gro_kernels import demo  # noqa: E402


def test_demo_runs_end_to_end_and_writes_summary_and_plot(tmp_path):
    out, js = tmp_path / "demo", tmp_path / "summary.json"
    summary = demo.main(["--steps", "2", "--prompts", "4", "--generations", "4", "--out", str(out),
                         "--json", str(js), "--no-progress"])
    data = json.loads(js.read_text())
    assert set(data["methods"]) == {"grpo", "rloo", "gro+gold"} == set(summary["methods"])
    for m in data["methods"].values():
        assert m["steps"] == 2 and m["seconds"] > 0
        for k in ("initial_reward", "final_reward", "greedy_initial", "greedy_final"):
            assert 0.0 <= m[k] <= 1.0
    assert data["steps"] == 2 and data["seconds_total"] > 0
    pytest.importorskip("matplotlib")
    assert (out / "reward.png").stat().st_size > 1000
    assert (out / "metrics_gro_gold.jsonl").exists()


def test_reversal_reward_only_gives_full_credit_to_the_exact_answer():
    r = demo.reversal_reward(None, ["321", "32", "3210", "123", "_21", ""], answer=["321"] * 6)
    assert r == [1.0, 2 / 3, 0.75, 1 / 3, 2 / 3, 0.0]
    tok = demo.CharTokenizer()
    assert tok.decode(tok.encode("12>", add_special_tokens=True) + [tok.eos_token_id]) == "_12>"

