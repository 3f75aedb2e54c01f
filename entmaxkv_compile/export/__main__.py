"""``entmaxkv-export``: export an entmax decoder to a static-budget ONNX file and print the check report.

    entmaxkv-export --out tiny.onnx                        # the built-in TinyEntmaxDecoder, topk policy
    entmaxkv-export --policy certified --min-candidates 32 --alpha 2
    entmaxkv-export --model mypkg.models:decode_step       # your own: a function returning (model, args)

Exit status 0 when the file passed every check (see :func:`~entmaxkv_compile.export.verify_onnx`).
"""

from __future__ import annotations

import argparse
import importlib

import torch

from ..config import EntmaxKVConfig
from .example import TinyEntmaxDecoder, example_inputs
from .static import DEFAULT_OPSET, to_onnx
from .verify import verify_onnx


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entmaxkv-export", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="entmaxkv_static.onnx", help="ONNX file to write")
    p.add_argument("--model", help="MODULE:FUNCTION returning (model, args); default: the built-in example")
    p.add_argument("--policy", choices=("topk", "certified"), default="topk")
    p.add_argument("--budget-pages", type=int, default=4)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--sink-pages", type=int, default=1)
    p.add_argument("--recent-pages", type=int, default=2)
    p.add_argument(
        "--min-candidates", type=int, default=32, help="certified: capacity floor (tokens per group)"
    )
    p.add_argument(
        "--candidate-fraction", type=float, default=0.01, help="certified: capacity / cache length"
    )
    p.add_argument("--sketch", choices=("int8", "int4"), default="int8")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    example = p.add_argument_group("built-in example model")
    example.add_argument("--alpha", type=float, choices=(1.5, 2.0), default=1.5)
    example.add_argument("--batch", type=int, default=2)
    example.add_argument("--cache-len", type=int, default=256)
    example.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    config = EntmaxKVConfig(
        policy=a.policy,
        page_size=a.page_size,
        budget_pages=a.budget_pages,
        sink_pages=a.sink_pages,
        recent_pages=a.recent_pages,
        min_candidates=a.min_candidates,
        candidate_fraction=a.candidate_fraction,
        sketch=a.sketch,
    )
    if a.model:
        module, _, name = a.model.partition(":")
        model, args = getattr(importlib.import_module(module), name)()
    else:
        torch.manual_seed(0)
        model = TinyEntmaxDecoder(alpha=a.alpha).to(getattr(torch, a.dtype)).eval()
        args = example_inputs(model, batch=a.batch, cache_len=a.cache_len)
    ep = to_onnx(model, args, a.out, config=config, opset=a.opset, return_selection=True)
    report = verify_onnx(a.out, ep.module(), args)
    print(f"static-budget export of {type(model).__name__}, policy {a.policy} (outputs: model, selections)")
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
