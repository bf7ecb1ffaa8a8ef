"""BFCL-compatible matching: rules by hand, data loading and its errors, and -- when the ``bfcl-eval``
package is installed -- our verdict == BFCL's official AST checker on every record of the simple and
multiple Python sets, for candidate calls that vary every argument the ways models err."""

import copy
import json
import sys
import types

import pytest

from aetheris.tasks import bfcl
from aetheris.tasks import toolcall as tc

FN = {"name": "book", "parameters": {"type": "dict", "required": ["city"], "properties": {
    "city": {"type": "string"}, "nights": {"type": "integer"}, "price": {"type": "float"},
    "tags": {"type": "array", "items": {"type": "string"}}, "scores": {"type": "array", "items": {"type": "float"}},
    "prefs": {"type": "dict", "properties": {"bed": {"type": "string"}, "floor": {"type": "integer"}}},
    "pet": {"type": "boolean"}, "rooms": {"type": "array", "items": {"type": "dict"}}}}}
ANSWER = {"book": {"city": ["New York", "NYC"], "nights": [2, ""], "price": [99.5, ""], "tags": [["a b", "c"], ""],
                   "scores": [[1.0, 2.0], ""], "prefs": [{"bed": ["king", ""], "floor": [3]}, ""], "pet": [False, ""],
                   "rooms": [[{"bed": ["twin"]}, {"bed": ["king"]}], ""]}}


def _check(args, name="book"):
    return tc.check_calls([{"name": name, "arguments": args}], ANSWER, [FN])


def test_possible_answer_rules_by_hand():
    assert _check({"city": "nyc"}) == (True, "ok")  # another allowed value; optionals omitted
    assert _check({"city": " New-York "})[0]  # standardize_string drops spaces and -
    assert not _check({"city": "New York!"})[0]  # ! is not dropped
    assert _check({"city": "NYC", "nights": 2, "price": 99.5, "pet": False})[0]
    assert _check({"city": "NYC", "price": 99.5})[0]
    assert not _check({"city": "NYC", "nights": 2.0})[0]  # a float is not an integer
    assert _check({"city": "NYC", "scores": [1.0, 2.0]})[0]
    # int -> float only at the top level: ints in a float array fail the item type check ...
    required_scores = {"book": {**ANSWER["book"], "scores": [[1.0, 2.0]]}}
    assert not tc.check_calls([{"name": "book", "arguments": {"city": "NYC", "scores": [1, 2]}}], required_scores, [FN])[0]
    # ... unless "" is among the allowed values: BFCL's item check passes on a non-list candidate
    assert _check({"city": "NYC", "scores": [1, 2]})[0]
    assert not _check({"city": "NYC", "pet": 0})[0]  # an int is not a boolean
    assert not _check({"city": "NYC", "nights": "2"})[0]  # a number as a string
    assert _check({"city": "NYC", "tags": ["A B", "c"]})[0] and not _check({"city": "NYC", "tags": ["c", "a b"]})[0]
    assert _check({"city": "NYC", "prefs": {"floor": 3}})[0]  # an optional key of a nested dict omitted
    assert _check({"city": "NYC", "prefs": {"floor": 3, "bed": "King"}})[0]
    assert not _check({"city": "NYC", "prefs": {"bed": "king"}})[0]  # a required key missing
    assert not _check({"city": "NYC", "prefs": {"floor": 3, "view": "sea"}})[0]  # an extra key
    assert _check({"city": "NYC", "rooms": [{"bed": "twin"}, {"bed": "king"}]})[0]
    assert not _check({"city": "NYC", "rooms": [{"bed": "king"}, {"bed": "twin"}]})[0]  # dicts in order
    assert _check({"nights": 2}) == (False, "missing required parameter 'city'")
    assert _check({"city": "NYC", "spa": True}) == (False, "unexpected parameter 'spa'")
    assert _check({"city": "NYC"}, name="rent") == (False, "wrong function 'rent'")
    two = [{"name": "book", "arguments": {"city": "NYC"}}] * 2
    assert tc.check_calls(two, ANSWER, [FN]) == (False, "2 calls where one was expected")
    strict = {"book": {"city": ["NYC"], "nights": [2]}}
    assert tc.check_calls([{"name": "book", "arguments": {"city": "NYC"}}], strict, [FN]) == (
        False, "expected parameter 'nights' missing")
    # a "variable": the answers are strings for an integer parameter -> a string passes, compared raw
    var = {"book": {"city": ["NYC"], "nights": ["n"]}}
    assert tc.check_calls([{"name": "book", "arguments": {"city": "NYC", "nights": "n"}}], var, [FN])[0]


