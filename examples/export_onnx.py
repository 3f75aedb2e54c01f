"""Export an entmax decoder step to a static-budget ONNX file, check it, run it with ONNX Runtime.

    python examples/export_onnx.py                     # certified policy: exact wherever the flag says so
    python examples/export_onnx.py --policy topk       # a fixed page budget (approximate)

The model is ordinary PyTorch (``entmaxkv_compile.export.example``); ``to_onnx`` finds its two entmax
attention sites, makes them static-budget ops, decomposes those into standard ONNX operators and writes
the file. The deployed graph returns the logits plus, per site, the selection and (certified) a per-row
flag that proves the sparse output equal to dense attention.
"""

from __future__ import annotations

import argparse

import onnxruntime as ort
import torch

from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.export import to_onnx, verify_onnx
from entmaxkv_compile.export.example import TinyEntmaxDecoder, example_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", choices=("topk", "certified"), default="certified")
    p.add_argument("--alpha", type=float, choices=(1.5, 2.0), default=2.0)
    p.add_argument("--out", default="entmax_decoder_static.onnx")
    a = p.parse_args()

    torch.manual_seed(0)
    model = TinyEntmaxDecoder(alpha=a.alpha).eval()
    args = example_inputs(model, batch=2, cache_len=512)
    config = EntmaxKVConfig(policy=a.policy, budget_pages=8, min_candidates=48, candidate_fraction=0.05)
    ep = to_onnx(model, args, a.out, config=config, return_selection=True)
    sites = [n.target for n in ep.graph.nodes if "static" in str(n.target)]
    print(f"{len(sites)} attention sites made static: {sorted({str(t) for t in sites})}")

    print(verify_onnx(a.out, ep.module(), args))

    session = ort.InferenceSession(a.out, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), args)})
    print(f"logits {outputs[0].shape}; selection outputs {[o.shape for o in outputs[1:]]}")
    if a.policy == "certified":
        for layer, flags in enumerate(outputs[2::2]):
            print(f"layer {layer}: {flags.sum()} of {flags.size} query rows certified exact")


if __name__ == "__main__":
    main()
