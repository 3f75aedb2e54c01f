"""PNG figures of a fidelity result (needs matplotlib; the harness skips plotting without it).

Every policy keeps one colour in all panels; the family sets the marker (scatter) and hatch (bars).
A series equal to an earlier one is labelled "(= earlier)"; an equal scatter point is drawn hollow over its
twin, so neither hides. Data are drawn as stored: no offsets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

FAMILY_STYLE = {  # family -> (scatter marker, bar hatch)
    "dense": ("*", ""),
    "topk": ("o", "//"),
    "quest": ("X", "xx"),
    "topk-mean": ("s", ".."),
    "adaptive": ("^", "\\\\"),
    "certified": ("D", ""),
}
LEGEND = {"fontsize": 7, "loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0}


def _colours(names: Iterable[str]) -> dict[str, Any]:
    """A distinct colour per name: tab10, Dark2, then tab20b by lightness level (stride 4)."""
    import matplotlib

    cmaps = matplotlib.colormaps
    palette = [*cmaps["tab10"].colors, *cmaps["Dark2"].colors]
    palette += [cmaps["tab20b"](i) for s in range(4) for i in range(s, 20, 4)]
    return {n: palette[i % len(palette)] for i, n in enumerate(dict.fromkeys(names))}


def _twins(series: dict[str, Hashable]) -> dict[str, str]:
    """name -> the first earlier name whose plotted values are identical."""
    first: dict[Hashable, str] = {}
    for n, v in series.items():
        first.setdefault(v, n)
    return {n: first[v] for n, v in series.items() if first[v] != n}


def _label(name: str, twins: dict[str, str]) -> str:
    return f"{name} (= {twins[name]})" if name in twins else name


def _log_ticks(axis: Any) -> None:
    """Plain-number log ticks at 1, 2, 3, 5 per decade (no 3e-1 / 4e-1 minor labels to collide)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _grouped_bars(
    ax: Any, series: dict[str, list[float]], colour: dict[str, Any], hatch: dict[str, str]
) -> list[Any]:
    """One bar group per index, one bar per series; equal series are labelled as twins."""
    twins = _twins({n: tuple(v) for n, v in series.items()})
    width = 0.8 / max(1, len(series))
    containers = []
    for i, (name, vals) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(vals))]
        style = {"color": colour[name], "hatch": hatch.get(name, ""), "edgecolor": "white", "linewidth": 0}
        containers.append(ax.bar(xs, vals, width, label=_label(name, twins), **style))
    ax.set_xticks(range(max((len(v) for v in series.values()), default=0)))
    return containers


def plot_fidelity(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 15), layout="constrained")
    axes = fig.subplot_mosaic([["rec", "err"], ["layer", "layer"], ["bpb", "pk"]])
    ax_rec, ax_err, ax_layer, ax_bpb, ax_pk = (axes[k] for k in ("rec", "err", "layer", "bpb", "pk"))
    fid, pk = result.get("fidelity"), result.get("passkey")
    pols = fid["policies"] if fid else {}
    size = Counter(r["family"] for r in pols.values())
    by_size = sorted(pols, key=lambda n: -size[pols[n]["family"]])  # biggest family: most distinct colours
    colour = _colours([*by_size, *(pk["policies"] if pk else {})])
    if fid:
        pts = {
            n: (r["overall"]["kv_bytes_fraction"], r["overall"]["support_recall"]) for n, r in pols.items()
        }
        errs = {n: r["overall"]["output_error"] for n, r in pols.items()}
        twins = _twins({n: (*pts[n], errs[n]) for n in pols})
        pos = [e for e in errs.values() if e > 0]
        zero = 10.0 ** (math.floor(math.log10(min(pos))) - 1) if pos else 1e-9
        for name, r in pols.items():
            x, rec = pts[name]
            style = {"marker": FAMILY_STYLE.get(r["family"], ("o", ""))[0], "label": _label(name, twins)}
            if name in twins:  # hollow and larger, over its twin
                style |= {"facecolors": "none", "edgecolors": [colour[name]], "s": 120, "linewidths": 1.5}
            else:
                style |= {"color": colour[name], "s": 40}
            ax_rec.scatter(x, rec, **style)
            ax_err.scatter(x, errs[name] or zero, **style)
        for ax, ylabel in ((ax_rec, "support recall (mean)"), (ax_err, "relative L2 output error (mean)")):
            ax.set_xscale("log")
            _log_ticks(ax.xaxis)
            ax.set_xlabel("KV bytes read / dense bf16 K+V (metadata included)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        ax_err.set_yscale("log")
        ax_err.axhline(zero, color="0.6", lw=0.8, ls=":")
        lo, hi = round(math.log10(zero)), math.ceil(math.log10(max(errs.values()) or 1.0))
        labels = ["0 (exact)", *(f"{10.0**k:g}" for k in range(lo + 1, hi + 1))]
        ax_err.set_yticks([10.0**k for k in range(lo, hi + 1)], labels)
        ax_err.set_ylim(zero / 3, 10.0**hi)
        ax_rec.set_title(
            f"context {fid['context']}, {fid['windows']} windows x {len(fid['positions'])} positions"
        )
        ax_err.set_title("output error (0 drawn on the dotted line)")
        ax_err.legend(title="policy (both panels above)", title_fontsize=8, **LEGEND)

        cert = {
            n: [la["read_fraction"] for la in r["layers"]]
            for n, r in pols.items()
            if r["family"] == "certified"
        }
        _grouped_bars(ax_layer, cert, colour, {})
        ax_layer.set_yscale("log")
        ax_layer.set_xlabel("layer")
        ax_layer.set_ylabel("exact K rows read / tokens (mean)")
        ax_layer.set_title("certified: tokens read per layer")
        ax_layer.legend(**LEGEND)
    if result.get("context_bpb"):
        rows = result["context_bpb"]
        ax_bpb.plot([r["context"] for r in rows], [r["bpb_tail"] for r in rows], "o-", color="k")
        ax_bpb.set_xscale("log", base=2)
        ax_bpb.set_xlabel("context (bytes)")
        ax_bpb.set_ylabel("dense bits per byte (last bytes of the context)")
        ax_bpb.grid(alpha=0.3)
    ax_bpb.set_title("does the model still work at long context?")
    if pk:
        accs = pk["policies"]
        hatch = {n: FAMILY_STYLE.get(pols.get(n, {}).get("family", ""), ("", ""))[1] for n in accs}
        for bars in _grouped_bars(ax_pk, {n: list(a.values()) for n, a in accs.items()}, colour, hatch):
            ax_pk.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
        ax_pk.set_xticklabels(list(next(iter(accs.values()))))
        ax_pk.set_ylim(0, 1.15)
        ax_pk.set_xlabel("passkey context (bytes)")
        ax_pk.set_ylabel(f"passkey accuracy ({pk['trials']} trials)")
        ax_pk.set_title("passkey retrieval")
        ax_pk.legend(**LEGEND)
    fig.savefig(path, dpi=110)
    plt.close(fig)
