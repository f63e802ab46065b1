"""The GPU visit's script and the benchmark's floor, checked on the CPU (issue 16, item 7).

- `bench/gpu_suite.sh` is valid shell (shellcheck where installed) and installs the wheels carried
  in `.whl/` without dependencies and without an index (its dry run, on a wheel built here).
- `matmul3_rows` times the three bare GEMMs on exactly the rows `gro_loss` computes: their GEMM
  FLOPs equal gro_loss's for a token-local preset (the mask drops rows from both), where `matmul3`
  counts every token.
- `bench/gpu_probe.py`'s probe and race stress run end to end (dry run, tiny shapes).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from helpers_gemm import GemmAudit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "bench", "gpu_suite.sh")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def test_gpu_suite_is_valid_shell():
    assert subprocess.run(["bash", "-n", SUITE]).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        out = subprocess.run([shellcheck, SUITE], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout


def _tiny_wheel(folder) -> str:
    """A valid pure-Python wheel of a one-module package, written by hand (no build, no network)."""
    name = os.path.join(folder, "gro_probe_dummy-0.1-py3-none-any.whl")
    info = "gro_probe_dummy-0.1.dist-info"
    files = {"gro_probe_dummy.py": "X = 1\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: gro_probe_dummy\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(name, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{info}/RECORD", "".join(f"{p},,\n" for p in files) + f"{info}/RECORD,,\n")
    return name


def test_gpu_suite_installs_the_carried_wheels_without_deps_or_index(tmp_path):
    wheels, out = tmp_path / "whl", tmp_path / "out"
    wheels.mkdir()
    wheel = _tiny_wheel(str(wheels))
    env = dict(os.environ, OUT=str(out), WHEEL_DIR=str(wheels), PYTHON=sys.executable)
    res = subprocess.run(["bash", SUITE, "--dry-run", "--only", "wheels"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    log = next(p for p in out.iterdir() if p.name.endswith("_wheels.log")).read_text()
    assert f"--no-deps --no-index {wheel}" in log, log
    assert "Would install gro_probe_dummy-0.1" in log, log


def test_matmul3_rows_makes_gro_losss_gemms_on_the_same_rows():
    from bench import cases, impls

    case = cases.CASES["grpo_ent"]
    shape = cases.Shape(64, 16, 300, 16, "float32")
    inp = cases.make_inputs(case, shape, "cpu", seed=0)
    rows = int(impls.counted_rows(inp).sum())
    assert 0 < rows < 64   # the mask drops some rows: the case this is about
    flops = {}
    for impl in ("matmul3_rows", "matmul3", "gro_loss_torch"):
        step = impls.build(impl, case, inp, "cpu")
        inp["hidden"].grad = inp["weight"].grad = None
        with GemmAudit() as audit:
            loss = step()
            if loss is not None:
                loss.backward()
        flops[impl] = audit.flops
    assert flops["matmul3_rows"] == flops["gro_loss_torch"] == 3 * 2 * rows * 16 * 300
    assert flops["matmul3"] == 3 * 2 * 64 * 16 * 300


@pytest.mark.parametrize("part", ["probe", "race"])
def test_gpu_probe_runs_end_to_end(tmp_path, part):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_probe.py"), part, "--dry-run",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads((tmp_path / f"{part}.json").read_text())
    assert doc["env"]["dry_run"] and "error" not in doc
    if part == "race":
        assert doc["ok"] and len(doc["configs"]) == 10 and all(c["repeats_differing_from_first"] == 0
                                                                for c in doc["configs"])
