"""A student saved with ``gradient_checkpointing: true`` (as the real-scale configs train it) loads through
``AutoModelForCausalLM`` and computes what the plain model computes."""

from __future__ import annotations

import torch

import aetheris  # noqa: F401  (registers the Auto classes)
from aetheris.checkpoint import save_model
from aetheris.config import AetherisConfig
from aetheris.model import Aetheris


def test_checkpointed_student_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = AetherisConfig(vocab_size=300, d_model=32, n_layer=2, n_heads=2, head_dim=16, d_state=16, n_groups=1,
                         d_ff=64, chunk_size=8, max_seq_len=64, gradient_checkpointing=True)
    torch.manual_seed(0)
    model = Aetheris(cfg).eval()
    save_model(model, tmp_path / "student")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert hf.model.cfg.gradient_checkpointing
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(hf(input_ids=x).logits, model(x).logits)
