"""DeepLabv3+ on any timm backbone, with local-file weight loading and safetensors export.

The network (DESIGN.md section 5)::

    x -> timm encoder (features_only) --deepest--> ASPP ------------> upsample to stride 4 -+
                                     --stride 4--> 1x1 conv (48 ch) -----------------------+-> concat
    concat -> 2 x (3x3 conv, BN, ReLU) = feats [B, F, h, w] -> classifier (1x1 conv) = logits_low
    logits_low -> bilinear upsampling (align_corners=False) to the input size = logits

``forward(x, return_features=True)`` returns ``feats`` and ``logits_low`` exactly as the classifier
consumed and produced them: the DII hypergradient (DESIGN.md section 2) is computed from these two
tensors, so nothing (no dropout, no normalisation) sits between them and the classifier.

Nothing is ever downloaded unless ``pretrained="timm"`` asks for it explicitly;
``pretrained="imagenet"`` reads ImageNet weights that a pip package installed (hybrid_accel.weights).

Input normalisation: every model records the mean and std its encoder expects (timm's
``pretrained_cfg`` for the backbone unless given) in its config; :func:`input_norm` reads them, and
the trainer, ``evaluate`` and ``audit`` scale images with them. An export carries them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .depthwise import use_fast_depthwise

__all__ = [
    "SegOutput",
    "DeepLabV3Plus",
    "WeightsError",
    "build_model",
    "read_state_dict",
    "load_backbone_weights",
    "load_model_weights",
    "export_model",
    "load_exported",
    "read_exported_config",
    "unwrap_model",
    "input_norm",
    "default_norm",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONFIG_KEY = "hybrid_accel_config"  # safetensors metadata key holding the JSON config
_RUNTIME_OPTIONS = ("pretrained", "channels_last", "compile", "fast_depthwise")  # not part of the stored architecture


class SegOutput(NamedTuple):
    logits: torch.Tensor  # [B, C, H, W] at the input size
    logits_low: torch.Tensor  # [B, C, h, w] = classifier(feats), stride 4
    feats: torch.Tensor  # [B, F, h, w], the classifier's input


class WeightsError(ValueError):
    """A weight file does not fit the model; the message names every offending key."""


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per rate, image pooling."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int], dropout: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout, 1)])
        self.branches.extend(_conv_bn_relu(cin, cout, 3, dilation=int(r)) for r in rates)
        # No BatchNorm on the pooled 1x1 map: with one image per process it would see a single
        # value per channel and fail in training mode.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            _conv_bn_relu(cout * (len(rates) + 2), cout, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(outs, dim=1))


def _pick_low_level(reductions: Sequence[int]) -> int:
    """Index of the stride-4 feature (the deepest one if several), else the finest one above 4."""
    at4 = [i for i, r in enumerate(reductions) if r == 4]
    if at4:
        return at4[-1]
    above = [i for i, r in enumerate(reductions) if r > 4]
    if not above:
        raise ValueError(f"no feature with stride >= 4 among the backbone's strides {list(reductions)}")
    return min(above, key=lambda i: reductions[i])


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ on a timm ``features_only`` encoder; build it with :func:`build_model`."""

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        aspp_rates: Sequence[int] = (6, 12, 18),
        decoder_channels: int = 256,
        low_level_channels: int = 48,
        aspp_dropout: float = 0.1,
        config: dict | None = None,
    ):
        super().__init__()
        info = encoder.feature_info
        channels, reductions = info.channels(), info.reduction()
        self.encoder = encoder
        self.low_index = _pick_low_level(reductions)
        self.low_stride = reductions[self.low_index]
        self.output_stride = reductions[-1]
        self.num_classes = num_classes
        self.feature_channels = decoder_channels
        self.aspp = ASPP(channels[-1], decoder_channels, aspp_rates, aspp_dropout)
        self.low_proj = _conv_bn_relu(channels[self.low_index], low_level_channels, 1)
        self.decoder = nn.Sequential(
            _conv_bn_relu(decoder_channels + low_level_channels, decoder_channels, 3),
            _conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1, bias=True)
        self.config = dict(config or {})
        self.channels_last = False
        for m in (self.aspp, self.low_proj, self.decoder):
            for mod in m.modules():
                if isinstance(mod, nn.Conv2d):
                    nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                    if mod.bias is not None:
                        nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor | SegOutput:
        size = x.shape[-2:]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.encoder(x)
        low = self.low_proj(feats[self.low_index])
        high = self.aspp(feats[-1])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        h = self.decoder(torch.cat([high, low], dim=1))
        logits_low = self.classifier(h)
        logits = F.interpolate(logits_low, size=size, mode="bilinear", align_corners=False)
        if return_features:
            return SegOutput(logits, logits_low, h)
        return logits


