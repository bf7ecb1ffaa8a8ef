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
  validation split mapped to calls by ``tasks.toolcall``; its test split stays for evaluation).
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
    else:
        raise ValueError(f"sft source type {kind!r}: choose toolgen, jsonl or xsid")
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
           "doc_ids": np.zeros(seq_len, dtype=np.int64), "lang_ids": np.full(seq_len, lang_index, dtype=np.int64)}
    row["input_ids"][:n], row["labels"][:n] = ids[:n], labels[:n]
    row["doc_ids"][n:] = 1  # padding is its own document
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
            val[lang] = {k: np.stack([p[k] for p in padded]) for k in ("input_ids", "labels", "doc_ids")}
    stream = SFTStream(by_lang, seq_len, temperature=temperature, seed=seed, pad_id=pad)
    return TrainData(stream, val, malformed)


# ----------------------------------------------------------------------------------------------
# Tool-call validity


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
