import json
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hybrid_accel.model import (
    DeepLabV3Plus,
    SegOutput,
    WeightsError,
    build_model,
    export_model,
    load_exported,
    read_exported_config,
    unwrap_model,
)

SMALL = dict(decoder_channels=16, low_level_channels=8)


@pytest.mark.parametrize(
    "backbone, output_stride",
    [
        ("resnet10t", 16),
        ("resnet10t", 8),
        ("resnet10t", 32),
        ("mobilenetv3_small_050", 16),
        ("efficientnet_b0", 8),
        ("convnext_atto", 16),
    ],
)
def test_shapes(backbone, output_stride):
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=3, output_stride=output_stride, **SMALL).eval()
    assert model.output_stride == output_stride
    assert model.encoder.feature_info.reduction()[-1] == output_stride
    assert model.low_stride == 4
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out = model(x, return_features=True)
        plain = model(x)
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 3, 64, 48)
    assert out.logits_low.shape == (2, 3, 16, 12)
    assert out.feats.shape == (2, 16, 16, 12)
    torch.testing.assert_close(plain, out.logits)
    # feats and logits_low are exactly the classifier's input and output
    torch.testing.assert_close(model.classifier(out.feats), out.logits_low, rtol=0, atol=0)
    up = F.interpolate(out.logits_low, size=(64, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, out.logits, rtol=0, atol=0)
    assert isinstance(model.classifier, torch.nn.Conv2d)
    assert model.classifier.kernel_size == (1, 1) and model.classifier.bias is not None


def test_classifier_gradient_comes_from_feats():
    # The DII contract: dL/dW = sum_p delta h^T with delta = dL/dlogits_low, h = feats.
    torch.manual_seed(0)
    model = build_model("resnet10t", num_classes=2, **SMALL).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x, return_features=True)
    out.logits_low.retain_grad()
    target = torch.randint(0, 2, (2, 32, 32))
    F.cross_entropy(out.logits, target).backward()
    delta = out.logits_low.grad.flatten(2)
    gw = torch.einsum("bcp,bfp->cf", delta, out.feats.detach().flatten(2))
    torch.testing.assert_close(model.classifier.weight.grad[:, :, 0, 0], gw, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.classifier.bias.grad, delta.sum((0, 2)), rtol=1e-4, atol=1e-6)


def test_batch_of_one_trains():
    model = build_model("resnet10t", **SMALL).train()
    model(torch.randn(1, 3, 32, 32)).sum().backward()


def test_bad_output_stride():
    with pytest.raises(ValueError, match="output_stride"):
        build_model("resnet10t", output_stride=4)


def test_never_downloads(monkeypatch):
    calls = []
    real = timm.create_model

    def spy(*args, **kwargs):
        calls.append(kwargs.get("pretrained"))
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    build_model("resnet10t", **SMALL)
    assert calls and not any(calls)


def test_timm_download_failure_says_how_to_pass_a_file(monkeypatch):
    real = timm.create_model

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"pretrained='/path/to/model\.safetensors'"):
        build_model("resnet10t", pretrained="timm", **SMALL)


def _assert_encoder_equals(model, full):
    sd = full.state_dict()
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_load_timm_classification_checkpoint_pth(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model("resnet10t", pretrained=False)  # with its fc head
    # a training checkpoint: nested under state_dict, DDP prefix, extra entries
    ckpt = {"state_dict": {"module." + k: v for k, v in full.state_dict().items()}, "epoch": 7, "arch": "resnet10t"}
    path = tmp_path / "r10.pth"
    torch.save(ckpt, path)
    model = build_model("resnet10t", pretrained=str(path), **SMALL)
    _assert_encoder_equals(model, full)


def test_load_timm_checkpoint_safetensors_with_head_and_no_bn_counters(tmp_path):
    torch.manual_seed(2)
    full = timm.create_model("mobilenetv3_small_050", pretrained=False)
    sd = {k: v for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    model = build_model("mobilenetv3_small_050", pretrained=path, **SMALL)
    sd_full = full.state_dict()
    for k, v in model.encoder.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, sd_full[k]), k


def test_load_features_only_state_dict_and_model_key(tmp_path):
    enc = timm.create_model("resnet10t", features_only=True, pretrained=False, output_stride=16)
    path = tmp_path / "enc.bin"
    torch.save({"model": enc.state_dict()}, path)
    model = build_model("resnet10t", pretrained=str(path), **SMALL)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, enc.state_dict()[k])


def test_weight_errors(tmp_path):
    full = timm.create_model("resnet10t", pretrained=False)
    sd = dict(full.state_dict())
    sd.pop("layer1.0.conv1.weight")
    sd["extra.weight"] = torch.zeros(2)
    sd["conv1.0.weight"] = torch.zeros(5, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        build_model("resnet10t", pretrained=str(path), **SMALL)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys (1): layer1.0.conv1.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "conv1.0.weight (file (5, 3, 3, 3), model (24, 3, 3, 3))" in msg


def test_weights_of_another_architecture(tmp_path):
    path = tmp_path / "r18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    with pytest.raises(WeightsError, match="shape mismatches"):
        build_model("resnet10t", pretrained=path, **SMALL)


def test_unreadable_weight_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_model("resnet10t", pretrained=str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="safetensors"):
        build_model("resnet10t", pretrained=junk)
    junk_pth = tmp_path / "junk.pth"
    junk_pth.write_bytes(b"\x00\x01garbage")
    with pytest.raises(WeightsError, match="torch state dict"):
        build_model("resnet10t", pretrained=junk_pth)
    no_sd = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, no_sd)
    with pytest.raises(WeightsError, match="no state dict found"):
        build_model("resnet10t", pretrained=no_sd)


