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
* Sources (``sft.sources`` in the distill config; typed in ``aetheris.sources``): ``toolgen`` (the generated
  multilingual tool-calling set, train templates only; ``languages``, ``per_language``, ``seed``, ``tools_offered``),
  ``jsonl`` (one conversation per line: ``{"id", "lang", "messages", "tools"?}``; the toolgen/toolcall-task format
  with ``user``/``expected`` is accepted too), ``xsid`` (xSID's validation split mapped to calls by
  ``tasks.toolcall.xsid_examples``; its test split stays for evaluation), ``hub`` (``datasets``: a hub id with
  ``name``/``config``/``split``/``streaming``/``limit``, or a local copy via ``path``; ``messages`` / ShareGPT
  ``conversations`` / xLAM ``query``+``answers`` / prompt-response columns, ``tools`` as a list or JSON text,
  language from ``lang`` or a ``lang``/``language_code`` column).
* ``SFTStream``: one conversation per row (cut at ``seq_len``, right-padded, padding never trained),
  languages drawn by the same ``data.LanguageSampler`` as ``data.PackedStream``; resumable.

The tool-call scores of a model on held-out examples (validity, loss of the gold call) are evaluation:
``tasks.toolcall.toolcall_validity`` / ``toolcall_loss``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from aetheris.chat import CHATBOT, ROLES, START_TURN, render_messages
from aetheris.data import LanguageSampler, TrainData
from aetheris.model import IGNORE_INDEX
from aetheris.sources import (
    ChatHubSource,
    ChatJsonlSource,
    MalformedLog,
    SFTSource,
    ToolgenSource,
    XsidSource,
    canonical_language,
    open_dataset,
    parse_sources,
)
from aetheris.toolgen import generate_examples

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


def load_conversations(spec, log: MalformedLog, seed: int = 0) -> list[dict]:
    """Records ``{"id", "lang", "messages", "tools"}`` from one ``sft.sources`` entry (an ``SFTSource`` or its
    dict); bad ones logged and skipped."""
    (src,) = parse_sources([spec], SFTSource, "sft.sources") if isinstance(spec, dict) else (spec,)
    if isinstance(src, ToolgenSource):
        raw = generate_examples(src.languages, split="train", per_language=src.per_language,
                                seed=seed if src.seed is None else src.seed, tools_offered=src.tools_offered,
                                frame_dropout=src.frame_dropout, extra_frames=src.extra_frames)
        where = "toolgen"
    elif isinstance(src, ChatJsonlSource):
        path = Path(src.path)
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
                    if "lang" not in rec and src.lang:
                        rec["lang"] = src.lang
                raw.append(rec)
        where = str(path)
    elif isinstance(src, XsidSource):
        raw = xsid_conversations(src.split, src.languages, src.per_language)
        where = "xsid"
    else:
        raw = hub_conversations(src, log)
        where = f"hub {src.name or src.path}"
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


def hub_record(row: dict, spec: ChatHubSource) -> dict:
    """A dataset row -> ``{"id", "lang", "messages", "tools"?}``. Shapes understood (columns auto-detected,
    or named with ``messages_field`` / ``prompt_field`` + ``response_field`` / ``tools_field``):

    * a message list — ``messages`` ({role, content}, OpenAI tool_calls) or ``conversations`` (ShareGPT
      {from, value}; ``function_call`` / ``observation`` turns become calls / tool results), plus ``tools``
      (a list, or JSON text) for tool-calling sets;
    * ``query`` + ``answers`` + ``tools`` (xLAM-style function calling: answers are the calls);
    * a prompt/response pair (Aya ``inputs``/``targets``, Alpaca ``instruction``/``output``, ``prompt``/``response``).
    ValueError says what is missing or malformed.
    """
    tools = row.get(spec.tools_field)
    tools = _json_value(tools, "tools") if tools not in (None, "", []) else None
    field = spec.messages_field or next((f for f in ("messages", "conversations", "conversation") if f in row), None)
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
        pairs = [(spec.prompt_field, spec.response_field)] if spec.prompt_field else PROMPT_RESPONSE
        pair = next(((p, r) for p, r in pairs if p in row and r in row), None)
        if pair is None:
            raise ValueError(f"no conversation columns among {sorted(row)}: set messages_field, or prompt_field and "
                             "response_field")
        prompt = row[pair[0]] if pair[0] != "instruction" or not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row[pair[1]]}]
    system = row.get("system")
    if isinstance(system, str) and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]  # a separate system column
    lang = spec.lang
    if lang is None:
        lang_field = spec.lang_field or next((f for f in ("lang", "language_code", "language") if row.get(f)), None)
        lang = row.get(lang_field) if lang_field else None
    record = {"messages": messages, "lang": lang}
    if tools is not None:
        record["tools"] = tools
    return record


