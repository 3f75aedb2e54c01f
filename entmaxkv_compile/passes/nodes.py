"""A small vocabulary over Dynamo-IR nodes, so the matcher reads ``kind(node) == "matmul"`` instead of
enumerating ``torch.matmul``, ``operator.matmul``, ``Tensor.matmul``, ``torch.bmm`` …

Dynamo IR keeps the user's spelling: free functions (``call_function``), tensor methods
(``call_method``), Python operators, ``getattr(x, "mT")``.  :func:`kind` maps each spelling to one name;
:func:`view_fn` turns a layout op into a function on :class:`~.layout.Chain` layouts, or returns
``None`` when the op is not a pure relayout (then the walk that met it stops there: that node is the
base tensor of the view).
"""

from __future__ import annotations

import builtins
import operator
import os
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from . import layout
from .layout import Dims, Splitter

_FUNCTIONS: dict[Any, str] = {
    torch.matmul: "matmul",
    operator.matmul: "matmul",
    torch.bmm: "matmul",
    torch.einsum: "einsum",
    torch.functional.einsum: "einsum",
    operator.mul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    torch.div: "div",
    torch.true_divide: "div",
    operator.add: "add",
    torch.add: "add",
    operator.sub: "sub",
    torch.sub: "sub",
    torch.masked_fill: "masked_fill",
    torch.where: "where",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.swapdims: "transpose",
    torch.permute: "permute",
    torch.movedim: "movedim",
    torch.moveaxis: "movedim",
    torch.reshape: "view",
    torch.flatten: "view",
    torch.unflatten: "view",
    torch.squeeze: "view",
    torch.unsqueeze: "view",
    torch.clone: "view",
    torch.repeat_interleave: "repeat_interleave",
    torch.tile: "tile",
    F.dropout: "dropout",
    torch.dropout: "dropout",
    torch.softmax: "softmax",
    F.softmax: "softmax",
    torch._C._nn.scaled_dot_product_attention: "sdpa",
    F.scaled_dot_product_attention: "sdpa",
    operator.getitem: "getitem",
    builtins.getattr: "getattr",
}
_METHODS: dict[str, str] = {
    "matmul": "matmul",
    "bmm": "matmul",
    "__matmul__": "matmul",
    "mul": "mul",
    "div": "div",
    "true_divide": "div",
    "add": "add",
    "sub": "sub",
    "masked_fill": "masked_fill",
    "transpose": "transpose",
    "swapaxes": "transpose",
    "swapdims": "transpose",
    "permute": "permute",
    "movedim": "movedim",
    "moveaxis": "movedim",
    "expand": "expand",
    "expand_as": "expand",
    "repeat_interleave": "repeat_interleave",
    "repeat": "tile",
    "tile": "tile",
    "softmax": "softmax",
    **dict.fromkeys(
        ("view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze"), "view"
    ),
    **dict.fromkeys(("contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "type_as"), "view"),
}
# Kinds that never change values, only layout (or dtype); "dropout" joins them when inactive.
VIEW_KINDS = frozenset({"view", "transpose", "permute", "movedim", "expand", "repeat_interleave", "tile"})
PRODUCT_KINDS = frozenset({"matmul", "einsum"})


def kind(node: fx.Node) -> str | None:
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverloadPacket | torch._ops.OpOverload):
            return _op_kind(node.target)
        name = _FUNCTIONS.get(node.target)
        if name == "getitem":
            return "view" if _is_view_index(node) else None
        if name == "getattr":
            return "transpose" if node.args[1] in ("mT", "T") else None
        return name
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def _op_kind(op: Any) -> str | None:
    name = str(op.name() if isinstance(op, torch._ops.OpOverload) else op._qualified_op_name)
    return {"entmaxkv::entmax": "entmax", "entmaxkv::decode_attn": "decode_attn"}.get(name.split(".")[0])


def _is_view_index(node: fx.Node) -> bool:
    idx = node.args[1]
    items = idx if isinstance(idx, tuple) else (idx,)
    return isinstance(node.args[0], fx.Node) and all(
        i is None or i is Ellipsis or i == slice(None) for i in items
    )


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def val(node: Any) -> Any:
    """The example value (a FakeTensor, SymInt, or constant) Dynamo recorded for ``node``."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def shape(node: fx.Node) -> tuple:
    return tuple(val(node).shape)


def is_tensor(x: Any) -> bool:
    return isinstance(val(x), torch.Tensor)


def is_inactive_dropout(node: fx.Node) -> bool:
    if kind(node) != "dropout":
        return False
    p = arg(node, 1, "p", 0.5)
    training = arg(node, 2, "training" if node.target is not torch.dropout else "train", True)
    return training is False or p == 0


def _dims_arg(node: fx.Node, start: int) -> list[int]:
    rest = node.args[start:]
    if len(rest) == 1 and isinstance(rest[0], tuple | list):
        rest = rest[0]
    return [int(r) for r in rest]


def _movedim_order(nd: int, src: int | tuple, dst: int | tuple) -> list[int]:
    src_l = [int(i) % nd for i in (src if isinstance(src, tuple | list) else (src,))]
    dst_l = [int(i) % nd for i in (dst if isinstance(dst, tuple | list) else (dst,))]
    order: list[int | None] = [None] * nd
    for s, d in zip(src_l, dst_l):
        order[d] = s
    rest = iter(i for i in range(nd) if i not in src_l)
    return [next(rest) if o is None else o for o in order]


def view_fn(node: fx.Node) -> Callable[[Dims, Splitter], Dims] | None:
    """The layout transfer of a pure relayout node, or None if ``node`` is not one we can follow."""
    k = kind(node)
    if (
        k is None
        or not isinstance(node.args[0], fx.Node)
        or not is_tensor(node)
        or not is_tensor(node.args[0])
    ):
        return None
    out = shape(node)
    nd = len(shape(node.args[0]))
    try:
        if k == "view":
            return lambda d, s: layout.reshape(d, out, s)
        if k == "expand":
            return lambda d, s: layout.expand(d, out)
        if k == "transpose":
            if node.op == "call_function" and node.target is builtins.getattr:
                order = list(range(nd))[::-1] if node.args[1] == "T" else [*range(nd - 2), nd - 1, nd - 2]
            else:
                i, j = int(arg(node, 1, "dim0")) % nd, int(arg(node, 2, "dim1")) % nd
                order = list(range(nd))
                order[i], order[j] = j, i
            return lambda d, s: layout.permute(d, order)
        if k == "permute":
            order = [i % nd for i in _dims_arg(node, 1)] if len(node.args) > 1 else list(node.kwargs["dims"])
            return lambda d, s: layout.permute(d, order)
        if k == "movedim":
            perm = _movedim_order(nd, arg(node, 1, "source"), arg(node, 2, "destination"))
            return lambda d, s: layout.permute(d, perm)
        if k == "repeat_interleave":
            reps, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
            if not isinstance(reps, int) or dim is None:
                return None
            return lambda d, s: layout.repeat_interleave(d, reps, int(dim))
        if k == "tile":
            reps = _dims_arg(node, 1)
            return lambda d, s: layout.tile(d, reps)
    except (TypeError, ValueError, KeyError):
        return None
    return None


def trace_view(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back through pure relayouts: the base node and the relayout nodes from base to ``node``."""
    ops: list[fx.Node] = []
    while view_fn(node) is not None:
        ops.append(node)
        node = node.args[0]
    return node, ops[::-1]


def follow(chain: layout.Chain, ops: list[fx.Node]) -> layout.Chain:
    for op in ops:
        chain.dims = view_fn(op)(chain.dims, chain.split)  # type: ignore[misc]
    return chain


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def is_pure(node: fx.Node) -> bool:
    """Safe to erase when unused: a functional call (no in-place method/operator, no side effect)."""
    if node.op == "call_method":
        name = node.target
        return not (name.endswith("_") and not name.endswith("__") or name.startswith("__i"))
    if node.op == "call_function":
        return node.target not in _INPLACE_OPERATORS and node.target not in fx.node._side_effectful_functions
    return False


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)')
_PASSES_DIR = os.path.dirname(__file__)
_ROOT = re.compile(r"^L\['[^']*'\](\[\d+\])?\.?")


