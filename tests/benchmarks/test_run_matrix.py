"""Benchmark matrix: hardware probe, planner, cell reuse, report merging, one real cell."""

import csv
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import run_matrix  # noqa: E402
from matrix_plan import Cell, PlanError, PlannedCell, emulation_overrides, plan_cells  # noqa: E402
from matrix_report import add_speedups, figures_from_summary, markdown_table, merge_results, write_outputs  # noqa: E402

from ocr.data.synthetic import generate_dataset  # noqa: E402
from ocr.hardware import gpu_tier, probe  # noqa: E402


def test_probe_on_this_machine():
    info = probe()
    assert info.cpu_cores_usable >= 1 and info.cpu_cores_logical >= info.cpu_cores_usable
    assert info.ram_total_gb > 0.5
    if not info.torch_cuda_available:
        assert info.tier == "cpu-only" and "cores" in info.device
    assert gpu_tier(8) == "entry" and gpu_tier(12) == "mid" and gpu_tier(24) == "high" and gpu_tier(80) == "high"


def test_plan_without_cuda_skips_gpu_cells_and_uses_bf16():
    plan = plan_cells(cuda=False, dali=True)
    assert len(plan) == 3 * 2 * 2
    skipped = {p.cell.name: p.skip_reason for p in plan if p.skip_reason}
    assert set(skipped) == {f"dali-gpu_{p}_cache-{c}" for p in ("32-true", "bf16-mixed") for c in ("off", "on")}
    assert all("CUDA" in reason for reason in skipped.values())
    assert {p.cell.precision for p in plan} == {"32-true", "bf16-mixed"}
    assert all(p.note for p in plan if p.cell.precision == "bf16-mixed" and not p.skip_reason)
    assert [p for p in plan if p.cell.is_baseline][0].cell.name == "cpu_32-true_cache-off"


def test_plan_with_cuda_runs_everything_and_explicit_fp16_on_cpu_is_skipped():
    assert not [p for p in plan_cells(cuda=True, dali=True) if p.skip_reason]
    plan = plan_cells(["cpu"], ["16-mixed", "bf16-mixed"], ["off"], cuda=False, dali=True)
    assert [(p.cell.precision, bool(p.skip_reason)) for p in plan] == [("16-mixed", True), ("bf16-mixed", False)]
    assert "fp16" in plan[0].skip_reason
    assert all(p.skip_reason == "nvidia-dali is not installed" for p in plan_cells(["dali-cpu"], ["32-true"], ["on"], cuda=False, dali=False))
    with pytest.raises(PlanError):
        plan_cells(["tpu"], cuda=False, dali=True)


def test_cell_overrides_and_emulation():
    cell = Cell("dali-cpu", "32-true", "on")
    assert "loader.backend=dali" in cell.overrides() and "loader.device=cpu" in cell.overrides()
    assert "datasets.val_dataset.config.cache_config.cache_transformed_tensors=true" in cell.overrides()
    assert emulation_overrides("entry", 80.0)[-1] == "trainer.gpu_memory_fraction=0.1000"
    assert not any("fraction" in o for o in emulation_overrides("mid", None))


def _settings(*argv):
    return run_matrix._settings(run_matrix.build_parser().parse_args(list(argv)))


def test_quick_runs_three_epochs_once_and_flags_win():
    assert _settings("--quick") == (3, "3", "1", 1)  # epochs 1-2 are the steady state
    assert _settings("--quick", "--limit-train-batches", "2", "--repeats", "2") == (3, "2", "1", 2)
    assert _settings() == (3, "1.0", "1.0", 3)
    assert run_matrix.main(["--repeats", "0"]) == 2


VERSIONS = {"torch": "2.5.1", "dali": "1.44.0", "lightning": "2.4.0", "commit": "abc123", "dirty": False}


