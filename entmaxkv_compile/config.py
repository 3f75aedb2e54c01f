"""The one configuration dataclass of entmaxkv-compile.

Every knob the backend, the ops, the export path and the benchmarks read lives here, validated once in
``__post_init__`` so a bad value fails at ``backend(config)`` time with a message that names the field,
the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

Policy = Literal["auto", "dense", "topk", "adaptive", "certified"]
Sketch = Literal["int8", "int4"]
InnerCompiler = Literal["inductor", "aot_eager", "eager"]

POLICIES: tuple[str, ...] = ("auto", "dense", "topk", "adaptive", "certified")
SKETCHES: tuple[str, ...] = ("int8", "int4")
INNER_COMPILERS: tuple[str, ...] = ("inductor", "aot_eager", "eager")
SUPPORTED_HEAD_DIMS: tuple[int, ...] = (64, 128, 256)
# ``auto``: from this many cached positions on the certified decode is faster than the dense one (both exact);
# measured side by side on an H200 (docs/KERNELS.md, "The automatic policy").
AUTO_CERTIFIED_FROM = 131072


@dataclass(frozen=True)
class EntmaxKVConfig:
    """Settings of the entmaxkv backend.

    Parameters
    ----------
    policy:
        How a decode step chooses what to read. ``auto`` (default): ``certified`` for caches of at least
        ``AUTO_CERTIFIED_FROM`` (128K) positions, where it is the faster exact decode, ``dense`` below
        (and for sequences shorter than that in a longer cache). ``certified`` is exact: int sketches of the
        keys with worst-case error bounds prove which tokens cannot be in the entmax support; ``dense`` reads
        every key once and values only for the support; ``topk`` reads a static budget of pages (plus sink
        and recent pages); ``adaptive`` keeps pages whose upper bound can cross an estimated threshold.
    page_size:
        Tokens per page for page metadata (``topk``/``adaptive``). Power of two, 4..256.
    budget_pages:
        Pages selected per KV group by ``topk`` (sink and recent pages come on top of it).
    sink_pages, recent_pages:
        Pages always kept by ``topk``/``adaptive`` at the start and at the end of the context.
    sketch:
        Key sketch used by ``certified``: ``int8`` (tightest) or ``int4`` (half the bytes).
    sketch_group:
        Channels that share one quantisation step in the sketch (a power of two dividing the head dim).
        ``None`` (default): one step per key row — on the fidelity model as tight as groups of 32, with
        fewer bytes and a faster scoring pass (one integer accumulator per token) — except for an unrotated
        ``int4`` sketch, which takes groups of 32.
    sketch_rotation:
        Quantise ``R·k`` and score it with ``R·q`` (``R`` the normalised Hadamard matrix; exact, as
        ``q·k = R·q·R·k``): spreads outlier channels over all of them, so one int4 step per key row keeps the
        certificate about as tight as steps per 32 channels. ``None`` (default): on for ``int4``, off for
        ``int8`` (as tight without it on the fidelity model).
    candidate_fraction, min_candidates:
        Static capacity of the certified candidate buffer, as a fraction of the cache length (with a floor).
        A head whose candidates overflow it is decoded densely (exact either way).
    adaptive_slack:
        How far below the estimated threshold a page bound may be and still be kept by ``adaptive``.
    min_context:
        Below this many cached tokens the sparse policies run the dense decode (sparse cannot win there).
    max_query_len:
        Attention sites with at most this many query positions are decode sites; longer ones (prefill)
        stay untouched.
    softmax_topk:
        Opt in to rewriting *softmax* attention with the Quest-style ``topk`` policy (approximate).
    inner_compiler:
        What compiles the rewritten graph: ``inductor`` (default), ``aot_eager`` (fast, for tests) or
        ``eager`` (run the rewritten FX graph as is).
    on_unsupported:
        ``fallback`` leaves an unsupported site dense and logs why; ``error`` raises instead.
    """

    policy: Policy = "auto"
    page_size: int = 16
    budget_pages: int = 64
    sink_pages: int = 1
    recent_pages: int = 2
    sketch: Sketch = "int8"
    sketch_group: int | None = None
    sketch_rotation: bool | None = None
    candidate_fraction: float = 0.08
    min_candidates: int = 256
    adaptive_slack: float = 0.0
    min_context: int = 0
    max_query_len: int = 1
    softmax_topk: bool = False
    inner_compiler: InnerCompiler = "inductor"
    on_unsupported: Literal["fallback", "error"] = "fallback"

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"EntmaxKVConfig.{name}={getattr(self, name)!r}: {rule}")

        if self.policy not in POLICIES:
            raise bad("policy", f"must be one of {POLICIES}")
        if self.sketch not in SKETCHES:
            raise bad("sketch", f"must be one of {SKETCHES}")
        if self.inner_compiler not in INNER_COMPILERS:
            raise bad("inner_compiler", f"must be one of {INNER_COMPILERS}")
        if self.on_unsupported not in ("fallback", "error"):
            raise bad("on_unsupported", "must be 'fallback' or 'error'")
        ps = self.page_size
        if not isinstance(ps, int) or ps < 4 or ps > 256 or ps & (ps - 1):
            raise bad("page_size", "must be a power of two in [4, 256]")
        for name in ("budget_pages", "max_query_len", "min_candidates"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be an integer >= 1")
        for name in ("sink_pages", "recent_pages", "min_context"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "must be an integer >= 0")
        g = self.sketch_group
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 8 or g & (g - 1)):
            raise bad("sketch_group", "must be None or a power of two >= 8")
        if self.sketch_rotation not in (None, True, False):
            raise bad("sketch_rotation", "must be None, True or False")
        if not 0.0 < self.candidate_fraction <= 1.0:
            raise bad("candidate_fraction", "must be in (0, 1]")
        if self.adaptive_slack < 0:
            raise bad("adaptive_slack", "must be >= 0")

    def group_size(self, head_dim: int) -> int:
        """Channels per sketch quantisation step at ``head_dim`` (``sketch_group`` resolved)."""
        if self.sketch_group is not None:
            return self.sketch_group
        return head_dim if self.sketch == "int8" or self.rotate_sketch else min(32, head_dim)

    @property
    def rotate_sketch(self) -> bool:
        """Whether the key sketch is of ``R·k`` (``sketch_rotation`` resolved)."""
        return self.sketch == "int4" if self.sketch_rotation is None else self.sketch_rotation

    def resolve(self, capacity: int) -> EntmaxKVConfig:
        """The config a decode over a cache of ``capacity`` positions runs: ``auto`` becomes ``dense`` below
        ``AUTO_CERTIFIED_FROM`` and ``certified`` from there on, with ``min_context`` raised to it (shorter
        sequences in a longer cache decode densely too); any other policy is returned as it is."""
        return _resolve(self, capacity, AUTO_CERTIFIED_FROM) if self.policy == "auto" else self

    def replace(self, **changes: object) -> EntmaxKVConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=256)
def _resolve(config: EntmaxKVConfig, capacity: int, crossover: int) -> EntmaxKVConfig:
    if capacity < crossover:
        return config.replace(policy="dense")
    return config.replace(policy="certified", min_context=max(config.min_context, crossover))


def validate_alpha(alpha: float) -> float:
    """α must be in (1, 2]; returns it as a float."""
    a = float(alpha)
    if not 1.0 < a <= 2.0:
        raise ValueError(f"entmax alpha={alpha!r} is outside (1, 2]; alpha=1 is softmax, use the dense path")
    return a


def _field_docs() -> dict[str, str]:
    """Field name → description, parsed from the ``Parameters`` section of :class:`EntmaxKVConfig`."""
    lines = (EntmaxKVConfig.__doc__ or "").split("----------\n", 1)[1].splitlines()
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in lines:
        if line.startswith("    ") and not line.startswith("        ") and line.rstrip().endswith(":"):
            names = [n.strip() for n in line.strip()[:-1].split(",")]
            docs.update({n: "" for n in names})
        elif line.strip():
            for n in names:
                docs[n] = f"{docs[n]} {line.strip()}".strip()
    return docs


def markdown() -> str:
    """``docs/CONFIG.md``: every :class:`EntmaxKVConfig` field with its type, default and description."""
    docs = _field_docs()
    pipe = "\\|"  # a type's `|` must not split the table cell
    rows = [
        f"| `{f.name}` | `{str(f.type).replace('|', pipe)}` | `{f.default!r}` | {docs.get(f.name, '')} |"
        for f in dataclasses.fields(EntmaxKVConfig)
    ]
    return _DOC_HEADER + "\n".join(rows) + "\n"


_DOC_HEADER = """# Configuration reference: `EntmaxKVConfig`

<!-- generated by `python scripts/gen_config_doc.py` from `entmaxkv_compile/config.py`; do not edit -->

One frozen dataclass holds every setting (`entmaxkv_compile/config.py`). Pass it to the backend factory,
`torch.compile(model, backend=entmaxkv_compile.backend(EntmaxKVConfig(policy="dense")))`, override single
fields with keyword arguments (`entmaxkv_compile.backend(policy="dense")`), or pass
`options={"entmaxkv.<field>": value}` to `torch.compile(..., backend="entmaxkv")`. Values are validated
when the config is built; a bad one raises `ValueError` naming the field and the rule.

| field | type | default | meaning |
|---|---|---|---|
"""
