"""Per-layer storage statistics of a Deep Compression model, its table and its plots.

For each shared layer the weight indices are coded as the paper stores them (Sec. 2-4):
relative-index entries ``(gap, code)`` with filler zeros (:mod:`lowbit.format.sparse`), and
the two streams (codes and gaps) Huffman-coded (:mod:`lowbit.format.huffman`) or ANS-coded
(:mod:`lowbit.format.ans`). The columns follow the paper's Tables 2 and 3:

- ``weights``: the layer's weight count ``n``; ``kept``: non-zero weights / ``n``;
- ``weight bits`` / ``index bits``: fixed widths before entropy coding (P+Q);
- ``huffman`` (and ``ans``) average bits per stored entry of each stream: coded payload bits /
  entries (entries = non-zeros + fillers), tables not included;
- compression ``float32 bytes / stored bytes`` where the stored bytes of a layer count the
  coded streams with their tables and block offsets, the float32 codebook and the float32 bias.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..format.ans import ans_encode
from ..format.huffman import HuffmanStream, huffman_encode
from ..format.sparse import encode_relative

FLOAT_BYTES = 4


def ans_available() -> bool:
    """Whether the optional ANS coder (the package constriction) is installed."""
    return importlib.util.find_spec("constriction") is not None


def huffman_bytes(stream: HuffmanStream) -> int:
    """Bytes a Huffman stream stores: bit stream, code-length table and block offsets."""
    return stream.data.nbytes + stream.lengths.nbytes + stream.offsets.nbytes


@dataclass
class LayerStats:
    """Storage of one shared layer (see the module docstring for each quantity)."""

    name: str
    kind: str  # "conv" or "fc"
    weights: int
    nonzero: int
    entries: int  # non-zeros plus filler zeros
    weight_bits: int
    index_bits: int
    biases: int
    codebook_size: int
    huffman_weight_bits: float  # mean coded bits per entry
    huffman_index_bits: float
    ans_weight_bits: float | None  # None without the optional package constriction
    ans_index_bits: float | None
    bytes_pq: int  # fixed-width entries, codebook, bias
    bytes_huffman: int  # Huffman streams with tables, codebook, bias
    bytes_ans: int | None  # ANS streams with their frequency tables, codebook, bias

    @property
    def kept(self) -> float:
        return self.nonzero / max(self.weights, 1)

    @property
    def float_bytes(self) -> int:
        return FLOAT_BYTES * (self.weights + self.biases)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kept": self.kept, "float_bytes": self.float_bytes}


#: relative-index widths tried by :func:`best_index_bits`
INDEX_BITS_SEARCH = range(2, 13)


def coded_bytes(codes: np.ndarray, index_bits: int) -> int:
    """Bytes of the two Huffman-coded relative-index streams (values and gaps) of flat ``codes``."""
    gaps, values = encode_relative(codes, index_bits)
    return huffman_bytes(huffman_encode(values)) + huffman_bytes(huffman_encode(gaps))


def best_index_bits(codes: np.ndarray, candidates: range = INDEX_BITS_SEARCH) -> int:
    """The relative-index width with the fewest Huffman-coded bytes (ties: the narrower).

    Wider gaps need fewer filler entries, and Huffman coding makes the unused width nearly free,
    so pruned layers whose zeros come in long runs (dead input pixels) gain from more than the
    paper's 5 bits.
    """
    codes = np.asarray(codes).reshape(-1)
    return min(candidates, key=lambda bits: (coded_bytes(codes, bits), bits))


def layer_stats(name: str, layer: nn.Module, index_bits: int) -> LayerStats:
    """Statistics of a QuantLinear/QuantConv2d with a fitted ``keep_zero`` k-means weight quantizer."""
    quantizer = layer.weight_quantizer
    codes = quantizer.indices.detach().cpu().numpy().reshape(-1)
    gaps, values = encode_relative(codes, index_bits)
    entries = int(values.size)
    streams = [huffman_encode(values), huffman_encode(gaps)]
    ans_streams = [ans_encode(values), ans_encode(gaps)] if ans_available() else None
    biases = layer.bias.numel() if layer.bias is not None else 0
    fixed = FLOAT_BYTES * (quantizer.codebook.numel() + biases)

    def mean_bits(nbytes: int) -> float:
        return 8 * nbytes / entries if entries else 0.0

    ans_sizes = [s.words.nbytes + s.freqs.nbytes for s in ans_streams or ()]
    return LayerStats(
        name=name,
        kind="conv" if isinstance(layer, nn.Conv2d) else "fc",
        weights=codes.size,
        nonzero=int(np.count_nonzero(codes)),
        entries=entries,
        weight_bits=quantizer.bits,
        index_bits=index_bits,
        biases=biases,
        codebook_size=quantizer.codebook.numel(),
        huffman_weight_bits=mean_bits(streams[0].data.nbytes),
        huffman_index_bits=mean_bits(streams[1].data.nbytes),
        ans_weight_bits=mean_bits(ans_streams[0].words.nbytes) if ans_streams else None,
        ans_index_bits=mean_bits(ans_streams[1].words.nbytes) if ans_streams else None,
        bytes_pq=math.ceil(entries * (quantizer.bits + index_bits) / 8) + fixed,
        bytes_huffman=sum(huffman_bytes(s) for s in streams) + fixed,
        bytes_ans=sum(ans_sizes) + fixed if ans_streams else None,
    )


def _ratio(num: float, den: float | None) -> str:
    return f"{num / den:.1f}x" if den else "-"


def _bits(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def format_table(layers: list[LayerStats], file_bytes: dict[str, int] | None = None) -> str:
    """The paper's Table 2/3 layout: one row per layer, then the total.

    ``file_bytes`` (layer -> bytes the .lowbit file holds for it) adds a column with the
    compression the file really achieves.
    """
    head = (f"{'layer':<10}{'weights':>9}{'kept':>7}{'w bits':>7}{'i bits':>7}{'w huff':>7}{'i huff':>7}"
            f"{'w ans':>7}{'i ans':>7}{'P+Q':>8}{'+Huff':>8}{'+ANS':>8}")
    if file_bytes is not None:
        head += f"{'file':>8}"
    lines = [head, "-" * len(head)]
    for s in layers:
        row = (f"{s.name:<10}{s.weights:>9}{100 * s.kept:>6.1f}%{s.weight_bits:>7}{s.index_bits:>7}"
               f"{s.huffman_weight_bits:>7.2f}{s.huffman_index_bits:>7.2f}{_bits(s.ans_weight_bits):>7}"
               f"{_bits(s.ans_index_bits):>7}{_ratio(s.float_bytes, s.bytes_pq):>8}"
               f"{_ratio(s.float_bytes, s.bytes_huffman):>8}{_ratio(s.float_bytes, s.bytes_ans):>8}")
        if file_bytes is not None:
            row += f"{_ratio(s.float_bytes, file_bytes.get(s.name, 0)):>8}"
        lines.append(row)

    def total(attr: str) -> int | None:
        values = [getattr(s, attr) for s in layers]
        return None if None in values else sum(values)

    weights, nonzero, floats = total("weights"), total("nonzero"), total("float_bytes")
    row = (f"{'total':<10}{weights:>9}{100 * nonzero / max(weights, 1):>6.1f}%{'':>42}"
           f"{_ratio(floats, total('bytes_pq')):>8}{_ratio(floats, total('bytes_huffman')):>8}"
           f"{_ratio(floats, total('bytes_ans')):>8}")
    if file_bytes is not None:
        row += f"{_ratio(floats, sum(file_bytes.get(s.name, 0) for s in layers)):>8}"
    lines += ["-" * len(head), row]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_weight_distribution(
    before: torch.Tensor, after: torch.Tensor, centroids: torch.Tensor, layer: str, path: str | Path
) -> Path:
    """Two histograms of a layer's weights: before pruning, and the survivors after pruning and
    retraining (zeros left out) with the shared centroids marked."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    values = before.detach().cpu().numpy().ravel()
    kept = after[after != 0].detach().cpu().numpy()
    bins = np.linspace(values.min(), values.max(), 120)
    left.hist(values, bins=bins, color="tab:blue")
    left.set(title=f"{layer}: before pruning ({values.size} weights)", xlabel="weight", ylabel="count")
    right.hist(kept, bins=bins, color="tab:orange")
    for i, c in enumerate(centroids.detach().cpu().numpy()):
        right.axvline(c, color="red", linewidth=0.6, alpha=0.8, label="shared centroids" if i == 0 else None)
    right.set(title=f"after pruning and retraining ({kept.size} kept)", xlabel="weight")
    right.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_tradeoff(points: list[dict[str, Any]], path: str | Path) -> Path:
    """Test error against compression ratio, one marker per stage (``stage``, ``ratio``, ``error``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["ratio"] for p in points], [100 * p["error"] for p in points], color="gray", linewidth=0.8)
    markers = "osD^v<>ph*"
    for i, p in enumerate(points):
        ax.plot(p["ratio"], 100 * p["error"], marker=markers[i % len(markers)], linestyle="none",
                label=f"{p['stage']}: {p['ratio']:.1f}x, {100 * p['error']:.2f}%")
    ax.set(xscale="log", xlabel="compression ratio (float32 bytes / stored bytes)", ylabel="test error (%)",
           title="compression vs accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
