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


def test_one_override_parser_serves_configs_and_recipes():
    from mtkit.config import parse_override, set_override
    from mtkit.errors import MtkitError
    from mtkit.recipes.schema import apply_recipe_overrides

    assert parse_override("train.lr=0.0005") == (["train", "lr"], 0.0005)
    assert parse_override("average.select.last=3", depth=None) == (["average", "select", "last"], 3)
    for bad, depth in (("train.lr", 2), ("lr=1", 2), ("a.b.c=1", 2), ("train..lr=1", None), ("train.lr=[1,", 2)):
        with pytest.raises(MtkitError, match="override"):
            parse_override(bad, depth=depth)
    raw = {"train": None, "name": "x"}
    set_override(raw, ["train", "lr"], 1, "train.lr=1")
    assert raw["train"] == {"lr": 1}
    with pytest.raises(MtkitError, match="'name' is not a section"):
        set_override(raw, ["name", "sub"], 1, "name.sub=1")
    assert apply_recipe_overrides({"average": {"last": 5}}, ["average.last=3", "train.lr=0.001"]) == {
        "average": {"last": 3}, "train": {"lr": 0.001}}
