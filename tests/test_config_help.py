"""``--help-config``: every key of every config a command takes is listed with its type, its real default and a
description taken from the dataclasses' attribute docstrings, so a new key cannot be added undocumented."""

from __future__ import annotations

import pytest
import yaml

from aetheris import cli, nano_teacher
from aetheris.config_io import ConfigError, config_help, describe_keys, schema_keys, to_dict
from aetheris.demo import DemoConfig
from aetheris.distill import DistillConfig
from aetheris.nano_teacher import NanoTeacherConfig
from aetheris.train_config import RunConfig

# Each config class with the command line that prints its keys (the nano teacher has its own module CLI).
COMMANDS = {
    RunConfig: lambda: cli.main(["train", "--help-config"]),
    DistillConfig: lambda: cli.main(["distill", "--help-config"]),
    DemoConfig: lambda: cli.main(["demo", "--help-config"]),
    NanoTeacherConfig: lambda: nano_teacher.main(["--help-config"]),
}


@pytest.mark.parametrize("cls", COMMANDS, ids=lambda c: c.__name__)
def test_every_config_key_has_a_description(cls):
    undocumented = [d.key for d in describe_keys(cls) if not d.help]
    assert not undocumented, (f"{cls.__name__}: write an attribute docstring (the string right below the field) "
                              f"for {undocumented}")
    assert [d.key for d in describe_keys(cls)] == schema_keys(cls)


@pytest.mark.parametrize("cls", COMMANDS, ids=lambda c: c.__name__)
def test_help_config_lists_every_key_with_its_description(cls, capsys):
    with pytest.raises(SystemExit) as exit_:
        COMMANDS[cls]()
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    listed = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert listed == schema_keys(cls)
    folded = " ".join(out.split())  # descriptions are wrapped over lines
    for d in describe_keys(cls):
        assert " ".join(d.help.split()) in folded, d.key


@pytest.mark.parametrize("cls", COMMANDS, ids=lambda c: c.__name__)
def test_the_listed_defaults_are_the_configs_own(cls):
    """Each default, read back as YAML, equals the value a config built from nothing has (kl.train.lr is 5e-5,
    not TrainConfig's 3e-4)."""
    built = cls()
    skipped = 0
    for d in describe_keys(cls):
        if d.type == "section":
            continue
        node = built
        for part in d.key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else getattr(node, part)
        if node is KeyError:  # an entry of a typed dict the defaults leave unset (student.options.d_model)
            skipped += 1
            continue
        assert yaml.safe_load(d.default) == to_dict(node), d.key  # typed sources are listed as YAML mappings
    assert skipped < len(schema_keys(cls)) / 2


def test_help_config_of_one_section_and_a_misspelt_one():
    text = config_help(DistillConfig, "kl.train")
    assert "kl.train.lr: float = 5.0e-05" in text and "sft.train" not in text and "  kl.kind" not in text
    with pytest.raises(ConfigError, match="did you mean 'kl.train'"):
        config_help(DistillConfig, "kl.trian")
