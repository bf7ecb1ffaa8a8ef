"""Training rows from documents: a held-out split per language, tokenization, language-sampled streams and
packing into fixed-length rows with document boundaries.

Pipeline (documents come from ``aetheris.sources``; each step below is a function or a small class)::

    sources (corpus / text / JSONL / Parquet / hub)  ->  Document(text, lang, doc_id)
    -> split_heldout (by doc_id, so a parallel document is held out in *every* language)
    -> tokenize: [BOS] + ids + [EOS] per document (``tokenize_until``: validation tokenizes only what its rows need)
    -> PackedStream: pick a language (``LanguageSampler``: p_l ∝ n_l^(1/language_temperature)), take its next
       document, pack rows of ``seq_len`` tokens with ``doc_ids`` so the model resets its state at each boundary.

``LanguageSampler`` is the one language-sampled walk over items, shared by ``PackedStream`` (documents) and
``sft.SFTStream`` (conversations): languages drawn from a seeded generator, each language's items in a
per-epoch permutation, a JSON-serialisable state so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aetheris.model import IGNORE_INDEX
from aetheris.sources import DEFAULT_MAX_CHARS, Document, MalformedLog, iter_source, parse_sources


@dataclass
class TrainData:
    """What the training loop consumes: a resumable stream of rows and held-out rows per language."""

    stream: Any  # next_batch(n) -> dict of (n, T) arrays; state_dict(); load_state_dict()
    val: dict[str, dict]
    malformed: MalformedLog = field(default_factory=MalformedLog)


# ----------------------------------------------------------------------------------------------
# Held-out split, tokenization, sampling weights


def is_heldout(doc_id: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether document ``doc_id`` is held out: a hash of (seed, id) in [0, 1) below ``val_fraction``. The one rule
    of the split, also used to rebuild it (``tasks.perplexity`` scores only what training held out)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_heldout(docs: Iterable[Document], val_fraction: float, seed: int = 0) -> tuple[dict, dict]:
    """(train, val): language -> documents. A document is held out when hash(doc_id) < val_fraction,
    so parallel documents (same id) are held out in every language at once and translations of
    validation text never leak into training. Every language keeps at least one document on each side."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    train: dict[str, list[Document]] = {}
    val: dict[str, list[Document]] = {}
    for doc in docs:
        side = val if is_heldout(doc.doc_id, val_fraction, seed) else train
        side.setdefault(doc.lang, []).append(doc)
        train.setdefault(doc.lang, [])
    for lang in list(train):
        if not val.get(lang) and len(train[lang]) > 1:
            val[lang] = [train[lang].pop()]
        if not train[lang]:
            if len(val.get(lang, [])) > 1:
                train[lang] = [val[lang].pop()]
            else:
                raise ValueError(f"language {lang} has a single document: too little data for a train/validation split")
    return train, val


