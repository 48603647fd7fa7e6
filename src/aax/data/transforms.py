"""From a decoded image to the tensor the members take.

Images are resized to ``size x size`` without keeping the aspect ratio, so that a map
over the model input maps back onto the original image by one resize, with no padding
to undo. Normalisation defaults to ImageNet's, so ImageNet checkpoints fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def prepare(image: np.ndarray, size: int, mean: Sequence[float] = IMAGENET_MEAN,
            std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """``[H, W, 3]`` float RGB in [0, 1] -> normalised ``[3, size, size]`` float32 tensor.

    A grey ``[H, W, 1]`` image (``read_image(..., keep_grey=True)``) gives the same tensor
    as its three-channel copy: it is resized as one channel, then expanded.
    """
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    if x.shape[0] not in (1, 3):
        raise ValueError(f"expected an [H, W, 3] or [H, W, 1] image, got shape {tuple(image.shape)}")
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0]
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s
