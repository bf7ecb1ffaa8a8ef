"""Every shipped YAML loads, opens with the command that runs it, and overrides behave."""

from __future__ import annotations

from pathlib import Path

import pytest

from aetheris.config_io import ConfigError
from aetheris.data import resolve_languages
from aetheris.train import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
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
    assert cfg.data.sources and all("type" in s for s in cfg.data.sources)


def test_overrides_parse_yaml_values():
    cfg = load_config(ROOT / "configs" / "tiny-test.yaml",
                      ["train.lr=1e-3", "train.max_steps=7", "data.languages=[en, sw]", "data.pack=false", "model.d_model=32"])
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 7 and cfg.data.languages == ["en", "sw"]
    assert cfg.data.pack is False and cfg.model.d_model == 32


@pytest.mark.parametrize("override, hint", [
    ("train.max_step=3", "train.max_steps"),
    ("data.temprature=2", "data.temperature"),
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
