"""What a user installing the package relies on: it imports and runs its torch backend without triton
(macOS, Windows), asking for the triton backend there names triton, and the sdist's tests collect."""
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WITHOUT_TRITON = """
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTriton())
import torch
from gro_kernels import gro_loss, token_logprobs
h = torch.randn(2, 5, 8, requires_grad=True)
w, t = torch.randn(11, 8), torch.randint(0, 11, (2, 5))
out = gro_loss(h, w, t, method="grpo", rewards=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]),
               kl_coef=0.0)
out.loss.backward()
assert torch.isfinite(h.grad).all() and "triton" not in sys.modules
try:
    token_logprobs(h, w, t, backend="triton")
except ImportError as e:
    assert "triton" in str(e), e
    print("OK")
"""


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_runs_without_triton_and_names_it_when_asked_for(interpret):
    env = dict(os.environ, TRITON_INTERPRET=interpret)
    res = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stderr[-3000:]


def test_metadata_license_typed_and_triton_extras():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    meta = tomllib.loads(text)["project"]
    # triton is an extra (CUDA torch wheels bring it on GPU machines): a CPU install skips its 1 GB.
    assert not any(d.startswith("triton") for d in meta["dependencies"])
    assert "triton>=3.1" in meta["optional-dependencies"]["gpu"]
    assert any(d.startswith("triton>=3.1") for d in meta["optional-dependencies"]["test"])
    assert not any(d.startswith("triton") for d in meta["optional-dependencies"]["train"])
    assert 'license = "Apache-2.0"' in text
    assert "Apache License" in open(os.path.join(ROOT, "LICENSE")).read()
    assert os.path.exists(os.path.join(ROOT, "gro_kernels", "py.typed"))


def test_sdist_tests_collect(tmp_path):
    """Build the sdist with the PEP 517 hook in-process (no network), unpack it, collect its tests.

    It builds from a copy of the tree without the `*.egg-info` an editable install leaves: setuptools
    would otherwise add the files its SOURCES.txt lists from an earlier build, whatever MANIFEST.in says."""
    import shutil

    clean = tmp_path / "tree"
    shutil.copytree(ROOT, clean, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "runs", "build", "dist", "bench-results"))
    build = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; "
                            f"print(build_meta.build_sdist({str(tmp_path)!r}))"],
                           cwd=clean, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    name = build.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        try:
            tar.extractall(tmp_path, filter="data")
        except TypeError:  # Python without extraction filters (< 3.10.12)
            tar.extractall(tmp_path)
    src = tmp_path / name[: -len(".tar.gz")]
    docs = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "docs"))
            for f in files if f.endswith((".md", ".png", ".json"))]
    assert "docs/methods.md" in docs
    for path in ["LICENSE", "gro_kernels/py.typed", "python/examples/quickstart.py", "tests/conftest.py"] + docs:
        assert (src / path).exists(), path
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=src, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " collected" in res.stdout or "tests collected" in res.stdout


@pytest.mark.parametrize("module,missing,install", [
    ("gro_kernels.integrations.trl", "trl", "gro_kernels[integrations]"),
    ("gro_kernels.integrations.verl", "verl", "verl==0.9.1"),
])
def test_integration_without_its_trainer_library_says_what_to_install(monkeypatch, module, missing, install):
    """Importing a drop-in without TRL / verl: an ImportError that names the package and the install
    command, not a bare ModuleNotFoundError from inside the module."""
    import importlib

    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")] + [missing]:
        monkeypatch.setitem(sys.modules, name, None)  # `import trl...` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError) as info:
        importlib.import_module(module)
    message = str(info.value)
    assert type(info.value) is ImportError and repr(missing) in message and install in message, message


def test_bench_writes_outside_the_source_tree_by_default_and_speaks_user_terms():
    """`python bench/run.py --quick` from a clone must not rewrite the committed bench/results/; its
    help describes each suite, not the project's issue history."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "bench", "run.py"))
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    out_dir = os.path.abspath(run.parser().parse_args(["--quick"]).out_dir)
    assert not out_dir.startswith(os.path.join(ROOT, "bench") + os.sep), out_dir
    assert run.parser().parse_args(["--quick", "--out-dir", "bench/results"]).out_dir == "bench/results"
    help_text = run.parser().format_help()
    assert "issue" not in help_text.lower() and "bench-results" in help_text, help_text


def _make_dry_run(tmp_path, target):
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)  # no install stamps: what a fresh clone runs
    res = subprocess.run(["make", "-n", target, "PYTHON=python"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if "pip install" in line]


def test_make_demo_installs_only_the_demo_stack_and_make_test_the_whole_one(tmp_path):
    """`make demo` on a fresh clone: CPU torch (when torch is absent), the package and its train extra
    (transformers, matplotlib), not the test / integration stack; `make test` (what .ci/run runs after
    `make install`) installs everything the suite uses."""
    import re

    demo = _make_dry_run(tmp_path, "demo")
    assert any('"torch==2.13.0"' in line for line in demo) and any('-e ".[train]"' in line for line in demo), demo
    assert not any(word in line for line in demo for word in ("test", "integrations", "verl", "openrlhf")), demo
    train = re.search(r"^train = \[(.*)\]", open(os.path.join(ROOT, "pyproject.toml")).read(), re.M).group(1)
    assert sorted(re.findall(r'"([a-z_-]+)', train)) == ["matplotlib", "transformers"], train
    full = " ".join(_make_dry_run(tmp_path, "test"))
    for needed in ("torch==2.13.0", ".[test,train,integrations]", "verl==0.9.1"):
        assert needed in full, full
    ci = [line for line in open(os.path.join(ROOT, ".ci", "run")).read().splitlines() if line.startswith("make ")]
    assert ci == ["make install", "make test"], ci
