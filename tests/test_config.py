"""Config: YAML round trip, key=value overrides, clear errors for unknown keys and wrong types, recipes."""

from __future__ import annotations

import dataclasses

import pytest

from openseer.config import (
    Config,
    ConfigError,
    build_config,
    config_from_dict,
    load_config,
    parse_override,
    recipe_names,
    recipe_values,
    save_config,
    to_dict,
)


def test_yaml_round_trip(tmp_path):
    cfg = build_config("tiny-cpu", ["optim.base_lr=0.45", "crops.sizes=[40,20]", "log.progress=false",
                                    "swav.queue_length=512", "data.source=/some/where"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    back = load_config(path)
    assert to_dict(back) == to_dict(cfg)
    assert back == cfg  # dataclass equality, all sections
    # and the round trip through a plain dict (what checkpoints store)
    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("text", "section", "key", "expected"),
    [
        ("data.batch_size=64", "data", "batch_size", 64),
        ("optim.base_lr=0.45", "optim", "base_lr", 0.45),
        ("optim.base_lr=2", "optim", "base_lr", 2.0),  # an int is fine for a float
        ("optim.weight_decay=1e-5", "optim", "weight_decay", 1e-5),  # YAML 1.1 reads this as a string
        ("optim.weight_decay=1.0e-5", "optim", "weight_decay", 1e-5),
        ("crops.sizes=[40,20]", "crops", "sizes", [40, 20]),
        ("crops.min_scale=[0.2, 0.05]", "crops", "min_scale", [0.2, 0.05]),
        ("model.head_hidden=[]", "model", "head_hidden", []),
        ("log.progress=false", "log", "progress", False),
        ("log.tensorboard=true", "log", "tensorboard", True),
        ("model.arch=resnet18", "model", "arch", "resnet18"),
        ("data.source=/data/my images", "data", "source", "/data/my images"),
    ],
)
def test_overrides_are_parsed_and_typed(text, section, key, expected):
    cfg = build_config("tiny-cpu", [text])
    value = getattr(getattr(cfg, section), key)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, list) and expected:
        assert all(type(v) is type(expected[0]) for v in value)


def test_top_level_override_and_later_wins():
    cfg = build_config("tiny-cpu", ["seed=7", "data.batch_size=64", "data.batch_size=32"])
    assert cfg.seed == 7
    assert cfg.data.batch_size == 32


def test_parse_override_nests_keys():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert parse_override("x=") == {"x": ""}


def test_unknown_key_names_the_key_and_the_allowed_keys():
    with pytest.raises(ConfigError) as e:
        build_config("tiny-cpu", ["optim.learning_rate=0.1"])
    msg = str(e.value)
    assert "optim.learning_rate" in msg
    for allowed in ("base_lr", "weight_decay", "warmup_steps"):
        assert allowed in msg


def test_unknown_section_names_the_allowed_sections():
    with pytest.raises(ConfigError) as e:
        build_config("tiny-cpu", ["optimizer.base_lr=0.1"])
    msg = str(e.value)
    assert "optimizer" in msg
    for allowed in ("optim", "data", "swav", "crops"):
        assert allowed in msg


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("data.batch_size=abc", "data.batch_size"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("data.batch_size=true", "data.batch_size"),
        ("optim.base_lr=fast", "optim.base_lr"),
        ("log.progress=maybe", "log.progress"),
        ("log.progress=1", "log.progress"),
        ("crops.sizes=32", "crops.sizes"),
        ("crops.sizes=[32, big]", "crops.sizes[1]"),
        ("optim=3", "optim"),
        ("model.arch=[a, b]", "model.arch"),
    ],
)
def test_wrong_type_is_a_config_error_naming_the_key(text, key):
    with pytest.raises(ConfigError) as e:
        build_config("tiny-cpu", [text])
    assert key in str(e.value)


@pytest.mark.parametrize("text", ["data.batch_size", "=3", "data..batch_size=3", "data.batch_size=[1,"])
def test_malformed_override(text):
    with pytest.raises(ConfigError):
        build_config("tiny-cpu", [text])


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["crops.sizes=[16,32]"], "large to small"),
        (["crops.counts=[2]"], "crops.counts"),
        (["crops.min_scale=[0.5,0.1]", "crops.max_scale=[0.4,0.3]"], "min_scale"),
        (["swav.crops_for_assign=[0,6]"], "crops_for_assign"),
        (["data.batch_size=0"], "batch_size"),
        (["swav.epsilon=0"], "epsilon"),
        (["optim.precision=fp8"], "precision"),
        (["crops.counts=[1,0]"], "crops.counts"),
    ],
)
def test_validation_rejects_inconsistent_values(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        build_config("tiny-cpu", overrides)
    assert fragment in str(e.value)


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError) as e:
        build_config("no-such-recipe")
    msg = str(e.value)
    assert "no-such-recipe" in msg
    for name in recipe_names():
        assert name in msg


def test_all_builtin_recipes_build_and_validate():
    names = recipe_names()
    assert {"tiny-cpu", "swav-rn50", "seer-rg32", "seer-rg64", "seer-rg128", "seer-rg256"} <= set(names)
    for name in names:
        cfg = build_config(name)
        cfg.validate()
        assert cfg.recipe == name
        # every key a recipe sets is applied (nothing silently dropped)
        for section, values in recipe_values(name).items():
            if isinstance(values, dict):
                for key, value in values.items():
                    got = getattr(getattr(cfg, section), key)
                    assert got == value, f"{name}: {section}.{key}"


@pytest.mark.parametrize(("name", "arch"), [("seer-rg32", "regnety_320"), ("seer-rg64", "regnety_640"),
                                            ("seer-rg128", "regnety_1280"), ("seer-rg256", "regnety_2560")])
def test_seer_recipes_follow_the_reference(name, arch):
    """docs/method.md §2-§4: timm RegNetY, 16000 prototypes, no-BN head to 256, LARC trust 0.001, wd 1e-5."""
    cfg = build_config(name)
    assert cfg.model.arch == arch
    assert cfg.swav.n_prototypes == 16000
    assert cfg.model.head_bn is False
    assert cfg.model.head_out == 256
    assert cfg.swav.temperature == pytest.approx(0.1)
    assert cfg.swav.crops_for_assign == [0, 1]
    assert cfg.optim.lars_trust == pytest.approx(0.001)
    assert cfg.optim.lars_clip is False
    assert cfg.optim.weight_decay == pytest.approx(1e-5)
    assert cfg.optim.momentum == pytest.approx(0.9)
    assert cfg.optim.final_lr_ratio == pytest.approx(0.001)
    assert cfg.swav.freeze_prototypes_steps == 313


def test_recipe_from_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  batch_size: 48\nswav:\n  n_prototypes: 77\n")
    cfg = build_config(str(path))
    assert cfg.data.batch_size == 48
    assert cfg.swav.n_prototypes == 77
    bad = tmp_path / "bad.yaml"
    bad.write_text("swav:\n  n_protos: 77\n")
    with pytest.raises(ConfigError, match="swav.n_protos"):
        build_config(str(bad))


def test_defaults_are_valid_and_every_field_has_a_type():
    cfg = Config()
    cfg.validate()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            assert dataclasses.fields(value)
