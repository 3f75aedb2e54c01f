"""docs/CONFIG.md is generated from the EntmaxKVConfig dataclass and must match it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from entmaxkv_compile.config import EntmaxKVConfig, _field_docs, markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"


def test_committed_doc_is_generated() -> None:
    assert DOC.read_text() == markdown(), "stale docs/CONFIG.md: run python scripts/gen_config_doc.py"


def test_every_field_is_documented() -> None:
    docs = _field_docs()
    names = [f.name for f in dataclasses.fields(EntmaxKVConfig)]
    assert sorted(docs) == sorted(names)
    assert all(docs[n] for n in names)
    for n in names:
        assert f"| `{n}` |" in markdown()
