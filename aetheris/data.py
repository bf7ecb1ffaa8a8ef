"""Training data: documents with a language code, a held-out split per language, language-balanced
sampling with a temperature, and packing into fixed-length rows with document boundaries.

Pipeline (each step a function or small class below)::

    sources (offline corpus / text / JSONL / Parquet / hub)  ->  Document(text, lang, doc_id)
    -> split_heldout (by doc_id, so a parallel document is held out in *every* language)
    -> tokenize: [BOS] + ids + [EOS] per document
    -> PackedStream: pick a language (p_l ∝ n_l^(1/temperature)), take its next document, pack rows
       of ``seq_len`` tokens with ``doc_ids`` so the model resets its state at each boundary.

Loading rules (bad input is never trained on silently):

- A missing file or folder, an empty dataset, or a configured language code that is not in the
  registry is an error that names the file / source.
- Malformed *records* (no text, empty text, a non-UTF-8 line, invalid JSON, an unknown per-record
  language) are counted and skipped; ``MalformedLog.summary()`` lists them by reason with the first
  few locations (``file:line``), and the training loop reports it at the start and the end.
- A file (or hub / Parquet source) whose records are *mostly* malformed is an error naming it: that is a
  wrong file, not a few bad lines. A ``text`` / ``jsonl`` file holding NUL bytes is binary: an error too.
- Inputs are bounded: a record longer than ``max_chars`` characters (``data.max_document_chars``) is
  skipped and counted with its ``file:line``, and reading a long line never holds more than that in memory.
  Validation text is tokenized only until the rows it needs are filled (``tokenize_until``).

Local text and JSONL files are read line by line here rather than through ``datasets``: its JSON
reader aborts the whole file at the first bad line and cannot say which line it was. Parquet files
and hub datasets go through ``datasets.load_dataset`` (hub ones streaming), one interface either way.

The offline corpus (``AETHERIS_DATA_DIR/corpus``) covers all 70 Tiny Aya languages: NTREX-128 (68,
documents from ``DOCUMENT_IDS.tsv``), NusaX-MT Javanese (each row a document) and MAFAND
Nigerian Pidgin (no document ids: blocks of 16 consecutive lines act as documents).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aetheris.languages import CODES, get_language
from aetheris.paths import data_path

IGNORE_INDEX = -100  # the one ignore index (labels), as in transformers / torch cross_entropy
PCM_BLOCK_LINES = 16
SOURCE_TYPES = ("corpus", "text", "jsonl", "parquet", "hub")
DEFAULT_MAX_CHARS = 1_000_000
OVERSIZED = "document longer than data.max_document_chars (raise it to keep such documents)"


@dataclass(frozen=True)
class Document:
    """One training document. ``doc_id`` decides the held-out split; parallel translations share it."""

    text: str
    lang: str
    doc_id: str


def canonical_language(code: str, where: str = "") -> str:
    """The registry's code for ``code``; a ValueError naming ``where`` (file / source) if unknown."""
    try:
        return get_language(code).iso1
    except ValueError as err:
        raise ValueError(f"{where}: {err}" if where else str(err)) from None


def resolve_languages(languages) -> list[str]:
    """``"all"`` / None -> the 70 registry codes; otherwise a list of validated codes (order kept)."""
    if languages in (None, "all"):
        return list(CODES)
    if isinstance(languages, str):
        languages = [c.strip() for c in languages.split(",") if c.strip()]
    out = [canonical_language(c, "data.languages") for c in languages]
    if not out:
        raise ValueError("data.languages is empty: give 'all' or a list of language codes")
    return list(OrderedDict.fromkeys(out))


# ----------------------------------------------------------------------------------------------
# Malformed-record accounting


