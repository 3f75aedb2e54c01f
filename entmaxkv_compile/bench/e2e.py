"""``e2e``: a Llama decoding at long context, ``backend="entmaxkv"`` vs Inductor dense entmax vs softmax SDPA.

Per context: one exact chunked entmax prefill (:func:`entmaxkv_compile.generate.prefill`) of
``min(context, --prefill-len)`` prompt tokens, the rest of the cache filled by repeating them
(:func:`~entmaxkv_compile.generate.extend_cache`), a snapshot; then per variant, from the same cache,
``--steps`` greedy tokens through the model:

* ``entmaxkv`` — ``torch.compile(model, backend=entmaxkv_compile.backend(config))`` (certified policy);
* ``inductor`` — ``torch.compile(model)``: the same entmax model, dense entmax, default backend;
* ``sdpa`` — the same weights with ``attn_implementation="sdpa"`` (softmax), prefilled the same way.
  This is transformers' SDPA path as users run it: with a static-cache mask it repeats K/V to every
  query head (``enable_gqa`` needs a mask-free call), so it is slower than a bare ``enable_gqa`` SDPA
  (the per-layer yardstick of ``entmaxkv-bench kernels``);
* ``reference`` — eager dense entmax with the decode op's arithmetic
  (:func:`~entmaxkv_compile.generate.reference_entmax_attention`): the token reference. In a 16-bit model
  ``inductor`` rounds every score to bf16 and ``entmaxkv`` does not, so near-tied greedy tokens may part;
  both token comparisons are reported, each with the step where they part and the reference's top-2 logit
  margin there (in ulps of the logits dtype).

Reported per variant: median per-token latency and tokens/s over the steps after ``--warmup``, the wall
time of the first call (cold: Dynamo, the pass, Inductor and Triton compiles), compile time (the warm-up
steps' time beyond ``warmup`` median steps: also CUDA-graph recording), peak device memory, Dynamo
compiles and recompiles after warm-up (``torch._dynamo.utils.counters["frames"]["ok"]``), whether CUDA
graphs (``mode="reduce-overhead"``) were used — a variant whose CUDA-graph run raises is rerun without and
the error is recorded. ``e2e.json`` is rewritten after every variant and after each variant's first step
(``"partial": true`` until it finishes), so a run cut short keeps what it measured. ``e2e-summary`` prints
the tables of one or more ``e2e.json`` files with the speed-up ratios and the targets of :data:`TARGETS`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from ..backend import backend, reset
from ..config import EntmaxKVConfig

VARIANTS = ("entmaxkv", "inductor", "sdpa", "reference")
TOKEN_REFS = ("reference", "inductor")  # entmaxkv's greedy tokens are compared with these variants'
SDPA = "sdpa"  # the one variant with its own (softmax) cache; every other decodes the entmax cache
# speed-up of entmaxkv in tokens/s over another variant that the benchmark is meant to show, per context
TARGETS: dict[int, dict[str, float]] = {524288: {"inductor": 3.0, "sdpa": 1.5}, 131072: {"inductor": 1.5}}
CHECKPOINT_EVERY = 250  # decode steps between partial records in e2e.json (and after the first step)
COMPILE_TARGET_S = 60.0  # cold first call of the "1b" preset with backend="entmaxkv"
NOTES = (
    "cache slots past prefill_tokens repeat the prefilled tokens; sdpa is transformers' path (static-cache "
    "mask: K/V repeated per query head, no enable_gqa); reference = eager dense entmax with the decode op's "
    "fp32 arithmetic (scores not rounded to the model dtype); peak_mem_gib includes the prefill snapshot; "
    "first_step_s = wall of the first call; compile_s = warm-up steps minus warmup x the median step; "
    "margins in ulps of the logits dtype at the top logit"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for e2e.json and e2e.png")
    p.add_argument("--preset", default="attn128", help="entmaxkv_compile.generate.PRESETS: tiny, 1b, attn128")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--contexts", default="32768,131072", help="comma list of cache lengths")
    p.add_argument("--prefill-len", type=int, default=32768, help="exact prefill tokens (rest repeated)")
    p.add_argument("--steps", type=int, default=64, help="greedy tokens per variant")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing (≥ 1)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--policy", default="certified", help="EntmaxKVConfig.policy for the entmaxkv variant")
    p.add_argument("--inner-compiler", default="inductor", help="EntmaxKVConfig.inner_compiler (tests)")
    p.add_argument("--dense-backend", default="inductor", help="backend of the inductor/sdpa variants")
    p.add_argument("--no-cudagraphs", action="store_true", help="never try mode='reduce-overhead'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)


def _compiled(variant: str, model: torch.nn.Module, args: argparse.Namespace, mode: str | None) -> Any:
    if variant == "reference":
        return model  # eager: the reference is the plain-PyTorch oracle, not a compiled program
    if variant == "entmaxkv":
        config = EntmaxKVConfig(policy=args.policy, inner_compiler=args.inner_compiler)
        return torch.compile(model, backend=backend(config), mode=mode)
    return torch.compile(model, backend=args.dense_backend, mode=mode)


def _attention(variant: str) -> str:
    """The attention implementation ``variant`` decodes with."""
    from .. import generate

    return {SDPA: SDPA, "reference": "entmax15" + generate.REFERENCE_SUFFIX}.get(variant, "entmax15")


def _run_variant(
    variant: str,
    model: torch.nn.Module,
    cache: Any,
    start: dict,
    args: argparse.Namespace,
    checkpoint: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Decode from the snapshot ``start`` with CUDA graphs if possible, else without."""
    from .. import generate  # transformers is an optional dependency

    eager = variant == "reference"
    modes = [None] if eager or args.no_cudagraphs or args.device == "cpu" else ["reduce-overhead", None]
    errors = []
    for mode in modes:
        torch._dynamo.reset()
        counters.clear()
        generate.restore(cache, start["snap"])
        reset()  # per-site sketches describe the previous run's cache
        if args.device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        try:
            with generate.attention(model, _attention(variant)):
                res = _decode(variant, model, cache, start["logits"], args, mode, checkpoint)
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
    checkpoint: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    from tqdm import tqdm

    from .. import generate

    fn = _compiled(variant, model, args, mode)
    compiles: list[int] = []
    margins: list[float] = []
    bar = tqdm(total=args.steps, desc=f"  {variant:9s} decode", leave=False)
    t0 = time.perf_counter()

    partial = {"variant": variant, "partial": True, "cudagraphs": mode is not None}

    def on_token(_: int) -> None:
        compiles.append(counters["frames"]["ok"])
        bar.update()
        if len(compiles) == 1:
            partial["first_step_s"] = time.perf_counter() - t0
        if len(compiles) == 1 or len(compiles) % CHECKPOINT_EVERY == 0:  # on record if cut short later
            checkpoint(dict(partial, tokens_done=len(compiles), compiles=compiles[-1]))

    tokens, times = generate.greedy(fn, logits, cache, args.steps, on_token, margins)
    bar.close()
    warmup = min(max(1, args.warmup), len(times) - 1) if len(times) > 1 else 0
    timed = times[warmup:]
    median = statistics.median(timed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device != "cpu" else None
    return {
        "variant": variant,
        "tokens": tokens,
        "margins_ulps": margins,
        "ms_per_token": 1e3 * median,
        "tokens_per_s": len(timed) / sum(timed),
        "timed_steps": len(timed),
        "first_step_s": times[0],
        "compile_s": sum(times[:warmup]) - warmup * median if warmup else times[0] - median,
        "peak_mem_gib": peak,
        "compiles": compiles[-1],
        "recompiles_after_warmup": compiles[-1] - compiles[max(warmup, 1) - 1],
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
    variants.sort(key=lambda v: v == SDPA)  # the entmax-cache variants first: one prefill per kind
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
        print(f"context {ctx}", flush=True)
        entry: dict[str, Any] = {"context": ctx, "variants": {}}
        report["results"].append(entry)
        cache, start = None, None
        for variant in variants:
            kind = SDPA if variant == SDPA else "entmax15"
            if start is None or start["kind"] != kind:
                del cache, start  # free the previous kind's cache and snapshot first
                with generate.attention(model, kind):
                    cache, start = _prefilled(model, ctx, args, memo)
                start["kind"] = kind
                entry[f"prefill_{kind}"] = start["info"]

            checkpoint = functools.partial(_checkpoint, report, entry, variant, args.out)
            entry["variants"][variant] = _run_variant(variant, model, cache, start, args, checkpoint)
            _check_tokens(entry)
            _write(report, args.out)
        del cache, start
    summarize(report)
    _plot(report, args.out / "e2e.png")


def _checkpoint(report: dict[str, Any], entry: dict, variant: str, out: Path, partial: dict) -> None:
    entry["variants"][variant] = partial
    _write(report, out)


def _check_tokens(entry: dict[str, Any]) -> None:
    """``tokens_equal[ref]`` and ``first_divergence[ref]`` of entmaxkv against each finished reference."""
    from .. import generate

    got = entry["variants"].get("entmaxkv", {}).get("tokens")
    entry["tokens_equal"], entry["first_divergence"] = {}, {}
    for name in TOKEN_REFS:
        ref = entry["variants"].get(name, {})
        if got is None or "tokens" not in ref:
            continue
        entry["tokens_equal"][name] = got == ref["tokens"]
        entry["first_divergence"][name] = generate.first_divergence(got, ref["tokens"], ref["margins_ulps"])


def _env() -> dict[str, str | None]:
    import transformers

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    env: dict[str, str | None] = {"torch": torch.__version__, "transformers": transformers.__version__}
    env["device"] = dev
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # scripts/gpu/e2e.sh: fresh ones = cold
        env[var] = os.environ.get(var)
    return env


def _write(report: dict[str, Any], out: Path) -> None:
    (out / "e2e.json").write_text(json.dumps(report, indent=1))


def summarize(report: dict[str, Any]) -> None:
    """Per-variant table, then per context entmaxkv's speed-ups and token checks against the targets."""
    a = report["args"]
    print(
        f"preset {a['preset']} (layers {a['layers']}), {a['dtype']}, {a['steps']} steps "
        f"({a['warmup']} warm-up), {report['env']['device']}"
    )
    head = f"{'context':>8} {'variant':9} {'ms/tok':>8} {'tok/s':>8} {'1st s':>7} {'compile s':>9} "
    print(head + f"{'peak GiB':>8} {'comp':>4} {'recomp':>6} {'graphs':>6}")
    for entry in report["results"]:
        for name, r in entry["variants"].items():
            if "error" in r:
                print(f"{entry['context']:>8} {name:9} FAILED: {r['error']}")
            elif r.get("partial"):
                print(
                    f"{entry['context']:>8} {name:9} cut short after {r['tokens_done']} steps (first call "
                    f"{r['first_step_s']:.1f} s, {r['compiles']} compile(s) so far)"
                )
            else:
                peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
                first, comp = (
                    (f"{r['first_step_s']:.1f}", f"{r['compile_s']:.1f}") if r["compiles"] else ("-", "-")
                )
                print(
                    f"{entry['context']:>8} {name:9} {r['ms_per_token']:8.2f} {r['tokens_per_s']:8.1f} "
                    f"{first:>7} {comp:>9} {peak:>8} {r['compiles']:4d} "
                    f"{r['recompiles_after_warmup']:6d} {_graphs(r):>6}"
                )
    for line in _verdicts(report):
        print(line)


def _verdicts(report: dict[str, Any]) -> list[str]:
    lines = []
    for entry in report["results"]:
        done = {n: r for n, r in entry["variants"].items() if "tokens_per_s" in r}
        parts = []
        for other in ("inductor", SDPA):
            if "entmaxkv" not in done or other not in done:
                continue
            ratio = done["entmaxkv"]["tokens_per_s"] / done[other]["tokens_per_s"]
            target = TARGETS.get(entry["context"], {}).get(other)
            verdict = (
                "" if target is None else f" (target ≥ {target:g}: {'met' if ratio >= target else 'MISSED'})"
            )
            parts.append(f"{ratio:.2f}× {other}{verdict}")
        for ref, equal in entry.get("tokens_equal", {}).items():
            div = entry["first_divergence"][ref]
            where = (
                "" if div is None else f" (token {div['token']}, {ref} margin {_ulps(div['margin_ulps'])})"
            )
            parts.append(f"tokens == {ref}: {equal}{where}")
        if parts:
            lines.append(f"{_k(entry['context']):>7} entmaxkv: " + "; ".join(parts))
        if (r := done.get("entmaxkv")) is not None:
            lines.append(_compile_line(report, r))
    return lines


def _compile_line(report: dict[str, Any], r: dict[str, Any]) -> str:
    target = report["args"]["preset"] == "1b"
    ok = r["first_step_s"] <= COMPILE_TARGET_S and r["compile_s"] <= COMPILE_TARGET_S
    verdict = f" (target ≤ {COMPILE_TARGET_S:g} s: {'met' if ok else 'MISSED'})" if target else ""
    return (
        f"{'':>7} entmaxkv compile: first call {r['first_step_s']:.1f} s, warm-up {r['compile_s']:.1f} s"
        f"{verdict}; recompiles after warm-up over {r['timed_steps']} tokens: {r['recompiles_after_warmup']}"
        f" ({r['compiles']} compile(s) in all)"
    )


def _k(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _ulps(margin: float | None) -> str:
    return "?" if margin is None else f"{margin:.0f} ulp"


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
    ax.set_xticks([c + 1.5 * width for c in range(len(contexts))], [_k(c) for c in contexts])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{report['model']['num_hidden_layers']}-layer Llama, {report['env']['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_summary_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path, help="e2e.json files (missing ones are reported)")


def run_summary(args: argparse.Namespace) -> None:
    """Tables, speed-ups and targets of finished or partial ``e2e`` runs (one or more e2e.json)."""
    for path in args.files:
        print(f"== {path}")
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"   no result: {type(e).__name__}: {e}")
            continue
        summarize(report)
