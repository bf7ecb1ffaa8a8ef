"""Every shipped YAML loads, opens with the command that runs it, and overrides behave."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field

import pytest

from conftest import ROOT
from aetheris.config_io import ConfigError
from aetheris.sources import DataSource, resolve_languages
from aetheris.train import RunConfig, load_config

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"nano-scratch.yaml", "tiny-test.yaml", "scratch-hub.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_opens_with_its_command_and_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# aetheris ") and f"configs/{path.name}" in first, first
    if first.startswith("# aetheris distill"):
        from aetheris.distill import DistillConfig, load_distill_config

        assert isinstance(load_distill_config(path), DistillConfig)
        return
    if first.startswith("# aetheris demo"):
        from aetheris.demo import DemoConfig, load_demo_config

        cfg = load_demo_config(path)
        assert isinstance(cfg, DemoConfig)
        from aetheris.distill import load_distill_config  # its distillation overrides apply cleanly
        load_distill_config(ROOT / cfg.distill_config, cfg.distill)
        return
    assert first.startswith("# aetheris train"), f"{path.name}: a command this test does not know how to load"
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    resolve_languages(cfg.data.languages)  # every language code exists in the registry
    assert cfg.data.sources and all(isinstance(s, typing.get_args(DataSource)) for s in cfg.data.sources)


def test_overrides_parse_yaml_values():
    cfg = load_config(ROOT / "configs" / "tiny-test.yaml",
                      ["train.lr=1e-3", "train.max_steps=7", "data.languages=[en, sw]", "data.pack=false", "model.d_model=32"])
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 7 and cfg.data.languages == ["en", "sw"]
    assert cfg.data.pack is False and cfg.model.d_model == 32


@pytest.mark.parametrize("override, hint", [
    ("train.max_step=3", "train.max_steps"),
    ("data.language_temprature=2", "data.language_temperature"),
    ("model.d_modle=64", "model.d_model"),
    ("trian.lr=1", "train.lr"),
])
def test_unknown_keys_name_the_nearest_valid_key(override, hint):
    with pytest.raises(ConfigError, match=f"did you mean '{hint}'"):
        load_config(ROOT / "configs" / "tiny-test.yaml", [override])


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("# aetheris train --config bad.yaml\ntrain:\n  warmup: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.warmup'; did you mean 'train.warmup_steps'"):
        load_config(path)


def test_invalid_values_are_errors():
    tiny = ROOT / "configs" / "tiny-test.yaml"
    with pytest.raises(ConfigError, match="train.schedule"):
        load_config(tiny, ["train.schedule=linear"])
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(tiny, ["train.lr=fast"])
    with pytest.raises(ValueError, match="AetherisConfig.top_k"):
        load_config(tiny, ["model.top_k=9"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(tiny, ["train.lr"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(ROOT / "configs" / "nope.yaml")


def test_overrides_set_one_entry_of_a_dict_field():
    from aetheris.distill import EXACT_TRANSFER, load_distill_config

    path = ROOT / "configs" / "nano-align.yaml"
    shipped = load_distill_config(path).student.options
    cfg = load_distill_config(path, ["student.options.ssm_norm=true", "student.options.dt_min=1e-3"])
    assert cfg.student.options == {**shipped, "ssm_norm": True, "dt_min": 0.001}  # merged into the YAML's mapping
    # No YAML: the entry goes on top of the field's default, not into an empty mapping.
    assert load_distill_config(None, ["student.options.top_k=2"]).student.options == {**EXACT_TRANSFER, "top_k": 2}
    # A whole mapping given at once is merged over the exact-transfer defaults too (a gate left out stays sigmoid).
    assert load_distill_config(path, ["student.options={top_k: 2}"]).student.options == {**EXACT_TRANSFER, "top_k": 2}


@pytest.mark.parametrize("override, error", [
    ("student.options.n_head=8", "unknown config key 'student.options.n_head'.*did you mean 'student.options.n_heads'"),
    ("student.options.top_k=two", "student.options.top_k='two' must be an integer"),
    ("student.options.ssm_norm=maybe", "student.options.ssm_norm='maybe' must be true or false"),
    ("student.option.top_k=2", "did you mean 'student.options.top_k'"),
    ("student.options.top_k.x=2", "unknown config key 'student.options.top_k.x'"),
    ("student.options=3", "student.options must be a mapping of AetherisConfig fields"),
])
def test_keys_inside_a_typed_dict_field_are_checked_like_any_key(override, error):
    from aetheris.distill import load_distill_config

    with pytest.raises(ConfigError, match=error):
        load_distill_config(ROOT / "configs" / "nano-align.yaml", [override])


def test_a_typed_dict_field_in_yaml_is_checked_too(tmp_path):
    from aetheris.distill import EXACT_TRANSFER, load_distill_config

    path = tmp_path / "bad.yaml"
    path.write_text("student:\n  options:\n    n_expert: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'student.options.n_expert'.*did you mean 'student.options.n_experts'"):
        load_distill_config(path)
    path.write_text("student:\n  options:\n    dt_max: 1e-1\n")  # YAML 1.1 reads 1e-1 as a string
    assert load_distill_config(path).student.options == {**EXACT_TRANSFER, "dt_max": 0.1}


@dataclass
class Section:  # a section with a free-form dict field (no ``keys`` schema)
    extra: dict = field(default_factory=lambda: {"a": 1})
    n: int = 0


@dataclass
class Top:
    section: Section = field(default_factory=Section)


def test_a_free_form_dict_field_takes_any_key_one_level_deep():
    from aetheris.config_io import apply_overrides, build

    cfg = build(Top, apply_overrides({}, ["section.extra.b=[1, 2]"], Top))
    assert cfg.section.extra == {"a": 1, "b": [1, 2]}
    with pytest.raises(ConfigError, match="unknown config key 'section.extra.b.c'"):
        apply_overrides({}, ["section.extra.b.c=1"], Top)
    with pytest.raises(ConfigError, match="did you mean 'section.n'"):
        apply_overrides({}, ["section.nn=1"], Top)


def test_a_section_with_its_own_defaults_keeps_them_when_one_key_is_set(tmp_path):
    from aetheris.distill import load_distill_config

    cfg = load_distill_config(None, ["kl.train.max_steps=5", "sft.train.log_every=3"])
    assert cfg.kl.train.max_steps == 5 and cfg.kl.train.lr == 5e-5  # KLConfig's default section, not TrainConfig()
    assert cfg.sft.train.log_every == 3 and cfg.sft.train.lr == 2e-5
    partial = tmp_path / "partial.yaml"
    partial.write_text("kl:\n  train:\n    warmup_steps: 7\n")
    cfg = load_distill_config(partial)
    assert cfg.kl.train.warmup_steps == 7 and cfg.kl.train.lr == 5e-5
    assert cfg.align.train.lr == 1e-3  # AlignConfig's default section too


@pytest.mark.parametrize("override, new, new_in_yaml", [
    ("train.max_steps=20", "align.train.max_steps", "align.train"),
    ("train={max_steps: 20}", "align.train", "align.train"),
    ("kl.temperature=2", "kl.kd_temperature", "kl.kd_temperature"),
    ("sft.temperature=2", "sft.kd_temperature", "sft.kd_temperature"),
    ("sft.temperature_sampling=3", "sft.language_temperature", "sft.language_temperature"),
])
def test_keys_of_earlier_distill_configs_are_refused_with_the_new_key(override, new, new_in_yaml, tmp_path, capsys):
    from aetheris.cli import main
    from aetheris.distill import load_distill_config

    message = f"was renamed: write '{new}' instead"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_distill_config(ROOT / "configs" / "nano-distill.yaml", [override])
    assert main(["distill", "--config", str(ROOT / "configs" / "nano-distill.yaml"), "--plan", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    # The same keys in a YAML file (a config written before the rename) are refused too.
    key, value = override.split("=", 1)
    *sections, leaf = key.split(".")
    old = tmp_path / "old.yaml"
    old.write_text("".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: {value}\n")
    with pytest.raises(ConfigError, match=re.escape(f"was renamed: write '{new_in_yaml}' instead")):
        load_distill_config(old)


@pytest.mark.parametrize("override, error", [
    ("kl.kd_temperature=0", "kl.kd_temperature=0.0 must be > 0"),
    ("sft.kd_temperature=-1", "sft.kd_temperature=-1.0 must be > 0"),
    ("kl.kind=kl", "kl.kind='kl': choose one of forward, reverse, jsd"),
    ("kl.balance=script", "kl.balance='script': choose language or family"),
    ("align.pairs_at_once=-1", "align.pairs_at_once=-1: 0 trains every pair at once"),
    ("align.train.max_steps=0", "align.train.max_steps=0 must be a positive integer"),
    ("align.train.fsdp=true", "align.train.fsdp=true: stage 1 trains through its own forward module"),
    ("teacher.dtype=int8", "teacher.dtype='int8': choose auto or one of"),
    ("transfer.dt_init=zero", "transfer.dt_init='zero': choose mamba2 or span"),
    ("student.init_layer=middle", "student.init_layer='middle': choose last or first"),
])
def test_each_distill_section_checks_its_own_keys(override, error):
    from aetheris.distill import load_distill_config

    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace("[", r"\[")):
        load_distill_config(ROOT / "configs" / "nano-distill.yaml", [override])


def test_each_stage_has_its_own_loop_section():
    from aetheris.distill import load_distill_config

    cfg = load_distill_config(ROOT / "configs" / "nano-distill.yaml", ["align.train.lr=0.5", "run_dir=/tmp/r"])
    assert cfg.align.train.lr == 0.5 and cfg.kl.train.lr == 1e-3 and cfg.sft.train.lr == 2e-3  # the YAML's own values
    assert {s: t.out_dir for s, t in cfg.stage_train().items()} == {s: f"/tmp/r/{s}" for s in ("align", "kl", "sft")}
