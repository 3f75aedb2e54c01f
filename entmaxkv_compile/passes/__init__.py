"""The entmaxkv graph pass over Dynamo IR: canonicalise entmax, match attention, rewrite decode sites.

Order of work on one captured graph (see ``docs/PASS.md``):

1. :mod:`.opaque` — known entmax callables already arrive as ``entmaxkv::entmax`` (polyfills);
   ``entmax_bisect`` with a tensor α is resolved to a float α here when it is a compile-time constant.
2. :mod:`.decomposed` — entmax written out in plain ops is verified numerically and folded into one
   ``entmaxkv::entmax`` node.
3. :mod:`.matcher` — around every entmax node, the attention is matched and described canonically;
   softmax attention is reported (rewritten to Quest-style top-k only on the ``softmax_topk`` opt-in),
   SDPA is reported.
4. :mod:`.rewrite` — each matched decode site becomes one ``entmaxkv::decode_attn`` call.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from torch import fx
from torch._dynamo.utils import counters

from ..config import EntmaxKVConfig
from ..ops.decode import config_to_json
from . import decomposed, matcher, nodes, opaque, rewrite
from .layout import Unsupported
from .report import ExplainReport, MatchedSite, UnmatchedSite

__all__ = ["Analysis", "ExplainReport", "MatchedSite", "UnmatchedSite", "analyze", "apply"]

log = logging.getLogger("entmaxkv_compile")
_SITE_IDS = itertools.count()
_ENTMAX_KINDS = ("entmax15", "sparsemax", "entmax_bisect", "entmax", "hand-written")


@dataclass
class Analysis:
    sites: list[matcher.Site] = field(default_factory=list)
    unmatched: list[UnmatchedSite] = field(default_factory=list)

    @property
    def matched(self) -> list[MatchedSite]:
        return [s.info for s in self.sites]


def analyze(gm: fx.GraphModule, example_inputs: list[Any], config: EntmaxKVConfig) -> Analysis:
    """Canonicalise entmax in ``gm`` (mutates it) and match every attention site; rewrites nothing."""
    constant = nodes.Constants(gm, example_inputs)
    out = Analysis()
    for node, reason in opaque.resolve_tensor_alpha(gm, constant):
        out.unmatched.append(UnmatchedSite("entmax_bisect", nodes.where(node), reason))
    for node, kind, reason in decomposed.canonicalize(gm, constant):
        out.unmatched.append(UnmatchedSite(kind, nodes.where(node), reason))
    for node in list(gm.graph.nodes):
        k = nodes.kind(node)
        if k == "entmax":
            kind = opaque.entmax_kind(node)
            try:
                out.sites.append(matcher.match(node, float(node.args[1]), config, constant, kind))
            except Unsupported as e:
                out.unmatched.append(UnmatchedSite(kind, nodes.where(node), str(e)))
            except Exception as e:  # a bug of the matcher on one site must not fail the user's compile
                out.unmatched.append(UnmatchedSite(kind, nodes.where(node), internal_error(e)))
        elif k == "softmax":
            try:
                site = matcher.match(node, None, config, constant, "softmax")
            except Unsupported:
                continue  # not attention (e.g. the LM head): not worth reporting
            if config.softmax_topk:  # the user's opt-in: approximate Quest-style top-k softmax
                out.sites.append(site)
            else:
                reason = "softmax attention is left dense (not entmax)"
                out.unmatched.append(UnmatchedSite("softmax", nodes.where(node), reason))
        elif k == "sdpa":
            out.unmatched.append(
                UnmatchedSite("sdpa", nodes.where(node), "scaled_dot_product_attention is softmax attention")
            )
    return out


def internal_error(e: Exception) -> str:
    log.warning("entmaxkv: internal error on one site, left dense", exc_info=e)
    return f"internal error of the pass, left dense: {type(e).__name__}: {e}"


def apply(gm: fx.GraphModule, example_inputs: list[Any], config: EntmaxKVConfig) -> Analysis:
    """Rewrite every matched decode site of ``gm`` in place; counts, logs and returns what happened."""
    analysis = analyze(gm, example_inputs, config)
    failed = [u for u in analysis.unmatched if u.kind in _ENTMAX_KINDS]
    if failed and config.on_unsupported == "error":
        raise Unsupported("entmax sites the pass cannot rewrite:\n" + "\n".join(map(str, failed)))
    cfg = config_to_json(config)
    for site in list(analysis.sites):
        site_id = next(_SITE_IDS)
        before = set(gm.graph.nodes)
        try:
            rewrite.rewrite(gm, site, site_id, cfg)
        except Exception as e:  # the emitted nodes are unused until the final swap: drop them, stay dense
            for n in reversed([n for n in gm.graph.nodes if n not in before]):
                gm.graph.erase_node(n)
            analysis.sites.remove(site)
            analysis.unmatched.append(UnmatchedSite(site.info.kind, site.info.where, internal_error(e)))
            continue
        site.info = replace(site.info, site=site_id)
        counters["entmaxkv"]["decode_attn"] += 1
        log.info("entmaxkv: rewrote %s", site.info)
    for u in analysis.unmatched:
        if u.kind in _ENTMAX_KINDS:
            counters["entmaxkv"]["left_dense"] += 1
            log.info("entmaxkv: left dense: %s", u)
        else:
            log.debug("entmaxkv: left alone: %s", u)
    gm.graph.lint()
    gm.recompile()
    return analysis
