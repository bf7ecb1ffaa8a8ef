"""Teacher loading: local folder, frozen/eval/dtype, per-layer hidden states, hub and architecture errors."""

from __future__ import annotations

import pytest
import torch

from aetheris.teacher import TeacherError, hidden_states, load_teacher


def test_tiny_fixture_is_tiny_aya_shaped(tiny_cohere2_teacher, tiny_tokenizer):
    c = tiny_cohere2_teacher.config
    assert type(tiny_cohere2_teacher).__name__ == "Cohere2ForCausalLM"
    assert c.vocab_size == len(tiny_tokenizer) and c.tie_word_embeddings and c.logit_scale != 1.0
    assert c.num_key_value_heads < c.num_attention_heads
    assert c.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert tiny_cohere2_teacher.lm_head.weight is tiny_cohere2_teacher.model.embed_tokens.weight


@pytest.mark.parametrize("dtype,torch_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_load_local_teacher_frozen_eval_dtype(teacher_dir, tiny_cohere2_teacher, dtype, torch_dtype):
    teacher = load_teacher(str(teacher_dir), dtype=dtype)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(p.dtype == torch_dtype for p in teacher.parameters())
    if dtype == "float32":
        ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
        torch.testing.assert_close(teacher(ids).logits, tiny_cohere2_teacher(ids).logits)


def test_hidden_states_per_layer(tiny_cohere2_teacher):
    teacher = tiny_cohere2_teacher
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    states = hidden_states(teacher, ids)
    assert len(states) == teacher.config.num_hidden_layers + 1
    torch.testing.assert_close(states[0], teacher.model.embed_tokens(ids))
    # The last entry is the residual stream before the final norm: the logits follow from it.
    logits = teacher.lm_head(teacher.model.norm(states[-1])) * teacher.config.logit_scale
    torch.testing.assert_close(logits, teacher(ids).logits)
    # Each entry is the previous one pushed through one decoder layer (the parallel block).
    layer, h = teacher.model.layers[3], states[3]  # layer 3 is a full-attention layer: no positions needed
    n = layer.input_layernorm(h)
    mask = torch.full((12, 12), float("-inf")).triu(1)[None, None]
    attn, _ = layer.self_attn(n, position_embeddings=(None, None), attention_mask=mask)
    torch.testing.assert_close(states[4], h + attn + layer.mlp(n), rtol=1e-5, atol=1e-5)


def test_offline_hub_teacher_explains_login_licence_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError) as err:
        load_teacher("CohereLabs/tiny-aya-global")
    msg = str(err.value)
    assert "huggingface-cli login" in msg and "licence" in msg and "local folder" in msg


def test_unsupported_architecture_says_which_are(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(TeacherError, match="gpt2.*not supported.*Cohere2ForCausalLM.*LlamaForCausalLM"):
        load_teacher(str(tmp_path))


def test_missing_local_folder_is_clear(tmp_path):
    with pytest.raises(TeacherError, match="cannot load"):
        load_teacher(str(tmp_path / "nope"))
