"""Where training text comes from: typed source configs and the readers that turn them into documents.

``data.sources`` (documents: pretraining, distillation stages 1-2) and ``sft.sources`` (conversations, stage 3,
read by ``aetheris.sft``) are lists of small dataclasses keyed by ``type``: ``DataSource`` = corpus | text |
jsonl | parquet | hub, ``SFTSource`` = toolgen | jsonl | xsid | hub. Each validates itself on construction;
``config_io`` builds them from YAML and ``key=value`` overrides (``parse_sources`` from plain dicts), so an unknown
key names the nearest valid one with the entry's path (``sft.sources[1].per_langauge`` -> "did you mean
``sft.sources[1].per_language``?") and an unknown ``type`` lists the valid ones.

Reading documents, bad input is never trained on silently: a missing file, an empty dataset or an unknown
configured language code is an error naming the file / source; malformed *records* (no text, blank, not
UTF-8, invalid JSON, unknown per-record language) are counted and skipped (``MalformedLog``: reasons with
``file:line`` examples); a file whose records are *mostly* malformed, or a text / JSONL file holding NUL bytes,
is an error naming it; a record over ``max_chars`` (``data.max_document_chars``) is skipped and counted, and
reading a long line never holds more than that in memory. Local text and JSONL files are read line by line
(``datasets``' JSON reader aborts a file at its first bad line without saying which); Parquet files and hub
datasets go through ``open_dataset``, the one ``datasets`` opener (shared with SFT's hub source).

The offline corpus (``AETHERIS_DATA_DIR/corpus``) covers all 70 Tiny Aya languages: NTREX-128 (68, documents
from ``DOCUMENT_IDS.tsv``), NusaX-MT Javanese (each row a document) and MAFAND Nigerian Pidgin (no document
ids: blocks of 16 consecutive lines act as documents).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from aetheris.config_io import ConfigError, build_tagged_list
from aetheris.languages import CODES, get_language
from aetheris.paths import data_path

PCM_BLOCK_LINES = 16
DEFAULT_MAX_CHARS = 1_000_000
OVERSIZED = "document longer than data.max_document_chars (raise it to keep such documents)"


# ----------------------------------------------------------------------------------------------
# Source configs


class _Tagged:
    """Shared by the source dataclasses: the ``type`` tag and the YAML-shaped dict."""

    type: ClassVar[str]

    def to_dict(self) -> dict:
        """``type`` plus the keys that differ from their defaults: what one would write in the YAML."""
        out: dict[str, Any] = {"type": self.type}
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if getattr(self, f.name) != default:
                out[f.name] = getattr(self, f.name)
        return out

    @property
    def label(self) -> str:
        """How messages name this source: ``jsonl source data/x.jsonl``."""
        where = getattr(self, "path", None) or getattr(self, "name", None) or ""
        return f"{self.type} source {where}".strip()


def _check_language(code, key: str) -> None:
    if code is not None:
        try:
            get_language(str(code))
        except ValueError as err:
            raise ConfigError(f"{key}={code!r}: {err}") from None


def _check_languages(languages, key: str) -> None:
    """``all`` / None, a comma string or a list of registry codes."""
    codes = [] if languages in (None, "all") else languages.split(",") if isinstance(languages, str) else languages
    if not isinstance(codes, list):
        raise ConfigError(f"{key}={languages!r}: give 'all' or a list of language codes, e.g. [en, sw]")
    for code in codes:
        _check_language(str(code).strip(), key)


def _check_count(value, key: str, minimum: int = 1, optional: bool = False) -> None:
    if not (optional and value is None) and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")


@dataclass
class _Records(_Tagged):
    """Fields of a record-reading document source (text / jsonl / parquet / hub)."""

    text_field: str = "text"
    """Column / JSON key holding the document text."""
    language: str | None = None
    """A fixed language code for every record (records of other languages are then not read)."""
    language_field: str | None = None
    """Column / key holding each record's language code (default ``lang`` when no fixed ``language``)."""
    id_field: str | None = None
    """Column / key holding a document id (parallel documents share it); else the record's location."""

    def __post_init__(self):
        _check_language(self.language, "language")


