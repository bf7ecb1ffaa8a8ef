"""Measure one nano-teacher recipe: train it (``aetheris.nano_teacher``, the demo's own code) and score it.

    python experiments/teacher_recipes.py runs/recipes/r1 [--per-language 2] [key=value ...]   # NanoTeacherConfig fields
    python experiments/teacher_recipes.py runs/demo/teacher --rescore                           # a saved teacher

Prints and writes ``OUT/recipe.json``: the settings, wall time, the highest training and held-out LM loss after
warmup (against the uniform loss ln V), and greedy tool calls on the generated set's *held-out* templates in all
70 languages -- parsed / function name / BFCL AST match, each a mean over languages, as the demo's eval scores
them (``tasks.toolcall.score_examples``), and how many of the arguments a copier could get right it got right
(``argument_copies``: strings and numbers apart, since a number is the same token in the request and the call
and a city, with the default tokenizer, is not), and whether the teacher copies in context at all
(``copy_probe``: held-out rows written twice), where the greedy names go (``name_outcomes``: the right tool,
the other offered one, one not offered) and which offered tool the model prefers when the call is written up to
the name (``name_choice``, with the request shuffled between examples for its chance level). The recipes
tried, and the copy-only AST ceiling (``copy_ceiling``), are in docs/notes/distillation.md (the demo's nano
teacher).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import unicodedata
from collections import defaultdict
from pathlib import Path

import numpy as np


def _digit_runs(text: str) -> list[int]:
    """The numbers written in ``text``, any script's decimal digits, thousands separators dropped."""
    ascii_digits = "".join(str(unicodedata.digit(ch)) if ch.isdigit() else ch for ch in text)
    return [int(run) for run in re.findall(r"\d+", re.sub(r"(?<=\d)[\s,.'\u00a0\u202f\u2019](?=\d{3})", "", ascii_digits))]


def recoverable(value, request: str) -> bool:
    """Whether an argument can be produced from the request without knowing the request's language: a string
    written in it (after BFCL's normalisation), a number written in it, an ISO date whose year, month and day are
    all written as numbers (2026年3月5日 yes, 5 Machi 2026 no: the month name must be known), a currency code
    written as such."""
    from aetheris.tasks.toolcall import standardize_string

    numbers = _digit_runs(request)
    if isinstance(value, (int, float)):
        return value in numbers
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return all(int(part) in numbers for part in value.split("-"))
    if re.fullmatch(r"[A-Z]{3}", value):  # an ISO 4217 code: written as the code itself ("EUR" is not in "Euro")
        return re.search(rf"(?<![A-Za-z]){value}(?![A-Za-z])", request) is not None
    return standardize_string(value) in standardize_string(request)


def copy_ceiling(examples: list[dict]) -> dict:
    """AST match of an oracle that copies perfectly and knows no language: an example counts when every expected
    argument is ``recoverable`` from its request (and the function is right). Mean over languages, and per
    function. Anything above it needs month names and currency names learned per language."""
    per_lang, per_function = defaultdict(list), defaultdict(list)
    for ex in examples:
        ok = all(recoverable(v, ex["user"]) for v in ex["expected"]["arguments"].values())
        per_lang[ex["lang"]].append(ok)
        per_function[ex["expected"]["name"]].append(ok)
    return {"ast": float(np.mean([np.mean(v) for v in per_lang.values()])),
            "per_function": {f: float(np.mean(v)) for f, v in sorted(per_function.items())}}


def argument_copies(outputs: list[str], examples: list[dict]) -> dict:
    """Of the expected arguments ``recoverable`` from the request (the ones copying alone can produce), the share
    the call wrote with the right value (strings after BFCL's normalisation), whatever its function name: the
    copying the AST match needs, visible before every argument of a call is right. Strings (cities, queries)
    and numbers (amounts, nights) apart; each a mean over languages."""
    from aetheris.tasks.toolcall import parse_call, standardize_string

    per_lang = {"string": defaultdict(list), "number": defaultdict(list)}
    for out, ex in zip(outputs, examples):
        call = parse_call(out)
        args = call["arguments"] if call else {}
        for key, want in ex["expected"]["arguments"].items():
            if not recoverable(want, ex["user"]) or re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(want)):
                continue  # dates need the numbers rearranged into ISO form: not a copy
            got = args.get(key)
            if isinstance(want, str):
                per_lang["string"][ex["lang"]].append(isinstance(got, str) and standardize_string(got) == standardize_string(want))
            else:
                per_lang["number"][ex["lang"]].append(not isinstance(got, bool) and got == want)
    return {kind: float(np.mean([np.mean(v) for v in langs.values()])) if langs else None
            for kind, langs in per_lang.items()}


