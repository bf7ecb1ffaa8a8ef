"""Shared test fixtures. Tests run offline on CPU: the HF hub is never contacted.

Also shared by the test files: ``ROOT`` (the checkout), ``tiny_config`` (the tiny Aetheris shape the
equivalence tests use), and the ``needs_data`` marker: a test marked ``@pytest.mark.needs_data`` (or a
module with ``pytestmark = pytest.mark.needs_data``) is skipped, with the reason, when AETHERIS_DATA_DIR
is not set. Slow tests (> ~30 s on a 2-core CPU) are marked ``@pytest.mark.slow``: ``make test`` leaves
them out, ``make test-slow`` runs them.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]

# The tiny student most equivalence tests use: every mechanism (SSM heads and groups, chunked scan, MoE)
# present, small enough for float64 and milliseconds per forward.
TINY = dict(vocab_size=101, d_model=32, n_layer=4, n_heads=4, head_dim=8, d_state=8, n_groups=2, d_ff=48, chunk_size=8)


def run_process_group(cmd: list[str], *, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` (e.g. torchrun and its workers) in its own process group, capturing its output; on a
    timeout the whole group is killed, so a hung worker cannot outlive the test."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def merged_overrides(items: list[str]) -> list[str]:
    """``key=value`` overrides where a later one replaces an earlier one (``aetheris`` refuses a key given twice)."""
    out = {}
    for item in items:
        key = item.split("=", 1)[0]
        out.pop(key, None)
        out[key] = item
    return list(out.values())


def tiny_config(tokenizer=None, **overrides):
    """An ``AetherisConfig`` of the TINY shape; ``tokenizer`` sets the vocabulary and the bos/eos/pad ids,
    ``overrides`` any field."""
    from aetheris.config import AetherisConfig

    ids = {} if tokenizer is None else dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return AetherisConfig(**{**TINY, **ids, **overrides})


def pytest_collection_modifyitems(config, items):
    """The one data-skip hook: ``needs_data`` tests skip when the offline data copies are not configured."""
    if os.environ.get("AETHERIS_DATA_DIR"):
        return
    skip = pytest.mark.skip(reason="AETHERIS_DATA_DIR not set (the offline data copies; see README)")
    for item in items:
        if item.get_closest_marker("needs_data") is not None:
            item.add_marker(skip)


def corpus_slice(lines_per_language: int = 40) -> list[str]:
    """The first lines of every language in the offline 70-language corpus (NTREX-128 + NusaX + MAFAND)."""
    from aetheris.sources import offline_corpus_documents

    docs = offline_corpus_documents(max_lines_per_language=lines_per_language)
    return [text for doc in docs for text in doc.text.split("\n")]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (vocab 768) with the Cohere special tokens, trained in about a second on a slice
    of the 70-language corpus under AETHERIS_DATA_DIR."""
    from aetheris.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus_slice(), vocab_size=768)


def _tiny_cohere2_config(vocab_size: int, tokenizer=None):
    from transformers import Cohere2Config

    # Tiny Aya's structure scaled down: parallel block, GQA (4 heads / 2 kv heads), [sliding x3, full]
    # layer pattern with RoPE only on the sliding layers, tied embeddings, logit_scale != 1.
    return Cohere2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, logit_scale=0.5,
        layer_types=["sliding_attention"] * 3 + ["full_attention"], sliding_window=32,
        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 50_000.0},
        tie_word_embeddings=True, attn_implementation="eager",
        pad_token_id=getattr(tokenizer, "pad_token_id", 0) or 0,
        bos_token_id=getattr(tokenizer, "bos_token_id", None), eos_token_id=getattr(tokenizer, "eos_token_id", None),
    )


@pytest.fixture(scope="session")
def tiny_cohere2_teacher(tiny_tokenizer):
    """A tiny ``Cohere2ForCausalLM`` (same transformers code path as Tiny Aya), vocab = the tiny tokenizer,
    briefly trained (a few seconds, CPU) on the 70-language corpus slice so its distributions have structure
    a student can be measured against. Frozen, eval mode, fp32. Never touches the hub."""
    import torch
    from transformers import Cohere2ForCausalLM

    torch.manual_seed(0)
    model = Cohere2ForCausalLM(_tiny_cohere2_config(len(tiny_tokenizer), tiny_tokenizer))
    ids = [i for text in corpus_slice(20) for i in tiny_tokenizer.encode(text, add_special_tokens=False)]
    seq = 64
    rows = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(60):
        batch = rows[torch.randint(len(rows), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval().requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def teacher_dir(tiny_cohere2_teacher, tiny_tokenizer, tmp_path_factory):
    """The tiny Cohere2 teacher saved with its tokenizer: a folder ``teacher.name`` can point at."""
    folder = tmp_path_factory.mktemp("nano-teacher")
    tiny_cohere2_teacher.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
