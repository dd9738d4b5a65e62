"""benchmarks/gpu_check.sh's mechanism on the CPU (--dry-run): the stack record, per-step
cut-offs inside a total budget, and the packing into at most 4 files under $OUT. The steps are
the script's self-test steps (a step that sleeps past its cut-off, one that prints), so this
takes seconds; the full dry run (every step with CPU substitutes) is in the README."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "work"), "DATA": str(tmp_path / "data")}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, out


def _packed(out: Path) -> dict:
    entries = sorted(out.iterdir())
    assert len(entries) <= 4 and all(e.is_file() for e in entries), entries
    assert {e.name for e in entries} == {"gpu_check.log", "results.json", "results.tar.gz"}
    return json.loads((out / "results.json").read_text())


def test_cut_step_is_reported_and_the_next_step_runs(tmp_path):
    proc, out = _run(tmp_path, "--budget", "90", "--steps", "stack,selftest_slow,selftest_ok", "--cap", "selftest_slow=3")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one step not ok: the cut one
    doc = _packed(out)
    assert doc["mode"] == "dry-run" and doc["finished"] and doc["budget_s"] == 90
    steps = {s["name"]: s for s in doc["steps"]}
    assert [s["name"] for s in doc["steps"]] == ["stack", "selftest_slow", "selftest_ok"]
    assert steps["stack"]["status"] == "ok"
    slow = steps["selftest_slow"]
    assert slow["status"] == "cut" and slow["exit"] in (124, 137) and slow["timeout_s"] == 3
    assert 2.5 <= slow["seconds"] < 3 + 5 + 2  # SIGTERM at the cut-off (SIGKILL 5 s later at worst)
    assert steps["selftest_ok"]["status"] == "ok" and steps["selftest_ok"]["log_tail"] == ["selftest_ok: ran"]
    assert doc["summary"]["steps"] == {"stack": "ok", "selftest_slow": "cut", "selftest_ok": "ok"}

    # the machine's stack, as the interpreter that ran the steps sees it
    stack = doc["stack"]
    assert stack["versions"]["torch"]["version"] == torch.__version__
    assert stack["executable"] and stack["python"] == sys.version.split()[0]
    assert stack["cuda"]["available"] == torch.cuda.is_available() == stack["cuda_available"]
    assert "torch_cuda_build" in stack["cuda"] and "nvidia.dali" in stack["versions"]

    # logs as they happen: what the cut step printed before it was killed is in the log
    log = (out / "gpu_check.log").read_text()
    assert "selftest_slow: sleeping past the cut-off" in log
    assert "=== selftest_slow: cut" in log and "=== selftest_ok: ok" in log
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./results/stack.json", "./logs/selftest_slow.log", "./logs/selftest_ok.log"} <= names


def test_total_budget_cuts_a_step_and_skips_what_no_longer_fits(tmp_path):
    # 27 s of budget - 15 s reserve for packing - 5 s kill grace: the slow step (cap 100) gets 7 s
    proc, out = _run(tmp_path, "--budget", "27", "--steps", "selftest_slow,selftest_ok", "--cap", "selftest_slow=100")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    steps = {s["name"]: s for s in _packed(out)["steps"]}
    assert steps["selftest_slow"]["status"] == "cut" and steps["selftest_slow"]["timeout_s"] <= 7
    assert steps["selftest_ok"]["status"] == "skipped" and "budget" in steps["selftest_ok"]["note"]


def test_unknown_step_is_refused(tmp_path):
    proc, _ = _run(tmp_path, "--steps", "stack,nope")
    assert proc.returncode == 2 and "unknown step nope" in proc.stderr