# ----------------------------------------------------------------------------------------------
# Weight files


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``)."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in ("module.", "_orig_mod."):
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file (``.pth``/``.pt``/``.bin``).

    A torch file may nest the weights under ``state_dict``, ``model`` or ``model_state_dict``
    (training checkpoints, timm's ``train.py`` included). Wrapper prefixes are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(
                f"{path}: not a readable torch state dict ({type(e).__name__}: {e}); "
                "only tensors and plain containers are accepted (weights_only=True)"
            ) from e
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            keys = sorted(str(k) for k in obj)[:12]
            raise WeightsError(
                f"{path}: no state dict found; top-level keys are {keys} "
                "(expected tensors, or a dict under 'state_dict', 'model' or 'model_state_dict')"
            )
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: does not hold a non-empty dict of tensors")
    return _strip_prefixes(dict(obj))


def _fmt_keys(keys: Sequence[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_and_load(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    source: str,
    ignore_extra: set[str] = frozenset(),
) -> list[str]:
    """Load ``sd`` into ``module`` after checking that every key and shape fits.

    Keys in ``ignore_extra`` may be present without being loaded (a classification head); they
    are returned. BatchNorm ``num_batches_tracked`` buffers may be absent.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    extra = [k for k in sd if k not in expected]
    unexpected = [k for k in extra if k not in ignore_extra]
    mismatched = [
        f"{k} (file {tuple(sd[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"{source} does not fit the {type(module).__name__} it is loaded into:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}): {_fmt_keys(mismatched)}")
        raise WeightsError("\n".join(parts))
    module.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    return sorted(set(extra))


def _is_whole_model(sd: Mapping[str, torch.Tensor]) -> bool:
    return "classifier.weight" in sd and any(k.startswith("encoder.") for k in sd) and any(
        k.startswith("aspp.") for k in sd
    )


def _classification_keys(backbone: str, in_chans: int) -> set[str]:
    """State-dict keys of timm's classification model (built on the meta device: no memory, no I/O)."""
    try:
        with torch.device("meta"):
            full = timm.create_model(backbone, pretrained=False, in_chans=in_chans)
        return set(full.state_dict())
    except Exception:  # an exotic backbone: then every extra key is reported as unexpected
        return set()


def load_backbone_weights(
    encoder: nn.Module,
    weights: str | os.PathLike | Mapping[str, torch.Tensor],
    backbone: str,
    in_chans: int = 3,
    source: str | None = None,
) -> list[str]:
    """Load backbone weights into a timm ``features_only`` encoder.

    Accepts the encoder's own state dict, timm's classification checkpoint for the same
    architecture (its head and any stage the encoder drops are skipped: timm's feature wrappers
    keep the module names of the layers they keep), or a whole DeepLabV3Plus state dict (its
    ``encoder.`` part). Raises :class:`WeightsError` naming missing/unexpected keys and shape
    mismatches. Returns the skipped keys.
    """
    source = source or (str(weights) if not isinstance(weights, Mapping) else "state dict")
    sd = read_state_dict(weights) if not isinstance(weights, Mapping) else _strip_prefixes(dict(weights))
    if _is_whole_model(sd):
        sd = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    head = _classification_keys(backbone, in_chans) - set(encoder.state_dict())
    return _check_and_load(encoder, sd, f"backbone weights {source}", ignore_extra=head)


def load_model_weights(
    model: nn.Module, weights: str | os.PathLike | Mapping[str, torch.Tensor], source: str | None = None
) -> None:
    """Load a whole-model state dict (file or mapping) strictly, with the same error report."""
    source = source or (str(weights) if not isinstance(weights, Mapping) else "state dict")
    sd = read_state_dict(weights) if not isinstance(weights, Mapping) else _strip_prefixes(dict(weights))
    _check_and_load(unwrap_model(model), sd, f"model weights {source}")


# ----------------------------------------------------------------------------------------------
# Construction


def _create_encoder(backbone: str, output_stride: int, in_chans: int, pretrained: bool) -> nn.Module:
    kwargs: dict[str, Any] = dict(features_only=True, pretrained=pretrained, in_chans=in_chans)
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    try:
        encoder = timm.create_model(backbone, **kwargs)
    except TypeError as e:
        if "output_stride" in str(e):
            raise ValueError(
                f"backbone {backbone!r} does not support output_stride={output_stride} in timm; "
                "use output_stride=32 or another backbone"
            ) from e
        raise
    reductions = encoder.feature_info.reduction()
    if reductions[-1] != output_stride:
        raise ValueError(
            f"backbone {backbone!r} gives a deepest stride of {reductions[-1]}, not the requested "
            f"output_stride={output_stride}"
        )
    return encoder


def _create_encoder_or_explain(backbone: str, output_stride: int, in_chans: int, from_timm: bool) -> nn.Module:
    """:func:`_create_encoder`, with timm's own weights when ``from_timm``; a failure to get
    those weights becomes a RuntimeError that says how to pass a local file instead."""
    try:
        return _create_encoder(backbone, output_stride, in_chans, pretrained=from_timm)
    except (ValueError, RuntimeError) as e:
        if not from_timm or "output_stride" in str(e):
            raise
        raise RuntimeError(
            f"could not get timm's pretrained weights for {backbone!r} ({type(e).__name__}: {e}). "
            "On a machine without network access, fetch the weights elsewhere (for example "
            f"timm's 'model.safetensors' for {backbone}) and pass the local file: "
            "pretrained='/path/to/model.safetensors' (a .pth/.bin state dict works too)."
        ) from e
    except Exception as e:
        if not from_timm:
            raise
        raise RuntimeError(
            f"could not get timm's pretrained weights for {backbone!r} ({type(e).__name__}: {e}). "
            "Pass a local weight file instead: pretrained='/path/to/model.safetensors'."
        ) from e


def _input_norm_for(
    backbone: str, in_chans: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[list[float], list[float]]:
    """The checked ``(mean, std)`` lists a model stores: those given, else the backbone's defaults."""
    d_mean, d_std = default_norm(backbone)
    mean = [float(v) for v in (d_mean if mean is None else mean)]
    std = [float(v) for v in (d_std if std is None else std)]
    if len(mean) != in_chans or len(std) != in_chans or min(std) <= 0:
        raise ValueError(f"input normalisation mean={mean} std={std}: need {in_chans} values each, std > 0")
    return mean, std


def _load_pretrained(
    model: DeepLabV3Plus, pretrained: str | os.PathLike | None, backbone: str, in_chans: int
) -> None:
    """Load ``pretrained`` (None: nothing; ``"imagenet"``: the pip-installed file; else a local
    file) into ``model``: the whole model when the file holds one, else its encoder."""
    if isinstance(pretrained, str) and pretrained == "imagenet":
        from .weights import imagenet_weights

        pretrained = imagenet_weights(backbone)
    if pretrained is None:
        return
    sd = read_state_dict(pretrained)
    if _is_whole_model(sd):
        load_model_weights(model, sd, source=str(pretrained))
    else:
        load_backbone_weights(model.encoder, sd, backbone, in_chans, source=str(pretrained))


def _apply_runtime_options(
    model: DeepLabV3Plus, channels_last: bool, compile: bool | Mapping[str, Any]
) -> DeepLabV3Plus:
    """Channels-last memory format and in-place ``torch.compile``, as :func:`build_model` documents."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True
    if compile:
        model.compile(**(dict(compile) if isinstance(compile, Mapping) else {}))
    return model


def build_model(
    backbone: str = "resnet18",
    num_classes: int = 2,
    output_stride: int = 16,
    aspp_rates: Sequence[int] = (6, 12, 18),
    decoder_channels: int = 256,
    pretrained: str | os.PathLike | None = None,
    in_chans: int = 3,
    low_level_channels: int = 48,
    aspp_dropout: float = 0.1,
    channels_last: bool = False,
    compile: bool | Mapping[str, Any] = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    fast_depthwise: bool = True,
) -> DeepLabV3Plus:
    """Build DeepLabv3+ on a timm backbone.

    Args:
        backbone: any timm model name that supports ``features_only=True``.
        num_classes: output classes, background included.
        output_stride: stride of the feature ASPP reads: 8 or 16 (dilated, where timm supports
            it: resnets, efficientnets, mobilenets, convnexts...) or 32 (no dilation).
        aspp_rates: dilation rates of the ASPP 3x3 branches ((6, 12, 18) suits output stride 16;
            DeepLab doubles them at 8).
        decoder_channels: width F of ASPP and decoder; ``feats`` has F channels.
        pretrained: ``None`` (random init); a local file with backbone weights (safetensors or a
            torch state dict, timm classification checkpoints included) or with a whole-model
            state dict (for example an exported model); ``"imagenet"`` for the ImageNet weights
            that pip packages ship (``tf_efficientnet_lite0/1/2``, see hybrid_accel.weights); or
            ``"timm"`` to let timm fetch its published weights (needs network access).
        in_chans: input channels.
        low_level_channels: width of the projected stride-4 feature.
        aspp_dropout: dropout after the ASPP projection (training only; before the decoder).
        channels_last: keep weights and activations in channels-last memory format.
        compile: ``True`` or a dict of ``torch.compile`` keyword arguments compiles the forward
            in place (``nn.Module.compile``), so state-dict keys stay unchanged.
        mean, std: the per-channel input normalisation the network expects (on [0, 1] images);
            ``None`` = the backbone's pretrained configuration in timm (ImageNet's where timm has none).
            Stored in the config (and so in an export); read it back with :func:`input_norm`.
        fast_depthwise: depthwise convolutions with a kernel larger than 3x3 or a dilation compute
            their CPU backward pass as forward depthwise convolutions (:mod:`hybrid_accel.depthwise`;
            the same gradients, far faster); no effect on a GPU, on inference or on the weights.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    from_timm = isinstance(pretrained, str) and pretrained == "timm"
    encoder = _create_encoder_or_explain(backbone, output_stride, in_chans, from_timm)
    mean, std = _input_norm_for(backbone, in_chans, mean, std)
    config = dict(
        backbone=backbone,
        num_classes=int(num_classes),
        output_stride=int(output_stride),
        aspp_rates=[int(r) for r in aspp_rates],
        decoder_channels=int(decoder_channels),
        in_chans=int(in_chans),
        low_level_channels=int(low_level_channels),
        aspp_dropout=float(aspp_dropout),
        mean=mean,
        std=std,
    )
    model = DeepLabV3Plus(
        encoder,
        num_classes,
        aspp_rates=aspp_rates,
        decoder_channels=decoder_channels,
        low_level_channels=low_level_channels,
        aspp_dropout=aspp_dropout,
        config=config,
    )
    if not from_timm:
        _load_pretrained(model, pretrained, backbone, in_chans)
    if fast_depthwise:
        use_fast_depthwise(model)
    return _apply_runtime_options(model, channels_last, compile)


def default_norm(backbone: str) -> tuple[list[float], list[float]]:
    """(mean, std) of ``backbone``'s default pretrained configuration in timm; ImageNet's if it has none."""
    try:
        cfg = timm.get_pretrained_cfg(backbone)
    except Exception:  # an unknown name: build_model reports it
        cfg = None
    mean = getattr(cfg, "mean", None) or IMAGENET_MEAN
    std = getattr(cfg, "std", None) or IMAGENET_STD
    return [float(v) for v in mean], [float(v) for v in std]


def input_norm(model: nn.Module) -> tuple[list[float], list[float]]:
    """(mean, std) that inputs of ``model`` are normalised with; models exported before this was
    recorded get their backbone's default."""
    cfg = unwrap_model(model).config
    if "mean" in cfg and "std" in cfg:
        return list(cfg["mean"]), list(cfg["std"])
    return default_norm(cfg.get("backbone", ""))


# ----------------------------------------------------------------------------------------------
# Export


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def export_model(model: nn.Module, path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> Path:
    """Write the model's weights and config to one safetensors file (atomically).

    The metadata entry ``hybrid_accel_config`` holds JSON: ``config`` (anything JSON-serialisable:
    image size, class names, training config...) with the key ``model`` set to the build
    arguments of the model, which :func:`load_exported` uses to rebuild it.
    """
    from safetensors.torch import save_file

    net = unwrap_model(model)
    if not isinstance(net, DeepLabV3Plus) or not net.config:
        raise TypeError("export_model expects a DeepLabV3Plus made by build_model")
    full = dict(config or {})
    full["model"] = dict(net.config)
    try:
        meta = {CONFIG_KEY: json.dumps(full), "format": "pt"}
    except TypeError as e:
        raise TypeError(f"export_model: config is not JSON-serialisable ({e})") from e
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)  # readers never see a half-written file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_exported_config(path: str | os.PathLike) -> dict:
    """The config stored by :func:`export_model` (without reading the weights)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    if CONFIG_KEY not in meta:
        raise WeightsError(
            f"{path}: no '{CONFIG_KEY}' metadata; it was not written by export_model "
            "(to use plain weights, build the model and pass the file as pretrained=...)"
        )
    return json.loads(meta[CONFIG_KEY])


def load_exported(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any
) -> tuple[DeepLabV3Plus, dict]:
    """Rebuild a model written by :func:`export_model`; returns ``(model in eval mode, config)``.

    ``overrides`` go to :func:`build_model` (for example ``channels_last=True``).
    """
    config = read_exported_config(path)
    kwargs = {k: v for k, v in config["model"].items() if k not in _RUNTIME_OPTIONS}
    compile_opt = overrides.pop("compile", False)
    model = build_model(**{**kwargs, **overrides, "pretrained": None})
    load_model_weights(model, path)
    model = model.to(map_location).eval()
    if compile_opt:
        model.compile(**(dict(compile_opt) if isinstance(compile_opt, Mapping) else {}))
    return model, config
