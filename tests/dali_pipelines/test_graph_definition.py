"""Both DALI graphs defined with ``device="gpu"`` on every commit, no CUDA needed.

Defining a graph (what ``@pipeline_def`` does when called) runs DALI's definition-time
checks: argument names and types against each operator's schema, operator placement (a
``mixed``/``gpu`` operator fed from the wrong device), and named argument inputs on the CPU.
Only ``Pipeline.build()`` needs CUDA (it creates the executor and fails without a driver), so
the GPU graphs are checked here as far as anything can be without a GPU; what only a build
checks (the dtype and shape of the data that arrives, memory) is left to
``tests/dali_pipelines/test_gpu.py`` on a GPU machine.
"""

from __future__ import annotations

import pytest
from nvidia.dali import Pipeline

from dali_pipelines import graphs
from dali_pipelines.graphs import OUTPUTS, build_pipeline
from dali_pipelines.source import DaliBatchSource, EpochControl
from ocr.data.sampling import EpochPlan
from ocr.data.transforms import TransformParams

GRAPHS = {"eval": (graphs.eval_graph, False), "train": (graphs.train_graph, True)}


@pytest.fixture
def callback(request, train_source, val_source):
    """The graphs' external-source callback over the tiny dataset (never called: nothing runs)."""
    made = []

    def make(train: bool) -> tuple[DaliBatchSource, TransformParams]:
        source = train_source if train else val_source
        params = TransformParams(image_size=64, train=train)
        control = EpochControl()
        made.append(control)
        return DaliBatchSource(source, params, EpochPlan(len(source), 2, shuffle=train), control), params

    yield make
    for control in made:
        control.close()


def _define(graph_fn, callback, params, device: str, parallel: bool = True):
    """``graph_fn``'s outputs inside a pipeline that is never built (``device_id=None``: a
    pipeline that needs a GPU is refused only at build time)."""
    pipe = Pipeline(batch_size=2, num_threads=1, device_id=None, prefetch_queue_depth=2, seed=0,
                    py_num_workers=1, py_start_method="spawn")
    with pipe:
        outputs = graph_fn(callback, params, device=device, parallel=parallel)
        pipe.set_outputs(*outputs)
    return pipe, outputs


def _pixel_path(node) -> list:
    """The nodes from an output back to the graph's input along each operator's first input."""
    path = [node]
    while node.source is not None and getattr(node.source, "inputs", None):
        node = node.source.inputs[0]
        path.append(node)
    return path


@pytest.mark.parametrize("split", list(GRAPHS))
def test_gpu_graph_defines_with_pixels_on_the_gpu(split, callback):
    graph_fn, train = GRAPHS[split]
    source, params = callback(train)
    _, outputs = _define(graph_fn, source, params, "gpu")
    named = dict(zip(OUTPUTS, outputs, strict=True))
    assert named["images"].device == "gpu"
    # the loader reads every other output on the host (as_array / numpy)
    assert {name: node.device for name, node in named.items() if name != "images"} == {
        name: "cpu" for name in OUTPUTS if name != "images"}
    # decode (mixed) and every pixel operator after it run on the GPU: only the encoded
    # bytes at the start of the path are on the host
    path = _pixel_path(named["images"])
    assert len(path) >= 4, [n.name for n in path]
    assert [n.device for n in path[:-1]] == ["gpu"] * (len(path) - 1), [(n.name, n.device) for n in path]
    assert path[-1].device == "cpu"


@pytest.mark.parametrize("split", list(GRAPHS))
def test_cpu_graph_defines_on_the_cpu(split, callback):
    graph_fn, train = GRAPHS[split]
    source, params = callback(train)
    _, outputs = _define(graph_fn, source, params, "cpu")
    assert [node.device for node in outputs] == ["cpu"] * len(OUTPUTS)


@pytest.mark.parametrize("split", list(GRAPHS))
@pytest.mark.parametrize("device_id", [None, 0])
def test_build_pipeline_defines_the_gpu_pipelines(split, device_id, callback):
    """The loader's entry point, with the arguments the GPU loader passes (parallel external
    source, a device id), up to the point where CUDA would be needed."""
    _, train = GRAPHS[split]
    source, params = callback(train)
    pipe = build_pipeline(source, params, "gpu", batch_size=2, num_threads=2, device_id=device_id, parallel=True,
                          py_num_workers=2)
    assert isinstance(pipe, Pipeline)
    if device_id is None and hasattr(pipe, "_init_pipeline_backend"):
        # DALI's Python graph and its backend operators (schema checks of every operator's
        # spec in C++); private API, so only where this DALI version has it
        pipe._build_graph()
        pipe._init_pipeline_backend()


def _one_input_on_gpu(monkeypatch, name: str) -> None:
    real = graphs._inputs

    def inputs(*args, **kwargs):
        nodes = real(*args, **kwargs)
        return {key: (node.gpu() if key == name else node) for key, node in nodes.items()}

    monkeypatch.setattr(graphs, "_inputs", inputs)


@pytest.mark.parametrize(("split", "argument_input"), [("eval", "resize_size"), ("eval", "resize_roi"),
                                                       ("train", "warp"), ("train", "jitter")])
def test_an_argument_input_on_the_gpu_is_refused_at_definition(split, argument_input, callback, monkeypatch):
    """The check this file relies on is live: a per-sample argument (resize size, warp
    matrix, jitter factors) moved to the GPU fails when the graph is defined, not on a GPU
    machine at run time."""
    if not hasattr(graphs, "_inputs"):
        pytest.skip("graphs._inputs is gone: adapt the fault injection")
    graph_fn, train = GRAPHS[split]
    source, params = callback(train)
    _one_input_on_gpu(monkeypatch, argument_input)
    with pytest.raises((ValueError, RuntimeError), match="(?i)argument.*must be on CPU"):
        _define(graph_fn, source, params, "gpu")


def test_decoder_input_on_the_gpu_is_refused_at_definition(callback, monkeypatch):
    """Operator placement: the mixed decoder reads host bytes only."""
    if not hasattr(graphs, "_inputs"):
        pytest.skip("graphs._inputs is gone: adapt the fault injection")
    source, params = callback(False)
    _one_input_on_gpu(monkeypatch, "encoded")
    with pytest.raises(RuntimeError, match="(?i)incompatible device"):
        _define(graphs.eval_graph, source, params, "gpu")
