"""Stage 3 data: conversations -> token rows whose labels keep assistant tokens only; sources; tool-call validity.

* ``encode_conversation``: renders with the one chat template (``aetheris.chat.render_messages``) message by
  message, and labels only what the model must generate in an assistant turn — the body after
  ``<|CHATBOT_TOKEN|>`` (``<|START_RESPONSE|>…<|END_RESPONSE|>`` and/or ``<|START_ACTION|>…<|END_ACTION|>``)
  and the closing ``<|END_OF_TURN_TOKEN|>``. System, user and tool-result turns, and the turn header
  itself, get -100 (the model's loss shifts labels, so label j is predicted at position j-1). Each piece
  starts and ends at a special token, so tokenising piece by piece gives the same ids as the whole text.
* ``check_conversation``: what makes a record unusable (no messages, unknown role, no assistant turn,
  a tool call whose arguments are not JSON, …). ``load_conversations`` reports each one with its record
  id through ``data.MalformedLog`` and skips it.
* Sources (``sft.sources`` in the distill config): ``toolgen`` (the generated multilingual tool-calling set,
  train templates only; ``languages``, ``per_language``, ``seed``, ``tools_offered``), ``jsonl`` (one conversation per line: ``{"id", "lang", "messages", "tools"?}``;
  the toolgen/toolcall-task format with ``user``/``expected`` is accepted too), ``xsid`` (xSID's
  validation split mapped to calls by ``tasks.toolcall.xsid_examples``; its test split stays for evaluation),
  ``hub`` (``datasets``: a hub id with ``name``/``config``/``split``/``streaming``/``limit``, or a local copy
  via ``path``; ``messages`` / ShareGPT ``conversations`` / xLAM ``query``+``answers`` / prompt-response
  columns, ``tools`` as a list or JSON text, language from ``lang`` or a ``lang``/``language_code`` column).
* ``SFTStream``: one conversation per row (cut at ``seq_len``, right-padded, padding never trained),
  languages sampled by temperature, resumable like ``data.PackedStream``.
* ``toolcall_validity``: greedy generation on held-out tool-call examples, scored by
  ``tasks.toolcall.score_output`` (parse, schema, name, exact, BFCL AST) plus exact match of the whole
  assistant turn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from aetheris.chat import CHATBOT, END_TURN, ROLES, START_TURN, render_messages
from aetheris.data import IGNORE_INDEX, MalformedLog, canonical_language, language_weights

# ----------------------------------------------------------------------------------------------
# One conversation


def check_conversation(record: Any) -> str | None:
    """Why a record cannot be trained on, or None when it is fine."""
    if not isinstance(record, dict):
        return "record is not a JSON object"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is not an object"
        if m.get("role") not in ROLES:
            return f"unknown role {m.get('role')!r} in message {i}"
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            return f"message {i} content is neither text nor a list of parts"
        for call in m.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                return f"tool call in message {i} has no function name"
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return f"tool call arguments in message {i} are not valid JSON"
            if not isinstance(args, dict):
                return f"tool call arguments in message {i} are not a JSON object"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        return "tools is not a list"
    return None


def encode_conversation(messages: list[dict], tools: list[dict] | None, tokenizer,
                        seq_len: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels (assistant-generated tokens kept, everything else -100) of one conversation."""
    pieces: list[tuple[str, bool]] = []  # (text, trained)
    before = ""
    for i, m in enumerate(messages):
        after = render_messages(messages[:i + 1], tools, add_generation_prompt=False)
        if not after.startswith(before):  # the renderer is a concatenation of turns; anything else is a bug
            raise AssertionError("chat template rendering is not incremental")
        piece = after[len(before):]
        header = START_TURN + CHATBOT
        if m["role"] == "assistant" and piece.startswith(header):
            pieces += [(header, False), (piece[len(header):], True)]
        else:
            pieces.append((piece, False))
        before = after
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        toks = tokenizer.encode(text, add_special_tokens=False)
        ids += toks
        labels += toks if trained else [IGNORE_INDEX] * len(toks)
    if seq_len is not None:
        ids, labels = ids[:seq_len], labels[:seq_len]
    return ids, labels


def record_messages(record: dict) -> list[dict]:
    """The toolgen / toolcall-task shape (``user`` + ``expected``) as messages; a ``messages`` record as is."""
    if "messages" in record:
        return record["messages"]
    call = record.get("expected") or {}
    return [{"role": "user", "content": record.get("user")},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "0", "type": "function",
                             "function": {"name": call.get("name"), "arguments": call.get("arguments", {})}}]}]


