import pytest

from mtkit.config import Config, TrainConfig, apply_overrides, config_from_dict, load_config
from mtkit.errors import MtkitError


def test_defaults_build():
    cfg = config_from_dict({})
    assert isinstance(cfg, Config)
    assert cfg.train.max_tokens == TrainConfig().max_tokens


def test_override_typed_by_yaml():
    raw = apply_overrides({}, ["train.lr=1e-3", "train.max_updates=12", "train.valid_bleu=false"])
    cfg = config_from_dict(raw)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.max_updates == 12 and isinstance(cfg.train.max_updates, int)
    assert cfg.train.valid_bleu is False


def test_override_list_value():
    cfg = config_from_dict(apply_overrides({}, ["train.adam_betas=[0.9, 0.997]"]))
    assert cfg.train.adam_betas == [0.9, 0.997]


def test_unknown_key_suggests_closest():
    with pytest.raises(MtkitError, match="did you mean 'train.max_updates'"):
        config_from_dict(apply_overrides({}, ["train.max_update=5"]))


def test_unknown_section_suggests_closest():
    with pytest.raises(MtkitError, match="did you mean 'train'"):
        config_from_dict({"trian": {}})


def test_wrong_type_names_key():
    with pytest.raises(MtkitError, match="train.max_updates"):
        config_from_dict(apply_overrides({}, ["train.max_updates=abc"]))


def test_bad_override_syntax():
    with pytest.raises(MtkitError, match="section.key=value"):
        apply_overrides({}, ["trainlr"])


def test_yaml_file_and_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.002\n  seed: 7\n")
    cfg = load_config(p, ["train.seed=9"])
    assert cfg.train.lr == pytest.approx(0.002) and cfg.train.seed == 9


def test_missing_config_file(tmp_path):
    with pytest.raises(MtkitError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_preset_is_error():
    with pytest.raises(MtkitError, match="unknown config file or preset"):
        load_config("no_such_preset_name")