@dataclass
class CorpusSource(_Tagged):
    """The offline 70-language corpus under ``AETHERIS_DATA_DIR/corpus`` (NTREX-128 + NusaX + MAFAND)."""

    type: ClassVar[str] = "corpus"
    max_lines_per_language: int | None = None
    """Read only the first N lines of each language (unset: all)."""

    def __post_init__(self):
        _check_count(self.max_lines_per_language, "max_lines_per_language", optional=True)


@dataclass
class _Files(_Records):
    """A record-reading source over local files."""

    path: str | None = None
    """A file or glob; ``$DATA/...`` resolves under AETHERIS_DATA_DIR."""

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"path={self.path!r}: a {self.type} source needs path: (a file or glob; $DATA/... is "
                              "under AETHERIS_DATA_DIR)")


@dataclass
class TextSource(_Files):
    """Plain text files, one document per line."""

    type: ClassVar[str] = "text"

    def __post_init__(self):
        super().__post_init__()
        if self.language is None and self.language_field is None:
            raise ConfigError("language: a text file needs a fixed `language:` (its lines carry no language code)")


@dataclass
class JsonlSource(_Files):
    """JSON Lines files, one record (``{"text": ..., "lang": ...}``) per line."""

    type: ClassVar[str] = "jsonl"


@dataclass
class ParquetSource(_Files):
    """Parquet files, read through ``datasets``."""

    type: ClassVar[str] = "parquet"
    streaming: bool = True


@dataclass
class HubSource(_Records):
    """A Hugging Face hub dataset (streamed by default)."""

    type: ClassVar[str] = "hub"
    name: str | None = None
    """Dataset id on the hub, e.g. ``HuggingFaceFW/fineweb-2``."""
    config: str | None = None
    split: str = "train"
    streaming: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not self.name:
            raise ConfigError("name: a hub source needs `name:` (a dataset id on the Hugging Face hub)")


@dataclass
class ToolgenSource(_Tagged):
    """The generated multilingual tool-calling set (``aetheris.toolgen``, train templates only)."""

    type: ClassVar[str] = "toolgen"
    languages: Any = "all"
    """``all`` or a list of language codes."""
    per_language: int = 40
    seed: int | None = None
    """Unset: the run's seed."""
    tools_offered: int = 3
    """Tool schemas in each system turn (1-5), the expected one among them."""
    frame_dropout: float = 0.0
    """Probability that a word of a request's frame (never a value) is left out (``toolgen.generate_examples``)."""
    extra_frames: bool = False
    """Also the four extra English train frames per function (``toolgen.EXTRA_TRAIN_TEMPLATES``)."""

    def __post_init__(self):
        _check_languages(self.languages, "languages")
        _check_count(self.per_language, "per_language")
        _check_count(self.tools_offered, "tools_offered")
        if not (isinstance(self.frame_dropout, (int, float)) and 0 <= self.frame_dropout < 1):
            raise ConfigError(f"frame_dropout={self.frame_dropout!r} must be a number in [0, 1) (the probability of "
                             "leaving out a frame word)")
        if not isinstance(self.extra_frames, bool):
            raise ConfigError(f"extra_frames={self.extra_frames!r} must be true or false")
        _check_count(self.seed, "seed", minimum=0, optional=True)


@dataclass
class ChatJsonlSource(_Tagged):
    """Conversations, one per line: ``{"id", "lang", "messages", "tools"?}`` (or the toolgen ``user`` /
    ``expected`` shape)."""

    type: ClassVar[str] = "jsonl"
    path: str | None = None
    lang: str | None = None
    """Language of records that carry none."""

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"path={self.path!r}: a jsonl conversation source needs path: (a .jsonl file)")
        _check_language(self.lang, "lang")


