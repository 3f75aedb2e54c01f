"""``python -m entmaxkv_compile.eval`` (``entmaxkv-eval``): every selection policy on the trained entmax LM.

    PYTHONPATH=. python -m entmaxkv_compile.eval                         # full run (GPU), ~1-2 min on an H200
    PYTHONPATH=. python -m entmaxkv_compile.eval --smoke                 # small contexts, CPU
    PYTHONPATH=. python -m entmaxkv_compile.eval --plot results.json     # redraw the PNG from a JSON

Writes ``<out-dir>/<name>.json`` after every section (so a cut-short run keeps what it measured) and
``<out-dir>/<name>.png`` at the end when matplotlib is available. See docs/FIDELITY.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..models.corpus import load_text
from ..models.llama_entmax import EntmaxLM, LMConfig, count_params, load_model
from .harness import context_bpb, decode_bpb, fidelity, passkey, take_windows
from .policies import Policy, policy_table

KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SECTIONS = ("context", "fidelity", "decode", "passkey")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="artifacts/entmax_lm.pt")
    p.add_argument("--random-init", action="store_true", help="a seeded random model instead of the weights")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="fidelity")
    p.add_argument("--sources", default="torch,stdlib", help="validation text roots (models.corpus)")
    p.add_argument(
        "--contexts", type=_ints, default=[1024, 4096, 8192, 16384, 32768], help="dense bpb at these"
    )
    p.add_argument("--context", type=int, default=16384, help="context of the fidelity and decode runs")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--positions", type=int, default=8, help="decode positions in the last 1/8 of the context")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--passkey-lengths", type=_ints, default=[1024, 4096, 16384])
    p.add_argument("--passkey-trials", type=int, default=20)
    p.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="bf16")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="small contexts and counts (CPU, seconds)")
    p.add_argument("--plot", metavar="JSON", help="only redraw the PNG of an existing result")
    args = p.parse_args(argv)
    if args.smoke:
        args.contexts, args.context, args.windows, args.positions = [256, 512], 512, 1, 2
        args.decode_steps, args.passkey_lengths, args.passkey_trials = 4, [256], 2
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
    return args


def decode_positions(context: int, n: int) -> list[int]:
    return sorted({int(x) for x in np.linspace(context * 7 // 8, context - 1, n).round()})


def _model(args: argparse.Namespace) -> tuple[EntmaxLM, dict]:
    if args.random_init:
        torch.manual_seed(args.seed)
        return EntmaxLM(LMConfig()).to(args.device).eval(), {"random_init": True, "seed": args.seed}
    return load_model(args.weights, args.device)


def run(args: argparse.Namespace) -> dict:
    """Run the chosen sections and write ``<out-dir>/<name>.json``; returns the result."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{args.name}.json"
    model, meta = _model(args)
    need = max([args.context + 1, *[n + 1 for n in args.contexts], *args.passkey_lengths]) * args.windows
    text = load_text("val", args.sources.split(","), max_bytes=4 * need if args.smoke else None)
    kv_dtype = KV_DTYPES[args.kv_dtype]
    sections = args.sections.split(",")
    policies = policy_table(args.context, model.cfg.head_dim)

    def headline_at(context: int) -> list[Policy]:
        return [p for p in policy_table(context, model.cfg.head_dim) if p.headline]

    result: dict = {
        "meta": {
            "model": meta,
            "params": count_params(model),
            "config": vars(model.cfg),
            "torch": str(torch.__version__),
            "device": str(args.device),
            "val_bytes": len(text),
            "args": {k: v for k, v in vars(args).items() if k != "plot"},
        },
        "seconds": {},
    }

    def section(name: str, fn) -> None:
        t0 = time.time()
        result[name] = fn()
        result["seconds"][name] = round(time.time() - t0, 2)
        json_path.write_text(json.dumps(result, indent=1))
        print(f"[eval] {name} done in {result['seconds'][name]}s", flush=True)

    if "context" in sections:
        section("context_bpb", lambda: context_bpb(model, text, args.contexts, args.windows, tail=1024))
    windows = take_windows(text, args.context + 1, args.windows, args.device)
    if "fidelity" in sections:
        positions = decode_positions(args.context, args.positions)

        def fid() -> dict:
            pols = fidelity(model, windows[:, :-1], positions, policies, kv_dtype)
            return {
                "context": args.context,
                "windows": args.windows,
                "positions": positions,
                "kv_dtype": args.kv_dtype,
                "policies": pols,
            }

        section("fidelity", fid)
    if "decode" in sections:
        section(
            "decode_bpb",
            lambda: {
                "context": args.context,
                "steps": args.decode_steps,
                "policies": decode_bpb(
                    model, windows, args.decode_steps, headline_at(args.context), kv_dtype
                ),
            },
        )
    if "passkey" in sections:
        section(
            "passkey",
            lambda: {
                "lengths": args.passkey_lengths,
                "trials": args.passkey_trials,
                "policies": passkey(
                    model, text, args.passkey_lengths, args.passkey_trials, headline_at, kv_dtype, args.seed
                ),
            },
        )
    return result


TABLE = (  # (header, field of the overall summary, format)
    ("KV bytes", "kv_bytes_fraction", "8.4f"),
    ("recall", "support_recall", "7.4f"),
    ("min rec", "support_recall_worst", "7.4f"),
    ("δ max", "dropped_mass_worst", "8.1e"),
    ("δ bound", "delta_bound_worst", "8.1e"),
    ("err max", "output_error_worst", "8.1e"),
    ("read", "read_fraction", "7.4f"),
    ("read wst", "read_fraction_worst", "8.4f"),
)


def print_table(result: dict) -> None:
    pols = result.get("fidelity", {}).get("policies", {})
    dec = result.get("decode_bpb", {}).get("policies", {})
    pk = result.get("passkey", {}).get("policies", {})
    cols = " ".join(f"{h:>{fmt.split('.')[0]}s}" for h, _, fmt in TABLE)
    print(f"{'policy':34s} {cols} {'Δbpb':>8s} passkey")
    for name, r in pols.items():
        o = r["overall"]
        vals = " ".join(f"{o[f]:{fmt}}" for _, f, fmt in TABLE)
        d = dec.get(name, {}).get("rel_to_dense")
        dbpb = "" if d is None else f"{d:+.2%}"
        acc = " ".join(f"{v:.2f}" for v in pk.get(name, {}).values())
        print(f"{name:34s} {vals} {dbpb:>8s} {acc}")


def _plot(result: dict, path: Path) -> None:
    try:
        from .plots import plot_fidelity

        plot_fidelity(result, path)
        print(f"[eval] wrote {path}")
    except ImportError:
        print("[eval] matplotlib not installed: no PNG (redraw later with --plot)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        _plot(result, Path(args.plot).with_suffix(".png"))
        return
    result = run(args)
    print_table(result)
    _plot(result, Path(args.out_dir) / f"{args.name}.png")


if __name__ == "__main__":
    main()
