"""A weight's fixed grid: the values its quantizer can give, found once from the whole weight, then held fixed
while a rounding method (GPTQ) moves the weights and rounds them a column at a time.

The grid comes from the layer's own weight quantizer: ``enc = quantizer.encode(W)`` on the original weight gives
its parameters, and then

- ``affine`` (``uniform`` and ``linear``): q = clamp(round(w * (1/s)) + z, qmin, qmax), value (q - z) s with the
  quantizer's own float32 arithmetic (:func:`~lowbit.quantizers.uniform.affine_codes`), s and z per tensor or per
  output channel, so on the original weight the codes are exactly ``encode``'s;
- ``log`` (``log2``): the values 0 and +-2^e, e in [fsr - 2^b + 1, fsr - 1] (only + when unsigned), fsr fixed;
- ``codebook`` (``kmeans``): the codebook's entries, fitted once;
- ``group_affine`` (``group_uniform``): q = clamp(round(w * (1/s)) + z, qmin, qmax) with the s, z of the value's
  group of consecutive columns in its row, fixed from the original weight (GPTQ's static groups, so a column's
  grid does not depend on the updates GPTQ made to the columns before it); the columns a rounding method passes
  say which group's parameters apply, also when act-order permutes them;
- ``group_binary``, ``group_ternary``, ``group_log``, ``group_codebook`` (``group_binary``, ``group_ternary``,
  ``group_log2``, ``group_kmeans``): the same static groups, each with its own table of levels, decoded from the
  original weight's parameters: {-a, +a}, {-a, 0, +a}, 0 and +-s 2^(c - E) for c in [1, E], or its 2^b k-means
  levels.

A value maps to the nearest representable value of its grid (of its group's table), nearest in value with ties to
the smaller one, except that

- a group's binary 0 takes +a (``group_binary``'s sign(0) = +1), so binary codes are exactly ``encode``'s;
- ``group_kmeans`` rounds as its ``encode`` does, the least float32 |w - level| with ties to the lower index, so on
  the original weight the codes are exactly ``encode``'s;
- log2's and group_log2's own rounding is in the log domain (it rounds 2^e (sqrt 2, 1.5) up, and the group's
  values below s 2^-E sqrt 2 to 0), and group_ternary's own threshold is TWN's delta rather than a / 2: GPTQ's grid
  rounds these to the nearest value, so on the original weight its codes differ from ``encode``'s there.

The codes pack into the quantizer's ``Encoded`` (same kind, params and meta as its ``encode``), so save, the Engine
and ONNX export take them. Values are decoded exactly as :func:`~lowbit.quantizers.decode` decodes the codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

import torch

from ..quantizers import Encoded, Quantizer, decode
from ..quantizers.base import along
from ..quantizers.group import group_count, nearest_level
from ..quantizers.log2 import log_encoded
from ..quantizers.uniform import affine_codes, affine_encoded

#: weight quantizers with a fixed grid, by registry name
GRID_QUANTIZERS = ("uniform", "linear", "log2", "kmeans", "group_uniform", "group_binary", "group_ternary",
                   "group_log2", "group_kmeans")
#: group tables gathered at once by ``GroupTableGrid.nearest`` (bounds its memory)
_GATHER_LIMIT = 2**22


class FixedGrid(Protocol):
    """What a rounding method needs of a weight's grid."""

    def nearest(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, value): each value's grid index (int64) and nearest representable value (``x``'s dtype).
        ``x``: the weight, or (after ``by_rows``) ``[groups, rows, c]`` whose last axis holds the weight's
        columns ``columns`` (``[groups, c]`` int64; None: all of them in order)."""

    def encoded(self, index: torch.Tensor) -> Encoded:
        """The quantizer's Encoded for grid indices laid out as the weight."""

    def by_rows(self, groups: int) -> FixedGrid:
        """The grid for the weight viewed as ``[groups, out_channels / groups, columns]``."""