@dataclass
class XsidSource(_Tagged):
    """xSID mapped to tool calls by ``tasks.toolcall.xsid_examples`` (its test split is for evaluation)."""

    type: ClassVar[str] = "xsid"
    split: str = "validation"
    languages: Any = None
    """A list of language codes (unset: all 13)."""
    per_language: int | None = None
    """The first N usable examples of each language (unset: all)."""

    def __post_init__(self):
        _check_languages(self.languages, "languages")
        _check_count(self.per_language, "per_language", optional=True)


@dataclass
class ChatHubSource(_Tagged):
    """A conversation dataset through ``datasets``: a hub id (``name``) or a local copy (``path``: a
    ``save_to_disk`` folder, or JSON/JSONL/Parquet files). Columns are auto-detected (``aetheris.sft.hub_record``)
    or named with the ``*_field`` keys."""

    type: ClassVar[str] = "hub"
    name: str | None = None
    path: str | None = None
    config: str | None = None
    split: str = "train"
    streaming: bool | None = None
    """Unset: streamed from the hub, not for a local copy (``limit`` then reads only the first rows)."""
    limit: int | None = None
    lang: str | None = None
    """A fixed language for every row; else from ``lang_field`` or a ``lang`` / ``language_code`` column."""
    lang_field: str | None = None
    messages_field: str | None = None
    tools_field: str = "tools"
    prompt_field: str | None = None
    response_field: str | None = None
    id_field: str = "id"

    def __post_init__(self):
        if not self.name and not self.path:
            raise ConfigError("name: a hub conversation source needs name: (a dataset id) or path: (a local copy)")
        if (self.prompt_field is None) != (self.response_field is None):
            raise ConfigError(f"prompt_field={self.prompt_field!r}, response_field={self.response_field!r}: set both "
                              "or neither")
        _check_count(self.limit, "limit", optional=True)
        _check_language(self.lang, "lang")


DataSource = CorpusSource | TextSource | JsonlSource | ParquetSource | HubSource
SFTSource = ToolgenSource | ChatJsonlSource | XsidSource | ChatHubSource


def parse_sources(specs, kind=DataSource, where: str = "data.sources") -> list:
    """Typed sources from dicts (or already typed ones): ``kind`` is ``DataSource`` or ``SFTSource``. A
    ConfigError names the entry and key (``sft.sources[1].per_language``)."""
    return build_tagged_list(kind, specs, where)


# ----------------------------------------------------------------------------------------------
# Documents, languages, malformed-record accounting


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
# Files and datasets


def expand_files(pattern: str, source: str) -> list[Path]:
    """Files for a path or glob; relative paths that start with ``$DATA/`` resolve under AETHERIS_DATA_DIR."""
    if pattern.startswith("$DATA/"):
        parts = pattern[len("$DATA/"):].split("/")
        root = data_path(parts[0], what=f"{source} ({pattern})")
        pattern = str(root.joinpath(*parts[1:]))
    files = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser())))
    if not files:
        raise FileNotFoundError(f"{source}: no file matches {pattern!r}")
    return files