def name_outcomes(outputs: list[str], examples: list[dict]) -> dict:
    """Where the greedy function names go: the share of calls naming the right tool, the other offered tool(s), a
    tool not offered at all, or no parsable call (pooled over examples). A name not offered means the call was
    written from the request alone, without reading the system turn's tool list."""
    from aetheris.tasks.toolcall import parse_call

    counts = dict.fromkeys(("right", "other_offered", "not_offered", "unparsed"), 0)
    for out, ex in zip(outputs, examples):
        call = parse_call(out)
        name = call["name"] if call else None
        counts["unparsed" if name is None else "right" if name == ex["expected"]["name"] else
               "other_offered" if name in {t["name"] for t in ex["tools"]} else "not_offered"] += 1
    return {k: v / len(examples) for k, v in counts.items()}


def name_choice(model, tokenizer, examples: list[dict], shuffled: bool = False) -> dict:
    """Teacher-forced tool choice: after the action's opening up to ``"tool_name": "``, the offered tool whose name
    the model gives the highest log-probability, scored against the expected one (mean over languages, and per
    function). It separates knowing which offered tool fits the request from writing an offered name at all.
    ``shuffled``: each example with another example's request (seeded), the chance level of this measure."""
    import torch

    from aetheris.tasks.toolcall import render_prompt

    users = [ex["user"] for ex in examples]
    if shuffled:
        np.random.default_rng(0).shuffle(users)
    opening = '<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "'
    per_lang, per_function = defaultdict(list), defaultdict(list)
    for ex, user in zip(examples, users):
        prompt = render_prompt(ex["tools"], user) + opening
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        scores = {}
        for tool in ex["tools"]:
            cont = tokenizer(prompt + tool["name"], add_special_tokens=False)["input_ids"][len(ids):]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids + cont])).logits[0].float().log_softmax(-1)
            scores[tool["name"]] = sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(cont))
        right = max(scores, key=scores.get) == ex["expected"]["name"]
        per_lang[ex["lang"]].append(right)
        per_function[ex["expected"]["name"]].append(right)
    return {"name": float(np.mean([np.mean(v) for v in per_lang.values()])),
            "per_function": {f: float(np.mean(v)) for f, v in sorted(per_function.items())}}


def doubled_rows(tokenizer, lines_per_language: int, seed: int = 0, half: int = 32) -> np.ndarray:
    """One row per language: the first ``half`` tokens of its first held-out corpus document (the split the
    teacher never trained on), written twice. (languages, 2 * half)."""
    from aetheris.data import split_heldout
    from aetheris.sources import load_documents

    docs = load_documents([{"type": "corpus", "max_lines_per_language": lines_per_language}], "all")
    _, val = split_heldout(docs, 0.05, seed=seed)
    rows = [ids[:half] * 2 for ids in (tokenizer(val[lang][0].text)["input_ids"] for lang in sorted(val))
            if len(ids) >= half]
    return np.array(rows)


def copy_probe(model, rows: np.ndarray) -> dict:
    """Mean next-token loss on the first and the second half of ``doubled_rows``: a model that copies in context
    (induction heads) predicts the repeated half far better than the first; one that cannot, no better."""
    import torch

    half = rows.shape[1] // 2
    ids = torch.as_tensor(rows)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]  # (rows, 2 * half - 1, V): position t predicts t + 1
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return {"first_half": float(nll[:, :half - 1].mean()), "second_half": float(nll[:, half:].mean())}