@dataclass(frozen=True)
class AffineGrid:
    """q = clamp(round(w / s) + z, qmin, qmax) with s, z fixed (scalars, or 1-D along the weight's ``axis``)."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None
    #: shape the per-channel parameters take against the values given to ``nearest`` (None: along ``axis``)
    view: tuple[int, ...] | None = None

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale.dim() == 0 or self.view is None:
            return along(self.scale, self.axis, x.dim()), along(self.zero_point, self.axis, x.dim())
        return self.scale.reshape(self.view), self.zero_point.reshape(self.view)

    def nearest(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero_point = self._params(x)
        codes, _ = affine_codes(x, scale, zero_point, self.qmin, self.qmax)
        return codes, decode(affine_encoded(codes, scale, zero_point, self.qmin, self.qmax, None)).to(x.dtype)

    def encoded(self, index: torch.Tensor) -> Encoded:
        return affine_encoded(index, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)

    def by_rows(self, groups: int) -> AffineGrid:
        if self.scale.dim() and self.axis != 0:
            raise ValueError(f"per-channel parameters along axis {self.axis} do not follow the rows")
        return replace(self, view=(groups, -1, 1))


@dataclass(frozen=True)
class TableGrid:
    """A per-tensor table of representable values (sorted); index i is the i-th smallest value."""

    values: torch.Tensor
    #: grid indices (the weight's shape) -> the quantizer's Encoded
    pack: Callable[[torch.Tensor], Encoded]

    def nearest(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        index = _search(self.values, x)
        return index, self.values[index].to(x.dtype)

    def encoded(self, index: torch.Tensor) -> Encoded:
        return self.pack(index)

    def by_rows(self, groups: int) -> TableGrid:
        return self


def _search(table: torch.Tensor, x: torch.Tensor, ties_up: bool = False) -> torch.Tensor:
    """Index of the nearest entry of the ascending ``table`` for each value of ``x``, exactly (float64 midpoints);
    ties to the smaller entry (the larger with ``ties_up``). ``table`` 1-D, or [N, L] against ``x`` [N, M]."""
    table = table.double()
    return torch.searchsorted((table[..., :-1] + table[..., 1:]) / 2, x.double().contiguous(), right=ties_up)


def _by_group(x: torch.Tensor, columns: torch.Tensor | None, groups: int, rows: int,
              group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``x`` viewed as [groups, rows, c], the group of columns [groups, c] each of its columns is in): ``columns``
    names the weight columns x holds (None: all of them in order)."""
    view = x.reshape(groups, rows, -1)
    if columns is None:
        columns = torch.arange(view.shape[-1], device=x.device).expand(groups, -1)
    return view, columns // group_size


