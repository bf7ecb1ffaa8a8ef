"""Model checkpoints: a folder with ``config.json`` + ``model.safetensors`` (+ tokenizer files).

The same folder loads with ``transformers.AutoModelForCausalLM.from_pretrained`` after
``import aetheris`` (tensor names carry the HF wrapper's ``model.`` prefix). Loading is strict: a
missing file, a foreign model type, or tensors that do not match the config are errors that say what
to fix — never a model with silently random weights. Only safetensors are read (no unpickling).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import AetherisConfig
from .model import Aetheris

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREFIX = "model."  # AetherisForCausalLM keeps the plain model as .model


def save_model(model: Aetheris, folder: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
    """Write config.json, model.safetensors and (if given) the tokenizer into ``folder``.

    ``state_dict``: the weights to write instead of ``model.state_dict()`` (a sharded model's, gathered whole)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, Aetheris) and hasattr(model, "save_pretrained"):  # a transformers model (the nano teacher)
        model.save_pretrained(folder, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        return folder
    config = {"model_type": "aetheris", "architectures": ["AetherisForCausalLM"], **model.cfg.to_dict(),
              "tie_word_embeddings": model.cfg.tie_embeddings,
              "dtype": str(model.embed.weight.dtype).removeprefix("torch.")}
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if config.get(key) is None:
                config[key] = getattr(tokenizer, key, None)
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {PREFIX + k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def read_config(folder: str | Path) -> AetherisConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist; pass the folder holding "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME} (e.g. a run's final/ folder)")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a model checkpoint")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt") from None
    if data.get("model_type") != "aetheris":
        raise ValueError(f"{path} describes a {data.get('model_type')!r} model, not an Aetheris one; load it with "
                         "transformers.AutoModelForCausalLM instead")
    return AetherisConfig.from_dict(data, ignore_hf_keys=True)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / WEIGHTS_NAME
    index = folder / (WEIGHTS_NAME + ".index.json")  # sharded, as transformers writes large models
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise FileNotFoundError(f"{single} is missing: the checkpoint has a config but no weights. "
                                "Refusing to continue with random weights; point at a complete checkpoint.")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"{f} cannot be read ({err}); the file is truncated or corrupt") from None
    return tensors


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Aetheris:
    """Load an Aetheris checkpoint strictly (every tensor present, right shapes, nothing extra)."""
    folder = Path(folder)
    cfg = read_config(folder)
    tensors = _read_tensors(folder)
    state = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    with torch.device("meta"):
        model = Aetheris(cfg)  # shapes only; real tensors are assigned below
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(s)}"
                        for k, s in expected.items() if k in state and state[k].shape != s)
    if missing or unexpected or mismatched:
        parts = [f"{name} ({len(v)}): {v[:5]}" for name, v in
                 (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)) if v]
        raise ValueError(f"weights in {folder} do not match its {CONFIG_NAME}: " + "; ".join(parts))
    model.load_state_dict(state, assign=True)
    model.tag_no_weight_decay()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)

