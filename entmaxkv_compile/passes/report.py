"""What the pass found: matched sites (rewritten, or rewritable for ``explain``) and sites left alone."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MatchedSite:
    """An entmax attention site the pass rewrites into ``entmaxkv::decode_attn``."""

    kind: str  # entmax15 | sparsemax | entmax_bisect | entmax | hand-written
    alpha: float
    num_heads: int
    num_kv_heads: int
    query_len: int
    where: str  # module path (node name)
    site: int | None = None  # id of the rewritten op (None in explain reports)

    def __str__(self) -> str:
        heads = f"Hq={self.num_heads} Hkv={self.num_kv_heads}"
        site = "" if self.site is None else f" site {self.site}"
        return f"{self.kind} α={self.alpha:g} {heads} Lq={self.query_len} at {self.where}{site}"


@dataclass(frozen=True)
class UnmatchedSite:
    """An attention-like site left as it is, and why."""

    kind: str  # the normaliser: entmax15 … | softmax | sdpa | unknown
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} at {self.where}: {self.reason}"


@dataclass
class ExplainReport:
    """The sites of the captured graph; ``print(report)`` for a summary."""

    matched: list[MatchedSite] = field(default_factory=list)
    unmatched: list[UnmatchedSite] = field(default_factory=list)
    graphs: int = 0
    complete: bool = True  # False: a graph break hid the rest of the model from the analysis

    def __str__(self) -> str:
        lines = [
            f"entmaxkv: {len(self.matched)} site(s) rewritten, {len(self.unmatched)} left dense, "
            f"in {self.graphs} graph(s)"
        ]
        if not self.complete:
            lines.append("  (a graph break stopped the capture: code after it was not analysed)")
        lines += [f"  matched   {m}" for m in self.matched]
        lines += [f"  unmatched {u}" for u in self.unmatched]
        return "\n".join(lines)