def test_single_gold_wrapper_keeps_bfcl_rules():
    tools = [{"name": "f", "parameters": {"type": "object", "required": ["a"], "properties": {
        "a": {"type": "string"}, "n": {"type": "number"}, "d": {"type": "object"}, "opt": {"type": "string", "default": "x"}}}}]
    gold = {"name": "f", "arguments": {"a": "Oslo", "n": 3, "d": {"k": "v"}}}
    assert tc.ast_match({"name": "f", "arguments": {"a": "oslo", "n": 3.0, "d": {"k": "V"}}}, gold, tools)[0]
    assert not tc.ast_match({"name": "f", "arguments": {"a": "oslo", "n": 3, "d": {"k": "v"}, "opt": "x"}}, gold, tools)[0]
    assert tc.ast_match({"name": "f", "arguments": {"a": "oslo", "n": 3}}, gold, tools)[1] == "expected parameter 'd' missing"


def test_unknown_types_and_bad_answers_are_errors():
    fn = {"name": "g", "parameters": {"type": "dict", "properties": {"x": {"type": "complex"}}, "required": []}}
    with pytest.raises(ValueError, match="type 'complex' is not one BFCL's checker knows"):
        tc.check_calls([{"name": "g", "arguments": {"x": 1}}], {"g": {"x": [1]}}, [fn], "set.json record g_0")
    with pytest.raises(ValueError, match="record g_0.*must be a list of allowed values"):
        tc.check_calls([{"name": "book", "arguments": {"city": "x"}}], {"book": {"city": "x"}}, [FN], "record g_0")


def _write_set(folder, questions, answers, stem="simple_python"):
    (folder / "possible_answer").mkdir(parents=True, exist_ok=True)
    (folder / f"BFCL_v4_{stem}.json").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (folder / "possible_answer" / f"BFCL_v4_{stem}.json").write_text("".join(json.dumps(a) + "\n" for a in answers))


