"""The sample record the DALI source hands on: one float64 vector, unpacked bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from dali_pipelines.source import pack_record, unpack_record
from ocr.data.targets import geometry_to_arrays, prepare_sample_geometry


def test_record_round_trip_is_exact():
    rng = np.random.default_rng(3)
    polys = [rng.uniform(-20, 700, size=(n, 2)).astype(np.float32) for n in (4, 7, 4)]
    polys[0] = np.array([[10.3, 20.1], [300.7, 22.9], [301.2, 60.4], [9.9, 58.0]], np.float32)
    ignore = [False, True, False]
    matrix = rng.normal(size=(3, 3))
    vertices = np.concatenate(polys)
    geom = geometry_to_arrays(prepare_sample_geometry(polys, ignore, 640, 640))
    assert len(geom[0]) > 0 and len(geom[2]) > 0
    record = pack_record(123456, matrix, vertices, np.array([4, 7, 4]), np.array(ignore), geom)
    out = unpack_record(record)
    assert out["index"] == 123456
    assert np.array_equal(out["matrix"], matrix)
    assert out["net_vertices"].dtype == np.float32 and np.array_equal(out["net_vertices"], vertices)
    assert out["lengths"].tolist() == [4, 7, 4] and out["ignore"].tolist() == ignore
    for got, want in zip(out["geometry"], geom, strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_record_without_polygons_or_targets_and_a_corrupt_one():
    record = pack_record(0, np.eye(3), np.zeros((0, 2), np.float32), np.zeros(0), np.zeros(0, bool))
    out = unpack_record(record)
    assert out["net_vertices"].shape == (0, 2) and out["lengths"].shape == (0,)
    assert [g.shape for g in out["geometry"]] == [(0, 2), (0, 4), (0, 6), (0, 3)]
    with pytest.raises(ValueError, match="header"):
        unpack_record(np.append(record, 1.0))
