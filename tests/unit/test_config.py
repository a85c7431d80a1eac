"""Strict config dicts (from_dict / replace / to_dict) and the family registry's errors."""

from __future__ import annotations

import dataclasses
import re

import pytest

from ctray.config import ConfigError, check_keys, field_names, from_dict, replace, to_dict
from ctray.data.build import BuildConfig
from ctray.families.phase_gan.config import PRESETS, PhaseGANConfig
from ctray.families.phase_gan.data import PhaseGANDataOptions
from ctray.registry import FamilySpec, family_names, get_family

PHASE_GAN_KEYS = ", ".join(f.name for f in dataclasses.fields(PhaseGANConfig))


# --------------------------------------------------------------------------- from_dict


def test_from_dict_empty_gives_defaults() -> None:
    assert from_dict(PhaseGANConfig, {}) == PhaseGANConfig()
    assert from_dict(PhaseGANConfig, None) == PhaseGANConfig()


def test_unknown_key_lists_every_valid_key() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(PhaseGANConfig, {"lr_gen": 1e-3, "vit_layer": 2}, where="my.yaml")
    msg = str(info.value)
    assert msg.startswith("my.yaml: unknown key(s) 'lr_gen', 'vit_layer' for PhaseGANConfig")
    assert msg.endswith(f"valid keys: {PHASE_GAN_KEYS}")


def test_check_keys_accepts_known_and_rejects_unknown() -> None:
    check_keys(BuildConfig, ["seed", "strict"], where="x")
    with pytest.raises(ConfigError, match=r"x: unknown key\(s\) 'seeds' for BuildConfig"):
        check_keys(BuildConfig, ["seed", "seeds"], where="x")
    assert field_names(BuildConfig)[:2] == ["patch_size", "spacing"]


def test_int_is_coerced_to_float() -> None:
    cfg = from_dict(PhaseGANConfig, {"lr_g": 1, "grl_max": 2})
    assert cfg.lr_g == 1.0 and type(cfg.lr_g) is float
    assert cfg.grl_max == 2.0 and type(cfg.grl_max) is float


def test_integral_float_is_coerced_to_int_and_fraction_rejected() -> None:
    assert type(from_dict(PhaseGANConfig, {"vit_layers": 4.0}).vit_layers) is int
    with pytest.raises(ConfigError, match=r"config: vit_layers=2.5 should be int"):
        from_dict(PhaseGANConfig, {"vit_layers": 2.5})


def test_wrong_scalar_type_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"lr_g='fast' should be float"):
        from_dict(PhaseGANConfig, {"lr_g": "fast"})
    with pytest.raises(ConfigError, match=r"seed='1' should be int"):
        from_dict(BuildConfig, {"seed": "1"})


def test_bool_is_not_accepted_as_a_number() -> None:
    """YAML `yes`/`true` in a numeric field is a typo, not 1 (float fields already refuse it)."""
    with pytest.raises(ConfigError, match=r"lr_g=True should be float"):
        from_dict(PhaseGANConfig, {"lr_g": True})
    with pytest.raises(ConfigError, match=r"vit_layers=True should be int"):
        from_dict(PhaseGANConfig, {"vit_layers": True})


def test_scalar_for_a_tuple_field_is_rejected() -> None:
    """`patch_size: 32` must not silently become BuildConfig(patch_size=32)."""
    with pytest.raises(ConfigError, match=r"patch_size"):
        from_dict(BuildConfig, {"patch_size": 32})


def test_list_becomes_tuple_with_coerced_items() -> None:
    cfg = from_dict(BuildConfig, {"patch_size": [16, 16, 8], "spacing": [1, 2, 3.5]})
    assert cfg.patch_size == (16, 16, 8) and isinstance(cfg.patch_size, tuple)
    assert cfg.spacing == (1.0, 2.0, 3.5)
    assert all(type(s) is float for s in cfg.spacing)
    opts = from_dict(PhaseGANDataOptions, {"source_phases": ["native"]})
    assert opts.source_phases == ("native",)


def test_tuple_length_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"patch_size needs 3 values, got 2"):
        from_dict(BuildConfig, {"patch_size": [16, 16]})


def test_literal_rejection_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(PhaseGANConfig, {"grl_schedule": "cosine"})
    assert str(info.value) == "config: grl_schedule='cosine' is not one of constant, linear, dann"
    assert from_dict(PhaseGANConfig, {"grl_schedule": "dann"}).grl_schedule == "dann"