def score_toolcalls(model, tokenizer, per_language: int, tools_offered: int, max_new_tokens: int = 256) -> dict:
    from aetheris.evaluate import LM
    from aetheris.tasks.toolcall import score_examples, score_output
    from aetheris.toolgen import generate_examples

    examples = generate_examples("all", "test", per_language, tools_offered=tools_offered)
    scores = score_examples(LM(model, tokenizer, batch_size=32), examples, "toolcall held-out",
                            {"toolcall_max_new_tokens": max_new_tokens})
    per_lang = defaultdict(list)
    for out, ex in zip(scores.outputs, examples):
        per_lang[ex["lang"]].append(score_output(out, ex))
    means = {lang: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for lang, rows in per_lang.items()}
    overall = {k: float(np.mean([m[k] for m in means.values()])) for k in ("parsed", "name", "ast")}
    return {"overall": overall, "copied": argument_copies(scores.outputs, examples),
            "names": name_outcomes(scores.outputs, examples), "name_choice": name_choice(model, tokenizer, examples),
            "name_choice_shuffled": name_choice(model, tokenizer, examples, shuffled=True)["name"],
            "languages": len(means),
            "examples": len(examples),
            "copy_ceiling": copy_ceiling(examples),
            "samples": {ex["lang"]: out for out, ex in list(zip(scores.outputs, examples))[::per_language * 10]}}


def main(argv=None) -> int:
    from aetheris.config_io import apply_overrides, build
    from aetheris.nano_teacher import NanoTeacherConfig, train_nano_teacher

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--per-language", type=int, default=2, help="held-out tool-calling requests per language")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="generation cap per call (the demo eval's toolcall_max_new_tokens; 256 by default)")
    p.add_argument("--rescore", action="store_true",
                   help="score the teacher already saved in OUT (no training; its nano_teacher.json gives the settings)")
    a = p.parse_intermixed_args(argv)
    if a.rescore:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        saved = json.loads((Path(a.out) / "nano_teacher.json").read_text())["config"]
        model, tokenizer = AutoModelForCausalLM.from_pretrained(a.out).eval(), AutoTokenizer.from_pretrained(a.out)
        scores = score_toolcalls(model, tokenizer, a.per_language, saved["toolcall_tools_offered"], a.max_new_tokens)
        probe = copy_probe(model, doubled_rows(tokenizer, saved["lines_per_language"], saved["seed"]))
        print(json.dumps({k: scores[k] for k in ("overall", "copied", "names", "name_choice", "name_choice_shuffled",
                                                 "copy_ceiling")} | {"copy_probe": probe}))
        return 0
    cfg = build(NanoTeacherConfig, apply_overrides({}, a.overrides, NanoTeacherConfig))
    model, tokenizer = train_nano_teacher(a.out, cfg)
    report = json.loads((Path(a.out) / "nano_teacher.json").read_text())
    uniform = math.log(cfg.vocab_size)
    after_warmup = [r for r in report["history"] if r["step"] > cfg.warmup_steps]
    row = {"overrides": a.overrides, "seconds_train": report["seconds"], "uniform_loss": round(uniform, 3),
           "max_train_lm_loss_after_warmup": max(r["lm_loss"] for r in after_warmup),
           "max_heldout_loss_after_warmup": max((r["heldout_loss"] for r in after_warmup if "heldout_loss" in r),
                                                default=None),
           "heldout_loss_after": report["heldout_loss_after"],
           "final_chat_loss": report["history"][-1].get("chat_loss"),
           "copy_probe": copy_probe(model, doubled_rows(tokenizer, cfg.lines_per_language, cfg.seed)),
           "toolcall": score_toolcalls(model, tokenizer, a.per_language, cfg.toolcall_tools_offered, a.max_new_tokens)}
    (Path(a.out) / "recipe.json").write_text(json.dumps(row, indent=1, ensure_ascii=False), encoding="utf-8")
    print(json.dumps({k: v for k, v in row.items() if k != "toolcall"}
                     | {k: row["toolcall"][k] for k in ("copied", "names", "name_choice", "name_choice_shuffled")}
                     | {"toolcall": row["toolcall"]["overall"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
