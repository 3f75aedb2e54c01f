"""Splice ``entmaxkv::decode_attn`` in place of a matched site's ``P @ v`` product.

The new nodes go right before ``M2`` (every input they read — q/k/v bases, masks, bias terms — is an
ancestor of ``M2``, so this is a valid position, and cache writes that precede the attention stay
before it).  Each new node gets an ``example_value`` computed under the graph's fake mode, like the
nodes Dynamo made, so later passes (Inductor's pre-grad passes, AOTAutograd) see a normal graph.
Afterwards the dense score/probability/value nodes that nothing else uses — including GQA's
``repeat_kv`` copies — are erased; impure nodes (cache writes) are never touched.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, fx

from ..ops import decode  # noqa: F401  (defines torch.ops.entmaxkv.decode_attn)
from . import nodes
from .matcher import Relayout, Site


def relayout(
    x: Tensor,
    sizes: tuple[int, ...],
    perm: tuple[int, ...],
    shape: tuple[int, ...],
    expand: tuple[int, ...] | None,
) -> Tensor:
    """``x`` regrouped into its atoms, permuted, (broadcast) and regrouped again — a view when possible."""
    y = x.reshape(sizes).permute(perm)
    return (y if expand is None else y.expand(expand)).reshape(shape)


def bias_add(bias: Tensor | None, term: Tensor, sign: float) -> Tensor:
    term = term.float() if sign > 0 else -term.float()
    return term if bias is None else bias + term


def bias_mask(bias: Tensor | None, mask: Tensor, masked_when: bool) -> Tensor:
    keep = ~mask if masked_when else mask
    base = bias if bias is not None else torch.zeros((), dtype=torch.float32, device=mask.device)
    return torch.where(keep, base, float("-inf"))


class Emitter:
    """Creates nodes at the graph's insertion point, with Dynamo-style ``example_value`` meta."""

    def __init__(self, graph: fx.Graph, meta: dict[str, Any]) -> None:
        self.graph = graph
        self.meta = {k: meta[k] for k in ("stack_trace", "nn_module_stack") if k in meta}
        fakes = (nodes.val(n) for n in graph.nodes)
        self.fake_mode = next((v.fake_mode for v in fakes if hasattr(v, "fake_mode")), None)

    def __call__(self, target: Callable[..., Any] | str, *args: Any) -> fx.Node:
        op = "call_method" if isinstance(target, str) else "call_function"
        node = self.graph.create_node(op, target, args)
        node.meta.update(self.meta)
        if self.fake_mode is not None:
            fake = fx.node.map_aggregate(args, nodes.val)
            with self.fake_mode:
                value = getattr(fake[0], target)(*fake[1:]) if isinstance(target, str) else target(*fake)
            node.meta["example_value"] = value
        return node

    def relayout(self, x: fx.Node, plan: Relayout) -> fx.Node:
        return self(relayout, x, plan.sizes, plan.perm, plan.shape, plan.expand)


def rewrite(gm: fx.GraphModule, site: Site, site_id: int, config_json: str) -> fx.Node:
    """Replace ``site`` by one ``decode_attn`` call; returns the node that now stands for ``P @ v``."""
    graph = gm.graph
    emit = Emitter(graph, site.product.meta)
    with graph.inserting_before(site.product):
        q, k, v = (
            emit.relayout(n, p)
            for n, p in ((site.q, site.q_plan), (site.k, site.k_plan), (site.v, site.v_plan))
        )
        bias: fx.Node | None = None
        for step in site.bias:
            if step.op == "scale":
                bias = None if bias is None else emit(operator.mul, bias, step.value)
            elif step.op == "add":
                bias = emit(bias_add, bias, emit.relayout(step.tensor, step.relayout), step.value)
            else:
                bias = emit(bias_mask, bias, emit.relayout(step.tensor, step.relayout), step.masked_when)
        out = emit(
            torch.ops.entmaxkv.decode_attn.default,
            q,
            k,
            v,
            bias,
            site.scale,
            site.alpha,
            site_id,
            config_json,
        )
        out = emit.relayout(out, site.out_plan)
        dtype = nodes.val(site.product).dtype
        if nodes.val(site.q).dtype != dtype:
            out = emit("to", out, dtype)
    site.product.replace_all_uses_with(out)
    erase_dead([site.product])
    return out


def erase_dead(start: Iterable[fx.Node]) -> None:
    """Erase ``start`` and, transitively, the inputs that become unused — pure nodes only."""
    stack, erased = list(start), set()
    while stack:
        n = stack.pop()
        if n in erased or n.users or n.op not in ("call_function", "call_method") or not nodes.is_pure(n):
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)
