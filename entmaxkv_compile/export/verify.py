"""Check an exported ONNX file: validity, static shapes, ONNX Runtime (CPU) against the PyTorch reference."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils import _pytree as pytree

from .tensorrt import check_tensorrt_ready, static_shape_problems

# default absolute tolerance on floating outputs, by the reference output's dtype
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class OnnxReport:
    """What :func:`verify_onnx` found. ``ok`` when ``problems`` and ``tensorrt`` are both empty."""

    path: str
    opset: int
    op_counts: Counter[str]
    max_error: float  # largest |onnxruntime − reference| over the floating outputs
    selections_equal: bool  # integer outputs equal as sets along the last dim, bool outputs equal
    problems: list[str] = field(default_factory=list)  # checker, static shapes, numerics
    tensorrt: list[str] = field(default_factory=list)  # check_tensorrt_ready

    @property
    def ok(self) -> bool:
        return not self.problems and not self.tensorrt

    def __str__(self) -> str:
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.op_counts.items()))
        lines = [
            f"ONNX file        {self.path} (opset {self.opset}, {self.op_counts.total()} nodes)",
            f"operators        {ops}",
            f"checker + shapes {'ok' if not self.problems else 'see problems'}",
            f"onnxruntime CPU  max |error| {self.max_error:.2e} vs the PyTorch static reference; "
            f"selections {'identical' if self.selections_equal else 'DIFFER'}",
            f"TensorRT parser  {'ready' if not self.tensorrt else f'{len(self.tensorrt)} problem(s)'}"
            " (checked against its operator table; TensorRT itself never ran)",
        ]
        lines += [f"  problem: {p}" for p in self.problems + self.tensorrt]
        return "\n".join(lines)


def _compare(
    name: str, got: np.ndarray, want: torch.Tensor, atol: float | None
) -> tuple[float, bool, str | None]:
    """``(max error, selection equal, problem)`` for one output."""
    got_t = torch.from_numpy(got)
    if got_t.shape != want.shape:
        return 0.0, False, f"output {name}: shape {tuple(got_t.shape)} != reference {tuple(want.shape)}"
    if want.is_floating_point():
        err = (got_t.float() - want.float()).abs().max().item() if want.numel() else 0.0
        tol = ATOL[want.dtype] if atol is None else atol
        return err, True, None if err <= tol else f"output {name}: max |error| {err:.2e} > {tol:.0e}"
    if want.dtype == torch.bool:
        equal = torch.equal(got_t, want)
    else:  # id slots: order is unspecified
        equal = torch.equal(got_t.sort(-1).values, want.sort(-1).values)
    return 0.0, equal, None if equal else f"output {name}: selection differs from the reference"


def verify_onnx(
    path: str | PathLike[str],
    reference: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    atol: float | None = None,
) -> OnnxReport:
    """Check ``path`` with ``onnx.checker`` (full), strict shape inference (every dim static), TensorRT
    readiness, and ONNX Runtime (CPU) against ``reference(*args, **kwargs)`` (e.g. ``to_onnx(...).module()``).

    The ONNX inputs are the tensors of ``(args, kwargs)`` in flattening order. Floating outputs must agree
    within ``atol`` (default by dtype: fp32 ``1e-4``, fp16 ``1e-2``); integer outputs (page or token ids)
    must hold the same ids along the last dim, in any order; bool outputs must be equal.
    """
    model = onnx.load(str(path))
    problems = []
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        problems.append(f"onnx.checker: {err}")
    problems += static_shape_problems(model)

    inputs = [x for x in pytree.tree_leaves((args, kwargs or {})) if isinstance(x, torch.Tensor)]
    with torch.no_grad():
        expected = [
            x for x in pytree.tree_leaves(reference(*args, **(kwargs or {}))) if isinstance(x, torch.Tensor)
        ]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    outputs = session.run(None, feeds)
    max_error, selections_equal = 0.0, True
    if len(outputs) != len(expected):
        problems.append(f"{len(outputs)} ONNX outputs, {len(expected)} reference outputs")
    for meta, got, want in zip(session.get_outputs(), outputs, expected):
        err, equal, problem = _compare(meta.name, got, want, atol)
        max_error, selections_equal = max(max_error, err), selections_equal and equal
        problems += [problem] if problem else []
    return OnnxReport(
        path=str(path),
        opset=next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        op_counts=Counter(n.op_type for n in model.graph.node),
        max_error=max_error,
        selections_equal=selections_equal,
        problems=problems,
        tensorrt=check_tensorrt_ready(path),
    )
