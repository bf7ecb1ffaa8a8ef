"""The teacher: any supported Hugging Face causal LM, loaded frozen, in eval mode, in a chosen dtype.

    teacher = load_teacher("CohereLabs/tiny-aya-global", dtype="bfloat16")   # or a local folder
    states = hidden_states(teacher, input_ids)   # [embeddings, after layer 0, ..., after layer L-1]

Supported architectures are the ones whose attention and MLP weights stage 1 knows how to transfer
(``SUPPORTED``): Cohere2 (Tiny Aya; parallel block, bias-free LayerNorm, GQA, tied embeddings,
``logit_scale``) and the Llama family (sequential block, RMSNorm). Anything else is refused before any
weights are read, with the list of what is supported.

Hub access happens only here. Tiny Aya is gated (CC-BY-NC-4.0): a failed download explains how to log
in, accept the licence, or pass a local folder instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

DEFAULT_TEACHER = "CohereLabs/tiny-aya-global"

# model_type -> (HF class name, block style, norm type)
SUPPORTED = {
    "cohere2": ("Cohere2ForCausalLM", "parallel", "layernorm"),
    "llama": ("LlamaForCausalLM", "sequential", "rmsnorm"),
    "mistral": ("MistralForCausalLM", "sequential", "rmsnorm"),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


class TeacherError(ValueError):
    """The teacher cannot be used (unsupported architecture, unreachable or gated hub model)."""


def supported_text() -> str:
    return ", ".join(f"{cls} (model_type {mt!r})" for mt, (cls, _, _) in SUPPORTED.items())


def check_supported(config) -> str:
    """Return the teacher's model_type, or raise TeacherError naming the supported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        archs = getattr(config, "architectures", None) or [model_type]
        raise TeacherError(
            f"teacher architecture {', '.join(map(str, archs))} is not supported for distillation; "
            f"supported: {supported_text()}"
        )
    attn_bias = getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    if attn_bias:
        raise TeacherError(f"teacher {model_type} has attention/MLP biases, which the SSM transfer cannot carry; "
                           f"supported are bias-free {supported_text()}")
    return model_type


def _hub_help(name: str, err: Exception) -> TeacherError:
    local = Path(name).expanduser()
    if local.is_absolute() or name.startswith((".", "~")) or local.exists():
        return TeacherError(f"cannot load the teacher from {name!r}: {err}. A local teacher folder needs "
                            "config.json, the weights (model.safetensors) and the tokenizer files.")
    return TeacherError(
        f"cannot load teacher {name!r} from the Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0]}). "
        f"If the machine is offline, download it elsewhere (`huggingface-cli download {name} --local-dir DIR`) and "
        "pass the local folder as teacher.name. If the model is gated (Tiny Aya is, CC-BY-NC-4.0), accept its licence "
        f"on https://huggingface.co/{name} and log in with `huggingface-cli login` (or set HF_TOKEN)."
    )


def load_teacher_config(name_or_path: str):
    """The teacher's HF config (no weights read), checked to be a supported architecture."""
    try:
        config = AutoConfig.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as err:
        raise _hub_help(str(name_or_path), err) from None
    check_supported(config)
    return config


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout) and no gradients: the teacher is a fixed function."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(name_or_path: str = DEFAULT_TEACHER, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu") -> nn.Module:
    """Load a supported causal LM by hub id or local folder, frozen, in eval mode, in ``dtype``."""
    config = load_teacher_config(name_or_path)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), config=config, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise _hub_help(str(name_or_path), err) from None
    return freeze(model.to(device))


def document_positions(doc_ids: Tensor) -> Tensor:
    """(B, T) document ids of packed rows -> (B, T) positions that restart at 0 at every document start."""
    T = doc_ids.shape[1]
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)             # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # start of each token's document
    return index - first


def teacher_logits(model: nn.Module, input_ids: Tensor, doc_ids: Tensor | None = None) -> Tensor:
    """The teacher's logits (B, T, V) with the documents of packed rows kept apart.

    Positions restart at every document (``document_positions``). Without a cache or a 2-D attention mask,
    transformers 5's mask builders (``masking_utils``, used by Cohere2 and Llama) read restarting positions
    as packed sequences and builds a block-diagonal causal mask for every layer type, the sliding
    window counted within each document; RoPE sees each document's own positions. So every document is
    scored as if it were alone (``check_documents_kept_apart`` verifies this on the loaded teacher).
    """
    if doc_ids is None or bool((doc_ids == doc_ids[:, :1]).all()):
        return model(input_ids=input_ids, use_cache=False).logits
    return model(input_ids=input_ids, position_ids=document_positions(doc_ids), use_cache=False).logits


class DocumentMaskError(ValueError):
    """The teacher cannot keep packed documents apart."""


@torch.no_grad()
def check_documents_kept_apart(model: nn.Module, setting: str = "data.pack") -> None:
    """Refuse packed distillation with a teacher that lets one document see another.

    Scores a probe document after another one in a packed row and alone: kept apart, the two agree to rounding.
    The bar is relative to how much the previous document moves the probe's logits when nothing separates them,
    so it holds in bf16 as well as in fp32. Cost: three forwards over 48 tokens.
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    first, probe = torch.randint(3, vocab, (1, 24), generator=g), torch.randint(3, vocab, (1, 24), generator=g)
    row = torch.cat([first, probe], 1).to(device)
    doc_ids = torch.tensor([[0] * 24 + [1] * 24], device=device)
    alone = model(input_ids=probe.to(device), use_cache=False).logits.float()
    apart = teacher_logits(model, row, doc_ids)[:, 24:].float()
    across = model(input_ids=row, use_cache=False).logits[:, 24:].float()
    leak, error = float((across - alone).abs().max()), float((apart - alone).abs().max())
    if error > 0.05 * leak:
        attn = getattr(model.config, "_attn_implementation", None)
        raise DocumentMaskError(
            f"{setting}=true but this teacher (attn_implementation={attn!r}) does not keep packed documents apart "
            f"(a document's logits move by {error:.3g} with the document before it, {leak:.3g} with no separation): "
            f"set {setting}=false (one document per row), or load the teacher with attn_implementation 'sdpa' or 'eager'")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The teacher's decoder layers (``model.model.layers`` for every supported architecture)."""
    return model.model.layers


@torch.no_grad()
def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[Tensor]:
    """The residual stream before the final norm: [embeddings, after layer 0, ..., after layer L-1].

    Read with forward hooks rather than ``output_hidden_states`` so the meaning of each entry does not
    depend on the transformers version (some return the last one after the final norm).
    """
    layers = decoder_layers(model)
    states: list[Tensor] = []

    def grab(_module, _args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    handles = [model.model.embed_tokens.register_forward_hook(grab)]
    handles += [layer.register_forward_hook(grab) for layer in layers]
    try:
        model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if len(states) != len(layers) + 1:
        raise RuntimeError(f"expected {len(layers) + 1} hidden states from the teacher, got {len(states)}")
    return states
