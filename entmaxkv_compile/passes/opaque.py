"""Make the known entmax callables one opaque node in Dynamo graphs.

Under ``no_grad`` Dynamo inlines ``autograd.Function.forward``: ``entmax.entmax15`` and ``sparsemax``
become ~25 nodes (max, sort, cumsum, gather, clamp …) and ``entmax_bisect`` a 50-step unrolled
loop of ~300.  Recognising those is possible (see :mod:`.decomposed`, the safety net) but slow and
brittle, so for the callables we know we swap the implementation *while Dynamo traces* with
``torch.compiler.substitute_in_graph``: when Dynamo loads ``entmax15`` (a global of the user's module,
or of ``entmax.activations`` inside ``Entmax15.forward``) it traces our polyfill instead, which emits
``torch.ops.entmaxkv.entmax(x, alpha, dim)``.  Eager code is untouched.

* Grad enabled → the polyfill calls the package's own ``Function.apply`` (training graphs keep the
  package's exact forward/backward; the backend only rewrites inference graphs anyway); so does a
  float64 input (the op computes in fp32).
* ``entmax_bisect`` with a tensor ``alpha`` (a parameter or buffer, e.g. ``EntmaxBisect(alpha=nn.Parameter)``)
  becomes ``entmaxkv::entmax_bisect_tensor_alpha`` — an opaque op that runs the package function —
  and :func:`resolve_tensor_alpha` turns it into ``entmaxkv::entmax`` when the value is known at
  compile time and is one scalar in (1, 2].
* ``k`` (partial-sort size) and ``n_iter``/``ensure_sum_one`` (bisection accuracy) do not change the
  function being computed; the opaque op computes it exactly.

The polyfills are registered once, at import; the kind of each emitted node (``entmax15``,
``sparsemax``, ``entmax_bisect``, ``entmax``) is read back from the node's stack trace, which names
the polyfill (``_opaque_<kind>``).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import Tensor, fx

from ..ops import entmax_op  # noqa: F401  (defines torch.ops.entmaxkv.entmax)

try:  # module globals, not closure cells: Dynamo can only trace ``Function.apply`` of a global class
    import entmax
    from entmax.activations import Entmax15Function, SparsemaxFunction
    from entmax.root_finding import EntmaxBisectFunction, SparsemaxBisectFunction
except ImportError:  # the entmax package is optional
    entmax = None
from ..reference.entmax import entmax as ref_entmax
from ..reference.entmax import entmax15 as ref_entmax15
from ..reference.entmax import sparsemax as ref_sparsemax
from . import nodes

log = logging.getLogger("entmaxkv_compile")


@torch.library.custom_op("entmaxkv::entmax_bisect_tensor_alpha", mutates_args=())
def entmax_bisect_tensor_alpha(
    x: Tensor, alpha: Tensor, dim: int, n_iter: int, ensure_sum_one: bool
) -> Tensor:
    return entmax.entmax_bisect(x, alpha, dim, n_iter, ensure_sum_one)


@entmax_bisect_tensor_alpha.register_fake
def _(x: Tensor, alpha: Tensor, dim: int, n_iter: int, ensure_sum_one: bool) -> Tensor:
    return torch.empty_like(x)


def _keep_package(x: Tensor) -> bool:
    """Training (exact package backward) and float64 (the op computes in fp32) keep the package code."""
    return torch.is_grad_enabled() or x.dtype == torch.float64


def _valid(alpha: object) -> bool:
    return isinstance(alpha, int | float) and 1.0 < alpha <= 2.0


def _install_reference() -> None:
    @torch.compiler.substitute_in_graph(ref_entmax)
    def _opaque_entmax(x: Tensor, alpha: float = 1.5, dim: int = -1) -> Tensor:
        return torch.ops.entmaxkv.entmax(x, float(alpha), dim)

    @torch.compiler.substitute_in_graph(ref_entmax15)
    def _opaque_entmax15(x: Tensor, dim: int = -1) -> Tensor:
        return torch.ops.entmaxkv.entmax(x, 1.5, dim)

    @torch.compiler.substitute_in_graph(ref_sparsemax)
    def _opaque_sparsemax(x: Tensor, dim: int = -1) -> Tensor:
        return torch.ops.entmaxkv.entmax(x, 2.0, dim)


def _install_package() -> None:
    @torch.compiler.substitute_in_graph(entmax.entmax15)
    def _opaque_entmax15(X: Tensor, dim: int = -1, k: int | None = None) -> Tensor:
        if _keep_package(X):
            return Entmax15Function.apply(X, dim, k)
        return torch.ops.entmaxkv.entmax(X, 1.5, dim)

    @torch.compiler.substitute_in_graph(entmax.sparsemax)
    def _opaque_sparsemax(X: Tensor, dim: int = -1, k: int | None = None) -> Tensor:
        if _keep_package(X):
            return SparsemaxFunction.apply(X, dim, k)
        return torch.ops.entmaxkv.entmax(X, 2.0, dim)

    @torch.compiler.substitute_in_graph(entmax.sparsemax_bisect)
    def _opaque_sparsemax_bisect(
        X: Tensor, dim: int = -1, n_iter: int = 50, ensure_sum_one: bool = True
    ) -> Tensor:
        if _keep_package(X):
            return SparsemaxBisectFunction.apply(X, dim, n_iter, ensure_sum_one)
        return torch.ops.entmaxkv.entmax(X, 2.0, dim)

    @torch.compiler.substitute_in_graph(entmax.entmax_bisect)
    def _opaque_entmax_bisect(
        X: Tensor, alpha: float | Tensor = 1.5, dim: int = -1, n_iter: int = 50, ensure_sum_one: bool = True
    ) -> Tensor:
        if _keep_package(X):
            return EntmaxBisectFunction.apply(X, alpha, dim, n_iter, ensure_sum_one)
        if isinstance(alpha, Tensor):
            return torch.ops.entmaxkv.entmax_bisect_tensor_alpha(X, alpha, dim, n_iter, ensure_sum_one)
        if _valid(alpha):
            return torch.ops.entmaxkv.entmax(X, float(alpha), dim)
        return EntmaxBisectFunction.apply(X, alpha, dim, n_iter, ensure_sum_one)


_install_reference()
if entmax is not None:
    _install_package()

_KIND = re.compile(r"in _opaque_(\w+)")
_KIND_NAMES = {"sparsemax_bisect": "sparsemax", "entmax": "entmax"}


def entmax_kind(node: fx.Node) -> str:
    """The callable behind an ``entmaxkv::entmax`` node (polyfill name, fold tag, or α of a direct call)."""
    if "entmaxkv_kind" in node.meta:
        return node.meta["entmaxkv_kind"]
    found = _KIND.findall(node.meta.get("stack_trace") or "")
    if found:
        return _KIND_NAMES.get(found[-1], found[-1])
    return {1.5: "entmax15", 2.0: "sparsemax"}.get(node.args[1], "entmax")


def resolve_tensor_alpha(gm: fx.GraphModule, constant: nodes.ConstantFn) -> list[tuple[fx.Node, str]]:
    """Turn ``entmax_bisect_tensor_alpha`` nodes with a compile-time scalar α into ``entmaxkv::entmax``.

    Returns the nodes left as they were, each with the reason.
    """
    left: list[tuple[fx.Node, str]] = []
    target = torch.ops.entmaxkv.entmax_bisect_tensor_alpha.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (target, target._overloadpacket):
            continue
        x, alpha, dim = node.args[:3]
        value = constant(alpha)
        reason = None
        if value is None:
            reason = "alpha is a runtime tensor (not a constant, parameter or buffer)"
        elif value.numel() == 0 or not bool((value == value.flatten()[0]).all()):
            reason = "alpha differs across rows (per-head alpha is not supported)"
        elif not _valid(a := float(value.flatten()[0])):
            reason = f"alpha={a:g} is outside (1, 2]"
        if reason:
            left.append((node, reason))
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.entmaxkv.entmax.default, (x, a, dim))
        new.meta.update(node.meta)
        new.meta["entmaxkv_kind"] = "entmax_bisect"
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        log.info("entmaxkv: entmax_bisect alpha read at compile time: %g (%s)", a, nodes.where(new))
    return left
