"""Every script in python/examples runs offline on its tiny default model (no Hub access)."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "python", "examples")

SCRIPTS = [
    # (script, arguments, packages it needs beyond the core)
    ("quickstart.py", [], []),
    ("plain_pytorch_loop.py", ["--steps", "1", "--prompts", "2", "--k", "2"], ["transformers"]),
    ("train_with_trainer.py", ["--steps", "1", "--prompts-per-step", "2", "--out", "{tmp}"], ["transformers"]),
    ("trl_grpo_trainer.py", ["--steps", "1", "--out", "{tmp}"], ["trl"]),
    ("verl_policy_loss.py", [], ["verl"]),
]


def test_every_example_is_listed():
    scripts = {f for f in os.listdir(EXAMPLES) if f.endswith(".py") and f != "tiny_local.py"}
    assert scripts == {s[0] for s in SCRIPTS}


@pytest.mark.parametrize("script,args,needs", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_example_runs_offline(tmp_path, script, args, needs):
    for package in needs:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install -e '.[integrations]')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, os.path.join(EXAMPLES, script)] + [a.format(tmp=tmp_path) for a in args],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
