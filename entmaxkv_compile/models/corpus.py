"""Training and evaluation text that exists offline on every machine, and the synthetic passkey task.

Text: the Python sources of the installed ``torch`` package and of the standard library, as bytes. Each
file goes to the validation split iff the MD5 of its name (``torch/...`` or ``stdlib/...``) falls in the
first ``VAL_PERCENT`` of the hash range, so the split is fixed per file and never depends on walk order.

Passkey: a five-digit key is planted in filler text (``NEEDLE``) and asked for at the end (``QUESTION``);
the key's digits follow the same prefix ``passkey: `` in both places, so retrieving it is an induction
(copy) problem at whatever distance the needle sits. For training, :func:`retrieval_sequence` chains
several such rounds in one window (each question asks for the most recent needle), which gives more
answer digits per sequence and a spread of needle distances from a few bytes to the whole window, and
:func:`copy_sequence` repeats a span of text inside a window: copying it is the same induction step
(find the earlier occurrence, continue it) with a dense signal, one target per copied byte.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VAL_PERCENT = 5
MAX_FILE_BYTES = 1 << 20
NEEDLE = "\n# passkey: {key}\n"
QUESTION = "\n# repeat the passkey: {key}\n"
KEY_DIGITS = 5
PASSKEY_MIN_LEN = len(NEEDLE.format(key="0" * KEY_DIGITS) + QUESTION.format(key="0" * KEY_DIGITS))
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def source_roots() -> dict[str, Path]:
    return {"torch": Path(torch.__file__).parent, "stdlib": Path(sysconfig.get_paths()["stdlib"])}


def source_files(sources: Sequence[str]) -> list[tuple[str, Path]]:
    """``(name, path)`` of every ``.py`` file under the named roots, sorted by name."""
    roots = source_roots()
    files = []
    for label in sources:
        root = roots[label]
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
            for f in filenames:
                if f.endswith(".py"):
                    path = Path(dirpath, f)
                    files.append((f"{label}/{path.relative_to(root).as_posix()}", path))
    return sorted(files)


def is_validation(name: str) -> bool:
    return int(hashlib.md5(name.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def load_text(
    split: str, sources: Sequence[str] = ("torch", "stdlib"), max_bytes: int | None = None
) -> np.ndarray:
    """Bytes of the ``split`` ("train" | "val") files, concatenated in name order (``uint8[N]``)."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: must be 'train' or 'val'")
    chunks, total = [], 0
    for name, path in source_files(sources):
        if is_validation(name) != (split == "val") or path.stat().st_size > MAX_FILE_BYTES:
            continue
        data = path.read_bytes() + b"\n\n"
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


@dataclass(frozen=True)
class Passkey:
    """A retrieval sequence: ``tokens[L]`` and the positions of the tokens only retrieval predicts (the
    key's digits in the answer, or the bytes of a copy)."""

    tokens: np.ndarray
    answer: np.ndarray


def passkey_sequence(filler: np.ndarray, length: int, rng: np.random.Generator, depth: float) -> Passkey:
    """``length`` bytes: filler (a random stretch of ``filler``) with the needle at relative ``depth``
    in [0, 1], then the question and its answer, which end the sequence."""
    key = "".join(str(d) for d in rng.integers(0, 10, KEY_DIGITS))
    needle = np.frombuffer(NEEDLE.format(key=key).encode(), dtype=np.uint8)
    question = np.frombuffer(QUESTION.format(key=key).encode(), dtype=np.uint8)
    n_fill = length - len(needle) - len(question)
    if n_fill < 0 or len(filler) < n_fill:
        raise ValueError(f"passkey length={length} is too short for the task or longer than the filler")
    start = int(rng.integers(0, len(filler) - n_fill + 1))
    fill = filler[start : start + n_fill]
    cut = int(round(depth * n_fill))
    tokens = np.concatenate([fill[:cut], needle, fill[cut:], question])
    answer = np.arange(length - 1 - KEY_DIGITS, length - 1)  # the digits; a newline ends the sequence
    return Passkey(tokens=tokens, answer=answer)


def retrieval_sequence(filler: np.ndarray, length: int, rng: np.random.Generator, rounds: int) -> Passkey:
    """``rounds`` passkey sequences of about ``length / rounds`` bytes each (needles at uniformly random
    depths, fresh keys), concatenated to ``length`` bytes; ``answer`` holds the digits of every round."""
    bounds = np.linspace(0, length, rounds + 1).round().astype(int)
    parts = [
        passkey_sequence(filler, int(hi - lo), rng, depth=float(rng.random()))
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    tokens = np.concatenate([pk.tokens for pk in parts])
    answer = np.concatenate([pk.answer + lo for pk, lo in zip(parts, bounds[:-1])])
    return Passkey(tokens=tokens, answer=answer)


def copy_sequence(filler: np.ndarray, length: int, rng: np.random.Generator, span: int) -> Passkey:
    """``length`` bytes of filler with a ``span``-byte stretch of other filler text inserted twice, at
    random places; ``answer`` holds the positions of the second copy's bytes after its first."""
    n_fill = length - 2 * span
    if n_fill < 0 or len(filler) < max(n_fill, span):
        raise ValueError(f"copy length={length}, span={span}: too short or longer than the filler")
    fill = filler[(s := int(rng.integers(0, len(filler) - n_fill + 1))) : s + n_fill]
    src = filler[(s := int(rng.integers(0, len(filler) - span + 1))) : s + span]
    c1, c2 = np.sort(rng.integers(0, n_fill + 1, 2))
    tokens = np.concatenate([fill[:c1], src, fill[c1:c2], src, fill[c2:]])
    second = c2 + span
    return Passkey(tokens=tokens, answer=np.arange(second + 1, second + span))
