"""Cache keys: every component changes the key and names itself as the reason."""

from __future__ import annotations

import json
import os
import shutil

import cv2
import numpy as np
import pytest
from small_data import VAL, compose_small, tiny_dataset

from ocr.data import cache_key
from ocr.data.datamodule import OCRDataModule


def compose_cfg(root, *overrides):
    return compose_small(root, f"{VAL}.load_maps=false", *overrides)


def key_of(root, *overrides, num_batches=2):
    dm = OCRDataModule(compose_cfg(root, *overrides), splits=("val",))
    dm.setup("fit")
    return dm.tensor_key("val", num_batches)


@pytest.fixture(scope="module")
def data_a(tmp_path_factory):
    return tiny_dataset(tmp_path_factory, "a", seed=1, num_val=4)


@pytest.fixture(scope="module")
def data_b(tmp_path_factory):
    return tiny_dataset(tmp_path_factory, "b", seed=2, num_val=4)


@pytest.fixture(scope="module")
def base_key(data_a):
    return key_of(data_a)


def test_same_inputs_same_key(data_a, base_key):
    again = key_of(data_a)
    assert again.hexdigest == base_key.hexdigest
    assert again.changes_since(base_key) == []
    assert set(base_key.components) == set(cache_key.COMPONENTS)


@pytest.mark.parametrize("overrides, num_batches, reason", [
    (["data.image_size=96"], 2, "transforms changed (image_size: 64 -> 96"),
    (["data.mean=[0.5,0.5,0.5]"], 2, "transforms changed (mean"),
    (["data.reduced_decode=false"], 2, "transforms changed (reduced_decode"),
    (["data.targets.shrink_ratio=0.5"], 2, "targets changed (shrink_ratio: 0.4 -> 0.5)"),
    (["data.targets.min_text_size=4"], 2, "targets changed (min_text_size"),
    (["loader.eval_batch_size=3"], 2, "loader changed (batch_size: 2 -> 3)"),
    (["loader.targets=reference"], 2, "loader changed (targets: vectorized -> reference)"),
    ([], 1, "loader changed (num_batches: 2 -> 1)"),
])
def test_each_parameter_changes_the_key(data_a, base_key, overrides, num_batches, reason):
    key = key_of(data_a, *overrides, num_batches=num_batches)
    assert key.hexdigest != base_key.hexdigest
    reasons = key.changes_since(base_key)
    assert len(reasons) == 1 and reasons[0].startswith(reason), reasons


def test_transforms_version_and_format_version_are_in_the_key(data_a, base_key, monkeypatch):
    assert base_key.components["transforms"]["transforms_version"] >= 1
    monkeypatch.setattr("ocr.data.datamodule.FORMAT_VERSION", cache_key.FORMAT_VERSION + 1)
    key = key_of(data_a)
    assert key.changes_since(base_key) == [f"cache format changed (format_version: {cache_key.FORMAT_VERSION} -> "
                                           f"{cache_key.FORMAT_VERSION + 1})"]
    monkeypatch.undo()
    import ocr.data.transforms as T

    params = T.TransformParams().describe()
    monkeypatch.setattr(T, "TRANSFORMS_VERSION", T.TRANSFORMS_VERSION + 1)
    assert T.TransformParams().describe() != params
    monkeypatch.undo()
    assert base_key.components["targets"]["targets_version"] >= 1
    monkeypatch.setattr("ocr.data.datamodule.TARGETS_VERSION", base_key.components["targets"]["targets_version"] + 1)
    assert key_of(data_a).changes_since(base_key)[0].startswith("targets changed (targets_version")


def test_switching_image_path_to_another_dataset(data_a, data_b, base_key):
    # A's annotations on B's images: words that fall outside B's smaller images are skipped
    # (they would stop the run with on_error=raise); only the image folder differs between the keys.
    skip = f"{VAL}.on_error=skip"
    key = key_of(data_a, skip, f"datasets.val_dataset.config.image_path={data_b}/images/val")
    reasons = key.changes_since(key_of(data_a, skip))
    assert reasons and reasons[0].startswith("dataset changed (image folder"), reasons
    # and the whole other dataset: images and annotations both differ
    other = key_of(data_b)
    assert {r.split(" ")[0] for r in other.changes_since(base_key)} == {"dataset", "annotations"}


def test_editing_annotations_or_one_image(data_a, base_key, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(data_a, root, copy_function=shutil.copy2)  # same mtimes, same content
    same_content = key_of(root)
    # a copy elsewhere is another folder (stat mode keys on it); content is the same
    assert [r.split(" ")[0] for r in same_content.changes_since(base_key)] == ["dataset"]

    ann = root / "jsons" / "val.json"
    doc = json.loads(ann.read_text())
    first = sorted(doc["images"])[0]
    word = next(iter(doc["images"][first]["words"].values()))
    word["points"][0][0] += 1
    ann.write_text(json.dumps(doc))
    edited = key_of(root)
    assert edited.changes_since(same_content) == ["annotations changed"]

    img = root / "images" / "val" / first
    pixels = cv2.imread(str(img))
    pixels[:8, :8] = 255 - pixels[:8, :8]
    cv2.imwrite(str(img), pixels)
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    changed = key_of(root)
    assert changed.changes_since(edited) == ["dataset changed (image files differ: size or modification time)"]


def test_content_hash_sees_edits_that_keep_size_and_mtime(data_a, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(data_a, root, copy_function=shutil.copy2)
    before_stat = key_of(root)
    before_content = key_of(root, "datasets.val_dataset.config.cache_config.content_hash=true")
    assert before_content.components["dataset"]["mode"] == "content"
    assert "image_dir" not in before_content.components["dataset"]  # content keys do not depend on the folder

    img = root / "images" / "val" / "val_00001.jpg"
    st = img.stat()
    data = bytearray(img.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    img.write_bytes(bytes(data))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old modification time

    assert key_of(root).hexdigest == before_stat.hexdigest  # the documented limit of the cheap fingerprint
    after = key_of(root, "datasets.val_dataset.config.cache_config.content_hash=true")
    assert after.changes_since(before_content) == ["dataset changed (image files differ: content)"]


def test_manifest_round_trip_keeps_the_key(base_key):
    again = cache_key.CacheKey.from_manifest(json.loads(json.dumps(base_key.to_manifest())))
    assert again.hexdigest == base_key.hexdigest
    assert np.all([again.digests[k] == base_key.digests[k] for k in base_key.digests])
