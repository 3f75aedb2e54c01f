"""PNG figures of a fidelity result (needs matplotlib; the harness skips plotting without it)."""

from __future__ import annotations

from pathlib import Path

MARKERS = {"dense": "*", "topk": "o", "quest": "x", "topk-mean": "s", "adaptive": "^", "certified": "D"}


def plot_fidelity(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fid = result.get("fidelity")
    if fid:
        pols = fid["policies"]
        ax_rec, ax_err, ax_layer = axes[0, 0], axes[0, 1], axes[1, 0]
        for name, r in pols.items():
            o = r["overall"]
            x = o["kv_bytes_fraction"]
            m = MARKERS.get(r["family"], "o")
            ax_rec.scatter(x, o["support_recall"], marker=m, label=name)
            ax_err.scatter(x, max(o["output_error"], 1e-9), marker=m, label=name)
        for ax, ylabel in (
            (ax_rec, "support recall (mean)"),
            (ax_err, "relative L2 output error (mean; 0 drawn at 1e-9)"),
        ):
            ax.set_xscale("log")
            ax.set_xlabel("KV bytes read / dense bf16 K+V (metadata included)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        ax_err.set_yscale("log")
        ax_rec.set_title(
            f"context {fid['context']}, {fid['windows']} windows x {len(fid['positions'])} positions"
        )
        ax_rec.legend(fontsize=6, ncol=2)
        cert = {n: r for n, r in pols.items() if r["family"] == "certified"}
        width = 0.8 / max(1, len(cert))
        for i, (name, r) in enumerate(cert.items()):
            vals = [layer["read_fraction"] for layer in r["layers"]]
            ax_layer.bar([j + i * width for j in range(len(vals))], vals, width, label=name)
        n_layers = len(next(iter(cert.values()))["layers"]) if cert else 0
        ax_layer.set_xticks([j + 0.4 - width / 2 for j in range(n_layers)], [str(j) for j in range(n_layers)])
        ax_layer.set_yscale("log")
        ax_layer.set_xlabel("layer")
        ax_layer.set_ylabel("exact K rows read / tokens (mean)")
        ax_layer.set_title("certified: tokens read per layer")
        ax_layer.legend(fontsize=6)
    ax = axes[1, 1]
    if result.get("context_bpb"):
        rows = result["context_bpb"]
        ax.plot(
            [r["context"] for r in rows], [r["bpb_tail"] for r in rows], "o-", label="dense bpb (last bytes)"
        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (bytes)")
        ax.set_ylabel("bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper right")
    if result.get("passkey"):
        pk = result["passkey"]["policies"]
        ax2 = ax.twinx()
        for name, accs in pk.items():
            ax2.plot([int(n) for n in accs], list(accs.values()), ".--", label=f"passkey {name}")
        ax2.set_ylim(-0.05, 1.05)
        ax2.set_ylabel("passkey accuracy")
        ax2.legend(fontsize=6, loc="lower left")
    ax.set_title("does the model still work at long context?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