def test_optional_field_accepts_none_and_value() -> None:
    assert from_dict(PhaseGANConfig, {"pretrained": None}).pretrained is None
    assert from_dict(PhaseGANConfig, {"pretrained": "w.pt"}).pretrained == "w.pt"


def test_every_preset_is_a_valid_config() -> None:
    for name, overrides in PRESETS.items():
        cfg = from_dict(PhaseGANConfig, overrides, where=name)
        for key, value in overrides.items():
            assert getattr(cfg, key) == value


# --------------------------------------------------------------------------- replace / to_dict


def test_replace_returns_validated_copy() -> None:
    base = PhaseGANConfig()
    new = replace(base, {"lr_g": 3, "grl_schedule": "constant"})
    assert new.lr_g == 3.0 and type(new.lr_g) is float
    assert new.grl_schedule == "constant"
    assert base.lr_g == 1e-4 and base.grl_schedule == "linear"
    assert dataclasses.replace(new, lr_g=base.lr_g, grl_schedule="linear") == base
    assert replace(base, None) == base


def test_replace_rejects_unknown_key_and_bad_value() -> None:
    with pytest.raises(ConfigError, match=r"^overrides: unknown key\(s\) 'nope'"):
        replace(PhaseGANConfig(), {"nope": 1})
    with pytest.raises(ConfigError, match=r"^trial: grl_schedule='x' is not one of"):
        replace(PhaseGANConfig(), {"grl_schedule": "x"}, where="trial")


def test_to_dict_round_trip() -> None:
    cfg = BuildConfig(patch_size=(8, 16, 24), spacing=(1.0, 2.0, 3.0), seed=5)
    plain = to_dict(cfg)
    assert plain["patch_size"] == [8, 16, 24] and plain["spacing"] == [1.0, 2.0, 3.0]
    assert from_dict(BuildConfig, plain) == cfg


# --------------------------------------------------------------------------- registry


def test_get_family_returns_spec() -> None:
    spec = get_family("phase_gan")
    assert isinstance(spec, FamilySpec)
    assert spec.name == "phase_gan" and spec.config_cls is PhaseGANConfig
    assert "phase_gan" in family_names()


def test_unknown_family_lists_valid_families() -> None:
    with pytest.raises(KeyError) as info:
        get_family("cyclegan")
    msg = info.value.args[0]
    assert msg == f"unknown family 'cyclegan'; valid families: {', '.join(family_names())}"


def test_unknown_preset_lists_valid_presets() -> None:
    spec = get_family("phase_gan")
    with pytest.raises(KeyError) as info:
        spec.preset("tiny")
    assert info.value.args[0] == (
        "family 'phase_gan' has no preset 'tiny'; valid presets: a100, debug, demo"
    )
    debug = spec.preset("debug")
    debug["vit_layers"] = 99  # a copy: the registry's preset is not modified
    assert spec.preset("debug")["vit_layers"] == 2


@pytest.mark.parametrize(
    ("value", "index"),
    [("venous", 1), ("non-contrast", 3), ("Arterial", 0), ("delayed", 2), ("2", 2)],
)
def test_parse_conditioning_target_phase(value: str, index: int) -> None:
    assert get_family("phase_gan").parse_conditioning({"target_phase": value}) == {
        "target_phase": index
    }


def test_parse_conditioning_unknown_phase_lists_valid() -> None:
    with pytest.raises(ValueError) as info:
        get_family("phase_gan").parse_conditioning({"target_phase": "portal-arterial"})
    msg = str(info.value)
    assert "portal-arterial" in msg
    assert "valid: arterial, venous, delayed, native (non-contrast), or 0-3" in msg


def test_parse_conditioning_unknown_key() -> None:
    with pytest.raises(ValueError) as info:
        get_family("phase_gan").parse_conditioning({"target_phase": "venous", "dose": "low"})
    assert str(info.value) == (
        "unknown conditioning dose for family 'phase_gan'; valid: target_phase"
    )


@pytest.mark.parametrize("given", [{}, {"target_phase": None}, {"target_phase": ""}])
def test_parse_conditioning_missing_target_phase(given: dict) -> None:
    with pytest.raises(ValueError, match=re.escape("family 'phase_gan' needs target_phase")):
        get_family("phase_gan").parse_conditioning(given)
