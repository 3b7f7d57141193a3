"""Config: precedence, overrides, base chains, unknown keys, validation."""

from pathlib import Path

import pytest
import yaml

from hybrid_accel.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    valid_keys,
    validate_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("dii:\n  tau: 200\n  lr: 0.05\ntrain:\n  batch_size: 4\n")
    cfg = load_config(f, ["dii.tau=100", "method.paste=cutmix", "data.image_size=32"])
    assert cfg.dii.tau == 100  # CLI wins
    assert cfg.dii.lr == 0.05  # YAML wins over default
    assert cfg.train.batch_size == 4
    assert cfg.dii.betas == [0.9, 0.999]  # default
    assert cfg.method.paste == "cutmix"
    assert cfg.data.image_size == [32, 32]


def test_base_chain_and_section_mapping(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 3\nmethod:\n  dcr: false\n  dii: false\n  dii_sampling: false\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmethod:\n  dii: true\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.seed, cfg.method.dcr, cfg.method.dii) == (3, False, True)


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["dii.tua=3"])
    assert "dii.tau" in str(e.value) and "Valid keys" in str(e.value)
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  backbon: resnet50\n")
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config(f)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["dii.tau"])


def test_type_errors():
    with pytest.raises(ConfigError, match="integer"):
        load_config(None, ["dii.tau=abc"])
    with pytest.raises(ConfigError, match="true or false"):
        load_config(None, ["method.dii=maybe"])
    cfg = load_config(None, ["resume=latest", "data.root=null", "optim.lr=1e-3", "optim.grad_clip=1"])
    assert cfg.resume == "latest" and cfg.data.root is None and cfg.optim.lr == 1e-3 and cfg.optim.grad_clip == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("dii.tau=0", "dii.tau"),
        ("dii.tau=-5", "dii.tau"),
        ("method.sampling_floor=1.5", "method.sampling_floor"),
        ("method.dcr_weight=-1", "method.dcr_weight"),
        ("method.lambda_=-1", "method.dcr_weight"),  # the old name, an alias
        ("method.paste=mixup", "method.paste"),
        ("optim.name=adam", "optim.name"),
        ("dii.score=plain", "dii.score"),
        ("optim.momentum=1", "optim.momentum"),
        ("dii.clip=[1,0]", "dii.clip"),
        ("train.batch_size=0", "train.batch_size"),
        ("data.train_on=strong", "method.dii needs strong and weak"),
        ("data.weak_boundary_band=1", "data.weak_boundary_band"),
        ("data.weak_boundary_band=-0.2", "data.weak_boundary_band"),
    ],
)
def test_validation(override, message):
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate_config(cfg)


def test_boundary_band_refuses_scribbles(tmp_path):
    from hybrid_accel.data import make_synthetic_hybrid
    from hybrid_accel.train import build_datasets, check_against_data

    root = make_synthetic_hybrid(tmp_path / "d", n_train=8, n_val=2, n_test=2, size=32, strong_count=2, seed=0,
                                 weak="scribble", workers=1)
    cfg = load_config(None, ["data.weak_boundary_band=0.3", "train.batch_size=2"])
    with pytest.raises(ConfigError, match="scribble weak masks.*data.weak_boundary_band=0"):
        check_against_data(cfg, build_datasets(cfg, root)["train"])
    cfg = load_config(None, ["data.weak_boundary_band=0", "train.batch_size=2"])
    check_against_data(cfg, build_datasets(cfg, root)["train"])


def test_sampling_without_dii_is_an_error():
    cfg = load_config(None, ["method.dii=false"])
    with pytest.raises(ConfigError, match="dii_sampling"):
        validate_config(cfg)


def test_roundtrip(tmp_path):
    cfg = load_config(None, ["dii.tau=7", "model.backbone=resnet50"])
    save_config(cfg, tmp_path / "config.yaml")
    back = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert config_to_dict(back) == config_to_dict(cfg)
    assert "dii.scan_size" in valid_keys()


def test_shipped_configs_load_and_validate():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert len(files) >= 10
    for f in files:
        cfg = load_config(f)
        validate_config(cfg)
    paper = load_config(CONFIGS / "polyp-paper.yaml")
    assert paper.model.backbone == "resnet50" and paper.train.batch_size == 16
    assert paper.optim.lr == 0.002 and paper.optim.momentum == 0.9 and paper.optim.weight_decay == 5e-5
    assert paper.dii.tau == 400 and paper.dii.lr == 0.1 and paper.method.dcr_weight == 4
    assert paper.method.strong_warmup == 0 and paper.dii.init == 0.5 and paper.optim.name == "sgd"
    polyp = load_config(CONFIGS / "polyp.yaml")  # the recommended setting on top of the paper's
    assert polyp.model.pretrained == "imagenet" and polyp.method.strong_warmup > 0 and polyp.dii.init == 0.5
    assert (polyp.dii.normalize, polyp.dii.optimizer, polyp.dii.lr_schedule) == ("area", "median_sgd", "inv_sqrt")
    cvc = load_config(CONFIGS / "cvc-clinicdb.yaml")  # the real-data config inherits the recommended DII
    assert (cvc.dii.normalize, cvc.dii.optimizer, cvc.dii.init) == ("area", "median_sgd", 0.5)
    assert polyp.method.dcr_weight == 4 and polyp.train.steps == paper.train.steps
    assert isinstance(Config(), Config)


