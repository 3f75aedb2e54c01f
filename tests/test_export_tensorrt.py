"""TensorRT readiness checker on hand-built ONNX graphs (TensorRT itself is not installable here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from entmaxkv_compile.export import check_tensorrt_ready, register_torch_tensorrt


def _save(
    tmp_path: Path, nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], x_shape: list, opset: int = 20
) -> Path:
    """A graph ``x[x_shape] → nodes → y`` (float), with ``inits`` as initializers."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def _topk(k: int, sorted_: int = 1) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    return [helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=-1, sorted=sorted_)], {"k": np.array([k])}


def test_a_static_topk_graph_is_ready(tmp_path: Path) -> None:
    assert check_tensorrt_ready(_save(tmp_path, *_topk(8), [2, 5000])) == []


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("k_too_large", "K=3840 must be less than 3840"),
        ("unsorted", "sorted must be 1"),
        ("k_not_constant", "input K must be a build-time constant"),
        ("cumsum_axis", "input axis must be a build-time constant"),
        ("nonzero", "control flow / data-dependent shape"),
        ("unique", "control flow / data-dependent shape"),
        ("det", "not supported by TensorRT's ONNX parser"),
        ("custom", "custom domain 'trt' needs a TensorRT plugin"),
        ("dynamic", "dynamic shape ['batch', 5000]"),
        ("opset", "opset 25: TensorRT parses opsets 9–24"),
    ],
)
def test_problems_are_reported(case: str, expected: str, tmp_path: Path) -> None:
    shape: list = [2, 5000]
    opset = 20
    nodes, inits = _topk(8)
    if case == "k_too_large":
        nodes, inits = _topk(3840)
    elif case == "unsorted":
        nodes, inits = _topk(8, sorted_=0)
    elif case == "k_not_constant":
        nodes = [helper.make_node("Shape", ["x"], ["k"], start=1), *nodes]
        inits = {}
    elif case == "cumsum_axis":
        nodes = [
            helper.make_node("Shape", ["x"], ["a"], start=0, end=1),
            helper.make_node("CumSum", ["x", "a"], ["y"]),
        ]
    elif case == "nonzero":
        nodes = [helper.make_node("NonZero", ["x"], ["i"]), helper.make_node("Identity", ["x"], ["y"])]
    elif case == "unique":
        nodes = [helper.make_node("Unique", ["x"], ["y"])]
    elif case == "det":
        shape, nodes = [2, 3, 3], [helper.make_node("Det", ["x"], ["y"])]
    elif case == "custom":
        nodes = [helper.make_node("EntmaxKVPageSelect", ["x"], ["y"], domain="trt")]
    elif case == "dynamic":
        shape = ["batch", 5000]
    elif case == "opset":
        opset = 25
    problems = check_tensorrt_ready(_save(tmp_path, nodes, inits, shape, opset))
    assert any(expected in p for p in problems), problems


def test_torch_tensorrt_registration_needs_torch_tensorrt() -> None:
    """Here torch_tensorrt is absent (it needs CUDA torch and TensorRT's libraries): nothing is registered."""
    if importlib.util.find_spec("torch_tensorrt") is not None:
        pytest.skip(
            "torch_tensorrt is installed; the registration itself is exercised by examples/tensorrt_build.py"
        )
    assert register_torch_tensorrt() is False
