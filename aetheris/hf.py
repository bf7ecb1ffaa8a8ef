"""transformers interop: ``AutoConfig`` / ``AutoModelForCausalLM`` load Aetheris checkpoints.

``import aetheris`` registers the classes below, so HF tools (lm-evaluation-harness, pipelines, our own
evaluation code) can load a student folder like any causal LM. The wrapper holds the plain-torch model
as ``.model``; a checkpoint's tensor names are therefore ``model.<name>``.

``generate`` is routed to Aetheris' own recurrent decoder (prefill once, then O(1) per token) rather
than transformers' attention-cache machinery, which does not fit a fixed-size SSM state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .config import AetherisConfig
from .model import Aetheris


class AetherisHFConfig(PretrainedConfig):
    """The dataclass config as a transformers config; every field is an attribute of the same name."""

    model_type = "aetheris"

    def __init__(self, **kwargs: Any):
        fields = AetherisConfig().to_dict()
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        # Validate now, so a bad config.json fails at load time with the field's name.
        cfg = AetherisConfig.from_dict({**fields, **own})
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.setdefault(key, own.get(key))
        kwargs.setdefault("tie_word_embeddings", cfg.tie_embeddings)
        super().__init__(**kwargs)
        for key, value in cfg.to_dict().items():
            setattr(self, key, value)

    def _get_generation_parameters(self) -> dict[str, Any]:
        # transformers refuses to save a model config holding generation-parameter names; ``top_k`` is
        # ours (experts per token), not a sampling setting.
        own = AetherisConfig().to_dict()
        return {k: v for k, v in super()._get_generation_parameters().items() if k not in own}

    def to_aetheris(self) -> AetherisConfig:
        return AetherisConfig.from_dict({k: getattr(self, k) for k in AetherisConfig().to_dict()})


class AetherisForCausalLM(PreTrainedModel):
    config_class = AetherisHFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block", "ParallelPair"]

    def __init__(self, config: AetherisHFConfig):
        super().__init__(config)
        self.model = Aetheris(config.to_aetheris())
        self.post_init()

    def _backward_compatibility_gradient_checkpointing(self) -> None:
        # ``gradient_checkpointing`` is an AetherisConfig field the model itself honours; transformers would
        # read it as its legacy flag and fail to find HF-style checkpointing modules (a student trained with
        # checkpointing on could not be loaded).
        pass

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Aetheris initialises itself; never re-initialise tensors that were loaded from a checkpoint.
        if isinstance(module, Aetheris) and not any(getattr(p, "_is_hf_initialized", False)
                                                    for p in module.parameters()):
            module.init_weights()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> AetherisForCausalLM:
        """As transformers', but a checkpoint with missing, unexpected or mis-shaped tensors is an error,
        never a model with silently random weights."""
        want_info = kwargs.pop("output_loading_info", False)
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path", "")
        fix = "Re-save it with aetheris.checkpoint.save_model, or check that config.json belongs to these weights."
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as err:
            if "mismatch" not in str(err):
                raise
            raise ValueError(f"checkpoint {where} does not match its config (tensor shapes differ). {fix}") from err
        problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if problems:
            detail = "; ".join(f"{k}: {sorted(map(str, v))[:8]}" for k, v in problems.items())
            raise ValueError(f"checkpoint {where} does not match its config ({detail}). {fix}")
        return (model, info) if want_info else model

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                doc_ids: Tensor | None = None, **kwargs: Any) -> CausalLMOutput:
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: skip the masking work
        out = self.model(input_ids, labels=labels, doc_ids=doc_ids, attention_mask=attention_mask)
        return CausalLMOutput(loss=out.loss, logits=out.logits)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 **kwargs: Any) -> Tensor:
        """HF-style ``generate`` on the recurrent decoder: returns prompt + new tokens (B, T + new),
        right-padded with ``pad_token_id`` after a sequence stops."""
        from .generation import decode_ids  # generation imports the model; keep import-time light

        unsupported = {k for k, v in kwargs.items() if v is not None and k not in ("generation_config", "use_cache")}
        if unsupported:
            raise ValueError(f"AetherisForCausalLM.generate does not support {sorted(unsupported)}; "
                             "supported: max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, "
                             "pad_token_id, attention_mask")
        eos = eos_token_id if eos_token_id is not None else self.config.eos_token_id
        stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
        pad = pad_token_id if pad_token_id is not None else (self.config.pad_token_id or (stop_ids or [0])[0])
        new = decode_ids(self.model, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         temperature=temperature if do_sample else 0.0, top_k=top_k or 0, top_p=top_p,
                         stop_token_ids=stop_ids)
        width = max((len(n) for n in new), default=0)
        out = torch.full((input_ids.shape[0], width), pad, dtype=input_ids.dtype, device=input_ids.device)
        for i, ids in enumerate(new):
            out[i, :len(ids)] = torch.tensor(ids, dtype=input_ids.dtype)
        return torch.cat([input_ids, out], dim=1)


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM aware of model_type "aetheris" (idempotent)."""
    try:
        AutoConfig.register("aetheris", AetherisHFConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(AetherisHFConfig, AetherisForCausalLM)
    except ValueError:
        pass
