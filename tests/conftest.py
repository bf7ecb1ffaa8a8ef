"""Shared test fixtures. Tests run offline on CPU: the HF hub is never contacted."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def corpus_slice(lines_per_language: int = 40) -> list[str]:
    """The first lines of every language in the offline 70-language corpus (NTREX-128 + NusaX + MAFAND)."""
    from aetheris.data import offline_corpus_documents

    docs = offline_corpus_documents(max_lines_per_language=lines_per_language)
    return [text for doc in docs for text in doc.text.split("\n")]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (vocab 768) with the Cohere special tokens, trained in about a second on a slice
    of the 70-language corpus under AETHERIS_DATA_DIR."""
    from aetheris.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus_slice(), vocab_size=768)