def _same_outputs(a, b, x):
    with torch.no_grad():
        oa, ob = a(x, return_features=True), b(x, return_features=True)
    for ta, tb in zip(oa, ob):
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)


def test_export_round_trip(tmp_path):
    torch.manual_seed(3)
    model = build_model("resnet10t", num_classes=3, output_stride=8, aspp_rates=(2, 4, 6), **SMALL)
    # move BN statistics away from their initial values
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    model.eval()
    path = export_model(model, tmp_path / "sub" / "net.safetensors", {"image_size": [32, 32], "name": "primary"})
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]
    loaded, config = load_exported(path)
    assert not loaded.training
    assert config["image_size"] == [32, 32] and config["name"] == "primary"
    assert config["model"]["output_stride"] == 8 and config["model"]["aspp_rates"] == [2, 4, 6]
    assert read_exported_config(path) == config
    _same_outputs(model, loaded, torch.randn(2, 3, 40, 36))
    # the same file is also a whole-model `pretrained` source
    again = build_model(**config["model"], pretrained=path).eval()
    _same_outputs(model, again, torch.randn(1, 3, 32, 32))
    # and its encoder part a backbone source for another head
    other = build_model(**{**config["model"], "num_classes": 5}, pretrained=None)
    from hybrid_accel.model import load_backbone_weights

    load_backbone_weights(other.encoder, path, "resnet10t")
    for k, v in other.encoder.state_dict().items():
        assert torch.equal(v, model.encoder.state_dict()[k])


def test_exported_file_for_other_num_classes_is_an_error(tmp_path):
    path = export_model(build_model("resnet10t", num_classes=3, **SMALL), tmp_path / "m.safetensors")
    with pytest.raises(WeightsError, match=r"classifier\.weight \(file \(3, 16, 1, 1\), model \(2, 16, 1, 1\)\)"):
        build_model("resnet10t", num_classes=2, pretrained=path, **SMALL)


def test_export_unwraps_and_rejects_plain_files(tmp_path):
    model = build_model("resnet10t", **SMALL).eval()
    compiled = torch.compile(model)  # lazy: nothing is compiled until called
    assert unwrap_model(compiled) is model
    path = export_model(compiled, tmp_path / "c.safetensors")
    assert all(not k.startswith("_orig_mod") for k in json.loads(json.dumps(list(model.state_dict()))))
    loaded, _ = load_exported(path)
    _same_outputs(model, loaded, torch.randn(1, 3, 32, 32))
    cl, _ = load_exported(path, channels_last=True, aspp_dropout=0.0)
    assert cl.channels_last and cl.config["aspp_dropout"] == 0.0
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(plain))
    with pytest.raises(WeightsError, match="export_model"):
        load_exported(plain)
    with pytest.raises(TypeError):
        export_model(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_channels_last_matches():
    torch.manual_seed(4)
    ref = build_model("resnet10t", **SMALL).eval()
    cl = build_model("resnet10t", channels_last=True, **SMALL).eval()
    cl.load_state_dict(ref.state_dict())
    assert cl.classifier.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ref(x, return_features=True), cl(x, return_features=True)
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cl.classifier(b.feats), b.logits_low, rtol=0, atol=0)


def test_compile_fullgraph_forward_and_backward():
    # aot_eager traces the whole graph as inductor would, without the C++ compile time.
    torch.manual_seed(5)
    ref = build_model("resnet10t", **SMALL)
    comp = build_model("resnet10t", compile=dict(backend="aot_eager", fullgraph=True), **SMALL)
    comp.load_state_dict(ref.state_dict())
    assert isinstance(comp, DeepLabV3Plus) and "classifier.weight" in comp.state_dict()
    x = torch.randn(2, 3, 32, 32)
    ref.eval(), comp.eval()
    _same_outputs_close(ref, comp, x)
    comp.train()
    out = comp(x, return_features=True)
    out.logits.sum().backward()
    assert comp.classifier.weight.grad is not None


def _same_outputs_close(a, b, x):
    with torch.no_grad():
        for ta, tb in zip(a(x, return_features=True), b(x, return_features=True)):
            torch.testing.assert_close(ta, tb, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HYBRID_ACCEL_SLOW"), reason="inductor compile takes ~40 s on 2 cores")
def test_compile_inductor():
    torch.manual_seed(6)
    ref = build_model("resnet10t", **SMALL).eval()
    comp = build_model("resnet10t", compile=True, **SMALL).eval()
    comp.load_state_dict(ref.state_dict())
    _same_outputs_close(ref, comp, torch.randn(2, 3, 32, 32))
