"""Real photographs that exist offline: scikit-image's colour sample photos, cut into random crops.

For calibrating and checking ImageNet models where no ImageNet is at hand: :func:`crops` takes random square
crops (a third to all of the shorter side, as a random-resized crop), resizes them (bilinear, antialiased),
flips half of them, and scales pixels to [0, 1]. Different seeds give different crops, so calibration and
evaluation sets do not share images. Needs scikit-image (``pip install 'lowbit[real]'``).
"""

from __future__ import annotations

import torch

from ..errors import DataError

#: the colour photographs scikit-image ships (its other samples are fetched from the network)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "logo")


def photos() -> list[torch.Tensor]:
    """The photographs as float [3, H, W] tensors in [0, 1]."""
    try:
        from skimage import data
    except ImportError:
        raise DataError("the sample photographs need scikit-image: pip install 'lowbit[real]'") from None
    return [torch.tensor(getattr(data, name)()[..., :3]).permute(2, 0, 1).float() / 255 for name in PHOTOS]


def crops(count: int, size: int, seed: int, images: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``count`` random crops ``[count, 3, size, size]`` in [0, 1] of ``images`` (default: :func:`photos`)."""
    images = photos() if images is None else images
    generator = torch.Generator().manual_seed(seed)

    def uniform() -> float:
        return float(torch.rand((), generator=generator))

    out = []
    for _ in range(count):
        photo = images[int(torch.randint(len(images), (), generator=generator))]
        h, w = photo.shape[1:]
        side = int(min(h, w) * (1 / 3 + 2 / 3 * uniform()))
        top, left = int(uniform() * (h - side + 1)), int(uniform() * (w - side + 1))
        crop = torch.nn.functional.interpolate(photo[None, :, top:top + side, left:left + side], size=(size, size),
                                               mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(crop.flip(2) if uniform() < 0.5 else crop)
    return torch.stack(out).clamp(0, 1)
