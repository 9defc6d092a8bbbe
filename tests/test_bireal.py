"""Bi-Real Net (Liu et al., ECCV 2018) as lowbit trains it: a multi-stage net (downsampling shortcuts with
ceil-mode average pooling) saved to .lowbit, loaded bit-identical and run by the Engine on its XNOR kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import ConfigError
from lowbit.models import get_model
from lowbit.recipes import get_recipe
from lowbit.runtime import Engine


def _bireal(input_size: int, stem_pool: int) -> torch.nn.Module:
    """A tiny four-stage Bi-Real net with the recipe's last-stage quantizers, batch-norm statistics and affine
    parameters away from their inits, in eval mode."""
    torch.manual_seed(0)
    net = get_model("resnet-small", input_size=input_size, block="bireal", activation="hardtanh",
                    widths=(8, 16, 32, 32), blocks=(1, 1, 1, 1), stem_pool=stem_pool)
    model = lowbit.quantize(net.train(), get_recipe("bireal").config, strict=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".bn" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        for _ in range(3):
            model(torch.randn(32, 1, input_size, input_size, generator=g))
    return model.eval()


# maps 28 -> 14 -> 7 -> 4, 9 -> 5 -> 3 -> 2, and with the stem's 2x2 max pool 28 -> 14 -> 7 -> 4 -> 2 and
# 9 -> 5 -> 3 -> 2 -> 1: odd maps pool in ceil mode
@pytest.mark.parametrize(("size", "stem_pool"), [(28, 1), (9, 1), (28, 2), (9, 2)])
def test_multi_stage_bireal_saves_and_runs_alike_in_the_engine(size, stem_pool, tmp_path):
    model = _bireal(size, stem_pool)
    pools = [m for m in model.modules() if isinstance(m, (torch.nn.AvgPool2d, torch.nn.MaxPool2d))]
    assert len(pools) == 3 + (stem_pool > 1) and all(p.ceil_mode for p in pools)
    path = tmp_path / "bireal.lowbit"
    x = torch.randn(64, 1, size, size, generator=torch.Generator().manual_seed(2))
    lowbit.save(model, path, x[:1])
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(lowbit.load(path)(x), expected)
    engine = Engine(path)
    assert len(engine.binary_layers) == 8  # two binary 3x3 convs per block, on the XNOR-popcount kernels
    got = engine.run(x.numpy())
    assert got.shape == (64, 10)
    assert np.array_equal(got.argmax(1), expected.numpy().argmax(1))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_stem_pool_keeps_the_state_dict_and_quarters_the_maps():
    plain = get_model("resnet-small", block="bireal", activation="hardtanh", widths=(8, 16), blocks=(1, 1))
    pooled = get_model("resnet-small", block="bireal", activation="hardtanh", widths=(8, 16), blocks=(1, 1),
                       stem_pool=2)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in pooled.state_dict().items()}
    x = torch.randn(2, 1, 28, 28)
    pooled.eval()
    assert plain.eval().stem(x).shape == (2, 8, 28, 28) and pooled.stem(x).shape == (2, 8, 14, 14)
    assert torch.equal(pooled.stem(x), torch.nn.functional.max_pool2d(pooled.stem.bn(pooled.stem.conv(x)), 2))
    with pytest.raises(ConfigError, match="stem_pool"):
        get_model("resnet-small", stem_pool=0)
