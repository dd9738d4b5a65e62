"""Batch helpers: polygon lists that cross a process boundary cheaply and intact."""

from __future__ import annotations

import pickle

import numpy as np

from ocr.data.batch import PolygonList
from ocr.data.geometry import split_rows


def test_polygon_list_pickles_as_one_array_and_comes_back_intact():
    rng = np.random.default_rng(0)
    polys = PolygonList([rng.random((n, 2)).astype(np.float32) for n in (4, 5, 4, 12)])
    back = pickle.loads(pickle.dumps(polys))
    assert type(back) is PolygonList and len(back) == 4
    for a, b in zip(back, polys, strict=True):
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)
    # one array, not one per polygon: a receipt's 50 lines pickle to far fewer bytes (and objects)
    lines = PolygonList([rng.random((4, 2)).astype(np.float32) for _ in range(50)])
    assert len(pickle.dumps(lines)) < 0.75 * len(pickle.dumps(list(lines)))
    # empty, and mixed dtypes (kept as they are)
    assert pickle.loads(pickle.dumps(PolygonList())) == []
    mixed = pickle.loads(pickle.dumps(PolygonList([np.zeros((3, 2)), np.ones((4, 2), np.float32)])))
    assert [a.dtype for a in mixed] == [np.float64, np.float32]


def test_split_rows_matches_np_split():
    data = np.arange(40).reshape(20, 2)
    lengths = [3, 0, 7, 10]
    for got, want in zip(split_rows(data, lengths), np.split(data, np.cumsum(lengths)[:-1]), strict=True):
        assert np.array_equal(got, want)