def _summary(epoch_seconds, started="2026-12-01T09:30:00+0000", hmean=0.5):
    """A finished run_summary.json with (train, val) seconds per epoch."""
    epochs = [{"epoch": i, "train_seconds": t, "val_seconds": v, "train_img_s": 24 / t, "train_batches": 3,
               "val_batches": 2} for i, (t, v) in enumerate(epoch_seconds)]
    return {"status": "finished", "started_at": started, "epochs": epochs,
            "final_metrics": {"val": {"cleval": {"hmean": hmean}, "iou": {"hmean": 0.4}}}}


def _finished_run(cells_dir, planned, common, versions, summary, repeat=0):
    run_dir = cells_dir / planned.key(common, versions, repeat)
    run_dir.mkdir(parents=True)
    (run_dir / "run_summary.json").write_text(json.dumps(summary))
    return run_dir


def test_finished_runs_are_reused_unless_forced(tmp_path):
    planned = PlannedCell(Cell("cpu", "32-true", "off"))
    common = ["trainer.max_epochs=3"]
    run_dir = _finished_run(tmp_path, planned, common, VERSIONS, _summary([(9.0, 3.0), (2.0, 1.0), (3.0, 1.0)]))
    run = run_matrix.run_cell(planned, common, tmp_path, versions=VERSIONS, timeout=5)
    assert run["status"] == "ok" and run["reused"] and run["started_at"] == "2026-12-01T09:30:00+0000"
    assert run["epoch_s_later"] == 3.5 and run["epoch_s_first"] == 12.0 and run["hmean"] == 0.5
    # the report marks the row as reused, with the date the run started
    row = {"tier": "t", "cell": planned.cell.name, "baseline": True, **run_matrix.cell_row([run])}
    add_speedups([row])
    assert "ok, reused 1/1 (run 2026-12-01 09:30)" in markdown_table([row])
    # --force: the finished run is dropped and the cell runs again (cut here at once by the timeout)
    forced = run_matrix.run_cell(planned, common, tmp_path, versions=VERSIONS, force=True, timeout=0)
    assert not forced.get("reused") and forced["status"] == "failed" and "timeout" in forced["reason"]
    assert forced["run_dir"] == str(run_dir) and not (run_dir / "run_summary.json").exists()
    assert "runners/train.py" in (run_dir / "command.txt").read_text()


@pytest.mark.parametrize("change", [{"commit": "def456"}, {"dirty": True}, {"torch": "2.6.0"}, {"dali": None}])
def test_a_new_code_or_library_version_is_not_reused(tmp_path, change):
    planned = PlannedCell(Cell("cpu", "32-true", "off"))
    common = ["trainer.max_epochs=3"]
    old_dir = _finished_run(tmp_path, planned, common, VERSIONS, _summary([(9.0, 3.0), (2.0, 1.0), (3.0, 1.0)]))
    assert planned.key(common, dict(VERSIONS)) == old_dir.name  # the key is stable for the same inputs
    # another version: another run folder, so a fresh run starts (cut here at once by the timeout)
    run = run_matrix.run_cell(planned, common, tmp_path, versions={**VERSIONS, **change}, timeout=0)
    assert not run.get("reused") and run["status"] == "failed" and "timeout" in run["reason"]
    assert run["run_dir"] != str(old_dir) and (old_dir / "run_summary.json").is_file()
    # other overrides or another repeat: another folder too
    assert planned.key(["trainer.max_epochs=4"], VERSIONS) != old_dir.name
    assert planned.key(common, VERSIONS, repeat=1) != old_dir.name


