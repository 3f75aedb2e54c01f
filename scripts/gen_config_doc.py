"""Write docs/CONFIG.md from the EntmaxKVConfig dataclass; ``--check`` fails if the committed file differs."""

from __future__ import annotations

import sys
from pathlib import Path

from entmaxkv_compile.config import markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"

if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        if DOC.read_text() != markdown():
            raise SystemExit(f"{DOC} is stale: run python scripts/gen_config_doc.py")
    elif sys.argv[1:]:
        raise SystemExit("usage: python scripts/gen_config_doc.py [--check]")
    else:
        DOC.write_text(markdown())
