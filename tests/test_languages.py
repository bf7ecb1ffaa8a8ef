"""The language registry: 70 languages, lookups, groupings, and the embedded table == the TSV."""

import csv
import os
from pathlib import Path

import pytest

from aetheris.languages import CODES, CREOLE_FAMILY, GROUP_LEVELS, LANGUAGES, get_language, group_of, groups


def test_seventy_unique_languages():
    assert len(LANGUAGES) == 70
    assert len(set(CODES)) == 70


def test_lookup_by_iso1_and_iso3_case_insensitive():
    assert get_language("sw").name == "Swahili"
    assert get_language("swh") is get_language("sw")
    assert get_language("ZH-hant").iso1 == "zh-Hant"
    assert get_language("cmn").iso1 == "zh"  # zh and zh-Hant share cmn; 639-3 means Simplified


def test_unknown_code_lists_valid_and_nearby():
    with pytest.raises(ValueError) as err:
        get_language("sx")
    msg = str(err.value)
    assert "'sx'" in msg and "Did you mean" in msg and "zh-Hant" in msg and "pcm" in msg


def test_creole_and_isolate_grouping_is_explicit():
    assert group_of("pcm", "family") == CREOLE_FAMILY
    assert group_of("pcm", "glottolog_family") == "Indo-European"
    assert group_of("eu", "family") == "Basque (isolate)" == group_of("eu", "branch")
    assert group_of("ja", "family") == "Japonic"


def test_grouping_levels():
    assert group_of("sr", "script") == "Cyrl"
    assert group_of("ur", "script") == "Arab"
    assert group_of("ko", "script") == "Kore"
    assert group_of("en", "resource_class") == "class 5"
    assert group_of("th", "region") == "Asia Pacific"
    assert group_of("de", "branch") == "Germanic"
    with pytest.raises(ValueError, match="grouping level"):
        group_of("en", "continent")
    for level in GROUP_LEVELS:
        assert sum(len(v) for v in groups(level).values()) == 70
    assert groups("family", ["sw", "yo", "en"]) == {"Atlantic-Congo": ["sw", "yo"], "Indo-European": ["en"]}


def _tsv():
    root = os.environ.get("AETHERIS_DATA_DIR")
    path = Path(root or "/nonexistent") / "lang_meta" / "tiny_aya_70_languages.tsv"
    if not path.exists():
        pytest.skip("AETHERIS_DATA_DIR not set or has no lang_meta/ table")
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_embedded_table_equals_tsv():
    rows = _tsv()
    assert [r["iso1"] for r in rows] == list(CODES)
    for row, lang in zip(rows, LANGUAGES):
        assert lang.iso3 == row["iso639_3"]
        assert lang.name == row["name"]
        assert row["script"].startswith(lang.script) and len(lang.script) == 4
        assert lang.glottolog_family == row["glottolog_family"]
        assert lang.region == row["tiny_aya_region"]
        assert lang.resource_class == int(row["joshi_class"])
        assert lang.glottocode == row["glottocode"]
        if row["glottolog_family"].startswith("(isolate)"):
            assert lang.family == lang.branch == f"{row['name']} (isolate)"
        else:
            assert lang.branch == row["branch"]
            assert lang.family in (row["glottolog_family"], CREOLE_FAMILY)


def test_every_language_has_its_fineweb2_config():
    import re

    # FineWeb-2 names a config by its GlotLID label: ISO 639-3 + ISO 15924 script. Where that differs from the
    # registry's code + primary script, the difference is deliberate (see the languages module docstring).
    differs = {"fa": "fas_Arab", "tl": "fil_Latn", "ko": "kor_Hang", "zh": "cmn_Hani", "zh-Hant": "cmn_Hani",
               "yue": "yue_Hani"}
    for lang in LANGUAGES:
        if lang.iso1 == "en":
            assert lang.fineweb2 is None  # English is FineWeb, not FineWeb-2
            continue
        assert re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", lang.fineweb2), lang
        assert lang.fineweb2 == differs.get(lang.iso1, f"{lang.iso3}_{lang.script}"), lang
    assert {get_language(c).fineweb2 for c in ("sw", "ar", "ne", "ms", "et", "lv", "mg")} == {
        "swh_Latn", "arb_Arab", "npi_Deva", "zsm_Latn", "ekk_Latn", "lvs_Latn", "plt_Latn"}
