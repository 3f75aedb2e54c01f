"""Static-budget export: ``torch.export`` with every entmax attention site replaced by a static op, then ONNX.

:func:`export_static` exports the model once, finds its entmax attention sites, replaces each by
``entmaxkv::static_topk_attn`` (``policy="topk"``) or ``entmaxkv::static_certified_attn``
(``policy="certified"``) with the budget read from the config, and exports the rewritten graph again, so
the returned program is an ordinary ``ExportedProgram`` whose every shape is static. :func:`to_onnx`
decomposes the static ops into standard ATen ops (:data:`~entmaxkv_compile.ops.static.STATIC_DECOMPOSITIONS`)
and hands the program to ``torch.onnx.export(dynamo=True)``.
"""

from __future__ import annotations

import logging
import math
import operator
from os import PathLike
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .. import passes  # noqa: F401  (makes the known entmax callables one entmaxkv::entmax node)
from ..config import EntmaxKVConfig
from ..ops.static import (
    STATIC_DECOMPOSITIONS,
    check_alpha,
    check_static_certified,
    check_static_topk,
)
from ..reference.entmax import entmax as entmax_reference
from .sites import AttentionSite, find_sites

log = logging.getLogger("entmaxkv_compile")

DEFAULT_OPSET = 20  # torch.onnx's default; TensorRT 10.x parses opsets 9–24
SKETCH_BITS = {"int8": 8, "int4": 4}
# entmax nodes left unmatched stay dense: the reference entmax exports to TopK/CumSum/GatherElements
ONNX_DECOMPOSITIONS = {**STATIC_DECOMPOSITIONS, torch.ops.entmaxkv.entmax.default: entmax_reference}


def _site_op(site: AttentionSite, config: EntmaxKVConfig) -> tuple[torch._ops.OpOverload, tuple[int, ...]]:
    """The static op for ``site`` and its integer arguments, after checking they fit the site's shapes."""
    head_dim, seq_len = site.q.meta["val"].shape[-1], site.k.meta["val"].shape[2]
    try:
        check_alpha(site.alpha)
        if config.policy == "topk":
            check_static_topk(
                seq_len, config.page_size, config.budget_pages, config.sink_pages, config.recent_pages
            )
            args = (config.budget_pages, config.page_size, config.sink_pages, config.recent_pages)
            return torch.ops.entmaxkv.static_topk_attn.default, args
        group = config.group_size(head_dim)
        if head_dim % group:
            raise ValueError(f"sketch_group={group} must divide the head dim {head_dim}")
        capacity = max(config.min_candidates, math.ceil(config.candidate_fraction * seq_len))
        check_static_certified(seq_len, capacity)
        args = (capacity, SKETCH_BITS[config.sketch], group, config.rotate_sketch)
        return torch.ops.entmaxkv.static_certified_attn.default, args
    except (ValueError, NotImplementedError) as err:
        raise type(err)(f"attention site {site.name}: {err}") from None


def _rewrite(graph: fx.Graph, site: AttentionSite, config: EntmaxKVConfig) -> list[fx.Node]:
    """Replace ``site``'s ``p @ v`` by the static op; returns the op's selection outputs."""
    op, extra = _site_op(site, config)
    with graph.inserting_before(site.output):
        call = graph.call_function(op, (site.q, site.k, site.v, site.bias, site.scale, site.alpha, *extra))
        outs = [graph.call_function(operator.getitem, (call, i)) for i in range(len(op._schema.returns))]
        out = outs[0]
        dtype = site.output.meta["val"].dtype
        if dtype != site.q.meta["val"].dtype:
            out = graph.call_function(torch.ops.aten.to.dtype, (out, dtype))
    site.output.replace_all_uses_with(out)
    return outs[1:]


def _append_outputs(gm: fx.GraphModule, selections: list[list[fx.Node]]) -> None:
    """Make ``gm`` return ``(its output, per-site selection tuples)``."""
    output = gm.graph.output_node()
    flat = list(output.args[0])
    output.args = (tuple(flat + [n for sel in selections for n in sel]),)
    info = gm.graph._codegen.pytree_info
    user = pytree.tree_unflatten(list(range(len(flat))), info.out_spec)
    extra = tuple(tuple(range(len(sel))) for sel in selections)
    gm.graph._codegen.pytree_info = info._replace(out_spec=pytree.tree_structure((user, extra)))


