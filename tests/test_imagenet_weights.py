"""``pretrained="imagenet"``: each member's standard checkpoint, read through torch hub's
cache. Nothing is downloaded: the test writes the files where the cache keeps them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from aax.models.members import build_member
from aax.models.members.weights import IMAGENET_URLS, load_weights
from aax.training.train import FINETUNE_LR, SCRATCH_LR, TrainConfig


def _source_format(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A member's backbone weights in the key names its ImageNet file uses."""
    out = {}
    for key, value in state.items():
        if name == "densenet121":
            key = key.replace(".layers.", ".")  # torchvision: denselayer1.norm1.weight
        elif name == "efficientnet-b0":
            key = re.sub(r"^_blocks\.\d+\.(\d+)\.", r"_blocks.\1.", key)  # lukemelas: _blocks.15.
        out[key] = value
    return out


@pytest.mark.parametrize("name", sorted(IMAGENET_URLS))
def test_imagenet_checkpoint_is_read_from_the_hub_cache(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(1)
    source = build_member(name, 2)
    state = _source_format(name, {k: v for k, v in source.net.state_dict().items()
                                  if not re.match(r"^(fc|class_layers\.out|_fc)\.", k)})
    filename = os.path.basename(IMAGENET_URLS[name])
    torch.save(state, cache / filename)

    config = TrainConfig(pretrained="imagenet", members=(name,))
    config.validate()
    assert config.member_weights(name) == IMAGENET_URLS[name] and config.member_lr(name) == FINETUNE_LR
    torch.manual_seed(2)
    target = build_member(name, 2)
    report = load_weights(target, config.member_weights(name))
    assert report.backbone_problems == []
    for key, value in source.net.state_dict().items():
        if key in report.loaded:
            assert torch.equal(target.net.state_dict()[key], value), key
    assert len(report.loaded) > 100


def test_scratch_and_explicit_weights_win_over_imagenet() -> None:
    scratch = TrainConfig(pretrained=None)
    assert scratch.member_weights("resnet50") is None and scratch.member_lr("resnet50") == SCRATCH_LR
    assert TrainConfig().member_weights("resnet50") == IMAGENET_URLS["resnet50"]
    config = TrainConfig(pretrained="imagenet", weights={"resnet50": "/x.pt"})
    assert config.member_weights("resnet50") == "/x.pt"
    with pytest.raises(ValueError, match="pretrained"):
        TrainConfig(pretrained="coco").validate()
    with pytest.raises(ValueError, match="output_stride"):
        TrainConfig(output_stride=4).validate()
