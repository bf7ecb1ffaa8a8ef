"""``aetheris eval``: run the tasks on one model and write ``DIR/results.json``.

Holds the model adapter (``LM``: any HF-loadable causal LM, Aetheris checkpoints included, through
``AutoModelForCausalLM`` + ``AutoTokenizer``) and the per-task, per-language result cache.

- ``LM.loglikelihood`` follows lm-evaluation-harness's ``HFLM`` (``_encode_pair`` and
  ``_loglikelihood_tokens``): trailing spaces of the context move to the continuation; the context is
  encoded with the tokenizer's default special tokens (its BOS); continuation = ``whole[len(ctx):]``;
  inputs are left-truncated to the model length; the score is the sum of continuation log-probs.
- ``LM.generate_until`` is greedy with the harness's stop rule: decode the new tokens (special tokens
  skipped) and cut at the first stop string; generation also stops early once every row hit a stop.
- Batches are right-padded for scoring (causal models never look right, so no mask is needed) and
  left-padded with an attention mask for generation.
- Cache: ``DIR/cache/<task>/<lang>.json`` holds each finished (task, language) with a key made of the
  model fingerprint, a hash of the data files, the task settings and ``--limit``. A rerun resumes from
  it; a cache written for a different model, data or settings is an error (or recomputed with
  ``--overwrite``), never silently reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers

from aetheris import hf
from aetheris.generation import left_pad
from aetheris.progress import progress_bar
from aetheris.tasks import TASK_NAMES, Scores, get_task, select_languages
from aetheris.tasks.perplexity import check_same_tokenizer, recorded_training

LOGSOFTMAX_DTYPES = ("float32", "model", "bfloat16", "float16")
CACHE_VERSION = 2  # 2: mGSM prompts/stops/filters equal to lm-eval 0.4.13 (1 differed)
RESULTS_FORMAT = "aetheris-eval/1"


# ---------------------------------------------------------------------------------------------------
# Model adapter


def model_fingerprint(name_or_path: str) -> str:
    """Cheap identity of a model folder: config + tokenizer contents, weight file sizes and their
    first/last MiB. A hub name without a local folder is identified by its name."""
    path = Path(name_or_path)
    if not path.is_dir():
        return "name:" + str(name_or_path)
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        h.update(f.name.encode())
        if f.suffix in (".json", ".txt", ".model", ".jinja"):
            h.update(f.read_bytes())
        else:
            size = f.stat().st_size
            h.update(str(size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > (2 << 20):
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return "sha256:" + h.hexdigest()[:32]


class LM:
    """A causal LM + tokenizer behind the three calls the tasks need."""

    def __init__(self, model, tokenizer, name: str = "model", batch_size: int = 8, max_length: int | None = None,
                 logsoftmax_dtype: str = "float32"):
        if logsoftmax_dtype not in LOGSOFTMAX_DTYPES:
            raise ValueError(f"logsoftmax dtype {logsoftmax_dtype!r}: choose one of {', '.join(LOGSOFTMAX_DTYPES)}")
        self.logsoftmax_dtype = logsoftmax_dtype
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = max(1, int(batch_size))
        self.device = next(model.parameters()).device
        cfg_len = getattr(model.config, "max_position_embeddings", None)
        self.max_length = int(max_length or cfg_len or 8192)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ends = [tokenizer.eos_token_id]
        for tok in ("<|END_OF_TURN_TOKEN|>", "<|END_RESPONSE|>"):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
                ends.append(tid)
        self.end_ids = [t for t in dict.fromkeys(ends) if t is not None]
        self._torch = torch
        self.fingerprint = "unknown"

    @classmethod
    def load(cls, name_or_path: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
             logsoftmax_dtype: str = "float32") -> "LM":
        """Load with a clear error (before any evaluation work) when the model cannot be loaded."""
        hf.register()
        path = Path(name_or_path).expanduser()
        if path.exists() and not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model {name_or_path!r}: no config.json in {path.resolve()}. Pass a folder saved with "
                "save_pretrained (an Aetheris checkpoint or any HF causal LM) or a hub name (needs network)."
            )
        if not path.exists() and not _looks_like_hub_id(name_or_path):
            raise FileNotFoundError(f"model folder {name_or_path!r} does not exist (and is not a hub name like org/model)")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        else:
            torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
            model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
        except (OSError, ValueError, KeyError) as err:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            hint = " (HF_HUB_OFFLINE=1: only local folders and cached hub models can be loaded)" if offline else ""
            raise ValueError(f"could not load model {name_or_path!r}{hint}: {err}") from err
        lm = cls(model.to(device), tokenizer, name=str(name_or_path), batch_size=batch_size,
                 logsoftmax_dtype=logsoftmax_dtype)
        lm.fingerprint = model_fingerprint(name_or_path)
        return lm

    # -- tokenisation helpers

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            return [self.prefix_id], self.encode(continuation, special=False)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    @property
    def numerics(self) -> dict:
        """What the scores' arithmetic depends on besides the weights (part of the cache key)."""
        return {"dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "logsoftmax_dtype": self.logsoftmax_dtype}

    def _log_softmax(self, logits):
        """log-softmax in the chosen dtype: float32 (default), the logits' own dtype (``model``: what
        lm-eval's HFLM does unless given ``softmax_dtype``), or an explicit one."""
        torch = self._torch
        if self.logsoftmax_dtype == "model":
            return torch.log_softmax(logits, dim=-1)
        return torch.log_softmax(logits, dim=-1, dtype=getattr(torch, self.logsoftmax_dtype))

    def logits(self, batch_ids: list[list[int]], native: bool = False):
        """Logits (B, T, V) of right-padded rows (causal: padding after a row changes none of its logits);
        float32 unless ``native``."""
        torch = self._torch
        width = max(len(r) for r in batch_ids)
        ids = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in batch_ids], device=self.device)
        with torch.no_grad():
            logits = self.model(ids).logits
        return logits if native else logits.float()

    # -- the three calls

    def loglikelihood(self, requests: list[tuple[str, str]], desc: str = "loglikelihood") -> list[float]:
        """Sum of log p(continuation | context) per request, as lm-evaluation-harness computes it."""
        torch = self._torch
        encoded = []
        for ctx, cont in requests:
            ctx_ids, cont_ids = self._encode_pair(ctx, cont)
            inp = (ctx_ids + cont_ids)[-(self.max_length + 1):][:-1]
            encoded.append((inp, cont_ids))
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        out = [0.0] * len(encoded)
        for start in _progress(range(0, len(order), self.batch_size), desc, total_items=len(order), step=self.batch_size):
            idx = order[start:start + self.batch_size]
            logits = self.logits([encoded[i][0] for i in idx], native=True)
            for row, i in enumerate(idx):
                inp, cont = encoded[i]
                sel = logits[row, len(inp) - len(cont):len(inp)]  # (len(cont), V)
                logp = self._log_softmax(sel)
                # summed in logp's dtype, then to Python float: the harness's arithmetic
                out[i] = float(logp.gather(1, torch.tensor(cont, device=logp.device)[:, None]).sum())
        return out

    def token_logprobs(self, id_lists: list[list[int]], desc: str = "scoring") -> list[list[float]]:
        """log p(ids[t] | ids[:t]) for t >= 1 of each sequence (the first id is the conditioning prefix)."""
        torch = self._torch
        order = sorted(range(len(id_lists)), key=lambda i: -len(id_lists[i]))
        out: list = [None] * len(id_lists)
        for start in _progress(range(0, len(order), self.batch_size), desc, total_items=len(order), step=self.batch_size):
            idx = order[start:start + self.batch_size]
            logits = self.logits([id_lists[i][: self.max_length] for i in idx], native=True)
            for row, i in enumerate(idx):
                ids = id_lists[i][: self.max_length]
                logp = self._log_softmax(logits[row, : len(ids) - 1])
                out[i] = logp.gather(1, torch.tensor(ids[1:], device=logp.device)[:, None])[:, 0].tolist()
        return out

    def generate_until(self, prompts: list[str], stops: list[str], max_new_tokens: int = 256,
                       desc: str = "generating", skip_special_tokens: bool = True) -> list[str]:
        """Greedy continuations, each cut at the first stop string (harness ``generate_until``).
        ``skip_special_tokens=False`` keeps markers such as ``<|START_ACTION|>`` in the text."""
        torch = self._torch

        encoded = [self.encode(p)[-(self.max_length - max_new_tokens):] for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        out = [""] * len(prompts)
        hf_generate = type(self.model).generate is transformers.GenerationMixin.generate
        for start in _progress(range(0, len(order), self.batch_size), desc, total_items=len(order), step=self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, mask = left_pad([encoded[i] for i in idx], self.pad_id, self.device)
            width = ids.shape[1]
            kwargs = dict(attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=self.end_ids, pad_token_id=self.pad_id)
            if hf_generate:
                kwargs["stopping_criteria"] = transformers.StoppingCriteriaList(
                    [_StopOnStrings(self.tokenizer, stops, width, skip_special_tokens)])
            with torch.no_grad():
                gen = self.model.generate(ids, **kwargs)
            for row, i in enumerate(idx):
                new = gen[row, width:].tolist()
                out[i] = cut_at_stops(self._decode_new(new, skip_special_tokens), stops)
        return out


    def _decode_new(self, ids: list[int], skip_special_tokens: bool) -> str:
        if not skip_special_tokens:  # padding after an early stop is not text
            while ids and ids[-1] == self.pad_id:
                ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def cut_at_stops(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


class _StopOnStrings:
    """Per-row stop for HF ``generate``: a row is done once its decoded new text contains a stop string."""

    def __init__(self, tokenizer, stops: list[str], prompt_len: int, skip_special_tokens: bool = True):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len
        self.skip = skip_special_tokens

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        for row in input_ids[:, self.prompt_len:].tolist():
            text = self.tokenizer.decode(row, skip_special_tokens=self.skip)
            done.append(any(s in text for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _progress(iterable, desc: str, total_items: int, step: int):
    """Batches with a progress bar counted in examples (whole lines, ~10 % apart, when stderr is a log file)."""
    bar = progress_bar(total=total_items, desc=desc, unit="ex", leave=False)
    for item in iterable:
        yield item
        bar.update(min(step, total_items - bar.n))
    bar.close()


# ---------------------------------------------------------------------------------------------------
# Cache and results


def _hash_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        h.update(Path(p).read_bytes())
    return "sha256:" + h.hexdigest()[:32]


def _task_settings(task: str, options: dict, limit) -> dict:
    prefix = {"xcopa_fixed": "xcopa", "ppl": "ppl"}.get(task, task) + "_"
    settings = {k: v for k, v in sorted(options.items())
                if k.startswith(prefix) or (task == "bfcl" and k == "toolcall_max_new_tokens")}
    settings["limit"] = limit
    return settings


def _describe_mismatch(old: dict, new: dict) -> str:
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: cached {old.get(k)!r} vs now {new.get(k)!r}" for k in diffs)


def evaluate(lm: LM, tasks: list[str], output: Path, languages: list[str] | None = None, limit: int | None = None,
             options: dict | None = None, overwrite: bool = False, teacher: LM | None = None,
             plan: list | None = None) -> dict:
    """Run (or resume) the tasks and write ``output/results.json``; returns the results dict."""
    options = dict(options or {})
    plan = plan or make_plan(tasks, languages, options)
    output.mkdir(parents=True, exist_ok=True)
    all_results: dict[str, dict] = {}
    for task, module, task_options, lang, files in plan:
        key = {
            "version": CACHE_VERSION,
            "model": lm.fingerprint,
            "data": _hash_files(files),
            "settings": _task_settings(task, task_options, limit),
            "numerics": lm.numerics,
        }
        if task == "ppl" and teacher is not None:
            key["teacher"] = teacher.fingerprint
        cache = output / "cache" / task / f"{lang}.json"
        scores = None
        if cache.exists() and not overwrite:
            cached = json.loads(cache.read_text(encoding="utf-8"))
            if cached["key"] != key:
                raise ValueError(
                    f"{cache} was computed for a different model, data or settings "
                    f"({_describe_mismatch(cached['key'], key)}). Use a fresh --output folder, or --overwrite to recompute."
                )
            scores = {name: Scores.from_dict(d) for name, d in cached["results"].items()}
            print(f"[cached] {task} {lang}", file=sys.stderr)
        if scores is None:
            t0 = time.time()
            if task == "ppl":
                task_options = {**task_options, "teacher": teacher}
            scores = module.run(lm, lang, task_options, limit)
            cache.parent.mkdir(parents=True, exist_ok=True)
            payload = {"key": key, "seconds": round(time.time() - t0, 2),
                       "results": {name: s.to_dict(with_outputs=True) for name, s in scores.items()}}
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
            tmp.replace(cache)  # atomic: an interrupted run never leaves half a cache file
            summary = ", ".join(f"{n} {s.score:.4f}" for n, s in scores.items())
            print(f"[done] {task} {lang}: {summary} (n={next(iter(scores.values())).n}, {time.time() - t0:.1f}s)",
                  file=sys.stderr)
        for name, s in scores.items():
            entry = all_results.setdefault(name, {"metric": s.metric, "higher_is_better": s.higher_is_better,
                                                  "languages": {}})
            entry["languages"][lang] = s.to_dict()

    results = {
        "format": RESULTS_FORMAT,
        "model": {"name": lm.name, "fingerprint": lm.fingerprint},
        "teacher": {"name": teacher.name, "fingerprint": teacher.fingerprint} if teacher is not None else None,
        "limit": limit,
        "options": {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "tasks": all_results,
    }
    path = output / "results.json"
    if path.exists() and not overwrite:  # keep tasks from earlier runs of the same model
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("model", {}).get("fingerprint") == lm.fingerprint:
            results["tasks"] = {**old.get("tasks", {}), **all_results}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)
    return results


def make_plan(tasks: list[str], languages: list[str] | None, options: dict) -> list:
    """(task, module, options, lang, data files) for every unit of work; checks names and data first."""
    if not tasks:
        raise ValueError(f"no task given; valid tasks: {', '.join(TASK_NAMES)}")
    plan = []
    covered = set()
    for task in tasks:
        module, extra = get_task(task)
        task_options = {**options, **extra}
        available = module.languages(task_options)
        covered.update(c.lower() for c in available)
        chosen = [c for c in available if not languages or c.lower() in {x.lower() for x in languages}]
        for lang in chosen:
            plan.append((task, module, task_options, lang, module.data_files(lang, task_options)))
    if languages:
        unknown = [c for c in languages if c.lower() not in covered]
        if unknown:
            select_languages(unknown[:1], sorted(covered), "/".join(tasks))  # raises with the valid codes
    if not plan:
        raise ValueError("nothing to evaluate: the chosen languages are not covered by the chosen tasks")
    return plan


# ---------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model folder (Aetheris checkpoint or any HF causal LM) or hub name")
    parser.add_argument("--tasks", default="xcopa,mgsm,toolcall,ppl", help=f"comma-separated, from: {', '.join(TASK_NAMES)}")
    parser.add_argument("--output", required=True, help="folder for results.json and the per-language cache")
    parser.add_argument("--languages", default=None, help="comma-separated language codes (default: all each task covers)")
    parser.add_argument("--limit", type=int, default=None, help="at most N examples per language (quick runs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--logsoftmax-dtype", default="float32", choices=list(LOGSOFTMAX_DTYPES),
                        help="dtype of the log-softmax behind log-likelihoods and bits per byte: float32 (default), "
                             "model = the logits' own dtype, as lm-eval's hf model does by default (for bf16 models "
                             "scored the harness's way), or bfloat16/float16")
    parser.add_argument("--overwrite", action="store_true", help="recompute cached results instead of resuming")
    parser.add_argument("--mgsm-mode", default="native_cot", choices=["native_cot", "direct", "en_cot"],
                        help="the harness's mgsm_native_cot_* / mgsm_direct_* / mgsm_en_cot_* prompts")
    parser.add_argument("--mgsm-shots", type=int, default=8, help="few-shot exemplars (0-8) before each mGSM question")
    parser.add_argument("--toolcall-file", default=None,
                        help="JSONL of extra tool-calling examples {id, lang, tools, user, expected} (e.g. the generated 70-language set)")
    parser.add_argument("--toolcall-xsid", action=argparse.BooleanOptionalAction, default=True,
                        help="score the xSID tool-calling sets (13 languages, 16 schemas per prompt); "
                             "--no-toolcall-xsid keeps only --toolcall-file")
    parser.add_argument("--toolcall-max-new-tokens", type=int, default=None,
                        help="generation cap per tool-calling request (default 256; a call to these schemas needs < 100)")
    parser.add_argument("--bfcl-dir", default=None,
                        help="folder with BFCL's BFCL_v4_simple_python.json, BFCL_v4_multiple.json and possible_answer/ "
                             "(default: the data of the installed bfcl-eval package)")
    parser.add_argument("--ppl-max-sentences", type=int, default=None,
                        help="sentences per language for perplexity (default: all; --limit also caps it)")
    parser.add_argument("--ppl-start", type=int, default=0,
                        help="score ppl sentences from index N on (e.g. past the first lines a model trained on)")
    parser.add_argument("--ppl-split", default="heldout", choices=["heldout", "all"],
                        help="heldout: only documents that training holds out (same ids and rule as aetheris.data's "
                             "split); all: every sentence (for models that never trained on this corpus)")
    parser.add_argument("--ppl-seed", type=int, default=None,
                        help="the training run's seed for --ppl-split heldout (default: the checkpoint's recorded seed, else 0)")
    parser.add_argument("--ppl-val-fraction", type=float, default=None,
                        help="the training run's data.val_fraction (default: the checkpoint's recorded value, else 0.05)")
    parser.add_argument("--teacher", default=None,
                        help="teacher model for per-token KL(teacher||student) in the ppl task (tokenizers must match)")


def options_from_args(args) -> dict:
    return {
        "mgsm_mode": args.mgsm_mode,
        "mgsm_shots": args.mgsm_shots,
        "toolcall_file": str(Path(args.toolcall_file).resolve()) if args.toolcall_file else None,
        "toolcall_xsid": args.toolcall_xsid,
        "toolcall_max_new_tokens": args.toolcall_max_new_tokens,
        "bfcl_dir": str(Path(args.bfcl_dir).resolve()) if args.bfcl_dir else None,
        "ppl_max_sentences": args.ppl_max_sentences,
        "ppl_start": args.ppl_start,
        "ppl_split": args.ppl_split,
        "ppl_seed": args.ppl_seed,
        "ppl_val_fraction": args.ppl_val_fraction,
    }


def run(args) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    languages = [c.strip() for c in args.languages.split(",")] if args.languages else None
    options = options_from_args(args)
    if "ppl" in tasks:
        # The checkpoint's own training data: its split is the default held-out split, and scored
        # sentences are checked against it (a leak stops the run before anything is cached).
        recorded = recorded_training(args.model)
        if recorded is not None:
            options["ppl_training"] = recorded
            options["ppl_seed"] = recorded["seed"] if options["ppl_seed"] is None else options["ppl_seed"]
            if options["ppl_val_fraction"] is None:
                options["ppl_val_fraction"] = recorded["val_fraction"]
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be a positive number of examples per language")
    plan = make_plan(tasks, languages, options)  # names and data files are checked before any model loads
    lm = LM.load(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                 logsoftmax_dtype=args.logsoftmax_dtype)
    teacher = None
    if args.teacher:
        teacher = LM.load(args.teacher, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                          logsoftmax_dtype=args.logsoftmax_dtype)

        check_same_tokenizer(teacher, lm)
    results = evaluate(lm, tasks, Path(args.output), languages, args.limit, options, args.overwrite, teacher, plan)
    print(f"wrote {Path(args.output) / 'results.json'}")
    for name, entry in results["tasks"].items():
        scores = [v["score"] for v in entry["languages"].values()]
        print(f"  {name:>16}: {len(scores)} languages, mean {entry['metric']} {sum(scores) / len(scores):.4f}")
    return 0
