"""Axis bookkeeping: which logical attention axis every dimension of a tensor in the graph carries.

Mental model
------------
User code reaches the attention products through views: ``view``/``reshape`` to split heads,
``transpose`` for ``kᵀ``, ``x[:, :, None].expand(...).reshape(...)`` for GQA's ``repeat_kv``, flattening
``B·H`` for ``bmm``.  Instead of enumerating those spellings we *interpret* them.

A tensor's **layout** is a tuple of dimensions; each dimension is a tuple of **atoms** in row-major
order.  An atom is one indivisible logical axis of size > 1 (size-1 axes carry no data and are simply
absent): either an axis of the **base** tensor the view started from (a cache buffer, a projection
output), or a **broadcast** axis created by ``expand``/``repeat_interleave``/``repeat``.  Then

* ``reshape`` (and every op that keeps the row-major element order: ``view``, ``flatten``,
  ``unsqueeze``, ``x[:, None]``, casts, ``contiguous``) regroups the atom sequence; a group boundary
  that falls inside an atom splits it (e.g. ``[B, L, H·D] → [B, L, H, D]``), which also refines the
  base's own factorisation so the base can later be reshaped into exactly those atoms;
* ``transpose``/``permute``/``movedim``/``mT`` reorder dimensions;
* ``expand``/``repeat_interleave``/``repeat`` add broadcast atoms (``repeat_interleave(n)`` puts the
  new atom *after* the existing ones, ``repeat`` before: that is the difference between ``h // n`` and
  ``h % n`` head sharing, and it falls out of the bookkeeping for free).

At a product (``matmul``/``bmm``/``einsum``) the two operands' atoms are :func:`pair`-ed dimension by
dimension; a query-head atom of size ``Hq`` meeting ``(kv_head, broadcast)`` is split into
``(Hkv, Hq/Hkv)``, which is exactly the GQA grouping.  Once every atom of ``q``, ``k`` and ``v`` has a
role, rebuilding the canonical ``[B, H, L, D]`` tensors is ``base.reshape(atoms).permute(order)
.reshape(canonical)`` — a view whenever the user's layout already was canonical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

Size = int | torch.SymInt


class Unsupported(Exception):
    """A site the pass leaves dense; the message is the human-readable reason."""


def same(a: Size, b: Size) -> bool:
    return a is b or statically_known_true(a == b)


def is_one(a: Size) -> bool:
    return same(a, 1)


def divides(a: Size, b: Size) -> bool:
    """``a`` divides ``b`` (both known statically)."""
    return isinstance(a, int) and isinstance(b, int) and b % a == 0


@dataclass(eq=False)
class Atom:
    """One logical axis of a base tensor (or a broadcast axis); identity matters, not value."""

    size: Size
    broadcast: bool = False


Dims = tuple[tuple[Atom, ...], ...]
Splitter = Callable[[Atom, int], tuple[Atom, Atom]]


def flat(dims: Sequence[Sequence[Atom]]) -> list[Atom]:
    return [a for d in dims for a in d]


def numel(atoms: Sequence[Atom]) -> Size:
    return math.prod(a.size for a in atoms)


def no_split(atom: Atom, outer: int) -> tuple[Atom, Atom]:
    raise Unsupported("a reshape splits an attention axis after the product")


class Chain:
    """A view of a base tensor: the base's atom factorisation and the view's current layout."""

    def __init__(self, shape: Sequence[Size]) -> None:
        self.base: list[list[Atom]] = [[] if is_one(s) else [Atom(s)] for s in shape]
        self.dims: Dims = tuple(tuple(d) for d in self.base)

    def split(self, atom: Atom, outer: int) -> tuple[Atom, Atom]:
        """Split ``atom`` into ``(outer, size // outer)`` everywhere it occurs (row-major)."""
        parts = (Atom(outer, atom.broadcast), Atom(atom.size // outer, atom.broadcast))
        self.base = [_replace(d, atom, parts) for d in self.base]
        self.dims = tuple(tuple(_replace(d, atom, parts)) for d in self.dims)
        return parts

    def base_atoms(self) -> list[Atom]:
        return flat(self.base)


def _replace(atoms: Sequence[Atom], old: Atom, new: Sequence[Atom]) -> list[Atom]:
    out: list[Atom] = []
    for a in atoms:
        out.extend(new if a is old else (a,))
    return out


def reshape(dims: Dims, shape: Sequence[Size], split: Splitter = no_split) -> Dims:
    """Regroup the row-major atom sequence into ``shape`` (splitting atoms at group boundaries)."""
    seq = flat(dims)
    out: list[tuple[Atom, ...]] = []
    i = 0
    for size in shape:
        group: list[Atom] = []
        acc: Size = 1
        while not same(acc, size):
            if i >= len(seq):
                raise Unsupported(f"cannot follow a reshape to {tuple(shape)}")
            a = seq[i]
            if same(acc * a.size, size) or divides(acc * a.size, size):
                group.append(a)
                acc = acc * a.size
                i += 1
            elif isinstance(size, int) and isinstance(acc, int) and divides(size // acc, a.size):
                outer, inner = split(a, size // acc)
                seq[i : i + 1] = [outer, inner]
            else:
                raise Unsupported(f"cannot follow a reshape to {tuple(shape)}")
        out.append(tuple(group))
    if i != len(seq):
        raise Unsupported(f"cannot follow a reshape to {tuple(shape)}")
    return tuple(out)


def permute(dims: Dims, order: Sequence[int]) -> Dims:
    return tuple(dims[i] for i in order)


def expand(dims: Dims, shape: Sequence[Size]) -> Dims:
    lead = len(shape) - len(dims)
    out = []
    for j, size in enumerate(shape):
        i = j - lead
        if i >= 0 and (dims[i] or is_one(size)):
            out.append(dims[i])
        else:
            out.append(() if is_one(size) else (Atom(size, broadcast=True),))
    return tuple(out)


def repeat_interleave(dims: Dims, repeats: int, dim: int) -> Dims:
    if repeats == 1:
        return dims
    d = dim % len(dims)
    return dims[:d] + (dims[d] + (Atom(repeats, broadcast=True),),) + dims[d + 1 :]


def tile(dims: Dims, reps: Sequence[int]) -> Dims:
    reps = [1] * (len(dims) - len(reps)) + list(reps)
    lead = len(reps) - len(dims)
    full = ((),) * lead + dims
    return tuple(((Atom(r, broadcast=True),) if r > 1 else ()) + d for r, d in zip(reps, full))


def pair(
    a_atoms: Sequence[Atom], b_atoms: Sequence[Atom], split_a: Splitter, split_b: Splitter
) -> list[tuple[Atom | None, Atom | None]]:
    """Pair the atoms of one dimension of two product operands (``None``: the side is size 1).

    Both atom sequences index the same positions of the dimension, so factors are matched from the
    outside in, splitting the larger atom where the other side has a finer factorisation.
    """
    if not a_atoms or not b_atoms:
        return [(a, None) for a in a_atoms] + [(None, b) for b in b_atoms]
    a, b = list(a_atoms), list(b_atoms)
    out: list[tuple[Atom | None, Atom | None]] = []
    while a and b:
        x, y = a[0], b[0]
        if same(x.size, y.size):
            out.append((a.pop(0), b.pop(0)))
        elif divides(y.size, x.size):
            outer, a[0] = split_a(x, y.size)
            out.append((outer, b.pop(0)))
        elif divides(x.size, y.size):
            outer, b[0] = split_b(y, x.size)
            out.append((a.pop(0), outer))
        else:
            raise Unsupported("operand axes of a product do not line up")
    if a or b:
        raise Unsupported("operand axes of a product do not line up")
    return out