def open_dataset(name: str | None = None, *, path: str | None = None, config: str | None = None,
                 split: str = "train", streaming: bool | None = None, file_format: str | None = None,
                 offline_hint: str = ""):
    """Records through ``datasets``: a hub id (``name``, ``config``, ``split``; streamed unless ``streaming`` is
    false, so reading the first rows downloads only those) or a local copy (``path``: a folder written by
    ``save_to_disk``, or JSON/JSONL/Parquet files or a glob; not streamed unless asked). ``offline_hint`` says
    what to do when the hub cannot be reached."""
    import datasets  # here, not at the top: ~1 s that train/distill/eval startup skips unless a source needs it

    if path:
        folder = Path(str(path))
        if folder.is_dir() and ((folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{folder} has splits {', '.join(ds)}; set split: to one of them")
                ds = ds[split]
            return ds
        files = [str(f) for f in expand_files(str(path), f"dataset {path}")]
        fmt = file_format or ("parquet" if all(f.endswith(".parquet") for f in files) else "json")
        return datasets.load_dataset(fmt, data_files=files, split="train", streaming=bool(streaming))
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True if streaming is None else streaming)
    except Exception as err:  # offline, gated, misspelt: say which and what to do
        raise FileNotFoundError(
            f"could not open hub dataset {name!r} (config {config!r}, split {split!r}): {err}. {offline_hint}"
        ) from err


# ----------------------------------------------------------------------------------------------
# Reading documents


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


def _file_records(src: TextSource | JsonlSource, log: MalformedLog, max_chars: int) -> Iterator:
    """(record, where, tally) per usable line of a text / JSONL source's files; bad lines are logged."""
    for path in expand_files(src.path, src.label):
        tally = _SourceTally(path, src.type, log)
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
            if src.type == "text":
                yield {src.text_field: line}, where, tally
                continue
            try:
                yield json.loads(line), where, tally
            except json.JSONDecodeError as err:
                tally.records, tally.bad = tally.records + 1, tally.bad + 1
                log.add(where, f"invalid JSON ({err.msg})")
        tally.check()


def iter_source(spec, languages: Sequence[str], log: MalformedLog, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Document]:
    """Documents of the ``languages`` from one ``DataSource`` (or its dict). Records over ``max_chars``
    characters are skipped (counted in ``log``)."""
    (src,) = parse_sources([spec]) if isinstance(spec, dict) else (spec,)
    wanted = set(languages)
    if isinstance(src, CorpusSource):
        yield from offline_corpus_documents(languages, src.max_lines_per_language, log)
        return
    fixed_lang = canonical_language(src.language, src.label) if src.language is not None else None
    if fixed_lang is not None and fixed_lang not in wanted:
        return
    lang_field = src.language_field or (None if src.language else "lang")

    def record_doc(record, where: str, tally: _SourceTally):
        tally.records += 1
        if not isinstance(record, dict):
            tally.bad += 1
            log.add(where, "record is not an object")
            return None
        text = record.get(src.text_field)
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
        doc_id = str(record[src.id_field]) if src.id_field and record.get(src.id_field) is not None else where
        return Document(text, lang, doc_id)

    if isinstance(src, (TextSource, JsonlSource)):
        for record, where, tally in _file_records(src, log, max_chars):
            if (doc := record_doc(record, where, tally)) is not None:
                yield doc
        return
    if isinstance(src, ParquetSource):
        ds = open_dataset(path=src.path, streaming=src.streaming, file_format="parquet")
    else:
        ds = open_dataset(src.name, config=src.config, split=src.split, streaming=src.streaming,
                          offline_hint="Offline, point the config at local files instead (type: jsonl / parquet / "
                                       "text / corpus).")
    tally = _SourceTally(src.label, src.type, log)
    for i, record in enumerate(ds):
        if (doc := record_doc(record, f"{src.label}#{i}", tally)) is not None:
            yield doc
    tally.check()


def load_documents(sources: Sequence, languages=None, log: MalformedLog | None = None,
                   max_chars: int = DEFAULT_MAX_CHARS) -> list[Document]:
    """All documents from ``sources`` (in memory), restricted to ``languages``; longer than ``max_chars``: skipped."""
    if not sources:
        raise ValueError("data.sources is empty: name at least one source (e.g. `- type: corpus`)")
    sources = parse_sources(sources)
    langs = resolve_languages(languages)
    log = log if log is not None else MalformedLog()
    docs = []
    for src in sources:
        got = list(iter_source(src, langs, log, max_chars))
        if not got:
            raise ValueError(f"data source {src.to_dict()} gave no usable documents for languages "
                             f"{langs[:8]}{'...' if len(langs) > 8 else ''} ({log.summary()})")
        docs += got
    return docs
