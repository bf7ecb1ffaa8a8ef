"""Typed source configs: ``data.sources`` / ``sft.sources`` entries are dataclasses chosen by ``type``; unknown
keys name the nearest one with the entry's path, unknown types list the valid ones, values are checked, and the
YAML form round-trips. Renamed keys (``data.temperature``) are refused with the new name."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from aetheris.config_io import ConfigError, to_dict
from aetheris.distill import load_distill_config
from aetheris.sources import (
    ChatHubSource,
    CorpusSource,
    DataSource,
    HubSource,
    JsonlSource,
    SFTSource,
    ToolgenSource,
    XsidSource,
    parse_sources,
)
from aetheris.train import load_config

TINY = ROOT / "configs" / "tiny-test.yaml"
DISTILL = ROOT / "configs" / "nano-distill.yaml"


def test_yaml_sources_become_typed_and_round_trip():
    cfg = load_config(TINY)
    assert cfg.data.sources == [CorpusSource(max_lines_per_language=400)]
    assert to_dict(cfg.data)["sources"] == [{"type": "corpus", "max_lines_per_language": 400}]  # as written
    sft = load_distill_config(DISTILL).sft.sources
    assert sft == [ToolgenSource(languages="all", per_language=20)]
    specs = [{"type": "hub", "name": "HuggingFaceFW/fineweb-2", "config": "swh_Latn", "language": "sw"},
             {"type": "jsonl", "path": "x.jsonl", "id_field": "id"}]
    typed = parse_sources(specs)
    assert typed == [HubSource(name="HuggingFaceFW/fineweb-2", config="swh_Latn", language="sw"),
                     JsonlSource(path="x.jsonl", id_field="id")]
    assert parse_sources(json.loads(json.dumps(to_dict(typed)))) == typed  # a checkpoint's recorded config


@pytest.mark.parametrize("override, error", [
    ("sft.sources=[{type: toolgen}, {type: toolgen, per_langauge: 5}]",
     r"unknown config key 'sft.sources\[1\].per_langauge'; did you mean 'sft.sources\[1\].per_language'\?"),
    ("sft.sources=[{type: toolgen, per_language: many}]", r"sft.sources\[0\].per_language='many' must be an integer"),
    ("sft.sources=[{type: toolgen, per_language: 0}]", r"sft.sources\[0\].per_language=0 must be an integer >= 1"),
    ("sft.sources=[{type: tolgen}]", r"sft.sources\[0\] has type 'tolgen': one of toolgen, jsonl, xsid, hub; "
                                     r"did you mean 'toolgen'\?"),
    ("sft.sources=[{per_language: 3}]", r"sft.sources\[0\] needs a type: one of toolgen, jsonl, xsid, hub"),
    ("sft.sources=[{type: hub, limit: 10}]", r"sft.sources\[0\].name: a hub conversation source needs name:"),
    ("sft.sources={type: toolgen}", r"sft.sources=.*give a list of sources"),
    ("data.sources=[{type: corpus, max_line_per_language: 5}]",
     r"unknown config key 'data.sources\[0\].max_line_per_language'; did you mean "
     r"'data.sources\[0\].max_lines_per_language'\?"),
    ("data.sources=[{type: text, path: a.txt}]", r"data.sources\[0\].language: a text file needs a fixed `language:`"),
    ("data.sources=[{type: jsonl, path: a.jsonl, language: klingon}]",
     r"data.sources\[0\].language='klingon': unknown language code 'klingon'"),
    ("data.sources=[{type: toolgen}]", r"data.sources\[0\] has type 'toolgen': one of corpus, text, jsonl, parquet, hub"),
])
def test_bad_source_entries_name_their_path(override, error):
    with pytest.raises(ConfigError, match=error):
        load_distill_config(DISTILL, [override])


def test_a_typo_in_a_yaml_source_is_refused_with_the_hint(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY.read_text().replace("max_lines_per_language: 400", "max_lines_per_langauge: 400"))
    with pytest.raises(ConfigError, match=r"'data.sources\[0\].max_lines_per_langauge'; did you mean "
                                          r"'data.sources\[0\].max_lines_per_language'"):
        load_config(path)


def test_sources_given_as_dicts_are_checked_the_same_way():
    with pytest.raises(ConfigError, match=r"sft.sources\[0\].per_language"):
        parse_sources([{"type": "xsid", "per_language": -1}], SFTSource, "sft.sources")
    assert parse_sources([{"type": "xsid", "languages": ["da"]}], SFTSource) == [XsidSource(languages=["da"])]
    assert parse_sources([{"type": "hub", "path": "chats/"}], SFTSource) == [ChatHubSource(path="chats/")]
    typed = ToolgenSource(per_language=2)
    assert parse_sources([typed], SFTSource)[0] is typed
    with pytest.raises(ConfigError, match=r"data.sources\[0\] has type 'xsid'"):
        parse_sources([{"type": "xsid"}], DataSource)


@pytest.mark.parametrize("where, override, new", [
    ("yaml", None, "data.language_temperature"),
    ("override", "data.temperature=2", "data.language_temperature"),
    ("override", "sft.temperature_sampling=2", "sft.language_temperature"),
])
def test_renamed_keys_are_refused_naming_the_new_key(tmp_path, where, override, new):
    old = new.replace("language_temperature", "temperature" if new.startswith("data") else "temperature_sampling")
    with pytest.raises(ConfigError, match=f"config key '{old}' was renamed: write '{new}' instead") as err:
        if where == "yaml":
            path = tmp_path / "old.yaml"
            path.write_text(TINY.read_text().replace("language_temperature:", "temperature:"))
            load_config(path)
        else:
            load_distill_config(DISTILL, [override])
    assert "\n" not in str(err.value)