def hub_conversations(spec, log: MalformedLog) -> list[dict]:
    """Conversations from a hub dataset (or its local copy; a ``ChatHubSource`` or its dict), ``limit`` rows at
    most; rows that cannot be mapped are reported with their id and skipped."""
    (spec,) = parse_sources([spec], SFTSource, "sft.sources") if isinstance(spec, dict) else (spec,)
    ds = open_dataset(spec.name, path=spec.path, config=spec.config, split=spec.split, streaming=spec.streaming,
                      offline_hint="Offline, pass a local copy instead: {type: hub, path: FOLDER} (written by "
                                   "datasets' save_to_disk) or {type: hub, path: FILE} (JSON/JSONL/Parquet, same "
                                   "columns), or export the conversations to {type: jsonl, path: FILE}.")
    limit, id_field = spec.limit, spec.id_field
    where = spec.name or spec.path
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
    from aetheris.tasks import toolcall  # here, not at the top: the task module imports this one (its tool-call loss)

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
    """One conversation per row, languages and conversations drawn by a ``data.LanguageSampler`` (p_l ∝
    n_l^(1/language_temperature) over conversation counts); resumable."""

    def __init__(self, rows: dict[str, list[tuple[list[int], list[int]]]], seq_len: int, *,
                 language_temperature: float = 1.0, seed: int = 0, pad_id: int = 0):
        rows = {lang: r for lang, r in rows.items() if r}
        if not rows:
            raise ValueError("no SFT conversations left after filtering: check sft.sources")
        self.rows, self.seq_len, self.seed, self.pad_id = rows, seq_len, seed, pad_id
        self.sizes = {lang: len(r) for lang, r in rows.items()}
        self.sampler = LanguageSampler(self.sizes, self.sizes, language_temperature=language_temperature, seed=seed)
        self.languages = self.sampler.languages

    @property
    def probs(self) -> np.ndarray:
        return self.sampler.probs

    def next_batch(self, n: int) -> dict[str, np.ndarray]:
        rows = []
        for _ in range(n):
            li, index = self.sampler.next()
            ids, labels = self.rows[self.languages[li]][index]
            rows.append(pad_row(ids, labels, self.seq_len, self.pad_id, li))
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}  # (n, T) each

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def pad_row(ids: list[int], labels: list[int], seq_len: int, pad_id: int, lang_index: int = 0) -> dict[str, np.ndarray]:
    """One right-padded training row: ids cut at ``seq_len``; padding has label -100, attention 0, its own doc id."""
    n = min(len(ids), seq_len)
    row = {"input_ids": np.full(seq_len, pad_id, dtype=np.int64), "labels": np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
           "doc_ids": np.zeros(seq_len, dtype=np.int64), "lang_ids": np.full(seq_len, lang_index, dtype=np.int64),
           "attention_mask": np.zeros(seq_len, dtype=np.int64)}
    row["input_ids"][:n], row["labels"][:n] = ids[:n], labels[:n]
    row["doc_ids"][n:] = 1  # padding is its own document
    row["attention_mask"][:n] = 1  # padding counts in no loss and no MoE statistic
    return row


def build_sft_data(sources: list, tokenizer, seq_len: int, *, language_temperature: float = 1.0, seed: int = 0,
                   log=print, val_per_language: int = 2) -> TrainData:
    """``data.TrainData`` for stage 3: the stream and a few held-out conversations per language (the loop's
    validation CE is then on assistant tokens only). ``sources``: ``SFTSource`` entries or their dicts."""
    malformed = MalformedLog()
    sources = parse_sources(sources, SFTSource, "sft.sources")
    records = [r for src in sources for r in load_conversations(src, malformed, seed)]
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
    stream = SFTStream(by_lang, seq_len, language_temperature=language_temperature, seed=seed, pad_id=pad)
    return TrainData(stream, val, malformed)