def test_old_key_lambda_is_an_alias_of_dcr_weight(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("method:\n  lambda_: 2.5\n")
    assert load_config(f).method.dcr_weight == 2.5
    assert load_config(None, ["method.lambda_=3"]).method.dcr_weight == 3.0
    assert load_config(None, ["method={lambda_: 1.5, dcr: true}"]).method.dcr_weight == 1.5
    assert load_config(f, ["method.dcr_weight=0.5"]).method.dcr_weight == 0.5  # CLI over YAML, whichever name
    old = config_to_dict(Config())
    old["method"]["lambda_"] = old["method"].pop("dcr_weight") * 2  # config.yaml of a run from before the rename
    assert config_from_dict(old).method.dcr_weight == 8.0
    assert "method.lambda_" not in valid_keys() and not hasattr(Config().method, "lambda_")


def test_synthetic_yaml_is_exactly_the_defaults():
    # configs/synthetic.yaml spells the default run out for users; the dataclasses are the source, so it
    # must resolve to exactly their defaults (its run name aside)
    cfg = load_config(CONFIGS / "synthetic.yaml")
    assert cfg.name == "synthetic-polyp"
    cfg.name = Config().name
    assert config_to_dict(cfg) == config_to_dict(Config())


def test_bare_no_reads_as_the_string_no():
    # YAML 1.1 parses a bare `no` as False; string options such as train.mixed_precision take it as "no"
    cfg = load_config(None, ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"


def test_optimizer_choice():
    import torch

    from hybrid_accel.train import make_optimizer

    nets = [torch.nn.Linear(3, 1)]
    sgd = make_optimizer(nets, load_config(None, ["optim.name=sgd", "optim.lr=0.02", "optim.momentum=0.8"]))
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.8 and sgd.defaults["lr"] == 0.02
    adamw = make_optimizer(nets, load_config(None, ["optim.name=adamw", "optim.lr=1e-3", "optim.momentum=0.85",
                                                    "optim.weight_decay=0.01"]))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.85, 0.999)
    assert adamw.defaults["lr"] == 1e-3 and adamw.defaults["weight_decay"] == 0.01


def test_head_lr_mult_groups_encoder_apart_from_the_rest():
    import torch

    from hybrid_accel.model import build_model
    from hybrid_accel.train import make_optimizer

    nets = [build_model("resnet18", 2, decoder_channels=16) for _ in range(2)]
    opt = make_optimizer(nets, load_config(None, ["optim.head_lr_mult=10"]))
    enc, head = opt.param_groups
    assert (enc["lr_mult"], head["lr_mult"]) == (1.0, 10.0)
    enc_ids = {id(p) for n in nets for p in n.encoder.parameters()}
    assert {id(p) for p in enc["params"]} == enc_ids
    rest = {id(p) for n in nets for p in n.parameters()} - enc_ids
    assert {id(p) for p in head["params"]} == rest and id(nets[1].classifier.weight) in rest
    with pytest.raises(ConfigError, match="head_lr_mult"):
        validate_config(load_config(None, ["optim.head_lr_mult=0"]))


def test_cpu_thread_count():
    from hybrid_accel.train import cpu_thread_count

    assert cpu_thread_count(3, processes=1, load=5.0, cores=2) == 3  # train.cpu_threads wins
    assert cpu_thread_count(0, processes=1, load=0.2, cores=2) == 2  # idle: every core (not accelerate's 1)
    assert cpu_thread_count(0, processes=2, load=0.2, cores=8) == 4  # shared among the processes
    assert cpu_thread_count(0, processes=4, load=0.0, cores=2) == 1
    assert cpu_thread_count(0, processes=1, load=1.5, cores=2) == 1  # busy: one thread


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="busy_cores reads /proc/stat (Linux)")
def test_busy_cores_counts_other_processes_now_not_this_one():
    # what picks the thread count: CPU use right now (a spinning child counts), not the decaying load
    # average, and never this process's own work (a spinning thread here does not count)
    import os
    import subprocess
    import sys
    import threading
    import time

    from hybrid_accel.train import busy_cores

    base = busy_cores(0.4)
    if base > (os.cpu_count() or 1) - 0.7:
        pytest.skip(f"no free core to measure with ({base:.1f} busy)")
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 4: pass"])
    try:
        time.sleep(0.5)
        with_child = busy_cores(0.6)
    finally:
        child.kill()
        child.wait()
    assert with_child > base + 0.6, (base, with_child)
    stop = time.time() + 1.2
    spinner = threading.Thread(target=lambda: [None for _ in iter(lambda: time.time() < stop, False)])
    spinner.start()
    own = busy_cores(0.6)
    spinner.join()
    assert own < base + 0.4, (base, own)


@pytest.mark.parametrize("override, message", [
    ("model.output_stride=7", "model.output_stride=7: choose 8, 16 or 32"),
    ("model.backbone=resnet_18", "did you mean"),
    ("model.pretrained=/no/such/weights.safetensors", "no such file"),
])
def test_model_settings_checked_before_training(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(load_config(None, [override]))


def test_imagenet_needs_a_backbone_with_pip_weights():
    with pytest.raises(ConfigError, match="model.pretrained=imagenet: available for tf_efficientnet_lite0"):
        validate_config(load_config(None, ["model.backbone=resnet18"]))
    validate_config(load_config(None, ["model.backbone=resnet18", "model.pretrained=null"]))
    validate_config(load_config(None, []))  # the defaults: lite0 with its installed weights