# ----------------------------------------------------------------------------------------------
# Sources


def load_conversations(spec: dict, log: MalformedLog, seed: int = 0) -> list[dict]:
    """Records ``{"id", "lang", "messages", "tools"}`` from one ``sft.sources`` entry; bad ones logged and skipped."""
    kind = spec.get("type")
    if kind == "toolgen":
        from aetheris.toolgen import generate_examples
        raw = generate_examples(spec.get("languages", "all"), split="train", per_language=spec.get("per_language", 40),
                                seed=spec.get("seed", seed), tools_offered=spec.get("tools_offered", 3))
        where = "toolgen"
    elif kind == "jsonl":
        path = Path(spec["path"])
        if not path.is_file():
            raise FileNotFoundError(f"sft source {path} does not exist")
        raw = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    log.add(f"{path}:{n}", f"line is not valid JSON ({err.msg})")
                    continue
                if isinstance(rec, dict):
                    rec.setdefault("id", f"{path.name}:{n}")
                    if "lang" not in rec and spec.get("lang"):
                        rec["lang"] = spec["lang"]
                raw.append(rec)
        where = str(path)
    elif kind == "xsid":
        raw = xsid_conversations(spec.get("split", "validation"), spec.get("languages"), spec.get("per_language"))
        where = "xsid"
    elif kind == "hub":
        raw = hub_conversations(spec, log)
        where = f"hub {spec.get('name') or spec.get('path')}"
    else:
        raise ValueError(f"sft source type {kind!r}: choose toolgen, jsonl, xsid or hub")
    out = []
    for i, rec in enumerate(raw):
        if isinstance(rec, dict) and "messages" not in rec and "expected" in rec:
            rec = {**rec, "messages": record_messages(rec)}
        rid = rec.get("id", i) if isinstance(rec, dict) else i
        reason = check_conversation(rec)
        if reason is None and not rec.get("lang"):
            reason = "no lang code (set it per record or as the source's lang)"
        if reason is None:
            try:
                rec["lang"] = canonical_language(str(rec["lang"]), where)
            except ValueError as err:
                reason = str(err)
        if reason is not None:
            log.add(f"{where} record {rid}", reason)
            continue
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------
# Hub datasets (and local copies of them)

# Speaker names of common chat datasets -> our roles (ShareGPT ``from``; Aya/Gemma ``model``; Cohere ``chatbot``).
ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
              "model": "assistant", "chatbot": "assistant", "bot": "assistant", "system": "system",
              "developer": "developer", "tool": "tool", "observation": "tool", "function_response": "tool",
              "ipython": "tool", "function_call": "assistant"}
# Instruction datasets without a message list: (prompt column, response column), tried in order.
PROMPT_RESPONSE = (("inputs", "targets"), ("instruction", "output"), ("prompt", "response"), ("prompt", "completion"),
                   ("question", "answer"))
HUB_KEYS = {"type", "name", "path", "config", "split", "streaming", "limit", "lang", "lang_field", "messages_field",
            "tools_field", "prompt_field", "response_field", "id_field"}


def open_dataset(spec: dict):
    """The records of a ``{type: hub}`` source through ``datasets``: a hub id (``name``, ``config``, ``split``,
    ``streaming`` — default on for the hub, so ``limit`` reads only the first rows), or a local copy
    (``path``: a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or JSON/JSONL/
    Parquet files or a glob)."""
    import datasets

    split = spec.get("split", "train")
    if spec.get("path"):
        path = Path(str(spec["path"]))
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{path} has splits {', '.join(ds)}; set split: to one of them")
                ds = ds[split]
            return ds
        from aetheris.data import _expand_files
        files = [str(f) for f in _expand_files(str(path), f"sft hub source {path}")]
        fmt = "parquet" if all(f.endswith(".parquet") for f in files) else "json"
        return datasets.load_dataset(fmt, data_files=files, split="train", streaming=bool(spec.get("streaming", False)))
    name = spec.get("name")
    if not name:
        raise ValueError(f"sft source {spec}: a hub source needs name: (a dataset id) or path: (a local copy)")
    config, streaming = spec.get("config"), bool(spec.get("streaming", True))
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as err:  # offline, gated, misspelt: say which and what to do
        raise FileNotFoundError(
            f"could not open hub dataset {name!r} (config {config!r}, split {split!r}): {err}. Offline, pass a local "
            "copy instead: {type: hub, path: FOLDER} (written by datasets' save_to_disk) or {type: hub, path: FILE} "
            "(JSON/JSONL/Parquet, same columns), or export the conversations to {type: jsonl, path: FILE}."
        ) from err