@dataclass
class MalformedLog:
    """Counts skipped records by reason and keeps the first few locations of each."""

    examples_per_reason: int = 3
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, where: str, reason: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < self.examples_per_reason:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no malformed records"
        lines = [f"skipped {self.total} malformed record(s):"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {n} x {reason}  (e.g. {', '.join(self.examples[reason])})")
        return "\n".join(lines)


def _check_text(text, where: str, log: MalformedLog) -> str | None:
    """The record's text, or None (logged) when it is missing, not a string, blank or not valid UTF-8."""
    if text is None:
        log.add(where, "record without text")
        return None
    if not isinstance(text, str):
        log.add(where, f"text is a {type(text).__name__}, not a string")
        return None
    if not text.strip():
        log.add(where, "empty text")
        return None
    if "\ufffd" in text:  # a decoder replaced invalid bytes: the record is not clean UTF-8
        log.add(where, "not valid UTF-8")
        return None
    if "\x00" in text:
        log.add(where, "holds NUL characters (binary data)")
        return None
    return text


# ----------------------------------------------------------------------------------------------
# Sources


def offline_corpus_documents(
    languages=None, max_lines_per_language: int | None = None, log: MalformedLog | None = None
) -> list[Document]:
    """The 70-language parallel corpus under ``AETHERIS_DATA_DIR/corpus`` as documents."""
    langs = set(resolve_languages(languages))
    log = log if log is not None else MalformedLog()
    root = data_path("corpus", what="the offline 70-language corpus (NTREX-128 + NusaX + MAFAND)")
    docs: list[Document] = []

    # NTREX-128: one file per language, line-aligned with DOCUMENT_IDS.tsv.
    ntrex = root / "ntrex128"
    doc_ids = [line.split("\t")[0].strip() for line in _read_lines(ntrex / "DOCUMENT_IDS.tsv")]
    for row in _read_lines(ntrex / "tiny_aya_iso1_to_ntrex.tsv"):
        iso1, _, filename = row.split("\t")
        if iso1 not in langs:  # also skips sr-Latn: the registry's Serbian is Cyrillic
            continue
        lines = _read_lines(ntrex / filename)
        if len(lines) != len(doc_ids):
            raise ValueError(f"{ntrex / filename}: {len(lines)} lines but DOCUMENT_IDS.tsv has {len(doc_ids)}")
        lines, ids = lines[:max_lines_per_language], doc_ids[:max_lines_per_language]
        docs += _group_lines(lines, ids, iso1, f"ntrex:{filename}", log)

    if "jv" in langs:  # NusaX-MT: a CSV of parallel sentences; each row a (short) document
        rows = []
        for split in ("valid", "test"):
            path = root / "nusax_mt" / f"{split}.csv"
            with open(path, encoding="utf-8", newline="") as f:
                rows += [(f"nusax:{split}:{r['']}", r["javanese"]) for r in csv.DictReader(f)]
        for doc_id, text in rows[:max_lines_per_language]:
            if (t := _check_text(text, doc_id, log)) is not None:
                docs.append(Document(t.strip(), "jv", doc_id))

    if "pcm" in langs:  # MAFAND en-pcm: line-aligned news sentences without document ids
        lines = []
        for split in ("dev", "test"):
            lines += [(f"mafand:{split}", i // PCM_BLOCK_LINES, t) for i, t in enumerate(_read_lines(root / "mafand_en_pcm" / f"{split}.pcm"))]
        lines = lines[:max_lines_per_language]
        docs += _group_lines([t for *_, t in lines], [f"{s}:{b}" for s, b, _ in lines], "pcm", "mafand", log)
    return docs


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (is AETHERIS_DATA_DIR pointing at the shared data folder?)")
    return path.read_text(encoding="utf-8").splitlines()


def _group_lines(lines: Sequence[str], ids: Sequence[str], lang: str, where: str, log: MalformedLog) -> list[Document]:
    """Consecutive lines with the same id become one document (lines joined by newlines)."""
    out, current, cur_id = [], [], None
    for i, (text, doc_id) in enumerate(zip(lines, ids)):
        if doc_id != cur_id and current:
            out.append(Document("\n".join(current), lang, cur_id))
            current = []
        cur_id = doc_id
        if (t := _check_text(text, f"{where}:{i + 1}", log)) is not None:
            current.append(t.strip())
    if current:
        out.append(Document("\n".join(current), lang, cur_id))
    return out


def _expand_files(pattern: str, source: str) -> list[Path]:
    """Files for a path or glob; relative paths that start with ``$DATA/`` resolve under AETHERIS_DATA_DIR."""
    if pattern.startswith("$DATA/"):
        parts = pattern[len("$DATA/"):].split("/")
        root = data_path(parts[0], what=f"{source} ({pattern})")
        pattern = str(root.joinpath(*parts[1:]))
    files = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser())))
    if not files:
        raise FileNotFoundError(f"{source}: no file matches {pattern!r}")
    return files


