"""transformers interop: ``AutoConfig`` / ``AutoModelForCausalLM`` load Aetheris checkpoints.

``import aetheris`` registers the classes below, so HF tools (lm-evaluation-harness, pipelines, our own
evaluation code) can load a student folder like any causal LM. The wrapper holds the plain-torch model
as ``.model``; a checkpoint's tensor names are therefore ``model.<name>``.

``generate`` is transformers' own ``GenerationMixin.generate`` (every argument it takes: max_length,
stopping_criteria, logits_processor, generation_config, beam search, sampling, ...) running on the
recurrent decoder: the first forward (prefill, chunked scan over the prompt) returns an
``AetherisHFCache`` holding the fixed-size SSM state, and every later forward gets one token plus that
cache and takes one O(1) ``Aetheris.step``. transformers' own Mamba-2 keeps its conv/SSM states in
linear-attention cache layers of a ``DynamicCache``; we pass the model's own ``AetherisCache`` instead
(wrapped with the few methods generate calls: sequence length, beam reordering), so training,
``aetheris.generation`` and HF tools share one state layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from dataclasses import dataclass

from transformers import (AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PretrainedConfig,
                          PreTrainedModel)
from transformers.utils import ModelOutput

from .config import AetherisConfig
from .model import Aetheris, AetherisCache


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


class AetherisHFCache:
    """The decode state between ``generate`` steps: one ``AetherisCache`` (conv window + SSM state per
    mixer, size independent of the context) and the number of tokens it has consumed."""

    is_compileable = False  # transformers asks before building static attention masks

    def __init__(self, state: AetherisCache, seen: int):
        self.state, self.seen = state, seen

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.state.states)  # every layer's state is recurrent: nothing to slice by length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: keep/duplicate batch rows ``beam_idx`` (in place, as transformers expects)."""
        self.state = self.state.select(beam_idx.to(self.state.states[0].ssm.device) if self.state.states else beam_idx)


@dataclass
class AetherisCausalLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: AetherisHFCache | None = None  # the name transformers' generate reads the state back from


class AetherisForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = AetherisHFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block", "ParallelPair"]
    _is_stateful = True  # the recurrent state cannot be rolled back: transformers refuses assisted decoding

    def __init__(self, config: AetherisHFConfig):
        super().__init__(config)
        self.model = Aetheris(config.to_aetheris())
        self.post_init()
        self.generation_config = self._own_generation_config()

    def _own_generation_config(self) -> GenerationConfig:
        # transformers derives the default GenerationConfig from the model config, which would read our
        # ``top_k`` (experts per token) as a sampling cut-off: sampling would silently become top-1.
        c = self.config
        return GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)

    def adjust_generation_fn(self, *args: Any, **kwargs: Any) -> None:
        """As transformers' (loads generation_config.json), but without one the defaults are ours, not a
        generation config read out of config.json."""
        super().adjust_generation_fn(*args, **kwargs)
        if getattr(self.generation_config, "_from_model_config", False):
            self.generation_config = self._own_generation_config()

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

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no KV cache: the first forward creates an AetherisHFCache itself (as Mamba's do)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                doc_ids: Tensor | None = None, cache: AetherisHFCache | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs: Any) -> AetherisCausalLMOutput:
        """Full forward (training, scoring, the prefill of ``generate``), or -- given ``cache`` -- the
        recurrent step over ``input_ids`` (B, t) one token at a time, advancing the cache in place."""
        if cache is not None:
            # Decoding: the attention mask's padding was consumed by the prefill (pads leave the state
            # untouched); rows that finished keep stepping on pad tokens, which transformers discards.
            logits = torch.stack([self.model.step(input_ids[:, t], cache.state) for t in range(input_ids.shape[1])], 1)
            cache.seen += input_ids.shape[1]
            return AetherisCausalLMOutput(logits=logits, cache=cache)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: skip the masking work
        out = self.model(input_ids, labels=labels, doc_ids=doc_ids, attention_mask=attention_mask,
                         logits_to_keep=logits_to_keep)
        new_cache = AetherisHFCache(out.cache, input_ids.shape[1]) if use_cache else None
        return AetherisCausalLMOutput(loss=out.loss, logits=out.logits, cache=new_cache)

    def prepare_inputs_for_generation(self, input_ids: Tensor, cache: AetherisHFCache | None = None,
                                      attention_mask: Tensor | None = None, **kwargs: Any) -> dict:
        """Prefill gets the whole prompt (and its mask); each later step only the tokens the cache has
        not consumed yet (one per step)."""
        if cache is not None:
            return {"input_ids": input_ids[:, cache.seen:], "cache": cache, "use_cache": True}
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": kwargs.get("use_cache", True)}
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs


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