def _json_value(value, what: str):
    """A column that some datasets store as JSON text (tools, calls): parsed; ValueError naming it if broken."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} is a string but not valid JSON ({err.msg})") from None
    return value


def _call(name, arguments, index: int) -> dict:
    return {"id": str(index), "type": "function", "function": {"name": name, "arguments": arguments}}


def _message(m, i: int) -> dict:
    """One chat message in any common shape ({role, content} or ShareGPT {from, value}) -> ours."""
    if not isinstance(m, dict):
        raise ValueError(f"message {i} is not an object")
    speaker = m.get("role", m.get("from"))
    role = ROLE_NAMES.get(str(speaker).lower()) if speaker is not None else None
    if role is None:
        raise ValueError(f"unknown role {speaker!r} in message {i}")
    content = m.get("content", m.get("value"))
    if str(speaker).lower() == "function_call":  # glaive/ShareGPT: the call itself as JSON text
        call = _json_value(content, f"function_call in message {i}")
        calls = call if isinstance(call, list) else [call]
        return {"role": "assistant", "content": None,
                "tool_calls": [_call(c.get("name"), c.get("arguments", c.get("parameters", {})), j) for j, c in enumerate(calls)]}
    out = {"role": role, "content": content}
    if m.get("tool_calls"):  # OpenAI shape, or bare {name, arguments}; ids added where a dataset has none
        out["tool_calls"] = []
        for j, tc in enumerate(m["tool_calls"]):
            fn = tc.get("function", tc) if isinstance(tc, dict) else {}
            call = _call(fn.get("name"), fn.get("arguments", {}), j)
            call["id"] = str(tc.get("id") or j) if isinstance(tc, dict) else str(j)
            out["tool_calls"].append(call)
    if role == "tool":
        out["tool_call_id"] = m.get("tool_call_id", "0")
    return out


def hub_record(row: dict, spec: dict) -> dict:
    """A dataset row -> ``{"id", "lang", "messages", "tools"?}``. Shapes understood (columns auto-detected,
    or named with ``messages_field`` / ``prompt_field`` + ``response_field`` / ``tools_field``):

    * a message list — ``messages`` ({role, content}, OpenAI tool_calls) or ``conversations`` (ShareGPT
      {from, value}; ``function_call`` / ``observation`` turns become calls / tool results), plus ``tools``
      (a list, or JSON text) for tool-calling sets;
    * ``query`` + ``answers`` + ``tools`` (xLAM-style function calling: answers are the calls);
    * a prompt/response pair (Aya ``inputs``/``targets``, Alpaca ``instruction``/``output``, ``prompt``/``response``).
    ValueError says what is missing or malformed.
    """
    tools = row.get(spec.get("tools_field", "tools"))
    tools = _json_value(tools, "tools") if tools not in (None, "", []) else None
    field = spec.get("messages_field") or next((f for f in ("messages", "conversations", "conversation") if f in row), None)
    if field is not None:
        raw = row.get(field)
        if not isinstance(raw, list):
            raise ValueError(f"column {field!r} is not a list of messages")
        messages = [_message(m, i) for i, m in enumerate(raw)]
    elif "query" in row and "answers" in row:
        answers = _json_value(row["answers"], "answers")
        if not isinstance(answers, list):
            raise ValueError("answers is not a list of calls")
        messages = [{"role": "user", "content": row["query"]},
                    {"role": "assistant", "content": None,
                     "tool_calls": [_call(c.get("name"), c.get("arguments", {}), j) for j, c in enumerate(answers)]}]
    else:
        pairs = [(spec["prompt_field"], spec["response_field"])] if spec.get("prompt_field") else PROMPT_RESPONSE
        pair = next(((p, r) for p, r in pairs if p in row and r in row), None)
        if pair is None:
            raise ValueError(f"no conversation columns among {sorted(row)}: set messages_field, or prompt_field and "
                             "response_field")
        prompt = row[pair[0]] if pair[0] != "instruction" or not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row[pair[1]]}]
    system = row.get("system")
    if isinstance(system, str) and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]  # a separate system column
    lang = spec.get("lang")
    if lang is None:
        lang_field = spec.get("lang_field") or next((f for f in ("lang", "language_code", "language") if row.get(f)), None)
        lang = row.get(lang_field) if lang_field else None
    record = {"messages": messages, "lang": lang}
    if tools is not None:
        record["tools"] = tools
    return record


def hub_conversations(spec: dict, log: MalformedLog) -> list[dict]:
    """Conversations from a hub dataset (or its local copy), ``limit`` rows at most; rows that cannot be
    mapped are reported with their id and skipped."""
    unknown = set(spec) - HUB_KEYS
    if unknown:
        raise ValueError(f"sft hub source: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(HUB_KEYS))}")
    ds = open_dataset(spec)
    limit, id_field = spec.get("limit"), spec.get("id_field", "id")
    where = spec.get("name") or spec.get("path")
    out = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        rid = row.get(id_field) if isinstance(row, dict) and row.get(id_field) is not None else i
        try:
            record = hub_record(row, spec)
        except (ValueError, AttributeError, TypeError) as err:
            log.add(f"hub {where} record {rid}", str(err))
            continue
        out.append({"id": f"{where}#{rid}", **record})
    return out


def xsid_conversations(split: str = "validation", languages=None, per_language: int | None = None) -> list[dict]:
    """xSID as tool-call records through ``tasks.toolcall.xsid_examples`` (its intent -> function and
    slot -> argument mapping). ``split=test`` is the evaluation set; train on ``validation`` (the only
    other split shipped). ``per_language`` keeps the first N usable examples of each language."""
    from aetheris.tasks import toolcall

    out = []
    for lang in toolcall.XSID_FILES:
        if languages and lang not in languages:
            continue
        for ex in toolcall.xsid_examples(lang, split)[:per_language]:
            out.append({**ex, "id": f"xsid-{lang}-{split}-{ex['id']}"})
    return out


# ----------------------------------------------------------------------------------------------
# Stream


class SFTStream:
    """One conversation per row, languages sampled p_l ∝ n_l^(1/temperature); resumable."""

    def __init__(self, rows: dict[str, list[tuple[list[int], list[int]]]], seq_len: int, *, temperature: float = 1.0,
                 seed: int = 0, pad_id: int = 0):
        rows = {lang: r for lang, r in rows.items() if r}
        if not rows:
            raise ValueError("no SFT conversations left after filtering: check sft.sources")
        self.rows, self.seq_len, self.seed, self.pad_id = rows, seq_len, seed, pad_id
        self.languages = sorted(rows)
        self.sizes = {lang: len(r) for lang, r in rows.items()}
        w = language_weights(self.sizes, temperature)
        self.probs = np.array([w[lang] for lang in self.languages])
        self.rng = np.random.default_rng(seed)
        self.cursor = {lang: 0 for lang in self.languages}
        self.epoch = {lang: 0 for lang in self.languages}

    def _row(self, li: int) -> dict[str, np.ndarray]:
        lang = self.languages[li]
        perm = np.random.default_rng([self.seed, li, self.epoch[lang]]).permutation(len(self.rows[lang]))
        ids, labels = self.rows[lang][int(perm[self.cursor[lang]])]
        self.cursor[lang] += 1
        if self.cursor[lang] == len(self.rows[lang]):
            self.cursor[lang], self.epoch[lang] = 0, self.epoch[lang] + 1
        return pad_row(ids, labels, self.seq_len, self.pad_id, li)

    def next_batch(self, n: int) -> dict[str, np.ndarray]:
        rows = [self._row(int(self.rng.choice(len(self.languages), p=self.probs))) for _ in range(n)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "cursor": dict(self.cursor), "epoch": dict(self.epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.cursor, self.epoch = dict(state["cursor"]), dict(state["epoch"])


def pad_row(ids: list[int], labels: list[int], seq_len: int, pad_id: int, lang_index: int = 0) -> dict[str, np.ndarray]:
    n = min(len(ids), seq_len)
    row = {"input_ids": np.full(seq_len, pad_id, dtype=np.int64), "labels": np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
           "doc_ids": np.zeros(seq_len, dtype=np.int64), "lang_ids": np.full(seq_len, lang_index, dtype=np.int64),
           "attention_mask": np.zeros(seq_len, dtype=np.int64)}
    row["input_ids"][:n], row["labels"][:n] = ids[:n], labels[:n]
    row["doc_ids"][n:] = 1  # padding is its own document
    row["attention_mask"][:n] = 1  # padding counts in no loss and no MoE statistic
    return row


def build_sft_data(sources: list[dict], tokenizer, seq_len: int, *, temperature: float = 1.0, seed: int = 0,
                   log=print, val_per_language: int = 2):
    """``train.TrainData`` for stage 3: the stream and a few held-out conversations per language (the loop's
    validation CE is then on assistant tokens only)."""
    from aetheris.train import TrainData

    malformed = MalformedLog()
    records = [r for spec in sources for r in load_conversations(spec, malformed, seed)]
    by_lang: dict[str, list] = {}
    for rec in records:
        ids, labels = encode_conversation(rec["messages"], rec.get("tools"), tokenizer, seq_len)
        if all(lab == IGNORE_INDEX for lab in labels):
            malformed.add(f"record {rec.get('id')}", f"no assistant token within sft.seq_len={seq_len} (raise it)")
            continue
        by_lang.setdefault(rec["lang"], []).append((ids, labels))
    if malformed.total:
        log(malformed.summary())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    val = {}
    for lang, rows in sorted(by_lang.items()):
        if len(rows) > 2 * val_per_language and val_per_language:
            held, by_lang[lang] = rows[:val_per_language], rows[val_per_language:]
            padded = [pad_row(i, lab, seq_len, pad) for i, lab in held]
            val[lang] = {k: np.stack([p[k] for p in padded]) for k in ("input_ids", "labels", "doc_ids", "attention_mask")}
    stream = SFTStream(by_lang, seq_len, temperature=temperature, seed=seed, pad_id=pad)
    return TrainData(stream, val, malformed)


# ----------------------------------------------------------------------------------------------
# Tool-call validity


def toolcall_loss(model, tokenizer, examples: list[dict]) -> float:
    """Teacher-forced cross-entropy (nats per token) of the gold assistant turn of each example, given its
    prompt, over all examples' assistant tokens.

    The smooth companion of ``toolcall_validity``: a small student's greedy output may still miss the format
    by one token after SFT (its validity then stays 0) while the held-out loss of the right call has fallen.
    """
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for ex in examples:
            ids, labels = encode_conversation(record_messages(ex), ex.get("tools"), tokenizer)
            n = sum(lab != IGNORE_INDEX for lab in labels[1:])                 # tokens the shifted loss averages
            if n:
                out = model(torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device))
                total, count = total + float(out.ce_loss) * n, count + n
    model.train(was_training)
    return total / max(count, 1)


def toolcall_validity(model, tokenizer, examples: list[dict], max_new_tokens: int = 96, batch_size: int = 32) -> dict:
    """Greedy generation after the chat template's generation prompt; mean scores overall and per language."""
    import torch

    from aetheris.chat import END_ACTION, EOS, render_assistant
    from aetheris.generation import generate
    from aetheris.tasks.toolcall import score_output

    stops = [tokenizer.convert_tokens_to_ids(t) for t in (END_ACTION, END_TURN, EOS)]
    rows = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            prompts = [tokenizer.encode(render_messages(record_messages(ex)[:1], ex["tools"]), add_special_tokens=False)
                       for ex in chunk]
            results = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                               stop_token_ids=stops)
            for ex, res in zip(chunk, results):
                text = tokenizer.decode(res.token_ids, skip_special_tokens=False)
                scores = score_output(text, ex)
                gold = render_assistant(record_messages(ex)[1])
                scores["turn_exact"] = float(text.strip() + END_ACTION == gold or text.strip() == gold)
                rows.append((ex["lang"], scores))
    model.train(was_training)
    keys = ["parsed", "schema_valid", "name", "exact", "ast", "turn_exact"]

    def mean(rs):
        return {k: sum(r[k] for r in rs) / max(len(rs), 1) for k in keys}

    per_lang: dict[str, list] = {}
    for lang, r in rows:
        per_lang.setdefault(lang, []).append(r)
    return {"overall": mean([r for _, r in rows]), "per_language": {lang: mean(rs) for lang, rs in per_lang.items()},
            "n": len(rows)}