def tokenize_documents(docs: Sequence[Document], tokenizer, batch_size: int = 1000) -> list[list[int]]:
    """``[BOS] + ids + [EOS]`` per document (special tokens added here, not by the tokenizer)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("the tokenizer needs BOS and EOS tokens to mark document boundaries")
    out = []
    for start in range(0, len(docs), batch_size):
        texts = [d.text for d in docs[start:start + batch_size]]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            out.append([bos, *ids, eos])
    return out


def tokenize_until(docs: Sequence[Document], tokenizer, tokens: int | None, batch_size: int = 16) -> list[list[int]]:
    """``tokenize_documents`` of the first documents, in order, until they hold ``tokens`` tokens (None: all).

    Validation needs ``rows x seq_len`` tokens per language; tokenizing every held-out document for that (one
    stray 50 MB record took 9 GB and two minutes to keep two rows) is work thrown away. The rows packed from
    the result equal those packed from every document: packing walks the documents in order and stops there."""
    out, total = [], 0
    for start in range(0, len(docs), batch_size):
        if tokens is not None and total >= tokens:
            break
        for ids in tokenize_documents(docs[start:start + batch_size], tokenizer):
            out.append(ids)
            total += len(ids)
    return out


def language_weights(sizes: dict[str, int], temperature: float) -> dict[str, float]:
    """Sampling probability per language, p_l ∝ n_l^(1/temperature): 1 = proportional to data size,
    larger = flatter, ``inf`` = uniform (XLM-R / mT5-style temperature sampling)."""
    if temperature <= 0:
        raise ValueError(f"data.language_temperature must be > 0 (1 = proportional, .inf = uniform), got {temperature}")
    alpha = 0.0 if math.isinf(temperature) else 1.0 / temperature
    raw = {lang: float(n) ** alpha for lang, n in sizes.items() if n > 0}
    total = sum(raw.values())
    return {lang: w / total for lang, w in raw.items()}


class StreamingDocs:
    """One language's training documents read lazily from its sources (hub datasets, big files).

    Plays the part of a document list inside ``PackedStream``: ``next()`` returns the next tokenized
    training document (held-out ones are skipped by the same doc_id hash as ``split_heldout``) and
    starts a new pass when the sources run out. Its position is the number of documents taken, so a
    resumed run re-opens the sources and skips that many (slow for very long runs, but exact).
    """

    def __init__(self, sources: Sequence, lang: str, tokenizer, val_fraction: float, seed: int,
                 log: MalformedLog, weight: float = 1.0, max_chars: int = DEFAULT_MAX_CHARS):
        self.sources, self.lang, self.tokenizer, self.max_chars = parse_sources(sources), lang, tokenizer, max_chars
        self.val_fraction, self.seed, self.log, self.weight = val_fraction, seed, log, weight
        self.taken, self._it = 0, None

    def __len__(self) -> int:  # the sampling weight stands in for the unknown size
        return max(1, round(self.weight * 1000))

    def documents(self) -> Iterator[Document]:
        """The training documents, pass after pass (untokenized: a sample of them trains a BPE)."""
        while True:
            got = False
            for src in self.sources:
                for doc in iter_source(src, [self.lang], self.log, self.max_chars):
                    if not is_heldout(doc.doc_id, self.val_fraction, self.seed):
                        got = True
                        yield doc
            if not got:
                raise ValueError(f"the streaming sources for language {self.lang} gave no training documents")

    def seek(self, taken: int) -> None:
        """Continue after the first ``taken`` documents (a resumed run): the sources are re-opened and skipped."""
        self.taken, self._it = taken, None

    def next(self) -> list[int]:
        if self._it is None:
            self._it = self.documents()
            for _ in range(self.taken):  # resume: skip what was already trained on
                next(self._it)
        self.taken += 1
        return tokenize_documents([next(self._it)], self.tokenizer)[0]

    def heldout(self, max_docs: int, max_scanned: int = 100_000) -> list[Document]:
        """The first ``max_docs`` held-out documents (reads at most ``max_scanned`` records)."""
        out = []
        for src in self.sources:
            for i, doc in enumerate(iter_source(src, [self.lang], self.log, self.max_chars)):
                if is_heldout(doc.doc_id, self.val_fraction, self.seed):
                    out.append(doc)
                if len(out) >= max_docs or i >= max_scanned:
                    return out
        return out


# ----------------------------------------------------------------------------------------------
# Language sampling and packing


class LanguageSampler:
    """Which language each draw comes from, and which of its items: the walk shared by ``PackedStream``
    (documents) and ``sft.SFTStream`` (conversations).

    A language is drawn from a seeded numpy generator with p_l ∝ weight_l^(1/language_temperature)
    (``set_language_weights`` replaces the probabilities, e.g. family-balanced ones); each language walks its
    ``counts[lang]`` items in a per-epoch permutation seeded by (seed, language index, epoch), or in order when
    ``shuffle`` is false. A language whose count is None (a stream of unknown size) only counts its draws.
    ``state_dict()`` is JSON-serialisable.
    """

    def __init__(self, weights: Mapping[str, float], counts: Mapping[str, int | None], *,
                 language_temperature: float = 1.0, seed: int = 0, shuffle: bool = True):
        self.languages = sorted(counts)
        self.counts, self.seed, self.shuffle = dict(counts), seed, shuffle
        self.set_language_weights(language_weights(dict(weights), language_temperature))
        self.rng = np.random.default_rng(seed)
        self.cursor = {lang: 0 for lang in self.languages}
        self.epoch = {lang: 0 for lang in self.languages}
        self._order: dict[str, tuple[int, np.ndarray]] = {}  # lang -> (epoch, its permutation)

    def set_language_weights(self, weights: Mapping[str, float] | Sequence[float]) -> None:
        """Sampling probabilities: a mapping language -> weight, or weights in ``languages`` order (normalised here)."""
        if isinstance(weights, Mapping):
            if set(weights) != set(self.languages):
                raise ValueError(f"language weights for {sorted(weights)} do not match the stream's languages "
                                 f"{self.languages}")
            weights = [weights[lang] for lang in self.languages]
        probs = np.asarray(weights, dtype=np.float64)
        if probs.shape != (len(self.languages),) or not np.isfinite(probs).all() or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"language weights must be {len(self.languages)} finite non-negative numbers, not all 0")
        self.probs = probs / probs.sum()

    def next(self) -> tuple[int, int | None]:
        """(language index, index of the item within that language; None for a stream of unknown size)."""
        li = int(self.rng.choice(len(self.languages), p=self.probs))
        lang = self.languages[li]
        n, epoch = self.counts[lang], self.epoch[lang]
        self.cursor[lang] += 1
        if n is None:
            return li, None
        if self._order.get(lang, (None,))[0] != epoch:
            order = np.random.default_rng([self.seed, li, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order[lang] = (epoch, order)
        index = int(self._order[lang][1][self.cursor[lang] - 1])
        if self.cursor[lang] == n:
            self.cursor[lang], self.epoch[lang] = 0, epoch + 1
        return li, index

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "cursor": dict(self.cursor), "epoch": dict(self.epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.cursor, self.epoch = dict(state["cursor"]), dict(state["epoch"])


class PackedStream:
    """An endless, resumable stream of training rows built from per-language token documents.

    Each row holds ``seq_len`` tokens: ``input_ids``, ``labels`` (= input_ids, with -100 at the first
    token of every document: nothing predicts a BOS across a boundary, and at padding), ``attention_mask``
    (1 at real tokens, 0 at padding), ``doc_ids``
    (0, 1, 2… per document within the row: the model resets its state where it changes) and
    ``lang_ids`` (index into ``self.languages``). ``pack=False`` puts one document per row, cut at
    ``seq_len`` and right-padded.

    Languages and documents are drawn by a ``LanguageSampler`` weighted by tokens per language (a
    ``StreamingDocs`` language: its stand-in weight); ``shuffle=False`` walks each language's documents in
    order. ``state_dict()`` (JSON-serialisable) captures the sampler plus the partly used document, so a
    resumed stream continues exactly.
    """

    def __init__(self, docs: dict[str, Sequence[list[int]]], seq_len: int, *, language_temperature: float = 1.0,
                 seed: int = 0, pack: bool = True, pad_id: int = 0, shuffle: bool = True):
        docs = {lang: d for lang, d in docs.items() if len(d)}
        if not docs:
            raise ValueError("no training documents: the dataset is empty after filtering")
        if seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {seq_len}")
        self.docs, self.seq_len, self.seed, self.pack, self.pad_id = docs, seq_len, seed, pack, pad_id
        streaming = {lang for lang, d in docs.items() if isinstance(d, StreamingDocs)}
        self.sampler = LanguageSampler(
            {lang: len(d) if lang in streaming else sum(len(x) for x in d) for lang, d in docs.items()},
            {lang: None if lang in streaming else len(d) for lang, d in docs.items()},
            language_temperature=language_temperature, seed=seed, shuffle=shuffle)
        self.languages = self.sampler.languages
        self.pending: list[int] = []  # rest of a document that did not fit the previous row
        self.pending_lang = 0
        self.rows = 0

    @property
    def probs(self) -> np.ndarray:
        """Sampling probability per language, in ``languages`` order."""
        return self.sampler.probs

    def set_language_weights(self, weights: Mapping[str, float] | Sequence[float]) -> None:
        """Replace the language sampling probabilities (see ``LanguageSampler.set_language_weights``)."""
        self.sampler.set_language_weights(weights)

    def _next_doc(self) -> tuple[list[int], int]:
        li, index = self.sampler.next()
        docs = self.docs[self.languages[li]]
        return (docs.next() if index is None else list(docs[index])), li

    def next_row(self) -> dict[str, np.ndarray]:
        T = self.seq_len
        ids = np.full(T, self.pad_id, dtype=np.int64)
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
        doc_ids = np.zeros(T, dtype=np.int64)
        lang_ids = np.zeros(T, dtype=np.int64)
        pos, d = 0, 0
        while pos < T:
            if self.pending:
                tokens, li, continued = self.pending, self.pending_lang, True
                self.pending = []
            else:
                (tokens, li), continued = self._next_doc(), False
            n = min(len(tokens), T - pos)
            ids[pos:pos + n] = tokens[:n]
            labels[pos:pos + n] = tokens[:n]
            if not continued:
                labels[pos] = IGNORE_INDEX  # a document's first token is given, never predicted
            doc_ids[pos:pos + n] = d
            lang_ids[pos:pos + n] = li
            pos, d = pos + n, d + 1
            if self.pack and n < len(tokens):
                self.pending, self.pending_lang = tokens[n:], li
            if not self.pack:
                break  # one document per row; the rest is padding (labels -100)
        if not self.pack:
            doc_ids[pos:] = 1  # padding is its own "document": no state flows into it from real text
        attention_mask = (np.arange(T) < pos).astype(np.int64)  # 0 at padding: no loss, no MoE statistics
        self.rows += 1
        return {"input_ids": ids, "labels": labels, "doc_ids": doc_ids, "lang_ids": lang_ids, "attention_mask": attention_mask}

    def next_batch(self, n: int) -> dict[str, np.ndarray]:
        rows = [self.next_row() for _ in range(n)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}  # (n, T) each

    def state_dict(self) -> dict:
        return {
            **self.sampler.state_dict(),
            "pending": list(map(int, self.pending)),
            "pending_lang": self.pending_lang,
            "rows": self.rows,
            "languages": self.languages,
            "sizes": {lang: len(d) for lang, d in self.docs.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["languages"] != self.languages or state["sizes"] != {lang: len(d) for lang, d in self.docs.items()}:
            raise ValueError(
                "the data position in this checkpoint belongs to a different dataset (languages or document "
                "counts differ): resume with the same data config, or start a new run"
            )
        self.sampler.load_state_dict(state)
        self.pending, self.pending_lang, self.rows = list(state["pending"]), state["pending_lang"], state["rows"]
        for lang, docs in self.docs.items():
            if isinstance(docs, StreamingDocs):  # streams keep no epochs: the cursor counts documents taken
                docs.seek(self.sampler.cursor[lang])


def validation_rows(docs: dict[str, Sequence[list[int]]], seq_len: int, max_rows_per_language: int | None = None,
                    pad_id: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Held-out rows per language, packed in document order (deterministic): language -> batch (R, T)."""
    out = {}
    for lang in sorted(docs):
        stream = PackedStream({lang: docs[lang]}, seq_len, pad_id=pad_id, shuffle=False)  # documents in order
        total = sum(len(d) for d in docs[lang])
        n_rows = max(1, total // seq_len)  # whole rows only: no document repeats
        if max_rows_per_language:
            n_rows = min(n_rows, max_rows_per_language)
        out[lang] = stream.next_batch(n_rows)
    return out
