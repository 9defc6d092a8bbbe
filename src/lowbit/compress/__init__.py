"""Deep Compression (Han, Mao, Dally, ICLR 2016): prune, share weights, fine-tune the codebook, entropy-code.

- :mod:`.prune`: magnitude pruning with masks that stay exact through retraining (:class:`Pruner`);
- :mod:`.share`: per-layer k-means weight sharing, zeros kept on code 0 (:func:`share_weights`);
- :mod:`.pipeline`: the driver :func:`deep_compress`, :func:`save_compressed` and the
  ``lowbit compress`` command (:data:`cli_command`);
- :mod:`.report`: the per-layer storage table (the paper's Tables 2 and 3) and the plots;
- :mod:`.rule`: the default per-layer kept fractions, bits and prune rounds, one rule for any model;
- :mod:`.search`: settings found from an error budget, around the rule.
"""

from .pipeline import (
    CompressionResult,
    DeepCompressionConfig,
    cli_command,
    deep_compress,
    paper_index_bits,
    paper_sparsity,
    save_compressed,
    store_and_verify,
)
from .prune import Pruner, prunable_layers, quality_threshold, sparsity_schedule, sparsity_threshold
from .report import LayerStats, format_table, layer_stats
from .share import paper_bits, share_weights, shared_layers

__all__ = [
    "CompressionResult",
    "DeepCompressionConfig",
    "LayerStats",
    "Pruner",
    "cli_command",
    "deep_compress",
    "format_table",
    "layer_stats",
    "paper_bits",
    "paper_index_bits",
    "paper_sparsity",
    "prunable_layers",
    "quality_threshold",
    "save_compressed",
    "share_weights",
    "shared_layers",
    "sparsity_schedule",
    "sparsity_threshold",
    "store_and_verify",
]
