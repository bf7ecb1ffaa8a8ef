"""Measure one nano-teacher recipe: train it (``aetheris.nano_teacher``, the demo's own code) and score it.

    python experiments/teacher_recipes.py runs/recipes/r1 [--per-language 2] [key=value ...]   # NanoTeacherConfig fields

Prints and writes ``OUT/recipe.json``: the settings, wall time, the highest training and held-out LM loss after
warmup (against the uniform loss ln V), and greedy tool calls on the generated set's *held-out* templates in all
70 languages -- parsed / function name / BFCL AST match, each a mean over languages, as the demo's eval scores
them (``tasks.toolcall.score_examples``). The table of recipes tried is in docs/DISTILLATION.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


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
    return {"overall": overall, "languages": len(means), "examples": len(examples),
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
    a = p.parse_intermixed_args(argv)
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
           "toolcall": score_toolcalls(model, tokenizer, a.per_language, cfg.toolcall_tools_offered, a.max_new_tokens)}
    (Path(a.out) / "recipe.json").write_text(json.dumps(row, indent=1, ensure_ascii=False), encoding="utf-8")
    print(json.dumps({k: v for k, v in row.items() if k != "toolcall"} | {"toolcall": row["toolcall"]["overall"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
