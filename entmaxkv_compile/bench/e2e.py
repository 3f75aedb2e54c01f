"""``e2e``: a Llama decoding at long context, ``backend="entmaxkv"`` vs Inductor dense entmax vs softmax SDPA.

Per context: one exact chunked entmax prefill (:func:`entmaxkv_compile.generate.prefill`) of
``min(context, --prefill-len)`` prompt tokens, the rest of the cache filled by repeating them
(:func:`~entmaxkv_compile.generate.extend_cache`), a snapshot; then per variant, from the same cache,
``--steps`` greedy tokens through the compiled model:

* ``entmaxkv`` — ``torch.compile(model, backend=entmaxkv_compile.backend(config))`` (certified policy);
* ``inductor`` — ``torch.compile(model)``: the same entmax model, dense entmax, default backend;
* ``sdpa`` — the same weights with ``attn_implementation="sdpa"`` (softmax), prefilled the same way.
  This is transformers' SDPA path as users run it: with a static-cache mask it repeats K/V to every
  query head (``enable_gqa`` needs a mask-free call), so it is slower than a bare ``enable_gqa`` SDPA
  (the per-layer yardstick of ``entmaxkv-bench kernels``).

Reported per variant: median per-token latency and tokens/s over the steps after ``--warmup``, compile
time (first step minus the median step), peak device memory, Dynamo compiles and recompiles after warm-up
(``torch._dynamo.utils.counters["frames"]["ok"]``), whether CUDA graphs (``mode="reduce-overhead"``) were
used — a variant whose CUDA-graph run raises is rerun without and the error is recorded — and whether its
greedy tokens equal the ``inductor`` (dense entmax) tokens. ``e2e.json`` is rewritten after every variant.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from ..backend import backend, reset
from ..config import EntmaxKVConfig

VARIANTS = ("entmaxkv", "inductor", "sdpa")
NOTES = (
    "cache slots past prefill_tokens repeat the prefilled tokens; sdpa is transformers' path (static-cache "
    "mask: K/V repeated per query head, no enable_gqa); peak_mem_gib includes the prefill snapshot; "
    "compile_s = first step minus the median step"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for e2e.json and e2e.png")
    p.add_argument("--preset", default="attn128", help="entmaxkv_compile.generate.PRESETS: tiny, 1b, attn128")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--contexts", default="32768,131072", help="comma list of cache lengths")
    p.add_argument("--prefill-len", type=int, default=32768, help="exact prefill tokens (rest repeated)")
    p.add_argument("--steps", type=int, default=64, help="greedy tokens per variant")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--policy", default="certified", help="EntmaxKVConfig.policy for the entmaxkv variant")
    p.add_argument("--inner-compiler", default="inductor", help="EntmaxKVConfig.inner_compiler (tests)")
    p.add_argument("--dense-backend", default="inductor", help="backend of the inductor/sdpa variants")
    p.add_argument("--no-cudagraphs", action="store_true", help="never try mode='reduce-overhead'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)


def _compiled(variant: str, model: torch.nn.Module, args: argparse.Namespace, mode: str | None) -> Any:
    if variant == "entmaxkv":
        config = EntmaxKVConfig(policy=args.policy, inner_compiler=args.inner_compiler)
        return torch.compile(model, backend=backend(config), mode=mode)
    return torch.compile(model, backend=args.dense_backend, mode=mode)


def _run_variant(
    variant: str, model: torch.nn.Module, cache: Any, start: dict, args: argparse.Namespace
) -> dict[str, Any]:
    """Decode from the snapshot ``start`` with CUDA graphs if possible, else without."""
    from .. import generate  # transformers is an optional dependency

    modes = [None] if args.no_cudagraphs or args.device == "cpu" else ["reduce-overhead", None]
    errors = []
    for mode in modes:
        torch._dynamo.reset()
        counters.clear()
        generate.restore(cache, start["snap"])
        reset()  # per-site sketches describe the previous run's cache
        if args.device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        try:
            res = _decode(variant, model, cache, start["logits"], args, mode)
        except Exception as e:  # noqa: BLE001  (recorded; the variant is rerun without CUDA graphs)
            errors.append(f"mode={mode}: {type(e).__name__}: {str(e)[:300]}")
            continue
        res.update(cudagraphs=mode is not None, cudagraph_error=errors[0] if errors else None)
        return res
    return {"variant": variant, "error": errors}


def _decode(
    variant: str,
    model: torch.nn.Module,
    cache: Any,
    logits: torch.Tensor,
    args: argparse.Namespace,
    mode: str | None,
) -> dict[str, Any]:
    from tqdm import tqdm

    from .. import generate

    fn = _compiled(variant, model, args, mode)
    compiles: list[int] = []
    bar = tqdm(total=args.steps, desc=f"  {variant:9s} decode", leave=False)

    def on_token(_: int) -> None:
        compiles.append(counters["frames"]["ok"])
        bar.update()

    tokens, times = generate.greedy(fn, logits, cache, args.steps, on_token)
    bar.close()
    timed = times[args.warmup :] or times
    median = statistics.median(timed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device != "cpu" else None
    return {
        "variant": variant,
        "tokens": tokens,
        "ms_per_token": 1e3 * median,
        "tokens_per_s": len(timed) / sum(timed),
        "compile_s": times[0] - median,
        "peak_mem_gib": peak,
        "compiles": compiles[-1],
        "recompiles_after_warmup": compiles[-1] - compiles[min(args.warmup, len(compiles)) - 1],
        "decode_attn_sites": counters["entmaxkv"]["decode_attn"],
        "left_dense": counters["entmaxkv"]["left_dense"],
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],  # > 0: Inductor ran without graphs
    }


def _prefilled(model: torch.nn.Module, ctx: int, args: argparse.Namespace, memo: dict) -> tuple[Any, dict]:
    """A cache for ``ctx`` tokens (+ the decode steps) and its snapshot after prefill.

    The exact prefix of each attention kind is prefilled once and copied into later contexts (``memo``).
    """
    from tqdm import tqdm

    from .. import generate

    cache = generate.new_cache(model, ctx + args.steps + 1)
    real = min(ctx, args.prefill_len)
    key = (model.config._attn_implementation, real)
    chunk = generate.prefill_chunk(model, real)
    t0, reused = time.perf_counter(), key in memo
    if reused:
        prefix, logits = memo[key]
        for lay, (k, v) in zip(cache.layers, prefix):
            lay.keys[:, :, :real], lay.values[:, :, :real] = k, v
    else:
        gen = torch.Generator().manual_seed(args.seed + 1)
        ids = torch.randint(0, model.config.vocab_size, (1, real), generator=gen).to(args.device)
        with tqdm(total=real, desc=f"  prefill {key[0]}", leave=False) as bar:
            logits = generate.prefill(model, ids, cache, chunk, bar)
        prefix = [(lay.keys[:, :, :real].clone(), lay.values[:, :, :real].clone()) for lay in cache.layers]
        memo[key] = prefix, logits
    generate.extend_cache(cache, real, ctx)
    _sync(args.device)
    elapsed = time.perf_counter() - t0
    info = {"prefill_tokens": real, "prefill_chunk": chunk, "prefill_s": elapsed, "prefix_reused": reused}
    return cache, {"snap": generate.snapshot(cache), "logits": logits, "info": info}


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> None:
    """Long-context decode: entmaxkv vs Inductor dense entmax vs softmax SDPA (JSON, PNG, table)."""
    from .. import generate

    args.out.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    if bad := set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants must be from {VARIANTS}, got {sorted(bad)}")
    model = generate.build_model(
        args.preset, layers=args.layers, max_positions=max(contexts) + args.steps + 1,
        device=args.device, dtype=getattr(torch, args.dtype), seed=args.seed,
    )  # fmt: skip
    report: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "env": _env(),
        "results": [],
    }
    report["notes"] = NOTES
    report["model"] = {k: getattr(model.config, k) for k in generate.PRESETS[args.preset]}
    memo: dict = {}
    for ctx in contexts:
        print(f"context {ctx}")
        entry: dict[str, Any] = {"context": ctx, "variants": {}}
        report["results"].append(entry)
        start = None
        for variant in variants:
            attn = "sdpa" if variant == "sdpa" else "entmax15"
            with generate.attention(model, attn):
                if start is None or start["attn"] != attn:
                    del start
                    cache, start = _prefilled(model, ctx, args, memo)
                    start["attn"] = attn
                    entry[f"prefill_{attn}"] = start["info"]
                entry["variants"][variant] = _run_variant(variant, model, cache, start, args)
            _check_tokens(entry)
            _write(report, args.out)
        del cache, start
    _summary(report)
    _plot(report, args.out / "e2e.png")


def _check_tokens(entry: dict[str, Any]) -> None:
    ref = entry["variants"].get("inductor", {}).get("tokens")
    got = entry["variants"].get("entmaxkv", {}).get("tokens")
    entry["entmaxkv_tokens_equal_dense"] = None if ref is None or got is None else got == ref


def _env() -> dict[str, str]:
    import transformers

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "device": dev}


def _write(report: dict[str, Any], out: Path) -> None:
    (out / "e2e.json").write_text(json.dumps(report, indent=1))


def _summary(report: dict[str, Any]) -> None:
    head = f"{'context':>8} {'variant':9} {'ms/tok':>8} {'tok/s':>8} {'compile s':>9} {'peak GiB':>8} "
    print(head + f"{'recomp':>6} {'graphs':>6}  tokens==dense")
    for entry in report["results"]:
        for name, r in entry["variants"].items():
            if "error" in r:
                print(f"{entry['context']:>8} {name:9} FAILED: {r['error']}")
                continue
            peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            eq = entry["entmaxkv_tokens_equal_dense"] if name == "entmaxkv" else ""
            print(
                f"{entry['context']:>8} {name:9} {r['ms_per_token']:8.2f} {r['tokens_per_s']:8.1f} "
                f"{r['compile_s']:9.1f} {peak:>8} {r['recompiles_after_warmup']:6d} "
                f"{_graphs(r):>6}  {eq}"
            )


def _graphs(r: dict[str, Any]) -> str:
    if not r["cudagraphs"]:
        return "no"
    return "skip" if r.get("cudagraph_skips") else "cuda"  # skip: Inductor declined to capture


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [e["context"] for e in report["results"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(VARIANTS)
    for i, name in enumerate(VARIANTS):
        ys = [e["variants"].get(name, {}).get("tokens_per_s", 0.0) for e in report["results"]]
        ax.bar([c + i * width for c in range(len(contexts))], ys, width, label=name)
    ax.set_xticks([c + width for c in range(len(contexts))], [f"{c // 1024}K" for c in contexts])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{report['model']['num_hidden_layers']}-layer Llama, {report['env']['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