@dataclass(frozen=True)
class GroupAffineGrid:
    """The ``group_affine`` grid of ``enc`` (scale, zero point ``[O, G]`` per group of ``group_size`` columns of
    each row), with the rows split into ``groups`` (a grouped conv's) for ``nearest``."""

    enc: Encoded
    groups: int = 1

    def nearest(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        meta = self.enc.meta
        params = {k: v.reshape(self.groups, -1, v.shape[-1]) for k, v in self.enc.params.items()}  # [G, R, groups]
        rows, group = _by_group(x, columns, self.groups, params["scale"].shape[1], meta["group_size"])
        group = group[:, None, :].expand(rows.shape)
        scale = params["scale"].float().gather(2, group)
        zero = params["zero_point"].long().gather(2, group) if "zero_point" in params else 0
        codes = (torch.round(rows.float() * torch.reciprocal(scale)) + zero).clamp(meta["qmin"], meta["qmax"]).long()
        return codes.reshape(x.shape), ((codes - zero).float() * scale).to(x.dtype).reshape(x.shape)

    def encoded(self, index: torch.Tensor) -> Encoded:
        return replace(self.enc, codes=index)

    def by_rows(self, groups: int) -> GroupAffineGrid:
        return replace(self, groups=groups)


@dataclass(frozen=True)
class GroupTableGrid:
    """Per group of ``group_size`` columns of each row (``enc``'s groups) a table of levels [O, G, L], level l
    standing for the code ``codes[l]``; ``search(levels [N, L], values [N, 1])`` picks each value's level among its
    own group's. Rows split into ``groups`` (a grouped conv's) for ``nearest``."""

    enc: Encoded
    levels: torch.Tensor
    codes: torch.Tensor
    search: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    groups: int = 1

    def nearest(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, count, size = self.levels.shape
        rows, group = _by_group(x, columns, self.groups, out // self.groups, self.enc.meta["group_size"])
        row = torch.arange(out, device=x.device).reshape(self.groups, -1, 1)
        table = (row * count + group[:, None, :]).flatten()  # each value's group table, in x's order
        levels, values = self.levels.reshape(-1, size), rows.reshape(-1, 1)
        step = max(1, _GATHER_LIMIT // size)
        position = torch.cat([self.search(levels[table[i:i + step]], values[i:i + step])
                              for i in range(0, len(table), step)])[:, 0]
        return self.codes[position].reshape(x.shape), levels[table, position].to(x.dtype).reshape(x.shape)

    def encoded(self, index: torch.Tensor) -> Encoded:
        return replace(self.enc, codes=index)

    def by_rows(self, groups: int) -> GroupTableGrid:
        return replace(self, groups=groups)


def _float32_nearest(levels: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """group_kmeans' own assignment: the least float32 |w - level|, ties to the lower index."""
    return nearest_level(values.float(), levels.float())


def _group_table_grid(enc: Encoded) -> GroupTableGrid:
    """The group table grid of ``enc``: each group's levels decoded by the codec from its codes in ascending value
    (the codebook's in its own order)."""
    device = enc.codes.device
    if enc.kind == "group_codebook":
        codes, search = torch.arange(enc.params["codebook"].shape[-1], device=device), _float32_nearest
    elif enc.kind == "group_log":
        top = 2 ** (enc.bits - 1) - 1
        codes, search = torch.arange(-top, top + 1, device=device), _search
    elif enc.kind == "group_ternary":
        codes, search = torch.arange(-1, 2, device=device), _search
    else:  # group_binary: sign(0) = +1
        codes, search = torch.arange(2, device=device), partial(_search, ties_up=True)
    out, size = enc.codes.shape[0], len(codes)
    count = group_count(enc.codes[0].numel(), enc.meta["group_size"])
    table = replace(enc, codes=codes.repeat(out, count), meta={**enc.meta, "group_size": size})
    return GroupTableGrid(enc, decode(table).reshape(out, count, size), codes, search)


def _table(values: torch.Tensor, entries: torch.Tensor, pack: Callable[[torch.Tensor], Encoded]) -> TableGrid:
    """The grid of ``values`` (float32, any order) whose i-th one is the quantizer's entry ``entries[i]``;
    ``pack(entries)`` builds the Encoded."""
    order = torch.sort(values, stable=True).indices
    sorted_entries = entries[order]
    return TableGrid(values[order], lambda index: pack(sorted_entries[index]))


def _log_grid(enc: Encoded) -> TableGrid:
    bits, fsr, signed = enc.bits, enc.meta["fsr"], enc.meta["signed"]
    codes = torch.arange(2**bits, device=enc.codes.device)
    signs = torch.ones_like(codes)
    if signed:  # -2^e for codes 1..2^b - 1 (code 0 is zero with sign +1)
        codes, signs = torch.cat([codes, codes[1:]]), torch.cat([signs, -signs[1:]])
    values = decode(log_encoded(codes, signs.to(torch.int8), bits, fsr, signed))
    entries = torch.stack([codes, signs], dim=-1)
    return _table(values, entries,
                  lambda e: log_encoded(e[..., 0], e[..., 1].to(torch.int8), bits, fsr, signed))


def _codebook_grid(enc: Encoded) -> TableGrid:
    codebook = enc.params["codebook"].detach().float()
    return _table(codebook, torch.arange(codebook.numel()),
                  lambda codes: Encoded("codebook", codes, enc.bits, {"codebook": codebook.clone()}))


def fixed_grid(quantizer: Quantizer, weight: torch.Tensor) -> FixedGrid:
    """The grid ``quantizer`` puts ``weight`` on (its ``encode`` of the whole weight fixes the parameters).

    ``quantizer`` is one of :data:`GRID_QUANTIZERS` (the caller checks).
    """
    with torch.no_grad():
        enc = quantizer.encode(weight.detach())
    if enc.kind == "affine":
        p = enc.params
        return AffineGrid(p["scale"].float(), p["zero_point"].long(), enc.meta["qmin"], enc.meta["qmax"],
                          enc.meta.get("axis"))
    if enc.kind == "log":
        return _log_grid(enc)
    if enc.kind == "group_affine":
        return GroupAffineGrid(enc)
    if enc.kind.startswith("group_"):
        return _group_table_grid(enc)
    return _codebook_grid(enc)
