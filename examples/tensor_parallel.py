"""Tensor-parallel entmax decode: the model sharded by heads over ranks, compiled with ``backend="entmaxkv"``.

Every rank builds the same Llama-style entmax model (``entmaxkv_compile.models.llama_entmax``), shards it
with PyTorch's own plan (``parallelize_module`` + ``ColwiseParallel``/``RowwiseParallel``, see
``entmaxkv_compile.models.tensor_parallel``) so that it holds ``Hq/N`` query heads, ``Hkv/N`` KV heads and
only their cache, compiles it with the entmaxkv backend and greedy-decodes. The rewrite sees local heads
only; the all-reduces are the plan's. Rank 0 also decodes with the unsharded model in one process (same
weights, same policy) and checks the tokens are identical; it reports per-token decode latency of both.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py --backend gloo   # CPU, 2 processes
    torchrun --nproc-per-node 2 examples/tensor_parallel.py                  # one GPU per rank (nccl)

Exit status 1 if the tokens differ. ``--json PATH`` writes each rank's results to ``PATH.rank<r>.json``.
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast must stay off (set before NCCL initialises)

import argparse
import copy
import json
import statistics
import sys
import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, fx
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import init_device_mesh

import entmaxkv_compile
from entmaxkv_compile.config import POLICIES, EntmaxKVConfig
from entmaxkv_compile.models.llama_entmax import EntmaxLM, LMConfig, load_model
from entmaxkv_compile.models.tensor_parallel import shard_heads

# Dynamo-IR spellings of the TP plan's communication: DTensor.from_local, .redistribute(), .to_local()
DIST_MARKERS = ("from_local", "redistribute", "to_local", "all_reduce", "all_gather", "reduce_scatter")
DECODE_ATTN = "entmaxkv.decode_attn"


def inspecting_backend(config: EntmaxKVConfig, log: list[dict[str, Any]]) -> Any:
    """The entmaxkv backend, recording per graph the decode_attn head counts and the distributed nodes
    before and after the rewrite (the pass rewrites ``gm`` in place)."""
    inner = entmaxkv_compile.backend(config)

    def dist_nodes(gm: fx.GraphModule) -> Counter:
        return Counter(
            str(n.target).split(" at ")[0]
            for n in gm.graph.nodes
            if n.op in ("call_function", "call_method") and any(m in str(n.target) for m in DIST_MARKERS)
        )

    def compiler(gm: fx.GraphModule, example_inputs: list[Any], **kw: Any) -> Any:
        before = dist_nodes(gm)
        fn = inner(gm, example_inputs, **kw)
        heads = []
        for n in gm.graph.nodes:
            if n.op == "call_function" and str(n.target).startswith(DECODE_ATTN):
                q, k = (a.meta.get("example_value", a.meta.get("val")) for a in n.args[:2])
                heads.append([int(q.shape[1]), int(k.shape[1])])
        log.append({"dist_before": dict(before), "dist_after": dict(dist_nodes(gm)), "decode_heads": heads})
        return fn

    return compiler


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(
    model: EntmaxLM, compiled: Any, prompt: Tensor, start: int, new_tokens: int, device: torch.device
) -> tuple[list[int], list[float]]:
    """Greedy tokens after ``prompt`` (prefilled eagerly: prefill is not what the backend rewrites, and a
    long one compiles slowly) and the wall time (s) of each compiled decode step after the first."""
    n = start + prompt.shape[1]
    logits = model(prompt, input_pos=torch.arange(start, n, device=device))
    tok = logits[:, -1].argmax(-1, keepdim=True)
    tokens, times = [int(tok)], []
    for i in range(n, n + new_tokens - 1):
        sync(device)
        t0 = time.perf_counter()
        logits = compiled(tok, input_pos=torch.tensor([i], device=device))
        tok = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(tok))  # int() syncs: the step's time includes the token reaching the host
        times.append(time.perf_counter() - t0)
    return tokens, times[1:]  # the first decode step compiles


def build(args: argparse.Namespace, device: torch.device) -> EntmaxLM:
    if args.checkpoint:
        return load_model(args.checkpoint, device)[0]
    torch.manual_seed(args.seed)
    cfg = LMConfig(n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim)
    model = EntmaxLM(cfg)
    with torch.no_grad():  # sharper than the init, so attention is sparse and the policy matters
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return model.to(device).eval()


@torch.no_grad()
def fill_synthetic(model: EntmaxLM, length: int, seed: int, head_offset: int) -> None:
    """Write seeded random K/V at positions ``0..length−1`` of every cache. Global KV head ``h`` of layer
    ``l`` gets the same values whichever rank holds it (``head_offset``: the rank's first global head),
    so sharded and unsharded runs see one context without a long prefill."""
    for layer, attn in enumerate(model.attention_layers):
        cache = attn.cache
        assert cache is not None
        for i in range(attn.n_kv_heads):
            for j, buf in enumerate((cache.k, cache.v)):
                g = torch.Generator(buf.device).manual_seed(
                    seed + 7919 * (2 * (layer * 4096 + head_offset + i) + j)
                )
                buf[0, i, :length] = torch.randn(length, buf.shape[-1], generator=g, device=buf.device)


def decode(
    model: EntmaxLM, args: argparse.Namespace, config: EntmaxKVConfig, device: torch.device, head_offset: int
) -> dict:
    counters.clear()
    log: list[dict[str, Any]] = []
    model.setup_cache(1, args.max_len)
    fill_synthetic(model, args.context, args.seed, head_offset)
    compiled = torch.compile(model, backend=inspecting_backend(config, log), dynamic=False)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, args.prompt_len), generator=g).to(device)
    entmaxkv_compile.reset()
    tokens, times = greedy(model, compiled, prompt, args.context, args.new_tokens, device)
    return {
        "tokens": tokens,
        "ms_per_token": 1e3 * statistics.median(times),
        "rewritten": counters["entmaxkv"]["decode_attn"],
        "left_dense": counters["entmaxkv"]["left_dense"],
        "graphs": log,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("nccl", "gloo"), default=None, help="default: nccl if CUDA")
    ap.add_argument("--policy", choices=POLICIES, default="certified")
    ap.add_argument("--inner-compiler", default=None, help="default: inductor on GPU, aot_eager on CPU")
    ap.add_argument("--checkpoint", help="a model saved by save_model (default: random weights)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=64, help="static cache length")
    ap.add_argument(
        "--context", type=int, default=0, help="positions before the prompt filled with seeded random K/V"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true", help="skip the unsharded run (context too large)")
    ap.add_argument("--json", help="write rank r's results to JSON.rank<r>.json")
    args = ap.parse_args(argv)
    if args.new_tokens < 3:
        ap.error("--new-tokens must be >= 3 (the first decode step compiles and is not timed)")
    if args.context + args.prompt_len + args.new_tokens > args.max_len:
        ap.error("--context + --prompt-len + --new-tokens must fit in --max-len")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    inner = args.inner_compiler or ("inductor" if device.type == "cuda" else "aot_eager")
    config = EntmaxKVConfig(policy=args.policy, inner_compiler=inner)

    model = build(args, device)
    out: dict[str, Any] = {"rank": rank, "world": world, "backend": backend, "device": str(device)}
    if rank == 0 and not args.no_reference:
        out["reference"] = decode(copy.deepcopy(model), args, config, device, head_offset=0)
    dist.barrier()
    shard_heads(model, mesh)
    out["sharded"] = decode(model, args, config, device, head_offset=rank * model.layers[0].attn.n_kv_heads)
    dist.barrier()

    ok = True
    if rank == 0:
        s = out["sharded"]
        heads = sorted({tuple(h) for g in s["graphs"] for h in g["decode_heads"]})
        print(f"{world} ranks ({backend}, {device.type}), policy={args.policy}, inner={inner}")
        print(f"rank 0: {s['rewritten']} decode_attn site(s), local (Hq, Hkv) {heads}")
        print(f"sharded     tokens {s['tokens']}  {s['ms_per_token']:.3f} ms/token (median)")
        if "reference" in out:
            r = out["reference"]
            ok = r["tokens"] == s["tokens"]
            out["identical"] = ok
            print(f"single-proc tokens {r['tokens']}  {r['ms_per_token']:.3f} ms/token (median)")
            print("tokens identical" if ok else "TOKENS DIFFER")
    if args.json:
        with open(f"{args.json}.rank{rank}.json", "w") as f:
            json.dump(out, f, indent=1)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
