"""What the training loop consumes: a resumable stream of training rows and held-out rows per language.

``build_data(cfg, tokenizer_for)`` reads the run config's ``data`` sources, holds out documents by id (the same
documents in every language), trains or loads the tokenizer on the training split (``tokenizer_for``), and
packs the rest into a language-balanced ``PackedStream``; ``data.streaming`` reads the sources lazily instead.
A distillation stage builds its own ``TrainData`` (chat rows, a teacher cache) and passes it to ``train.train``.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

from aetheris.config_io import ConfigError
from aetheris.data import (
    PackedStream,
    StreamingDocs,
    TrainData,
    split_heldout,
    tokenize_documents,
    tokenize_until,
    validation_rows,
)
from aetheris.sources import MalformedLog, load_documents, resolve_languages
from aetheris.tokenizer import load_tokenizer, train_bpe_tokenizer
from aetheris.train_config import RunConfig


def build_tokenizer(cfg: RunConfig, train_docs: dict | None, out_dir: Path, accelerator):
    """Pretrained by name/path, or a BPE trained on the training split (on the main process, shared via disk)."""
    if cfg.tokenizer.name:
        tok = load_tokenizer(cfg.tokenizer.name)
    else:
        folder = out_dir / "tokenizer"
        if accelerator.is_main_process:
            n = cfg.tokenizer.bpe_docs_per_language
            texts = [d.text for lang in sorted(train_docs) for d in train_docs[lang][:n]]
            train_bpe_tokenizer(texts, cfg.model.vocab_size).save_pretrained(folder)
        accelerator.wait_for_everyone()
        tok = load_tokenizer(folder)
    if len(tok) > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tok)} tokens but model.vocab_size={cfg.model.vocab_size}: "
            f"set model.vocab_size={len(tok)} (or larger)"
        )
    return tok


def build_data(cfg: RunConfig, tokenizer_for: Callable[[dict], Any], log: Callable[[str], None] = print):
    """Load, split, tokenize and pack. ``tokenizer_for(train_docs)`` returns the tokenizer to use."""
    malformed = MalformedLog()
    if cfg.data.streaming:
        return _build_streaming_data(cfg, tokenizer_for, malformed)
    docs = load_documents(cfg.data.sources, cfg.data.languages, malformed, max_chars=cfg.data.max_document_chars)
    if malformed.total:
        log(malformed.summary())
    train_docs, val_docs = split_heldout(docs, cfg.data.val_fraction, seed=cfg.train.seed)
    tokenizer = tokenizer_for(train_docs)
    train_ids = {lang: tokenize_documents(d, tokenizer) for lang, d in train_docs.items()}
    val_tokens = cfg.data.val_rows_per_language * cfg.data.seq_len or None  # 0 rows = all held-out text
    val_ids = {lang: tokenize_until(d, tokenizer, val_tokens) for lang, d in val_docs.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = PackedStream(train_ids, cfg.data.seq_len, language_temperature=cfg.data.language_temperature,
                          seed=cfg.train.seed, pack=cfg.data.pack, pad_id=pad)
    val = validation_rows(val_ids, cfg.data.seq_len, cfg.data.val_rows_per_language or None, pad_id=pad)
    return TrainData(stream, val, malformed), tokenizer


def _build_streaming_data(cfg: RunConfig, tokenizer_for, malformed: MalformedLog):
    d = cfg.data
    streams = {lang: StreamingDocs(d.sources, lang, None, d.val_fraction, cfg.train.seed, malformed,
                                   max_chars=d.max_document_chars)
               for lang in resolve_languages(d.languages)}
    sample = {lang: list(islice(s.documents(), cfg.tokenizer.bpe_docs_per_language)) for lang, s in streams.items()}
    tokenizer = tokenizer_for(sample)
    for s in streams.values():
        s.tokenizer = tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    val_docs = {lang: s.heldout(max_docs=max(8, 4 * (d.val_rows_per_language or 8))) for lang, s in streams.items()}
    val_ids = {lang: tokenize_until(v, tokenizer, d.val_rows_per_language * d.seq_len or None) for lang, v in val_docs.items() if v}
    stream = PackedStream(streams, d.seq_len, language_temperature=d.language_temperature, seed=cfg.train.seed,
                          pack=d.pack, pad_id=pad)
    val = validation_rows(val_ids, d.seq_len, d.val_rows_per_language or None, pad_id=pad)
    return TrainData(stream, val, malformed), tokenizer