def test_loading_a_folder_and_its_errors(tmp_path):
    q = {"id": "simple_0", "question": [[{"role": "user", "content": "Book NYC"}]], "function": [FN]}
    a = {"id": "simple_0", "ground_truth": [ANSWER]}
    _write_set(tmp_path, [q], [a])
    _write_set(tmp_path, [q | {"id": "multiple_0"}], [a | {"id": "multiple_0"}], "multiple")
    opts = {"bfcl_dir": str(tmp_path)}
    (ex,) = bfcl.load("simple", opts)
    assert ex["possible_answer"] == ANSWER and ex["expected"]["name"] == "book" and ex["messages"][0]["content"] == "Book NYC"
    assert len(bfcl.data_files("en", opts)) == 4
    bad = [(q, {"id": "simple_0", "ground_truth": [{"book": {"city": "NYC"}}]}, "needs a list of allowed values"),
           (q, {"id": "simple_0", "ground_truth": [ANSWER, ANSWER]}, "expect one call"),
           (q | {"function": [{"name": "book"}]}, a, r"\"function\" must be a list"),
           (q | {"question": "Book NYC"}, a, r"\"question\" must be a list of turns"),
           (q, {"id": "other", "ground_truth": [ANSWER]}, "no possible answer for record simple_0"),
           (q | {"function": [FN | {"parameters": {"properties": {"x": {"type": "complex"}}}}]}, a, "'complex'")]
    for question, answer, message in bad:
        _write_set(tmp_path, [question], [answer])
        with pytest.raises(ValueError, match=message) as err:
            bfcl.load("simple", opts)
        assert "BFCL_v4_simple_python.json" in str(err.value)  # the file is named
    (tmp_path / "BFCL_v4_simple_python.json").write_text("not json\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        bfcl.load("simple", opts)
    with pytest.raises(FileNotFoundError, match="--bfcl-dir"):
        bfcl.data_dir({"bfcl_dir": str(tmp_path / "missing")})


# ------------------------------------------------------------------------------------------------------
# Agreement with the official checker


def _official_checker():
    """BFCL's ``ast_checker`` from the installed package. Its module imports the model-config table,
    which imports every API client BFCL supports; without those clients installed, a stand-in table is
    used (the checker reads it only to rename dotted function names for APIs that forbid dots)."""
    pytest.importorskip("bfcl_eval")
    try:
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    except ImportError:
        for name in [m for m in sys.modules if m.startswith("bfcl_eval.constants.model_config")]:
            del sys.modules[name]
        stub = types.ModuleType("bfcl_eval.constants.model_config")
        stub.MODEL_CONFIG_MAPPING = {"aetheris": types.SimpleNamespace(underscore_to_dot=False)}
        sys.modules["bfcl_eval.constants.model_config"] = stub
        from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    from bfcl_eval.constants.enums import Language

    def check(functions, model_output, possible_answer, category):
        return ast_checker(functions, model_output, possible_answer, Language.PYTHON, category, "aetheris")

    return check


def _variants(record: dict, possible: dict) -> list[tuple[str, list[dict]]]:
    """Candidate calls: the first allowed value everywhere, then each argument changed one way at a time."""
    (name, answers), = possible.items()
    fn = next(f for f in record["function"] if f["name"] == name)
    props = fn["parameters"]["properties"]
    base = {p: next(v for v in allowed if v != "") for p, allowed in answers.items() if any(v != "" for v in allowed)}
    out = [("base", base)]

    def with_(p, v):
        return {**base, p: v}

    for p, allowed in answers.items():
        out += [(f"alt {p}", with_(p, v)) for v in allowed[1:4] if v != ""]
        out.append((f"omit {p}", {k: v for k, v in base.items() if k != p}))
        v = base.get(p)
        if isinstance(v, bool):
            out += [(f"bool as int {p}", with_(p, int(v))), (f"negated {p}", with_(p, not v))]
        elif isinstance(v, int):
            out += [(f"int as float {p}", with_(p, float(v))), (f"number as string {p}", with_(p, str(v))),
                    (f"off by one {p}", with_(p, v + 1))]
        elif isinstance(v, float):
            out += [(f"float as string {p}", with_(p, str(v))), (f"float scaled {p}", with_(p, v * 10))]
            if v == int(v):
                out.append((f"float as int {p}", with_(p, int(v))))
        elif isinstance(v, str):
            out += [(f"upper {p}", with_(p, v.upper())), (f"spaces {p}", with_(p, f"  {v} ")),
                    (f"punct {p}", with_(p, v + ".")), (f"dash {p}", with_(p, v.replace(" ", "-"))),
                    (f"bang {p}", with_(p, v + "!")), (f"quote {p}", with_(p, v.replace('"', "'"))),
                    (f"other {p}", with_(p, v + " extra")), (f"string as number {p}", with_(p, 7))]
        elif isinstance(v, list):
            out += [(f"reversed {p}", with_(p, v[::-1])), (f"empty {p}", with_(p, [])),
                    (f"first only {p}", with_(p, v[:1]))]
            if v and all(type(x) is int for x in v):
                out.append((f"items as float {p}", with_(p, [float(x) for x in v])))
            if v and all(type(x) is float for x in v):
                out.append((f"items as int {p}", with_(p, [int(x) for x in v])))
            if v and all(isinstance(x, str) for x in v):
                out.append((f"items upper {p}", with_(p, [x.upper() for x in v])))
            if v and all(isinstance(x, dict) for x in v):
                out.append((f"list of dicts first values {p}",
                            with_(p, [{k: next((a for a in opts if a != ""), None) for k, opts in d.items()} for d in v])))
        elif isinstance(v, dict):
            first = {k: next((a for a in opts if a != ""), None) for k, opts in v.items()}
            first = {k: a for k, a in first.items() if a is not None}
            out.append((f"dict {p}", with_(p, first)))
            for k, a in first.items():
                out.append((f"dict drop {p}.{k}", with_(p, {x: y for x, y in first.items() if x != k})))
                if isinstance(a, str):
                    out.append((f"dict case {p}.{k}", with_(p, {**first, k: a.upper()})))
                if isinstance(a, int) and not isinstance(a, bool):
                    out.append((f"dict int as float {p}.{k}", with_(p, {**first, k: float(a)})))
            out.append((f"dict extra key {p}", with_(p, {**first, "zz_extra": 1})))
    for p in props:
        if p not in answers:
            out.append((f"extra schema param {p}", {**base, p: "x"}))
    out.append(("extra unknown param", {**base, "zz_unknown": 1}))
    calls = [(label, [{"name": name, "arguments": args}]) for label, args in out]
    calls.append(("wrong name", [{"name": name + "_v2", "arguments": base}]))
    calls += [(f"other function {f['name']}", [{"name": f["name"], "arguments": base}])
              for f in record["function"] if f["name"] != name]
    calls.append(("two calls", [{"name": name, "arguments": base}] * 2))
    return calls


def test_verdicts_equal_bfcls_official_checker():
    official = _official_checker()
    compared, disagreements = 0, []
    for category, stem in (("simple", "simple_python"), ("multiple", "multiple")):
        for ex in bfcl.load(category, {}):
            record = {"function": ex["tools"]}
            for label, calls in _variants(record, ex["possible_answer"]):
                theirs = official(ex["tools"], [{c["name"]: copy.deepcopy(c["arguments"])} for c in calls],
                                  [ex["possible_answer"]], category)["valid"]
                ours = tc.check_calls(copy.deepcopy(calls), ex["possible_answer"], ex["tools"], ex["where"])[0]
                compared += 1
                if ours != theirs:
                    disagreements.append((ex["id"], label, calls, theirs))
    print(f"compared {compared} calls with BFCL's official checker; {len(disagreements)} disagreements")
    assert not disagreements, disagreements[:5]
    assert compared > 10_000


def test_eval_bfcl_on_a_tiny_model(tiny_tokenizer, tmp_path):
    """``aetheris eval --tasks bfcl`` end to end on a local folder: each example's score is the matcher's
    verdict on the generated text, and a failed run leaves the earlier cache untouched."""
    from aetheris.cli import main
    from eval_helpers import save_tiny_cohere2

    q = {"id": "simple_0", "question": [[{"role": "user", "content": "Book NYC"}]], "function": [FN]}
    a = {"id": "simple_0", "ground_truth": [ANSWER]}
    data = tmp_path / "bfcl"
    _write_set(data, [q, q | {"id": "simple_1"}], [a, a | {"id": "simple_1"}])
    _write_set(data, [q | {"id": "multiple_0"}], [a | {"id": "multiple_0"}], "multiple")
    model = save_tiny_cohere2(tmp_path / "m", tiny_tokenizer, seed=5)
    out = tmp_path / "out"
    args = ["eval", "--model", str(model), "--output", str(out), "--tasks", "bfcl", "--bfcl-dir", str(data),
            "--toolcall-max-new-tokens", "8"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    simple = results["tasks"]["bfcl_simple"]["languages"]["en"]
    assert simple["ids"] == ["simple_0", "simple_1"] and results["tasks"]["bfcl_multiple"]["languages"]["en"]["n"] == 1
    cache = json.loads((out / "cache" / "bfcl" / "en.json").read_text())
    examples = bfcl.load("simple", {"bfcl_dir": str(data)})
    assert simple["values"] == [tc.score_output(o, ex)["ast"] for o, ex in zip(cache["results"]["bfcl_simple"]["outputs"], examples)]
    before = (out / "cache" / "bfcl" / "en.json").read_bytes()
    _write_set(data, [q], [{"id": "simple_0", "ground_truth": [{"book": {"city": "NYC"}}]}])
    assert main(args + ["--overwrite"]) != 0  # a malformed possible answer stops the run ...
    assert (out / "cache" / "bfcl" / "en.json").read_bytes() == before  # ... and the cache is kept
