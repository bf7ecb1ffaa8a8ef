"""The training-state seam of ``aetheris.checkpoint``: what ``save_checkpoint`` writes, ``load_training_state``
gives back bitwise — optimizer moments, every RNG stream, the loop's state — so a restored run takes the very
same next step as the one that never stopped."""

from __future__ import annotations

import random

import numpy as np
import torch

from conftest import tiny_config
from aetheris.checkpoint import load_model, load_training_state, save_checkpoint, verify_checkpoint
from aetheris.model import Aetheris


def _step(model, optimizer) -> None:
    """One AdamW step on a batch drawn from the global torch RNG (so the RNG state matters)."""
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    out = model(ids, labels=ids)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _draws() -> tuple:
    return torch.rand(4), random.random(), np.random.rand(3)


def test_save_then_load_training_state_continues_bitwise(tmp_path):
    torch.manual_seed(0)
    random.seed(1)
    np.random.seed(2)
    model = Aetheris(tiny_config())
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    for _ in range(2):
        _step(model, optimizer)
    state = {"step": 2, "tokens_seen": 64, "run_id": "abc", "data": {"cursor": 7}}
    folder = save_checkpoint(tmp_path / "checkpoints", 2, model, None, optimizer, state, keep_last=2)
    assert folder.name == "step-0000002" and verify_checkpoint(folder)["step"] == 2
    expected_draws = _draws()
    _step(model, optimizer)  # the uninterrupted run's third step

    # A fresh process: other RNG states, a new model from the checkpoint's weights, an empty optimizer.
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    restored = load_model(folder / "model")
    restored_optimizer = torch.optim.AdamW(restored.param_groups(0.1), lr=1e-2)
    loaded = load_training_state(folder, restored, restored_optimizer)

    assert {k: loaded[k] for k in state} == state
    draws = _draws()
    assert torch.equal(draws[0], expected_draws[0]) and draws[1] == expected_draws[1]
    assert np.array_equal(draws[2], expected_draws[2])
    _step(restored, restored_optimizer)  # its batch comes from the restored torch RNG
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state.values(), restored_optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_saved_weights_are_readable_like_any_file_the_process_writes(tmp_path):
    """safetensors writes mode 0600 whatever the umask: a checkpoint saved by root in a container was unreadable
    for the non-root user serving it. Weights get open()'s mode (0666 minus the umask), as config.json does."""
    import os
    import stat

    from aetheris.checkpoint import WEIGHTS_NAME, save_model

    old = os.umask(0o022)
    try:
        folder = save_model(Aetheris(tiny_config()), tmp_path / "m")
    finally:
        os.umask(old)
    weights = stat.S_IMODE((folder / WEIGHTS_NAME).stat().st_mode)
    assert weights == 0o644 == stat.S_IMODE((folder / "config.json").stat().st_mode)