def where(node: fx.Node) -> str:
    """The module path of ``node`` (``layers.0.self_attn``) or its node name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = _ROOT.sub("", list(stack.values())[-1][0])
        path = re.sub(r"\[(\d+)\]|\.?_modules\['([^']+)'\]", lambda m: "." + (m[1] or m[2]), path).strip(".")
        return f"{path or 'model'} ({node.name})"
    frames = [f for f in _FRAME.findall(node.meta.get("stack_trace") or "") if _PASSES_DIR not in f[0]]
    if frames:
        file, line, func = frames[-1]
        return f"{func} ({os.path.basename(file)}:{line}, {node.name})"
    return node.name


ConstantFn = Callable[[Any], torch.Tensor | None]


class Constants:
    """Compile-time values of graph values that depend only on literals, parameters and buffers.

    Parameters and buffers are graph inputs in Dynamo IR; their current values are the real example
    inputs the backend receives.  A buffer the graph mutates (a KV cache) is never a constant.  Only
    pure nodes are evaluated, on real tensors, outside the fake mode.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> None:
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs = dict(zip(placeholders, example_inputs))
        self.memo: dict[fx.Node, torch.Tensor | None] = {}

    def __call__(self, x: Any) -> torch.Tensor | None:
        if isinstance(x, int | float) and not isinstance(x, bool):
            return torch.tensor(x)
        if not isinstance(x, fx.Node):
            return None
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():
            value = self._eval(x, depth=0)
        return None if isinstance(value, FakeTensor) else value

    def _eval(self, node: fx.Node, depth: int) -> Any:
        if node in self.memo:
            return self.memo[node]
        value = None
        if depth < 64:
            value = self._compute(node, depth)
        self.memo[node] = value
        return value

    def _compute(self, node: fx.Node, depth: int) -> Any:
        if node.op == "placeholder":
            mutated = any(not is_pure(u) and u.args and u.args[0] is node for u in node.users)
            state = "_parameters_" in node.name or "_buffers_" in node.name
            return self.inputs.get(node) if state and not mutated else None
        if node.op == "get_attr":
            return getattr(self.gm, node.target, None)
        if node.op not in ("call_function", "call_method") or not is_pure(node):
            return None
        missing = object()

        def ev(a: Any) -> Any:
            if isinstance(a, fx.Node):
                v = self._eval(a, depth + 1)
                return missing if v is None else v
            return a

        args = fx.node.map_aggregate(node.args, ev)
        kwargs = fx.node.map_aggregate(node.kwargs, ev)
        leaves: list[Any] = []
        fx.node.map_aggregate((args, kwargs), leaves.append)
        if any(a is missing for a in leaves):
            return None
        try:
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)
        except Exception:  # a value we cannot compute at compile time is simply not a constant
            return None