def export_static(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    config: EntmaxKVConfig | None = None,
    *,
    return_selection: bool = False,
    dynamic_shapes: object = None,
) -> torch.export.ExportedProgram:
    """Export ``model(*args, **kwargs)`` with every entmax attention site as a static-budget op.

    Parameters
    ----------
    config:
        ``policy="topk"`` (default: ``EntmaxKVConfig(policy="topk")``) selects ``budget_pages`` pages per KV
        group plus ``sink_pages`` and ``recent_pages``; ``policy="certified"`` selects
        ``max(min_candidates, ⌈candidate_fraction·S⌉)`` tokens by ``sketch`` bound and reports ``certified``
        (``auto`` exports as ``certified``: a static graph is built for one long cache length).
    return_selection:
        Return ``(model output, selections)`` where ``selections[i]`` is site ``i``'s ``(pages,)``
        (``[B, Hkv, sink+budget+recent]`` int64) or ``(tokens, certified)`` (``[B, Hkv, C]`` int64,
        ``[B, Hq, Lq]`` bool). Id slots are unordered; ``−1`` marks an unused slot.
    dynamic_shapes:
        Refused: the graph is static by design (one program per batch size and cache length).

    Raises
    ------
    ValueError
        No entmax attention site, a budget that does not fit the cache, an unsupported policy, or a
        dynamic-shape request. ``NotImplementedError`` for α other than 1.5 and 2.
    """
    if dynamic_shapes is not None:
        raise ValueError(
            f"export_static makes static graphs only, got dynamic_shapes={dynamic_shapes!r}: the budget and "
            "the cache length are baked into the graph; export one program per (batch, cache length) bucket"
        )
    config = config or EntmaxKVConfig(policy="topk")
    if config.policy == "auto":  # a static graph is built for one long cache length: the certified variant
        config = config.replace(policy="certified")
    if config.policy not in ("topk", "certified"):
        raise ValueError(
            f"static export supports policy 'topk' or 'certified', got {config.policy!r} "
            "('adaptive' selects a data-dependent number of pages; 'dense' needs no rewrite)"
        )
    with torch.no_grad():  # strict (Dynamo) capture applies the entmax polyfills of ``passes``
        gm = torch.export.export(model, args, kwargs, strict=True).module()
    sites, unmatched = find_sites(gm.graph, config.max_query_len)
    for reason in unmatched:
        log.warning("static export leaves an entmax dense: %s", reason)
    if not sites:
        found = "; ".join(unmatched) or "no torch.ops.entmaxkv.entmax node in the graph"
        raise ValueError(
            f"no entmax attention site to make static in {type(model).__name__} ({found}); "
            "export_static rewrites entmax(scale · q @ kᵀ + bias) @ v decode attention"
        )
    selections = [_rewrite(gm.graph, site, config) for site in sites]
    if return_selection:
        _append_outputs(gm, selections)
    for node in gm.graph.find_nodes(
        op="call_function", target=torch.ops.aten._assert_tensor_metadata.default
    ):
        gm.graph.erase_node(node)  # checks on the replaced scores would keep the dense path alive
    gm.graph.eliminate_dead_code()
    gm.recompile()
    log.info("static export: %d site(s) -> %s", len(sites), config.policy)
    return torch.export.export(gm, args, kwargs)


def to_onnx(
    model: nn.Module,
    args: tuple[Any, ...],
    path: str | PathLike[str],
    kwargs: dict[str, Any] | None = None,
    config: EntmaxKVConfig | None = None,
    opset: int = DEFAULT_OPSET,
    *,
    return_selection: bool = False,
    dynamic_shapes: object = None,
) -> torch.export.ExportedProgram:
    """Export the static-budget model to ONNX at ``path`` (standard ops only, every shape static).

    Same arguments as :func:`export_static`; returns the static ``ExportedProgram`` the file was made from
    (its ``.module()`` is the PyTorch reference to check the file against, see :func:`verify_onnx`).
    """
    ep = export_static(
        model, args, kwargs, config, return_selection=return_selection, dynamic_shapes=dynamic_shapes
    )
    program = torch.onnx.export(
        ep.run_decompositions(ONNX_DECOMPOSITIONS), (), dynamo=True, opset_version=opset, verbose=False
    )
    program.save(str(path))
    return ep
