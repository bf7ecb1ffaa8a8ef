"""A generated multilingual tool-calling set for all 70 languages: function schemas, user requests from
templates, values localised with CLDR (via ``babel``), split train/test **by template**.

    python -m aetheris.toolgen --split test --per-language 20 > toolgen-test.jsonl   # a --toolcall-file

Five functions (``TOOLS``): ``get_weather``, ``convert_currency``, ``get_time``, ``web_search``, ``book_hotel``.
Every record is ``{"id", "lang", "template", "native", "tools", "user", "expected": {"name", "arguments"}}``
(``tools``: the expected function and two distractors, in a seeded order):
the format of ``tasks.toolcall``'s ``--toolcall-file`` and an ``sft`` source (``aetheris.sft``).

What is native and what is not (be careful reading scores):
* **Request frames.** Hand-written templates (``TEMPLATES``) exist for en, fr, es, de — three per function,
  written by us, not by native speakers. Every other language uses the **English frame** with localised
  values inside it (``"native": false`` in its records). So for 66 languages the request is code-mixed:
  it tests whether the model copies and normalises localised values, not whether it understands requests
  phrased in that language.
* **Values** come from CLDR for the record's language: city names (CLDR exemplar cities of time zones,
  e.g. 東京, Токио, طوكيو; where CLDR keeps the English name, the English name), dates in the language's
  long date format (``babel.dates.format_date``, e.g. "2026年3月5日", "5 Machi 2026"), numbers with its
  digits/separators (``babel.numbers.format_decimal``), currency names (``Locale.currencies``) and language
  names for search queries (``Locale.languages``). Arguments are normalised: cities as written in the
  request, dates as ISO ``YYYY-MM-DD``, amounts as numbers, currencies as ISO 4217 codes.
* **Split.** Per frame language and function, the last template is the *test* template and the others are
  *train* templates, so a test request is never a memorised frame (values are drawn independently).
  Generation is deterministic: ``random.Random`` seeded by (seed, language, split).
* **Frame dropout** (``frame_dropout``, train split only, off by default): each word of the frame (never a value)
  is left out with that probability, so a model trained on two frames per function cannot name the function by
  recognising the frame and has to read what the request asks for (a city and a date, a currency, a query).
  The values drawn are the same with and without it.
* **Extra frames** (``extra_frames``, train split only, off by default): four more English train frames per
  function (``EXTRA_TRAIN_TEMPLATES``) for English and the 66 languages that use the English frame; the test
  frames are unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import zlib

from babel import Locale
from babel.dates import format_date
from babel.numbers import format_decimal

from aetheris.sources import resolve_languages

TOOLS = [
    {"name": "get_weather", "description": "Weather forecast for a city on a date (ISO).",
     "parameters": {"type": "object", "properties": {
         "city": {"type": "string"},
         "date": {"type": "string"}}, "required": ["city", "date"]}},
    {"name": "convert_currency", "description": "Convert money between ISO 4217 currencies.",
     "parameters": {"type": "object", "properties": {
         "amount": {"type": "number"},
         "from_currency": {"type": "string"},
         "to_currency": {"type": "string"}},
         "required": ["amount", "from_currency", "to_currency"]}},
    {"name": "get_time", "description": "Local time in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "web_search", "description": "Search the web.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
    {"name": "book_hotel", "description": "Book a hotel room (ISO check-in date).",
     "parameters": {"type": "object", "properties": {
         "city": {"type": "string"}, "check_in": {"type": "string"},
         "nights": {"type": "integer"}}, "required": ["city", "check_in", "nights"]}},
]

TOOLS_OFFERED = 3
"""Tools in each example's system turn: the right one and two distractors, shuffled (the model must select;
three schemas keep the prompt short enough for nano models)."""

# Frame language -> function -> templates; the LAST template of each list is the test template.
TEMPLATES = {
    "en": {
        "get_weather": ["What's the weather in {city} on {date}?", "Weather forecast for {city}, {date}, please.",
                        "Will it rain in {city} on {date}?"],
        "convert_currency": ["Convert {amount} {from_name} to {to_name}.", "How much is {amount} {from_name} in {to_name}?",
                             "I need {amount} {from_name} changed into {to_name}."],
        "get_time": ["What time is it in {city}?", "Tell me the current time in {city}.", "Is it late in {city} right now?"],
        "web_search": ["Search the web for {query}.", "Look up {query} online.", "Find me information about {query}."],
        "book_hotel": ["Book a hotel in {city} from {date} for {nights} nights.",
                       "I need a room in {city}, checking in {date}, {nights} nights.",
                       "Reserve {nights} nights at a hotel in {city} starting {date}."],
    },
    "fr": {
        "get_weather": ["Quel temps fera-t-il à {city} le {date} ?", "Donne-moi la météo de {city} pour le {date}.",
                        "Va-t-il pleuvoir à {city} le {date} ?"],
        "convert_currency": ["Convertis {amount} {from_name} en {to_name}.", "Combien font {amount} {from_name} en {to_name} ?",
                             "J'ai besoin de changer {amount} {from_name} en {to_name}."],
        "get_time": ["Quelle heure est-il à {city} ?", "Donne-moi l'heure actuelle à {city}.", "Il est quelle heure à {city} en ce moment ?"],
        "web_search": ["Cherche {query} sur le web.", "Fais une recherche sur {query}.", "Trouve-moi des informations sur {query}."],
        "book_hotel": ["Réserve un hôtel à {city} à partir du {date} pour {nights} nuits.",
                       "Il me faut une chambre à {city}, arrivée le {date}, {nights} nuits.",
                       "Réserve {nights} nuits dans un hôtel à {city} à partir du {date}."],
    },
    "es": {
        "get_weather": ["¿Qué tiempo hará en {city} el {date}?", "Dame el pronóstico del tiempo de {city} para el {date}.",
                        "¿Va a llover en {city} el {date}?"],
        "convert_currency": ["Convierte {amount} {from_name} a {to_name}.", "¿Cuánto son {amount} {from_name} en {to_name}?",
                             "Necesito cambiar {amount} {from_name} a {to_name}."],
        "get_time": ["¿Qué hora es en {city}?", "Dime la hora actual en {city}.", "¿Es tarde ahora mismo en {city}?"],
        "web_search": ["Busca {query} en internet.", "Haz una búsqueda sobre {query}.", "Encuéntrame información sobre {query}."],
        "book_hotel": ["Reserva un hotel en {city} desde el {date} por {nights} noches.",
                       "Necesito una habitación en {city}, entrada el {date}, {nights} noches.",
                       "Reserva {nights} noches en un hotel de {city} a partir del {date}."],
    },
    "de": {
        "get_weather": ["Wie wird das Wetter in {city} am {date}?", "Wettervorhersage für {city} am {date}, bitte.",
                        "Regnet es in {city} am {date}?"],
        "convert_currency": ["Rechne {amount} {from_name} in {to_name} um.", "Wie viel sind {amount} {from_name} in {to_name}?",
                             "Ich möchte {amount} {from_name} in {to_name} tauschen."],
        "get_time": ["Wie spät ist es in {city}?", "Sag mir die aktuelle Uhrzeit in {city}.", "Ist es in {city} gerade schon spät?"],
        "web_search": ["Suche im Internet nach {query}.", "Schlag {query} online nach.", "Finde Informationen über {query}."],
        "book_hotel": ["Buche ein Hotel in {city} ab dem {date} für {nights} Nächte.",
                       "Ich brauche ein Zimmer in {city}, Anreise am {date}, {nights} Nächte.",
                       "Reserviere {nights} Nächte in einem Hotel in {city} ab dem {date}."],
    },
}

# More English *train* frames (``extra_frames``): with two train frames per function a nano model names the function
# by recognising one of them, and the held-out frame is new to it. Written to vary the wording; none uses a word
# that is particular to its function's test frame ("rain", "late", "information", "changed into", "Reserve").
EXTRA_TRAIN_TEMPLATES = {
    "get_weather": ["Forecast for {city} on {date}?", "How's the weather going to be in {city} on {date}?",
                    "Check the weather for {city}, {date}.", "{city}, {date}: what will the weather be like?"],
    "convert_currency": ["What is {amount} {from_name} in {to_name}?", "Exchange {amount} {from_name} for {to_name}.",
                         "{amount} {from_name} to {to_name}, please.",
                         "Currency conversion: {amount} {from_name} to {to_name}."],
    "get_time": ["Current local time in {city}?", "What's the time in {city}?", "Check the clock in {city} for me.",
                 "{city}: what time is it there?"],
    "web_search": ["Search for {query}.", "Do a web search on {query}.", "Google {query} for me.",
                   "{query}: search the web, please."],
    "book_hotel": ["Get me a hotel room in {city} from {date}, {nights} nights.",
                   "Hotel booking: {city}, arriving {date}, {nights} nights.", "Book me {nights} nights in {city} from {date}.",
                   "Can you book a room in {city} on {date} for {nights} nights?"],
}

ZONES = ["Asia/Tokyo", "Europe/Paris", "Europe/Moscow", "Africa/Cairo", "Asia/Kolkata", "America/New_York",
         "Europe/London", "Asia/Shanghai", "Africa/Lagos", "America/Sao_Paulo", "Asia/Bangkok", "Europe/Berlin",
         "Africa/Nairobi", "Asia/Dubai", "Australia/Sydney", "Asia/Seoul", "Europe/Istanbul", "America/Mexico_City"]
CURRENCIES = ["EUR", "USD", "JPY", "GBP", "INR", "CNY", "NGN", "BRL", "KES", "RUB", "TRY", "THB"]
QUERY_LANGUAGES = ["sw", "yo", "ta", "mt", "eu", "km", "lo", "cy", "ha", "my"]


def _locale(code: str):
    """babel Locale for a registry code, or None (values then stay English)."""
    try:
        return Locale.parse(code.replace("-", "_"))
    except Exception:  # babel raises several types for unknown locales
        return None


def _values(lang: str, rng: random.Random) -> dict:
    """Localised surface strings and the normalised arguments they stand for."""
    loc = _locale(lang)
    name = str(loc) if loc is not None else "en"
    zone = rng.choice(ZONES)
    city = (loc.time_zones.get(zone, {}).get("city") if loc is not None else None) or zone.split("/")[-1].replace("_", " ")
    date = datetime.date(2026, 1, 1) + datetime.timedelta(days=rng.randrange(365))
    amount = rng.choice([5, 20, 50, 75, 100, 250, 1200, 15000])
    src, dst = rng.sample(CURRENCIES, 2)
    qlang = rng.choice(QUERY_LANGUAGES)
    cur = loc.currencies if loc is not None else {}
    langs = loc.languages if loc is not None else {}
    nights = rng.randrange(1, 8)
    return {"city": city, "date": format_date(date, "long", locale=name), "iso": date.isoformat(),
            "amount": format_decimal(amount, locale=name), "amount_value": amount,
            "from_name": cur.get(src, src), "to_name": cur.get(dst, dst), "from": src, "to": dst,
            "query": langs.get(qlang, qlang), "nights": format_decimal(nights, locale=name), "nights_value": nights}


def _arguments(function: str, v: dict) -> dict:
    return {"get_weather": {"city": v["city"], "date": v["iso"]},
            "convert_currency": {"amount": v["amount_value"], "from_currency": v["from"], "to_currency": v["to"]},
            "get_time": {"city": v["city"]},
            "web_search": {"query": v["query"]},
            "book_hotel": {"city": v["city"], "check_in": v["iso"], "nights": v["nights_value"]}}[function]


def templates_for(lang: str, function: str, split: str, extra_frames: bool = False) -> list[tuple[int, str]]:
    """(template index, text) of a split: train = all but the last, test = the last; ``extra_frames``: the train
    split of an English-frame language also gets ``EXTRA_TRAIN_TEMPLATES`` (indices after the test frame's)."""
    frame = TEMPLATES.get(lang, TEMPLATES["en"])[function]
    indexed = list(enumerate(frame))
    if split == "test":
        return indexed[-1:]
    english_frame = lang not in TEMPLATES or lang == "en"
    extra = EXTRA_TRAIN_TEMPLATES[function] if extra_frames and english_frame else []
    return indexed[:-1] + list(enumerate(extra, start=len(frame)))


def drop_frame_words(template: str, p: float, rng: random.Random) -> str:
    """``template`` with each word that holds no ``{field}`` left out with probability ``p``."""
    return " ".join(w for w in template.split(" ") if "{" in w or rng.random() >= p)


def generate_examples(languages="all", split: str = "train", per_language: int = 40, seed: int = 0,
                      tools_offered: int = TOOLS_OFFERED, frame_dropout: float = 0.0,
                      extra_frames: bool = False) -> list[dict]:
    """Deterministic tool-call examples; ``languages`` is ``all`` or a list of registry codes;
    ``tools_offered`` (1-5) schemas in each system turn, the expected one among them; ``frame_dropout`` (train
    only) the probability that a frame word is left out of a request; ``extra_frames`` (train only) adds
    ``EXTRA_TRAIN_TEMPLATES`` to the English frames."""
    if not 1 <= tools_offered <= len(TOOLS):
        raise ValueError(f"tools_offered={tools_offered} must be between 1 and {len(TOOLS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: choose train or test")
    if not 0 <= frame_dropout < 1:
        raise ValueError(f"frame_dropout={frame_dropout} must be in [0, 1) (the probability of leaving out a frame word)")
    if (frame_dropout or extra_frames) and split == "test":
        raise ValueError("frame_dropout and extra_frames are training augmentations: the test split keeps its frames")
    out = []
    functions = [t["name"] for t in TOOLS]
    for li, lang in enumerate(resolve_languages(languages)):
        rng = random.Random(zlib.crc32(f"{seed}/{lang}/{split}".encode()))
        drop_rng = random.Random(zlib.crc32(f"{seed}/{lang}/{split}/frame-dropout".encode()))  # values stay as without
        for i in range(per_language):
            function = functions[(i + li) % len(functions)]  # every function, even at 1 example per language
            t_index, template = rng.choice(templates_for(lang, function, split, extra_frames))
            if frame_dropout:
                template = drop_frame_words(template, frame_dropout, drop_rng)
            v = _values(lang, rng)
            offered = [t for t in TOOLS if t["name"] == function] + rng.sample(
                [t for t in TOOLS if t["name"] != function], tools_offered - 1)
            rng.shuffle(offered)
            out.append({"id": f"toolgen-{lang}-{split}-{i}", "lang": lang, "template": f"{function}/{t_index}",
                        "native": lang in TEMPLATES, "tools": offered, "user": template.format(**v),
                        "expected": {"name": function, "arguments": _arguments(function, v)}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="write the generated multilingual tool-calling set as JSONL")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--per-language", type=int, default=20)
    p.add_argument("--languages", default="all", help="all or a comma list of codes")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    langs = "all" if a.languages == "all" else a.languages.split(",")
    for ex in generate_examples(langs, a.split, a.per_language, a.seed):
        sys.stdout.write(json.dumps(ex, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
