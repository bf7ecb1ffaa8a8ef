"""BFCL's simple and multiple Python sets: the English anchor of the tool-calling row, scored with
BFCL's possible answers by ``toolcall.check_calls`` (BFCL's AST rules, re-implemented).

Source: Patil et al. 2024, Berkeley Function Calling Leaderboard (gorilla/berkeley-function-call-
leaderboard; the ``bfcl-eval`` package ships the data). Files read (v4 names; v3's ``BFCL_v3_simple.json``
works too):

- ``BFCL_v4_simple_python.json`` and ``BFCL_v4_multiple.json``: JSON lines ``{"id", "question": [[{"role",
  "content"}, ...]], "function": [{"name", "description", "parameters": {"type": "dict", "properties",
  "required"}}]}`` -- one function (simple) or several to choose from (multiple);
- ``possible_answer/<same name>``: ``{"id", "ground_truth": [{function: {param: [allowed values]}}]}``.

From ``--bfcl-dir DIR`` when given, else from the installed ``bfcl-eval`` package's ``data/`` folder
(found without importing the package, whose import pulls in every API client it supports).

Prompt: the project's chat template (``toolcall.render_prompt``: the functions as tools in the system
turn, the question's messages after it); the answer is parsed as an action list like every tool-calling
result. Results ``bfcl_simple`` and ``bfcl_multiple`` (language ``en``), metric ``ast_match``, with the
parse/schema/name rates in ``extra``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from aetheris.tasks import Scores, toolcall

NAME = "bfcl"
CATEGORIES = {"simple": ("simple_python", "simple"), "multiple": ("multiple",)}  # file stems, v4 then v3


def languages(options: dict) -> list[str]:
    return ["en"]


def data_dir(options: dict) -> Path:
    if options.get("bfcl_dir"):
        folder = Path(options["bfcl_dir"]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"--bfcl-dir {folder} is not a folder; give the folder holding "
                                    "BFCL_v4_simple_python.json, BFCL_v4_multiple.json and possible_answer/")
        return folder
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("BFCL data not found: pass --bfcl-dir DIR (a copy of the leaderboard's data/ folder) "
                                "or install the data with `pip install --no-deps bfcl-eval` (the `bfcl` extra)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _find(folder: Path, category: str) -> tuple[Path, Path]:
    for stem in CATEGORIES[category]:
        for version in ("v4", "v3"):
            questions = folder / f"BFCL_{version}_{stem}.json"
            answers = folder / "possible_answer" / questions.name
            if questions.exists() and answers.exists():
                return questions, answers
    raise FileNotFoundError(f"no BFCL {category} set in {folder}: expected BFCL_v4_{CATEGORIES[category][0]}.json "
                            f"and possible_answer/BFCL_v4_{CATEGORIES[category][0]}.json")


def data_files(lang: str, options: dict) -> list[Path]:
    folder = data_dir(options)
    return [p for category in CATEGORIES for p in _find(folder, category)]


def _json_lines(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {n}: not JSON ({err.msg}); BFCL files hold one JSON object per line") from None
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError(f"{path} line {n}: expected a JSON object with an \"id\"")
            rows.append(row)
    return rows


def _check_record(q: dict, a: dict, qpath: Path, apath: Path) -> None:
    rid = q["id"]
    turns = q.get("question")
    if not (isinstance(turns, list) and turns and isinstance(turns[0], list)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in turns[0])):
        raise ValueError(f"{qpath} record {rid}: \"question\" must be a list of turns, each a list of "
                         "{\"role\", \"content\"} messages")
    functions = q.get("function")
    if not (isinstance(functions, list) and functions and all(
            isinstance(f, dict) and "name" in f and isinstance((f.get("parameters") or {}).get("properties"), dict)
            for f in functions)):
        raise ValueError(f"{qpath} record {rid}: \"function\" must be a list of {{\"name\", \"parameters\": "
                         "{\"properties\", \"required\"}} schemas")
    truth = a.get("ground_truth")
    if not (isinstance(truth, list) and len(truth) == 1 and isinstance(truth[0], dict) and len(truth[0]) == 1):
        raise ValueError(f"{apath} record {rid}: \"ground_truth\" must be a list holding one {{function: "
                         "{param: [allowed values]}} (the simple and multiple sets expect one call)")
    (name, params), = truth[0].items()
    if not isinstance(params, dict) or not all(isinstance(v, list) for v in params.values()):
        raise ValueError(f"{apath} record {rid}: every parameter of {name} needs a list of allowed values "
                         "(\"\" in the list = may be omitted)")
    if name not in {f["name"] for f in functions}:
        raise ValueError(f"{apath} record {rid}: expected function {name!r} is not among the record's functions")


def load(category: str, options: dict) -> list[dict]:
    """The category's records as tool-calling examples with their possible answers."""
    qpath, apath = _find(data_dir(options), category)
    answers = {a["id"]: a for a in _json_lines(apath)}
    examples = []
    for q in _json_lines(qpath):
        if q["id"] not in answers:
            raise ValueError(f"{apath}: no possible answer for record {q['id']} of {qpath.name}")
        a = answers[q["id"]]
        _check_record(q, a, qpath, apath)
        possible = a["ground_truth"][0]
        (name, params), = possible.items()
        where = f"{apath.name} record {q['id']}"
        for fn in q["function"]:  # unknown schema types are a data error, found before any model runs
            for p, schema in fn["parameters"]["properties"].items():
                toolcall._bfcl_type(schema, f"{qpath.name} record {q['id']}: {fn['name']}.{p}")
        gold = {p: next((v for v in allowed if v != ""), None) for p, allowed in params.items()}
        examples.append({"id": q["id"], "lang": "en", "tools": q["function"], "messages": q["question"][0],
                         "expected": {"name": name, "arguments": {p: v for p, v in gold.items() if v is not None}},
                         "possible_answer": possible, "where": where})
    return examples


def run(lm, lang: str, options: dict, limit: int | None = None) -> dict[str, Scores]:
    return {f"bfcl_{category}": toolcall.score_examples(lm, load(category, options)[:limit], f"bfcl {category}", options)
            for category in CATEGORIES}
