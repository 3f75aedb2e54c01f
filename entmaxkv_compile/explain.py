"""``explain(model, *args)``: which attention sites the backend would rewrite, which not, and why.

The call is compiled with a capturing backend under ``no_grad``.  The captured graph is analysed
exactly as the real backend would analyse it (:func:`entmaxkv_compile.passes.analyze`), and then
**nothing runs**: the compiled function raises before executing the graph, so the in-graph KV-cache
writes (``index_copy_``, ``cat``) and Dynamo's replay of Python side effects never happen — caches and
model state stay exactly as they were.  The price: only the first graph is seen.  Models that compile
to one graph (HF decoders, the usual hand-written decoders) are covered completely; after a graph break
the report says the rest was not analysed.  The capture leaves a Dynamo cache entry for its own
backend, so a later ``torch.compile`` of the same function with another backend compiles afresh.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch._dynamo.utils import counters

from .config import EntmaxKVConfig
from .passes import analyze
from .passes.report import ExplainReport


class _Captured(Exception):
    pass


def explain(
    model_or_fn: Any, *args: Any, config: EntmaxKVConfig | None = None, **kwargs: Any
) -> ExplainReport:
    """Report the entmax attention sites of ``model_or_fn(*args, **kwargs)`` without running it.

    >>> print(explain(model, input_ids, past_key_values=cache))   # doctest: +SKIP
    entmaxkv: 2 site(s) rewritten, 0 left dense, in 1 graph(s)
      matched   entmax15 α=1.5 Hq=4 Hkv=2 Lq=1 at model.layers.0.self_attn (entmax)
      …
    """
    cfg = config or EntmaxKVConfig()
    report = ExplainReport()

    def capture(gm: fx.GraphModule, example_inputs: list[Any], **_: Any) -> Any:
        analysis = analyze(gm, example_inputs, cfg)
        report.graphs += 1
        report.matched += analysis.matched
        report.unmatched += analysis.unmatched

        def stop(*_: Any) -> Any:
            raise _Captured

        return stop

    breaks = sum(counters["graph_break"].values())
    try:
        with torch.no_grad():
            torch.compile(model_or_fn, backend=capture)(*args, **kwargs)
    except _Captured:
        pass
    report.complete = sum(counters["graph_break"].values()) == breaks
    return report
