"""Benchmark matrix: hardware probe, planner, cell reuse, report merging, one real cell."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import run_matrix  # noqa: E402
from matrix_plan import Cell, PlanError, PlannedCell, emulation_overrides, plan_cells  # noqa: E402
from matrix_report import add_speedups, merge_results, write_outputs  # noqa: E402

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


def test_finished_cells_are_reused_unless_forced(tmp_path):
    planned = PlannedCell(Cell("cpu", "32-true", "off"))
    common = ["trainer.max_epochs=1"]
    run_dir = tmp_path / planned.key(common)
    run_dir.mkdir()
    summary = {"status": "finished", "epochs": [{"train_seconds": 2.0, "val_seconds": 1.0, "train_img_s": 4.0}],
               "final_metrics": {"val": {"cleval": {"hmean": 0.5}, "iou": {"hmean": 0.4}}}}
    (run_dir / "run_summary.json").write_text(json.dumps(summary))
    row = run_matrix.run_cell(planned, common, tmp_path, force=False, timeout=5)
    assert row["status"] == "ok" and row["reused"] and row["epoch_s"] == 3.0 and row["hmean"] == 0.5
    # another override set is another cell: nothing to reuse
    assert planned.key(common) != planned.key(["trainer.max_epochs=2"])


def _rows(tier, base_s, fast_s):
    return [
        {"tier": tier, "cell": "cpu_32-true_cache-off", "baseline": True, "status": "ok", "epoch_s": base_s, "epoch_s_later": base_s},
        {"tier": tier, "cell": "dali-gpu_16-mixed_cache-on", "baseline": False, "status": "ok", "epoch_s": fast_s, "epoch_s_later": fast_s / 2},
        {"tier": tier, "cell": "dali-cpu_32-true_cache-on", "baseline": False, "status": "skipped", "reason": "needs CUDA"},
    ]


def test_report_merges_two_machines(tmp_path):
    for name, base, fast in (("high", 100.0, 10.0), ("entry", 200.0, 50.0)):
        rows = _rows(name, base, fast)
        add_speedups(rows)
        write_outputs(tmp_path / name, rows, {"hardware_label": name}, name)
    assert (tmp_path / "high" / "speedup.png").stat().st_size > 1000
    rows, headers = merge_results([tmp_path / "high", tmp_path / "entry"])
    assert len(rows) == 6 and {h["hardware_label"] for h in headers} == {"high", "entry"}
    add_speedups(rows)
    speedups = {(r["tier"], r["cell"]): r["speedup"] for r in rows}
    assert speedups[("high", "dali-gpu_16-mixed_cache-on")] == 10.0
    assert speedups[("entry", "dali-gpu_16-mixed_cache-on")] == 4.0
    assert speedups[("entry", "dali-cpu_32-true_cache-on")] is None
    out = tmp_path / "merged"
    assert run_matrix.main(["report", str(tmp_path / "high"), str(tmp_path / "entry"), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "10.00x" in report and "4.00x" in report and "needs CUDA" in report
    assert (out / "speedup.png").is_file() and (out / "results.csv").is_file()
    assert run_matrix.main(["report", str(tmp_path / "nothing-here")]) == 2


def test_one_tiny_real_cell_end_to_end(tmp_path, capsys):
    root = tmp_path / "data"
    generate_dataset(root, num_train=4, num_val=2, num_test=2, seed=5, progress=False)
    out = tmp_path / "results"
    code = run_matrix.main([
        "--loaders", "cpu", "--precisions", "32-true", "--caches", "off", "--epochs", "1",
        "--limit-train-batches", "1", "--limit-val-batches", "1", "--out", str(out), "--cells-dir", str(tmp_path / "cells"),
        f"data.root={root}", "data.image_size=128", "data.train_crop_size=128", "loader.batch_size=2",
        "loader.eval_batch_size=2", "loader.num_workers=0",
    ])
    assert code == 0, capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["speedup"] == 1.0
    assert rows[0]["train_s"] > 0 and rows[0]["epochs"] == 1
    assert "cpu_32-true_cache-off" in (out / "report.md").read_text()
    assert (out / "speedup.png").is_file()
