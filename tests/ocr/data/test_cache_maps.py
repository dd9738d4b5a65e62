"""Precomputed maps: written by ``preprocess_data.py maps`` with the training run's key,
read by eval loaders (``load_maps``), verified, missing ones computed and counted."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from small_data import REPO, SMALL, VAL, compose_small, tiny_dataset

from ocr.data.batch import TARGET_KEYS
from ocr.data.datamodule import OCRDataModule
from ocr.data.maps import MapFiller


def _script():
    spec = importlib.util.spec_from_file_location("preprocess_data_maps_under_test", REPO / "scripts" / "preprocess_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pp = _script()


def compose_cfg(root, cache_dir, *overrides):
    return compose_small(root, f"{VAL}.cache_config.cache_dir={cache_dir}",
                         f"{VAL}.cache_config.cache_transformed_tensors=false", *overrides)


def val_batches(root, cache_dir, *overrides):
    dm = OCRDataModule(compose_cfg(root, cache_dir, *overrides), splits=("val",))
    dm.setup("fit")
    loader = dm.val_dataloader()
    return dm, loader, list(loader)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory, "m", seed=6, num_val=4)


@pytest.fixture(scope="module")
def computed(data, tmp_path_factory):
    """Targets the loader computes itself (no maps)."""
    _dm, loader, batches = val_batches(data, tmp_path_factory.mktemp("none"), f"{VAL}.load_maps=false")
    assert not isinstance(loader, MapFiller)
    return batches


def test_maps_written_by_the_cli_replace_on_the_fly_targets(data, computed, tmp_path, caplog):
    args = ["maps", "--split", "val", "--cache-dir", str(tmp_path), f"data.root={data}", *SMALL]
    assert pp.main(["-q", *args]) == 0
    entries = list((tmp_path / "maps").iterdir())
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    assert pp.main(["-q", *args]) == 0  # up to date: nothing rewritten
    assert list((tmp_path / "maps").iterdir()) == entries

    caplog.set_level(logging.INFO)
    dm, loader, batches = val_batches(data, tmp_path, f"{VAL}.load_maps=true", f"{VAL}.preload_maps=true")
    assert isinstance(loader, MapFiller) and "Preloaded 4/4 maps into RAM (100.0%)" in caplog.text
    assert "Fallback to on-the-fly generation" not in caplog.text
    for got, want in zip(batches, computed):
        for key in TARGET_KEYS:
            assert got[key].shape == want[key].shape and got[key].dtype == torch.float32
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
        assert torch.equal(got["images"], want["images"])
    assert dm.cache_stats()["val"]["maps"]["fallback"] == 0
    assert dm.cache_stats()["val"]["maps"]["loaded"] == 4


def test_a_damaged_map_is_computed_on_the_fly_and_counted(data, computed, tmp_path, caplog):
    assert pp.main(["-q", "maps", "--split", "val", "--cache-dir", str(tmp_path), f"data.root={data}", *SMALL]) == 0
    entry = next((tmp_path / "maps").iterdir())
    victim = entry / "000002.npz"
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0xFF  # same size, fails its checksum
    victim.write_bytes(bytes(raw))
    caplog.set_level(logging.INFO)
    dm, loader, batches = val_batches(data, tmp_path, f"{VAL}.load_maps=true", f"{VAL}.preload_maps=false",
                                      f"{VAL}.cache_config.cache_maps=false")
    assert "Fallback to on-the-fly generation: 1/4 samples (25.0%)" in caplog.text
    for got, want in zip(batches, computed):
        for key in TARGET_KEYS:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert dm.cache_stats()["val"]["maps"]["fallback"] == 1


def test_no_maps_for_the_key_means_full_fallback(data, computed, tmp_path, caplog):
    assert pp.main(["-q", "maps", "--split", "val", "--cache-dir", str(tmp_path), f"data.root={data}", *SMALL]) == 0
    caplog.set_level(logging.INFO)
    # another image size: the maps written above do not match, and the log says why
    _dm, loader, batches = val_batches(data, tmp_path, f"{VAL}.load_maps=true", "data.image_size=96")
    assert not isinstance(loader, MapFiller)
    assert "Fallback to on-the-fly generation: 4/4 samples (100.0%)" in caplog.text
    assert "transforms changed (image_size: 64 -> 96)" in caplog.text
    assert all(k in batches[0] for k in TARGET_KEYS)


def test_cli_refuses_bad_usage(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pp.main(["maps", "--split", "train", f"data.root={data}"])
    assert e.value.code == 2
    assert pp.main(["maps", "--split", "val", "data.image_sizee=3"]) == 2
    assert "error: config:" in capsys.readouterr().err
