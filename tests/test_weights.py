"""Loading ImageNet checkpoints in their source formats (files written by the tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aax.models.members import build_member
from aax.models.members.weights import LoadReport, WeightsError, load_weights, read_state_dict

CLASSIFIER = {"resnet50": ("fc", 2048), "densenet121": ("classifier", 1024),
              "efficientnet-b0": ("_fc", 1280)}
FIRST_CONV = {"resnet50": "conv1.weight", "densenet121": "features.conv0.weight",
              "efficientnet-b0": "_conv_stem.weight"}


def _monai_backbone(name: str) -> dict[str, torch.Tensor]:
    """The MONAI net's own backbone keys, with random values (so a load is visible)."""
    member = build_member(name, 2)
    g = torch.Generator().manual_seed(7)
    out = {}
    for key, value in member.net.state_dict().items():
        if re.match(r"^(class_layers\.out|_fc)\.", key):
            continue  # MONAI's own classifier: the source format brings its own
        if value.is_floating_point():
            out[key] = torch.randn(value.shape, generator=g)
        else:
            out[key] = value + 3
    return out


def _source_format(name: str, monai: dict[str, torch.Tensor], *, download_form: bool = False,
                   classes: int = 1000) -> dict[str, torch.Tensor]:
    """Inverse renaming: MONAI keys -> torchvision / lukemelas keys, plus a classifier."""
    out = {}
    for key, value in monai.items():
        if name == "densenet121":
            sep = "." if download_form else ""
            key = re.sub(r"(denselayer\d+)\.layers\.(norm|relu|conv)([12])\.",
                         lambda m: f"{m.group(1)}.{m.group(2)}{sep}{m.group(3)}.", key)
        elif name == "efficientnet-b0":
            key = re.sub(r"^_blocks\.\d+\.(\d+)\.", r"_blocks.\1.", key)
        out[key] = value
    prefix, width = CLASSIFIER[name]
    out[f"{prefix}.weight"] = torch.randn(classes, width)
    out[f"{prefix}.bias"] = torch.randn(classes)
    return out


def _assert_landed(member, monai: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    now = member.net.state_dict()
    for key, value in monai.items():
        if key in skip:
            continue
        assert torch.equal(now[key], value.to(now[key].dtype)), key


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "efficientnet-b0"])
def test_source_format_file_loads_with_classifier_reported(name: str, tmp_path: Path) -> None:
    monai = _monai_backbone(name)
    source = _source_format(name, monai)
    if name == "densenet121":
        assert "features.denseblock1.denselayer1.norm1.weight" in source
    if name == "efficientnet-b0":
        assert "_blocks.15._bn2.bias" in source and "_blocks.6.15._bn2.bias" not in source
    path = tmp_path / f"{name}.pth"
    torch.save(source, path)
    member = build_member(name, 2)
    head_before = member.head.fc.weight.clone()

    report = load_weights(member, path)

    assert isinstance(report, LoadReport)
    _assert_landed(member, monai)
    assert len(report.loaded) == len(monai)
    prefix = CLASSIFIER[name][0]
    assert sorted(report.skipped) == [f"{prefix}.bias", f"{prefix}.weight"]
    assert "classifier" in report.notes[f"{prefix}.weight"]
    assert report.missing == [] and report.unexpected == [] and report.adapted == []
    assert torch.equal(member.head.fc.weight, head_before)  # the head is never touched
    assert f"{prefix}.weight" in report.summary()


def test_densenet_download_form_and_wrapped_module_prefix(tmp_path: Path) -> None:
    monai = _monai_backbone("densenet121")
    source = _source_format("densenet121", monai, download_form=True)
    assert "features.denseblock1.denselayer1.norm.1.weight" in source
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.items()}}
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped, path)
    member = build_member("densenet121", 3)
    report = load_weights(member, path)
    _assert_landed(member, monai)
    assert report.unexpected == [] and report.missing == []


