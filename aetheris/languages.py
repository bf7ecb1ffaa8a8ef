"""The 70 Tiny Aya languages: one registry used by data, reports and the equity score.

Facts are transcribed from ``lang_meta/tiny_aya_70_languages.tsv`` in the offline data folder
(Glottolog 5.1 for family/branch/glottocode, the Tiny Aya model card for region, Joshi et al. 2020
for the resource class 0-5). They are embedded here so the registry works without the data folder;
``tests/test_languages.py`` checks this table against the TSV whenever ``AETHERIS_DATA_DIR`` is set.

Grouping choices (explicit, because they change the equity score):

- **Creoles.** Glottolog files Nigerian Pidgin (``pcm``) under Indo-European > Germanic. Compressing
  a model hurts a creole in its own way, so at the ``family`` level ``pcm`` is its own group
  ``"Creole"``; its branch stays "English-lexifier creole ...". The raw Glottolog family is kept in
  ``Language.glottolog_family`` and is available as the grouping level ``"glottolog_family"``.
- **Isolates.** Each isolate is its own family and its own branch, named after the language
  (``eu`` -> ``"Basque (isolate)"``). Single-language families (Japonic, Koreanic) stay as they are.
- **Scripts** are the primary ISO 15924 code: Serbian ``Cyrl`` (its Latin orthography is also in
  use), Urdu ``Arab`` (Nastaliq style), Korean ``Kore``.
- **Resource class** is the Joshi class as an int; as a group label it reads ``"class 3"``.

- **FineWeb-2 configs** (``Language.fineweb2``, the ``config`` of ``HuggingFaceFW/fineweb-2``) are
  GlotLID labels, ISO 639-3 + script, and differ from the registry where GlotLID does: Persian is
  ``fas_Arab`` (macrolanguage), Tagalog/Filipino ``fil_Latn``, Korean ``kor_Hang``, and Chinese is one
  ``cmn_Hani`` for Simplified and Traditional alike (FineWeb-2 does not split the scripts; ``zh`` and
  ``zh-Hant`` share it) and ``yue_Hani`` for Cantonese. English is not in FineWeb-2 (it is FineWeb):
  ``None``.

API: ``LANGUAGES`` (tuple, TSV order), ``get_language(code)`` (ISO 639-1 / project code or
ISO 639-3), ``group_of(code, level)``, ``groups(level, codes=None)`` and ``GROUP_LEVELS``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

CREOLE_FAMILY = "Creole"
GROUP_LEVELS = ("family", "branch", "script", "region", "resource_class", "glottolog_family")


@dataclass(frozen=True)
class Language:
    """One Tiny Aya language. ``iso1`` is the key used everywhere (zh-Hant, yue, pcm are project codes)."""

    iso1: str
    iso3: str
    name: str
    script: str  # primary ISO 15924 code
    family: str  # grouping family: Glottolog top level, creoles -> "Creole", isolates -> "<Name> (isolate)"
    branch: str  # Glottolog branch below the family (isolates: same as family)
    region: str  # Tiny Aya model-card region
    resource_class: int  # Joshi et al. 2020 class, 0 (left behind) .. 5 (winners)
    glottolog_family: str  # Glottolog's own top-level family, unmodified
    glottocode: str
    fineweb2: str | None  # config name in HuggingFaceFW/fineweb-2 (None: English, which is in FineWeb)


# (iso1, iso639_3, name, script as in the TSV, Glottolog family, branch, region, Joshi class, glottocode)
_ROWS = (
    ("en", "eng", "English", "Latn", "Indo-European", "Germanic", "Europe", 5, "stan1293"),
    ("nl", "nld", "Dutch", "Latn", "Indo-European", "Germanic", "Europe", 4, "dutc1256"),
    ("fr", "fra", "French", "Latn", "Indo-European", "Romance", "Europe", 5, "stan1290"),
    ("it", "ita", "Italian", "Latn", "Indo-European", "Romance", "Europe", 4, "ital1282"),
    ("pt", "por", "Portuguese", "Latn", "Indo-European", "Romance", "Europe", 4, "port1283"),
    ("ro", "ron", "Romanian", "Latn", "Indo-European", "Romance", "Europe", 3, "roma1327"),
    ("es", "spa", "Spanish", "Latn", "Indo-European", "Romance", "Europe", 5, "stan1288"),
    ("cs", "ces", "Czech", "Latn", "Indo-European", "Slavic (West)", "Europe", 4, "czec1258"),
    ("pl", "pol", "Polish", "Latn", "Indo-European", "Slavic (West)", "Europe", 4, "poli1260"),
    ("uk", "ukr", "Ukrainian", "Cyrl", "Indo-European", "Slavic (East)", "Europe", 3, "ukra1253"),
    ("ru", "rus", "Russian", "Cyrl", "Indo-European", "Slavic (East)", "Europe", 4, "russ1263"),
    ("el", "ell", "Greek", "Grek", "Indo-European", "Greek (Hellenic)", "Europe", 3, "mode1248"),
    ("de", "deu", "German", "Latn", "Indo-European", "Germanic", "Europe", 5, "stan1295"),
    ("da", "dan", "Danish", "Latn", "Indo-European", "Germanic", "Europe", 3, "dani1285"),
    ("sv", "swe", "Swedish", "Latn", "Indo-European", "Germanic", "Europe", 4, "swed1254"),
    ("no", "nob", "Norwegian (Bokmål)", "Latn", "Indo-European", "Germanic", "Europe", 1, "norw1259"),
    ("ca", "cat", "Catalan", "Latn", "Indo-European", "Romance", "Europe", 4, "stan1289"),
    ("gl", "glg", "Galician", "Latn", "Indo-European", "Romance", "Europe", 3, "gali1258"),
    ("cy", "cym", "Welsh", "Latn", "Indo-European", "Celtic (Brythonic)", "Europe", 1, "wels1247"),
    ("ga", "gle", "Irish", "Latn", "Indo-European", "Celtic (Goidelic)", "Europe", 2, "iris1253"),
    ("eu", "eus", "Basque", "Latn", "(isolate) Basque", "(isolate)", "Europe", 4, "basq1248"),
    ("hr", "hrv", "Croatian", "Latn", "Indo-European", "Slavic (South)", "Europe", 4, "croa1245"),
    ("lv", "lvs", "Latvian", "Latn", "Indo-European", "Baltic", "Europe", 3, "stan1325"),
    ("lt", "lit", "Lithuanian", "Latn", "Indo-European", "Baltic", "Europe", 3, "lith1251"),
    ("sk", "slk", "Slovak", "Latn", "Indo-European", "Slavic (West)", "Europe", 3, "slov1269"),
    ("sl", "slv", "Slovenian", "Latn", "Indo-European", "Slavic (South)", "Europe", 3, "slov1268"),
    ("et", "ekk", "Estonian", "Latn", "Uralic", "Finnic", "Europe", 3, "esto1258"),
    ("fi", "fin", "Finnish", "Latn", "Uralic", "Finnic", "Europe", 4, "finn1318"),
    ("hu", "hun", "Hungarian", "Latn", "Uralic", "Ugric", "Europe", 4, "hung1274"),
    ("sr", "srp", "Serbian", "Cyrl (+Latn)", "Indo-European", "Slavic (South)", "Europe", 4, "serb1264"),
    ("bg", "bul", "Bulgarian", "Cyrl", "Indo-European", "Slavic (South)", "Europe", 3, "bulg1262"),
    ("ar", "arb", "Arabic", "Arab", "Afro-Asiatic", "Semitic (Central, Arabic)", "West Asia", 5, "stan1318"),
    ("fa", "pes", "Persian", "Arab", "Indo-European", "Indo-Iranian > Iranian", "West Asia", 4, "west2369"),
    ("ur", "urd", "Urdu", "Arab (Nastaliq)", "Indo-European", "Indo-Iranian > Indo-Aryan", "South Asia", 3, "urdu1245"),
    ("tr", "tur", "Turkish", "Latn", "Turkic", "Oghuz", "West Asia", 4, "nucl1301"),
    ("mt", "mlt", "Maltese", "Latn", "Afro-Asiatic", "Semitic (Central, Arabic)", "West Asia", 2, "malt1254"),
    ("he", "heb", "Hebrew", "Hebr", "Afro-Asiatic", "Semitic (Central, Canaanite)", "West Asia", 3, "hebr1245"),
    ("hi", "hin", "Hindi", "Deva", "Indo-European", "Indo-Iranian > Indo-Aryan", "South Asia", 4, "hind1269"),
    ("mr", "mar", "Marathi", "Deva", "Indo-European", "Indo-Iranian > Indo-Aryan", "South Asia", 2, "mara1378"),
    ("bn", "ben", "Bengali", "Beng", "Indo-European", "Indo-Iranian > Indo-Aryan", "South Asia", 3, "beng1280"),
    ("gu", "guj", "Gujarati", "Gujr", "Indo-European", "Indo-Iranian > Indo-Aryan", "South Asia", 1, "guja1252"),
    ("pa", "pan", "Punjabi", "Guru", "Indo-European", "Indo-Iranian > Indo-Aryan", "South Asia", 2, "panj1256"),
    ("ta", "tam", "Tamil", "Taml", "Dravidian", "South Dravidian I", "South Asia", 3, "tami1289"),
    ("te", "tel", "Telugu", "Telu", "Dravidian", "South Dravidian II", "South Asia", 1, "telu1262"),
    ("ne", "npi", "Nepali", "Deva", "Indo-European", "Indo-Iranian > Indo-Aryan", "South Asia", 1, "nepa1254"),
    ("tl", "tgl", "Tagalog/Filipino", "Latn", "Austronesian", "Malayo-Polynesian > Philippine", "Asia Pacific", 3, "taga1270"),
    ("ms", "zsm", "Malay", "Latn", "Austronesian", "Malayo-Polynesian > Malayic", "Asia Pacific", 3, "stan1306"),
    ("id", "ind", "Indonesian", "Latn", "Austronesian", "Malayo-Polynesian > Malayic", "Asia Pacific", 3, "indo1316"),
    ("vi", "vie", "Vietnamese", "Latn", "Austroasiatic", "Vietic", "Asia Pacific", 4, "viet1252"),
    ("jv", "jav", "Javanese", "Latn", "Austronesian", "Malayo-Polynesian > Javanese", "Asia Pacific", 1, "java1254"),
    ("km", "khm", "Khmer", "Khmr", "Austroasiatic", "Khmeric", "Asia Pacific", 1, "cent1989"),
    ("th", "tha", "Thai", "Thai", "Tai-Kadai", "Tai (Southwestern)", "Asia Pacific", 3, "thai1261"),
    ("lo", "lao", "Lao", "Laoo", "Tai-Kadai", "Tai (Southwestern)", "Asia Pacific", 2, "laoo1244"),
    ("zh", "cmn", "Chinese (Mandarin, Simplified)", "Hans", "Sino-Tibetan", "Sinitic (Mandarin)", "Asia Pacific", 5, "mand1415"),
    ("my", "mya", "Burmese", "Mymr", "Sino-Tibetan", "Lolo-Burmese", "Asia Pacific", 1, "nucl1310"),
    ("ja", "jpn", "Japanese", "Jpan", "Japonic", "Japonic", "Asia Pacific", 5, "nucl1643"),
    ("ko", "kor", "Korean", "Kore (Hang)", "Koreanic", "Koreanic", "Asia Pacific", 4, "kore1280"),
    ("am", "amh", "Amharic", "Ethi", "Afro-Asiatic", "Semitic (Ethiosemitic)", "Africa", 2, "amha1245"),
    ("ha", "hau", "Hausa", "Latn", "Afro-Asiatic", "Chadic (West)", "Africa", 2, "haus1257"),
    ("ig", "ibo", "Igbo", "Latn", "Atlantic-Congo", "Benue-Congo > Igboid", "Africa", 1, "nucl1417"),
    ("mg", "plt", "Malagasy", "Latn", "Austronesian", "Malayo-Polynesian > Barito", "Africa", 1, "plat1254"),
    ("sn", "sna", "Shona", "Latn", "Atlantic-Congo", "Benue-Congo > Bantu (S.10)", "Africa", 1, "shon1251"),
    ("sw", "swh", "Swahili", "Latn", "Atlantic-Congo", "Benue-Congo > Bantu (G.42)", "Africa", 2, "swah1253"),
    ("wo", "wol", "Wolof", "Latn", "Atlantic-Congo", "North-Central Atlantic (Wolofic)", "Africa", 2, "nucl1347"),
    ("xh", "xho", "Xhosa", "Latn", "Atlantic-Congo", "Benue-Congo > Bantu (Nguni S.41)", "Africa", 2, "xhos1239"),
    ("yo", "yor", "Yoruba", "Latn", "Atlantic-Congo", "Benue-Congo > Defoid (Yoruboid)", "Africa", 2, "yoru1245"),
    ("zu", "zul", "Zulu", "Latn", "Atlantic-Congo", "Benue-Congo > Bantu (Nguni S.42)", "Africa", 2, "zulu1248"),
    ("zh-Hant", "cmn", "Chinese (Mandarin, Traditional)", "Hant", "Sino-Tibetan", "Sinitic (Mandarin)", "Asia Pacific", 5, "mand1415"),
    ("yue", "yue", "Cantonese", "Hant", "Sino-Tibetan", "Sinitic (Yue)", "Asia Pacific", 1, "yuec1235"),
    ("pcm", "pcm", "Nigerian Pidgin", "Latn", "Indo-European", "English-lexifier creole (West African Pidgin English)", "Africa", 0, "nige1257"),
)

# FineWeb-2 config per language (see the module docstring for where it differs from iso3 + script).
FINEWEB2 = {
    "en": None, "nl": "nld_Latn", "fr": "fra_Latn", "it": "ita_Latn", "pt": "por_Latn", "ro": "ron_Latn",
    "es": "spa_Latn", "cs": "ces_Latn", "pl": "pol_Latn", "uk": "ukr_Cyrl", "ru": "rus_Cyrl", "el": "ell_Grek",
    "de": "deu_Latn", "da": "dan_Latn", "sv": "swe_Latn", "no": "nob_Latn", "ca": "cat_Latn", "gl": "glg_Latn",
    "cy": "cym_Latn", "ga": "gle_Latn", "eu": "eus_Latn", "hr": "hrv_Latn", "lv": "lvs_Latn", "lt": "lit_Latn",
    "sk": "slk_Latn", "sl": "slv_Latn", "et": "ekk_Latn", "fi": "fin_Latn", "hu": "hun_Latn", "sr": "srp_Cyrl",
    "bg": "bul_Cyrl", "ar": "arb_Arab", "fa": "fas_Arab", "ur": "urd_Arab", "tr": "tur_Latn", "mt": "mlt_Latn",
    "he": "heb_Hebr", "hi": "hin_Deva", "mr": "mar_Deva", "bn": "ben_Beng", "gu": "guj_Gujr", "pa": "pan_Guru",
    "ta": "tam_Taml", "te": "tel_Telu", "ne": "npi_Deva", "tl": "fil_Latn", "ms": "zsm_Latn", "id": "ind_Latn",
    "vi": "vie_Latn", "jv": "jav_Latn", "km": "khm_Khmr", "th": "tha_Thai", "lo": "lao_Laoo", "zh": "cmn_Hani",
    "my": "mya_Mymr", "ja": "jpn_Jpan", "ko": "kor_Hang", "am": "amh_Ethi", "ha": "hau_Latn", "ig": "ibo_Latn",
    "mg": "plt_Latn", "sn": "sna_Latn", "sw": "swh_Latn", "wo": "wol_Latn", "xh": "xho_Latn", "yo": "yor_Latn",
    "zu": "zul_Latn", "zh-Hant": "cmn_Hani", "yue": "yue_Hani", "pcm": "pcm_Latn",
}


def _make(row: tuple) -> Language:
    iso1, iso3, name, script, gfamily, branch, region, joshi, glottocode = row
    family = gfamily
    if gfamily.startswith("(isolate)"):
        family = branch = f"{name} (isolate)"
    elif "creole" in branch.lower():
        family = CREOLE_FAMILY
    return Language(
        iso1=iso1,
        iso3=iso3,
        name=name,
        script=script[:4],
        family=family,
        branch=branch,
        region=region,
        resource_class=int(joshi),
        glottolog_family=gfamily,
        glottocode=glottocode,
        fineweb2=FINEWEB2[iso1],
    )


LANGUAGES: tuple[Language, ...] = tuple(_make(r) for r in _ROWS)
CODES: tuple[str, ...] = tuple(lang.iso1 for lang in LANGUAGES)
_BY_CODE = {lang.iso1.lower(): lang for lang in LANGUAGES}
# ISO 639-3 aliases; zh and zh-Hant share "cmn", so the 639-3 code points to Simplified Chinese.
for _lang in LANGUAGES:
    _BY_CODE.setdefault(_lang.iso3.lower(), _lang)


def get_language(code: str) -> Language:
    """The language for an ISO 639-1 / project code (``"sw"``, ``"zh-Hant"``) or ISO 639-3 (``"swh"``)."""
    lang = _BY_CODE.get(str(code).strip().lower())
    if lang is None:
        raise ValueError(unknown_language_message(code))
    return lang


def unknown_language_message(code: str, valid: tuple[str, ...] | list[str] = CODES) -> str:
    near = difflib.get_close_matches(str(code), list(valid), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    return f"unknown language code {code!r}.{hint} Valid codes: {', '.join(valid)}."


def group_of(code: str, level: str = "family") -> str:
    """The group label of a language at a grouping level (one of ``GROUP_LEVELS``)."""
    if level not in GROUP_LEVELS:
        raise ValueError(f"unknown grouping level {level!r}; choose one of {', '.join(GROUP_LEVELS)}")
    lang = get_language(code)
    if level == "resource_class":
        return f"class {lang.resource_class}"
    return getattr(lang, level)


def groups(level: str = "family", codes=None) -> dict[str, list[str]]:
    """Group label -> language codes (registry order) for ``codes`` (default: all 70)."""
    codes = CODES if codes is None else [get_language(c).iso1 for c in codes]
    out: dict[str, list[str]] = {}
    for code in codes:
        out.setdefault(group_of(code, level), []).append(code)
    return out
