"""Every params file section loads into its stage's typed config; bad keys are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.common.config import HOW, ConfigError, Paths, config_class, load_section, overlay, read_yaml
from stages.common.params_check import FLOWS, stage_sections
from stages.common.profile import apply

ROOT = Path(__file__).resolve().parents[2]
STAGES = {name: cfg for name, cfg in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}


@pytest.mark.parametrize("profile", [None, "tiny"])
def test_every_section_loads_into_its_config(tmp_path: Path, profile: str | None) -> None:
    params_file = ROOT / "params.yaml"
    if profile:
        params_file = tmp_path / "params.yaml"
        apply(ROOT / "profiles" / f"{profile}.yaml", ROOT / "params.yaml", params_file)
    params = read_yaml(params_file)
    load_section(Paths, "paths", params)
    for section, cls in stage_sections(ROOT / "dvc.yaml").items():
        load_section(cls, section, params)
    # every section is read by a stage or a flow: no orphan values
    assert set(params) == {"paths", "train", *STAGES, *FLOWS, *HOW}


def test_unknown_key_is_named() -> None:
    params = read_yaml(ROOT / "params.yaml")
    params["tokenize"]["blok_size"] = 5
    with pytest.raises(ConfigError, match=r"tokenize\.blok_size: unknown key"):
        load_section(config_class("tokenize"), "tokenize", params)


def test_mistyped_value_is_named() -> None:
    params = read_yaml(ROOT / "params.yaml")
    params["tokenize"]["block_size"] = "large"
    with pytest.raises(ConfigError, match=r"tokenize\.block_size: .*integer.*'large'"):
        load_section(config_class("tokenize"), "tokenize", params)


def test_nested_source_key_is_named() -> None:
    params = read_yaml(ROOT / "params.yaml")
    params["collect"]["sources"][1]["splitt"] = "line"
    with pytest.raises(ConfigError, match=r"collect\.sources\.1\.text\.splitt: unknown key"):
        load_section(config_class("collect"), "collect", params)


def test_a_source_needs_only_what_identifies_it() -> None:
    """`{name, type, path}` is a whole source: every optional knob takes its type's default; a
    misspelt knob is still named."""
    params = read_yaml(ROOT / "params.yaml")
    params["collect"]["sources"] = [{"name": "mine", "type": "text", "path": "corpus/"}]
    params["collect"]["instructions"] = [{"name": "tips", "type": "hf", "path": "org/tips"}]
    cfg = load_section(config_class("collect"), "collect", params)
    mine, tips = cfg.sources[0], cfg.instructions[0]
    assert (mine.max_docs, mine.glob, mine.split) == (None, "**/*", "file")
    assert (tips.split, tips.text_field, tips.id_field) == ("train", "text", None)
    params["collect"]["sources"] = [{"name": "mine", "type": "text", "path": "corpus/", "max_doc": 5}]
    with pytest.raises(ConfigError, match=r"collect\.sources\.0\.text\.max_doc: unknown key"):
        load_section(config_class("collect"), "collect", params)


def test_missing_section_is_named() -> None:
    with pytest.raises(ConfigError, match="has no 'dedup' section"):
        load_section(config_class("dedup"), "dedup", {"paths": {}})


def test_profile_cannot_invent_keys() -> None:
    with pytest.raises(ConfigError, match=r"tokenize\.block: the profile sets a key"):
        overlay({"tokenize": {"block_size": 1}}, {"tokenize": {"block": 2}})


def test_profile_replaces_values_and_keeps_the_rest() -> None:
    merged = overlay({"a": {"b": 1, "c": [1, 2]}, "d": 3}, {"a": {"c": [9]}})
    assert merged == {"a": {"b": 1, "c": [9]}, "d": 3}


def _defaults_for_set_keys(cfg: object, raw: object, where: str, entry: bool = False) -> list[str]:
    """Fields of `cfg` (and of the configs nested in it) that carry a code default although the
    params file sets them: two places for one value. An optional knob of a list entry (a source's
    `max_docs`) has its default in its type, and the file sets it only where it differs (`entry`)."""
    from pydantic import BaseModel

    found: list[str] = []
    if isinstance(cfg, BaseModel) and isinstance(raw, dict):
        for name, field in type(cfg).model_fields.items():
            if name not in raw:
                continue
            if not field.is_required() and (not entry or raw[name] == field.get_default(call_default_factory=True)):
                found.append(f"{where}.{name}")
            found += _defaults_for_set_keys(getattr(cfg, name), raw[name], f"{where}.{name}")
    elif isinstance(cfg, (list, tuple)) and isinstance(raw, list):
        for i, (item, value) in enumerate(zip(cfg, raw)):
            found += _defaults_for_set_keys(item, value, f"{where}.{i}", entry=True)
    return found


def test_no_code_default_for_a_key_params_sets() -> None:
    """params.yaml is the one place for a value: a config field that params.yaml sets has no
    default in code (DVC only sees params.yaml, so a code default would be invisible to it); a
    list entry's optional knob is set only where it differs from its type's default."""
    params = read_yaml(ROOT / "params.yaml")
    found = _defaults_for_set_keys(load_section(Paths, "paths", params), params["paths"], "paths")
    sections = stage_sections(ROOT / "dvc.yaml")
    for section in (*STAGES, "train", *FLOWS, *HOW):
        cls = sections[section]
        found += _defaults_for_set_keys(load_section(cls, section, params), params[section], section)
    assert not found, f"code defaults for keys params.yaml sets: {found}"