def test_steady_state_excludes_the_warm_up_epoch():
    figures = figures_from_summary(_summary([(20.0, 10.0), (4.0, 1.0), (6.0, 1.0)]))
    assert figures["epoch_s_first"] == 30.0 and figures["train_s_first"] == 20.0 and figures["val_s_first"] == 10.0
    assert figures["epoch_s_later"] == 6.0 and figures["train_s_later"] == 5.0 and figures["val_s_later"] == 1.0
    assert figures["img_s_later"] == pytest.approx((24 / 4 + 24 / 6) / 2)
    assert (figures["epochs"], figures["steady_epochs"], figures["train_batches"], figures["val_batches"]) == (3, 2, 3, 2)
    # one epoch: a warm-up only, no steady state to compare
    single = figures_from_summary(_summary([(20.0, 10.0)]))
    assert single["epoch_s_first"] == 30.0 and single["epoch_s_later"] is None
    # the speed-up compares steady states; the warm-up has its own
    base = {"tier": "t", "baseline": True, "status": "ok", **figures}
    fast = {"tier": "t", "baseline": False, "status": "ok",
            **figures_from_summary(_summary([(5.0, 5.0), (2.0, 1.0), (2.0, 1.0)]))}
    add_speedups([base, fast])
    assert fast["speedup"] == 2.0 and fast["speedup_first"] == 3.0 and base["speedup"] == 1.0


def test_repeats_give_median_and_spread():
    runs = [{"status": "ok", "reused": False, "run_dir": f"r{i}", "started_at": "2026-12-01T10:00:00",
             **figures_from_summary(_summary([(first, 0.0), (later, 0.0), (later, 0.0)], hmean=h))}
            for i, (first, later, h) in enumerate([(30.0, 10.0, 0.5), (40.0, 20.0, 0.7), (35.0, 12.0, 0.6)])]
    row = {"tier": "t", "cell": "dali-cpu_32-true_cache-on", "baseline": False, **run_matrix.cell_row(runs)}
    assert row["status"] == "ok" and row["repeats"] == 3 and not row["reused_dates"]
    assert (row["epoch_s_later"], row["epoch_s_later_min"], row["epoch_s_later_max"]) == (12.0, 10.0, 20.0)
    assert (row["epoch_s_first"], row["epoch_s_first_min"], row["epoch_s_first_max"]) == (35.0, 30.0, 40.0)
    assert row["hmean"] == 0.6 and len(row["runs"]) == 3 and row["steady_epochs"] == 2
    assert run_matrix.cell_row(runs[:2])["epoch_s_later"] == 15.0  # an even count: the middle two's mean
    base = {"tier": "t", "cell": "cpu_32-true_cache-off", "baseline": True, "status": "ok", "repeats": 1,
            "epoch_s_later": 24.0, "epoch_s_first": 70.0}
    add_speedups([base, row])
    assert (row["speedup"], row["speedup_low"], row["speedup_high"]) == (2.0, 1.2, 2.4)
    table = markdown_table([base, row])
    assert "| 12.0 (10.0..20.0) | 2.00x (1.20..2.40) | 35.0 (30.0..40.0) | 2.00x |" in table
    assert "| 3 x 2 ep x 3+2 b |" in table
    # one failed run fails the cell
    failed = run_matrix.cell_row([*runs, {"status": "failed", "reason": "exit 1: boom", "run_dir": "r3"}])
    assert failed["status"] == "failed" and failed["reason"] == "exit 1: boom"


def _rows(tier, base_s, fast_s):
    return [
        {"tier": tier, "cell": "cpu_32-true_cache-off", "baseline": True, "status": "ok", "epoch_s_first": 2 * base_s,
         "epoch_s_later": base_s, "stack": {"commit": "abc123", "torch": "2.5.1"}, "command": "run_matrix.py --quick"},
        {"tier": tier, "cell": "dali-gpu_16-mixed_cache-on", "baseline": False, "status": "ok",
         "epoch_s_first": base_s, "epoch_s_later": fast_s, "stack": {"commit": "abc123", "torch": "2.5.1"},
         "command": "run_matrix.py --quick"},
        {"tier": tier, "cell": "dali-cpu_32-true_cache-on", "baseline": False, "status": "skipped", "reason": "needs CUDA"},
    ]