def _read_lines_bounded(path: Path, max_chars: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw bytes) for each line of ``path``; a line over ``max_chars`` characters gives None and
    is skipped in 1 MiB chunks, so one enormous line (or a file with none) never sits in memory whole."""
    limit = 4 * max_chars + 2  # UTF-8 takes at most 4 bytes per character, plus the line ending
    with open(path, "rb") as f:
        if b"\0" in f.read(8192):
            raise ValueError(f"{path} holds NUL bytes: it is a binary file, not text; remove it from data.sources")
        f.seek(0)
        number = 0
        while raw := f.readline(limit):
            number += 1
            if len(raw) == limit and not raw.endswith(b"\n"):
                while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):
                    pass
                yield number, None
            else:
                yield number, raw


class _SourceTally:
    """Records and malformed records of one file or source: mostly malformed means the wrong file."""

    def __init__(self, name, kind: str, log: MalformedLog):
        self.name, self.kind, self.log, self.records, self.bad = name, kind, log, 0, 0
        self.before = Counter(log.counts)

    def check(self) -> None:
        if self.records and 2 * self.bad > self.records:
            reasons = ", ".join(r for r, _ in (self.log.counts - self.before).most_common(3))
            raise ValueError(f"{self.name}: {self.bad} of its {self.records} records are malformed ({reasons}); "
                             f"it does not look like a {self.kind} source of documents: fix it or remove it from data.sources")


def iter_source(spec: dict, languages: Sequence[str], log: MalformedLog, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Document]:
    """Documents from one configured source. ``spec`` keys:

    ``type``: ``corpus`` (the offline 70-language corpus) | ``text`` | ``jsonl`` | ``parquet`` | ``hub``;
    ``path`` (text/jsonl/parquet: a file or glob; ``$DATA/...`` is under AETHERIS_DATA_DIR);
    ``name``/``config``/``split`` (hub); ``text_field`` (default ``text``); a fixed ``language`` or a
    per-record ``language_field``; ``id_field`` (else the record's location is its id).
    Records over ``max_chars`` characters are skipped (counted in ``log``).
    """
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in SOURCE_TYPES:
        raise ValueError(f"data source {spec} needs a type, one of {', '.join(SOURCE_TYPES)} (got {kind!r})")
    wanted = set(languages)
    name = f"{kind} source {spec.get('path') or spec.get('name') or ''}".strip()
    if kind == "corpus":
        max_lines = spec.pop("max_lines_per_language", None)
        _no_extra(spec, name)
        yield from offline_corpus_documents([c for c in spec.get("languages", languages) if c in wanted] if "languages" in spec else languages, max_lines, log)
        return

    text_field = spec.pop("text_field", "text")
    fixed_lang = spec.pop("language", None)
    lang_field = spec.pop("language_field", None if fixed_lang else "lang")
    id_field = spec.pop("id_field", None)
    if fixed_lang is not None:
        fixed_lang = canonical_language(fixed_lang, name)
        if fixed_lang not in wanted:
            return

    def record_doc(record, where: str, tally: _SourceTally):
        tally.records += 1
        if not isinstance(record, dict):
            tally.bad += 1
            log.add(where, "record is not an object")
            return None
        text = record.get(text_field)
        if isinstance(text, str) and len(text) > max_chars:
            log.add(where, OVERSIZED)  # a valid record, just too long: not counted as malformed
            return None
        text = _check_text(text, where, log)
        if text is None:
            tally.bad += 1
            return None
        lang = fixed_lang
        if lang is None:
            code = record.get(lang_field)
            try:
                lang = get_language(code).iso1
            except ValueError:
                tally.bad += 1
                log.add(where, f"language {code!r} not in the registry" if code is not None else f"record without '{lang_field}'")
                return None
        if lang not in wanted:
            return None
        doc_id = str(record[id_field]) if id_field and record.get(id_field) is not None else where
        return Document(text, lang, doc_id)

    if kind in ("text", "jsonl"):
        if kind == "text" and fixed_lang is None and "language_field" not in spec:
            raise ValueError(f"{name}: a text file needs a fixed `language:` (its lines carry no language code)")
        files = _expand_files(spec.pop("path"), name)
        _no_extra(spec, name)
        for path in files:
            tally = _SourceTally(path, kind, log)
            for i, raw in _read_lines_bounded(path, max_chars):
                where = f"{path}:{i}"
                if raw is None:
                    log.add(where, OVERSIZED)
                    continue
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    tally.records, tally.bad = tally.records + 1, tally.bad + 1
                    log.add(where, "not valid UTF-8")
                    continue
                if not line.strip():
                    continue  # blank lines separate nothing in line-per-document files
                if kind == "text":
                    record = {text_field: line}
                else:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        tally.records, tally.bad = tally.records + 1, tally.bad + 1
                        log.add(where, f"invalid JSON ({err.msg})")
                        continue
                if (doc := record_doc(record, where, tally)) is not None:
                    yield doc
            tally.check()
        return

    import datasets

    if kind == "parquet":
        files = [str(p) for p in _expand_files(spec.pop("path"), name)]
        streaming = spec.pop("streaming", True)
        _no_extra(spec, name)
        ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
    else:  # hub
        hub_name = spec.pop("name", None)
        if not hub_name:
            raise ValueError(f"{name}: a hub source needs `name:` (a dataset id on the Hugging Face hub)")
        config, split = spec.pop("config", None), spec.pop("split", "train")
        streaming = spec.pop("streaming", True)
        _no_extra(spec, name)
        try:
            ds = datasets.load_dataset(hub_name, config, split=split, streaming=streaming)
        except Exception as err:  # offline, gated, misspelt: say which and what to do
            raise FileNotFoundError(
                f"could not open hub dataset {hub_name!r} (config {config!r}, split {split!r}): {err}. "
                "Offline, point the config at local files instead (type: jsonl / parquet / text / corpus)."
            ) from err
    tally = _SourceTally(name, kind, log)
    for i, record in enumerate(ds):
        if (doc := record_doc(record, f"{name}#{i}", tally)) is not None:
            yield doc
    tally.check()


def _no_extra(spec: dict, name: str) -> None:
    if spec:
        raise ValueError(f"{name}: unknown key(s) {', '.join(sorted(spec))}")


def load_documents(sources: Sequence[dict], languages=None, log: MalformedLog | None = None,
                   max_chars: int = DEFAULT_MAX_CHARS) -> list[Document]:
    """All documents from ``sources`` (in memory), restricted to ``languages``; longer than ``max_chars``: skipped."""
    if not sources:
        raise ValueError("data.sources is empty: name at least one source (e.g. `- type: corpus`)")
    langs = resolve_languages(languages)
    log = log if log is not None else MalformedLog()
    docs = []
    for spec in sources:
        got = list(iter_source(spec, langs, log, max_chars))
        if not got:
            raise ValueError(f"data source {spec} gave no usable documents for languages {langs[:8]}{'...' if len(langs) > 8 else ''} ({log.summary()})")
        docs += got
    return docs


# ----------------------------------------------------------------------------------------------
# Held-out split, tokenization, sampling weights


def _unit_hash(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_heldout(docs: Iterable[Document], val_fraction: float, seed: int = 0) -> tuple[dict, dict]:
    """(train, val): language -> documents. A document is held out when hash(doc_id) < val_fraction,
    so parallel documents (same id) are held out in every language at once and translations of
    validation text never leak into training. Every language keeps at least one document on each side."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    train: dict[str, list[Document]] = {}
    val: dict[str, list[Document]] = {}
    for doc in docs:
        side = val if _unit_hash(doc.doc_id, seed) < val_fraction else train
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
        raise ValueError(f"data.temperature must be > 0 (1 = proportional, .inf = uniform), got {temperature}")
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

    def __init__(self, sources: Sequence[dict], lang: str, tokenizer, val_fraction: float, seed: int,
                 log: MalformedLog, weight: float = 1.0, max_chars: int = DEFAULT_MAX_CHARS):
        self.sources, self.lang, self.tokenizer, self.max_chars = list(sources), lang, tokenizer, max_chars
        self.val_fraction, self.seed, self.log, self.weight = val_fraction, seed, log, weight
        self.taken, self._it = 0, None

    def __len__(self) -> int:  # the sampling weight stands in for the unknown size
        return max(1, round(self.weight * 1000))

    def _docs(self) -> Iterator[Document]:
        while True:
            got = False
            for spec in self.sources:
                for doc in iter_source(spec, [self.lang], self.log, self.max_chars):
                    if _unit_hash(doc.doc_id, self.seed) >= self.val_fraction:
                        got = True
                        yield doc
            if not got:
                raise ValueError(f"the streaming sources for language {self.lang} gave no training documents")

    def next(self) -> list[int]:
        if self._it is None:
            self._it = self._docs()
            for _ in range(self.taken):  # resume: skip what was already trained on
                next(self._it)
        self.taken += 1
        return tokenize_documents([next(self._it)], self.tokenizer)[0]

    def heldout(self, max_docs: int, max_scanned: int = 100_000) -> list[Document]:
        """The first ``max_docs`` held-out documents (reads at most ``max_scanned`` records)."""
        out = []
        for spec in self.sources:
            for i, doc in enumerate(iter_source(spec, [self.lang], self.log, self.max_chars)):
                if _unit_hash(doc.doc_id, self.seed) < self.val_fraction:
                    out.append(doc)
                if len(out) >= max_docs or i >= max_scanned:
                    return out
        return out


# ----------------------------------------------------------------------------------------------
# Packing


class PackedStream:
    """An endless, resumable stream of training rows built from per-language token documents.

    Each row holds ``seq_len`` tokens: ``input_ids``, ``labels`` (= input_ids, with -100 at the first
    token of every document: nothing predicts a BOS across a boundary, and at padding), ``attention_mask``
    (1 at real tokens, 0 at padding), ``doc_ids``
    (0, 1, 2… per document within the row: the model resets its state where it changes) and
    ``lang_ids`` (index into ``self.languages``). ``pack=False`` puts one document per row, cut at
    ``seq_len`` and right-padded.

    Language choice draws from a seeded numpy generator; each language walks its documents in a
    per-epoch permutation seeded by (seed, language, epoch). ``state_dict()`` (JSON-serialisable)
    captures all of it plus the partly used document, so a resumed stream continues exactly.
    """

    def __init__(self, docs: dict[str, Sequence[list[int]]], seq_len: int, *, temperature: float = 1.0,
                 seed: int = 0, pack: bool = True, pad_id: int = 0):
        docs = {lang: d for lang, d in docs.items() if len(d)}
        if not docs:
            raise ValueError("no training documents: the dataset is empty after filtering")
        if seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {seq_len}")
        self.docs, self.seq_len, self.seed, self.pack, self.pad_id = docs, seq_len, seed, pack, pad_id
        self.languages = sorted(docs)
        sizes = {lang: len(d) if isinstance(d, StreamingDocs) else sum(len(x) for x in d) for lang, d in docs.items()}
        weights = language_weights(sizes, temperature)  # tokens per language (streams: a stand-in weight)
        self.probs = np.array([weights[lang] for lang in self.languages])
        self.rng = np.random.default_rng(seed)
        self.cursor = {lang: 0 for lang in self.languages}
        self.epoch = {lang: 0 for lang in self.languages}
        self.pending: list[int] = []  # rest of a document that did not fit the previous row
        self.pending_lang = 0
        self.rows = 0
        self._perm_cache: dict[tuple[str, int], np.ndarray] = {}

    def _next_doc(self) -> tuple[list[int], int]:
        li = int(self.rng.choice(len(self.languages), p=self.probs))
        lang = self.languages[li]
        key = (lang, self.epoch[lang])
        if key not in self._perm_cache and not isinstance(self.docs[lang], StreamingDocs):
            self._perm_cache = {key: np.random.default_rng([self.seed, li, self.epoch[lang]]).permutation(len(self.docs[lang]))}
        if isinstance(self.docs[lang], StreamingDocs):
            self.cursor[lang] += 1
            return self.docs[lang].next(), li
        doc = self.docs[lang][int(self._perm_cache[key][self.cursor[lang]])]
        self.cursor[lang] += 1
        if self.cursor[lang] == len(self.docs[lang]):
            self.cursor[lang], self.epoch[lang] = 0, self.epoch[lang] + 1
        return list(doc), li

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
            "rng": self.rng.bit_generator.state,
            "cursor": dict(self.cursor),
            "epoch": dict(self.epoch),
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
        self.rng.bit_generator.state = state["rng"]
        self.cursor, self.epoch = dict(state["cursor"]), dict(state["epoch"])
        self.pending, self.pending_lang, self.rows = list(state["pending"]), state["pending_lang"], state["rows"]
        for lang, docs in self.docs.items():
            if isinstance(docs, StreamingDocs):  # streams keep no epochs: the cursor counts documents taken
                docs.taken, docs._it = self.cursor[lang], None


def validation_rows(docs: dict[str, Sequence[list[int]]], seq_len: int, max_rows_per_language: int | None = None,
                    pad_id: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Held-out rows per language, packed in document order (deterministic): language -> batch (R, T)."""
    out = {}
    for lang in sorted(docs):
        stream = PackedStream({lang: docs[lang]}, seq_len, pad_id=pad_id)
        total = sum(len(d) for d in docs[lang])
        # Walk the documents once in order (no sampling needed for a single language).
        stream._perm_cache = {(lang, 0): np.arange(len(docs[lang]))}
        n_rows = max(1, total // seq_len)  # whole rows only: no document repeats
        if max_rows_per_language:
            n_rows = min(n_rows, max_rows_per_language)
        out[lang] = stream.next_batch(n_rows)
    return out
