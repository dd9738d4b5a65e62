"""scripts/cache_manager.py on a real cache directory written by the training code and
by ``preprocess_data.py maps``: status, health, validate, clear; exit codes."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ocr.config import register_configs
from ocr.data.cache import tree_size
from ocr.data.datamodule import OCRDataModule
from ocr.data.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[2]
VAL = "datasets.val_dataset.config"
COMMON = ["data.image_size=64", "data.targets.min_text_size=3", "loader.eval_batch_size=2", "loader.batch_size=2",
          "loader.num_workers=0", "loader.backend=cpu", "loader.device=cpu"]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cm = _load("cache_manager")
pp = _load("preprocess_data")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cm") / "receipts"
    generate_dataset(root, num_train=1, num_val=3, num_test=1, seed=8, progress=False)
    return root


@pytest.fixture
def cache(data, tmp_path):
    """A cache dir with one tensors entry (training code, store=disk), one maps entry
    (preprocess_data.py maps) and the leftovers of an interrupted write."""
    cache_dir = tmp_path / "cache"
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose(config_name="train", overrides=[
            f"data.root={data}", *COMMON, f"{VAL}.cache_config.store=disk", f"{VAL}.cache_config.cache_dir={cache_dir}",
            f"{VAL}.load_maps=false", "output_dir=/tmp/unused"])
    dm = OCRDataModule(cfg, splits=("val",))
    dm.setup("fit")
    list(dm.val_dataloader())
    assert pp.main(["-q", "maps", "--split", "val", "--cache-dir", str(cache_dir), f"data.root={data}", *COMMON]) == 0
    orphan = cache_dir / "tensors" / ".tmp-val-0123456789abcdef-999-xyz"
    orphan.mkdir()
    (orphan / "batch_00000.pt").write_bytes(b"x" * 1000)
    return cache_dir


def run(capsys, *argv) -> tuple[int, str]:
    code = cm.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def entries(cache_dir, kind):
    return [p for p in (cache_dir / kind).iterdir() if not p.name.startswith(".")]


def test_status_lists_entries(cache, data, capsys):
    code, out = run(capsys, "--cache-dir", cache, "status")
    assert code == 0
    assert "2 entries" in out
    lines = out.splitlines()
    assert any(line.startswith("tensors  val") and "2 batches/3 img" in line and str(data / "images" / "val") in line
               for line in lines), out
    assert any(line.startswith("maps     val") and "3 samples" in line for line in lines), out
    assert "temporary directory of an interrupted write" in out
    code, out = run(capsys, "status", "--cache-dir", cache.parent / "nothing-here")
    assert code == 0 and "no cache entries on disk" in out
    # where the default store's batches are, and how to keep them
    assert "(cache_config.store=auto) keeps the validation batches in memory" in out and "for the length of the run" in out
    assert "datasets.val_dataset.config.cache_config.store=disk" in out and "preprocess_data.py maps" in out


def test_health_finds_orphans_corruption_and_stale_entries(cache, data, capsys):
    code, out = run(capsys, "--cache-dir", cache, "health")
    assert code == 1 and "orphan:" in out and "interrupted write" in out
    assert "1 problems" in out

    code, out = run(capsys, "--cache-dir", cache, "clear", "--stale")
    assert code == 0 and "removed" in out and ".tmp-val" in out
    code, out = run(capsys, "--cache-dir", cache, "health")
    assert code == 0 and "0 problems" in out

    # a file goes missing: corrupt
    tensors = entries(cache, "tensors")[0]
    (tensors / "batch_00001.pt").unlink()
    code, out = run(capsys, "--cache-dir", cache, "health")
    assert code == 1 and f"corrupt: {tensors}: batch_00001.pt: missing" in out

    # the dataset changes on disk after the maps were written: stale
    img = data / "images" / "val" / "val_00000.jpg"
    st = img.stat()
    try:
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        code, out = run(capsys, "--cache-dir", cache, "health")
        maps = entries(cache, "maps")[0]
        assert code == 1 and f"stale: {maps}: dataset changed since the entry was written" in out
    finally:
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_validate_checks_every_checksum(cache, capsys):
    code, out = run(capsys, "--cache-dir", cache, "validate")
    assert code == 0 and "2/2 entries pass" in out
    victim = entries(cache, "tensors")[0] / "batch_00000.pt"
    data = bytearray(victim.read_bytes())
    data[100] ^= 1  # same size: only the checksum can tell
    victim.write_bytes(bytes(data))
    code, out = run(capsys, "--cache-dir", cache, "health", "--quick")  # sizes only: only the orphan
    assert code == 1 and "checksum" not in out and "1 problems" in out
    code, out = run(capsys, "--cache-dir", cache, "health")
    assert code == 1 and "batch_00000.pt: checksum mismatch" in out
    code, out = run(capsys, "--cache-dir", cache, "validate")
    assert code == 1 and "batch_00000.pt: checksum mismatch" in out and "1/2 entries pass" in out


def test_clear_dry_run_type_and_all_really_free_space(cache, capsys):
    before = tree_size(cache)
    code, out = run(capsys, "--cache-dir", cache, "clear", "--type", "maps", "--dry-run")
    assert code == 0 and "would remove" in out and tree_size(cache) == before
    maps_size = tree_size(entries(cache, "maps")[0])
    code, out = run(capsys, "--cache-dir", cache, "clear", "--type", "maps")
    assert code == 0 and f"({maps_size} bytes)" in out
    assert entries(cache, "maps") == [] and tree_size(cache) == before - maps_size
    code, out = run(capsys, "--cache-dir", cache, "clear", "--all")
    assert code == 0 and "freed" in out
    assert tree_size(cache) == 0
    code, out = run(capsys, "--cache-dir", cache, "clear", "--all")
    assert code == 0 and "nothing to clear" in out


def test_usage_and_io_errors_exit_2(cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cm.main(["--cache-dir", str(cache), "clear"])  # what to clear is required
    assert e.value.code == 2
    capsys.readouterr()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, out = run(capsys, "--cache-dir", a_file, "status")
    assert code == 2 and out.strip().startswith("error:") and len(out.strip().splitlines()) == 1