def test_report_merges_two_machines(tmp_path):
    for name, base, fast in (("high", 100.0, 10.0), ("entry", 200.0, 50.0)):
        rows = _rows(name, base, fast)
        add_speedups(rows)
        write_outputs(tmp_path / name, rows, {"hardware_label": name, "command": "run_matrix.py --quick",
                                              "versions": {"commit": "abc123"}}, name)
    assert (tmp_path / "high" / "speedup.png").stat().st_size > 1000
    report = (tmp_path / "high" / "report.md").read_text()
    assert "- command: run_matrix.py --quick" in report and "abc123" in report
    with open(tmp_path / "high" / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert csv_rows[0]["stack.commit"] == "abc123" and csv_rows[0]["command"] == "run_matrix.py --quick"
    rows, headers = merge_results([tmp_path / "high", tmp_path / "entry"])
    assert len(rows) == 6 and {h["hardware_label"] for h in headers} == {"high", "entry"}
    add_speedups(rows)
    speedups = {(r["tier"], r["cell"]): (r["speedup"], r["speedup_first"]) for r in rows}
    assert speedups[("high", "dali-gpu_16-mixed_cache-on")] == (10.0, 2.0)
    assert speedups[("entry", "dali-gpu_16-mixed_cache-on")] == (4.0, 2.0)
    assert speedups[("entry", "dali-cpu_32-true_cache-on")] == (None, None)
    out = tmp_path / "merged"
    assert run_matrix.main(["report", str(tmp_path / "high"), str(tmp_path / "entry"), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "10.00x" in report and "4.00x" in report and "needs CUDA" in report
    assert (out / "speedup.png").is_file() and (out / "results.csv").is_file()
    assert run_matrix.main(["report", str(tmp_path / "nothing-here")]) == 2


@pytest.mark.slow
def test_tiny_real_cell_end_to_end_and_reused(tmp_path, capsys, monkeypatch):
    # the stack as it is now, for both matrix runs: a commit made meanwhile in this working tree would
    # (rightly) make the second run a fresh one
    versions = run_matrix.stack()
    monkeypatch.setattr(run_matrix, "stack", lambda: versions)
    root = tmp_path / "data"
    generate_dataset(root, num_train=4, num_val=2, num_test=2, seed=5, progress=False)
    args = ["--loaders", "cpu", "--precisions", "32-true", "--caches", "off", "--epochs", "2", "--repeats", "1",
            "--limit-train-batches", "1", "--limit-val-batches", "1", "--cells-dir", str(tmp_path / "cells"),
            f"data.root={root}", "data.image_size=128", "data.train_crop_size=128", "loader.batch_size=2",
            "loader.eval_batch_size=2", "loader.num_workers=0", "model.inner_channels=32"]

    def matrix(name):
        code = run_matrix.main([*args, "--out", str(tmp_path / name)])
        assert code == 0, capsys.readouterr().out
        data = json.loads((tmp_path / name / "results.json").read_text())
        assert len(data["rows"]) == 1
        return data, data["rows"][0], (tmp_path / name / "report.md").read_text()

    data, first, report = matrix("first")
    assert first["status"] == "ok" and first["speedup"] == 1.0 and first["speedup_first"] == 1.0
    assert first["epochs"] == 2 and first["steady_epochs"] == 1 and first["epoch_s_later"] > 0
    assert first["runs"][0]["reused"] is False and "| ok |" in report
    assert data["command"].startswith("benchmarks/run_matrix.py --loaders cpu") and data["versions"]["torch"]
    assert "| 1 x 1 ep x 1+1 b |" in report and (tmp_path / "first" / "speedup.png").is_file()

    _, again, report = matrix("again")
    assert again["runs"][0]["reused"] is True and again["epoch_s_later"] == first["epoch_s_later"]
    assert f"reused 1/1 (run {first['runs'][0]['started_at'][:16].replace('T', ' ')})" in report