def test_one_channel_first_conv_is_adapted_and_reported(tmp_path: Path) -> None:
    monai = _monai_backbone("densenet121")
    key = FIRST_CONV["densenet121"]
    grey_kernel = torch.randn(monai[key].shape[0], 1, *monai[key].shape[2:])
    source = _source_format("densenet121", monai, classes=14)  # a 14-class X-ray model
    source[key] = grey_kernel
    path = tmp_path / "xray.pth"
    torch.save({"model": source}, path)
    member = build_member("densenet121", 2)

    report = load_weights(member, path)

    assert report.adapted == [key]
    assert "1 -> 3" in report.notes[key]
    assert sorted(report.skipped) == ["classifier.bias", "classifier.weight"]
    _assert_landed(member, monai, skip=(key,))
    # A grey image copied to three channels gives what the grey model gave.
    grey = torch.rand(1, 1, 16, 16)
    loaded = member.net.state_dict()[key]
    assert torch.allclose(F.conv2d(grey.expand(1, 3, 16, 16), loaded),
                          F.conv2d(grey, grey_kernel), atol=1e-5)
    assert "adapted" in report.summary() and key in report.summary()


def test_missing_unexpected_and_misshapen_keys_are_reported_or_refused(tmp_path: Path) -> None:
    monai = _monai_backbone("resnet50")
    source = _source_format("resnet50", monai)
    del source["layer4.2.conv3.weight"]
    source["layer9.extra.weight"] = torch.zeros(3)
    source["layer1.0.conv1.weight"] = torch.zeros(5, 5, 1, 1)  # wrong shape, not first conv
    path = tmp_path / "bad.pth"
    torch.save(source, path)

    with pytest.raises(WeightsError) as err:
        load_weights(build_member("resnet50", 2), path)
    message = str(err.value)
    assert "layer4.2.conv3.weight" in message and "layer9.extra.weight" in message

    member = build_member("resnet50", 2)
    before = member.net.layer4[2].conv3.weight.clone()
    report = load_weights(member, path, strict_backbone=False)
    assert report.missing == ["layer4.2.conv3.weight"]
    assert report.unexpected == ["layer9.extra.weight"]
    assert "layer1.0.conv1.weight" in report.skipped
    assert "does not fit" in report.notes["layer1.0.conv1.weight"]
    assert torch.equal(member.net.layer4[2].conv3.weight, before)  # left as initialised
    assert torch.equal(member.net.layer2[0].conv1.weight, monai["layer2.0.conv1.weight"])


def test_missing_bn_counters_do_not_fail_a_strict_load() -> None:
    monai = _monai_backbone("efficientnet-b0")
    source = {k: v for k, v in _source_format("efficientnet-b0", monai).items()
              if not k.endswith("num_batches_tracked")}
    report = load_weights(build_member("efficientnet-b0", 2), source)
    assert report.missing and all(k.endswith("num_batches_tracked") for k in report.missing)
    assert "num_batches_tracked" in report.summary()


class NotWeights:
    """A pickled object ``weights_only`` loading must refuse."""


def test_files_are_read_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "pickle.pth"
    torch.save({"conv1.weight": torch.zeros(1), "obj": NotWeights()}, path)
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(build_member("resnet50", 2), path)
    with pytest.raises(WeightsError, match="not found"):
        load_weights(build_member("resnet50", 2), tmp_path / "nope.pth")


def test_urls_go_through_torch_hub_with_weights_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monai = _monai_backbone("resnet50")
    calls = []

    def fake(url, **kwargs):
        calls.append((url, kwargs))
        return _source_format("resnet50", monai)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    member = build_member("resnet50", 2)
    report = load_weights(member, "https://example.org/resnet50.pth")
    assert calls and calls[0][0] == "https://example.org/resnet50.pth"
    assert calls[0][1].get("weights_only") is True
    assert report.source == "https://example.org/resnet50.pth"
    _assert_landed(member, monai)


def test_read_state_dict_unwraps_and_strips() -> None:
    sd = read_state_dict({"model": {"module.module.a": torch.ones(1), "note": "x"}})
    assert list(sd) == ["a"]
    with pytest.raises(WeightsError):
        read_state_dict({"a": "no tensors here"})
