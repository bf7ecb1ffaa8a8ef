"""The Aetheris model config: one plain dataclass, validated on construction, saved in every checkpoint.

The layer layout is a pattern string tiled to ``n_layer``: ``S`` is a Mamba-2 (SSD) mixer, ``M`` a
sparse mixture-of-experts FFN. The seed default ``"SM"`` × 24 gives 12 (SSM, MoE) pairs with the SSM
on odd 1-indexed layers. ``parallel_pairs`` makes each pair read one normalised input, as Cohere2's
parallel block does (``h + ssm(n) + moe(n)``).

Defaults describe the real-scale student of Tiny Aya (d_model 2048, 16 heads × 128, 4 kv groups,
SwiGLU 11008, vocab 262,144). Tests and the CPU demo use tiny configs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

LAYER_KINDS = {"S": "Mamba-2 (SSD) mixer", "M": "mixture-of-experts SwiGLU FFN"}
NORMS = ("layernorm", "rmsnorm")
GATES = ("silu", "sigmoid")
ACTIVATIONS = ("silu", "identity")
ROUTER_WEIGHTINGS = ("renormalized", "softmax")
SCAN_IMPLS = ("auto", "chunked", "reference", "mamba_ssm")

# Keys transformers writes into config.json that are not ours; tolerated when reading a checkpoint.
HF_BOOKKEEPING_KEYS = {
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map",
    "_name_or_path", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "tie_word_embeddings", "is_encoder_decoder", "bos_token_id", "eos_token_id", "pad_token_id",
}


@dataclass
class AetherisConfig:
    """The model: sizes, the layer pattern, the SSM mixer (Mamba-2 / SSD) and the MoE FFN."""

    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 262_144
    """Vocabulary size; must equal the tokenizer's (and the teacher's, when distilling)."""
    d_model: int = 2048
    """Residual stream width."""
    n_layer: int = 24
    """Number of layers (an SSM mixer and an MoE FFN each count as one)."""
    layout: str = "SM"
    """Layer pattern tiled to n_layer: S = Mamba-2 mixer, M = MoE FFN."""
    parallel_pairs: bool = False
    """Each (S, M) pair reads one normalised input (Cohere2-style parallel block)."""
    max_seq_len: int = 8192
    """Longest prompt accepted by generation (the state itself has no length limit)."""

    # --- SSM mixer (Mamba-2 / SSD, shaped like the teacher's attention) ------------------------
    n_heads: int = 16
    """SSM heads (= teacher query heads). Each head has its own decay, dt and C."""
    head_dim: int = 128
    """P: channels per head (= teacher head_dim)."""
    d_state: int = 128
    """N: state size per head (= teacher head_dim, so C <- W_Q and B <- W_K fit)."""
    n_groups: int = 4
    """G: groups sharing x and B (= teacher kv heads); heads are expanded per group, like GQA."""
    d_conv: int = 4
    """Causal depthwise conv width on x, B, C."""
    chunk_size: int = 64
    """Chunk length of the SSD scan (64 is fastest on CPU)."""
    scan_impl: str = "auto"
    """auto: mamba-ssm's fused kernel on CUDA when installed, else chunked; chunked; reference (slow loop)."""
    xbc_activation: str = "silu"
    """Activation after the conv on x, B, C: silu (Mamba-2) or identity (exact linear attention)."""
    gate: str = "silu"
    """z gate: silu (Mamba-2, y*silu(z)) or sigmoid (y*2*sigmoid(z): exactly pass-through when z = 0)."""
    ssm_norm: bool = True
    """Normalise the gated SSM output before out_proj (Mamba-2's gated RMSNorm)."""
    dt_min: float = 0.001
    """Initial SSM step sizes dt are drawn log-uniformly in [dt_min, dt_max] (Mamba-2's init)."""
    dt_max: float = 0.1
    """Upper end of the initial dt range."""
    dt_init_floor: float = 1e-4
    """Initial dt values are clamped to at least this."""
    A_init_min: float = 1.0
    """Initial decay rates A are drawn uniformly in [A_init_min, A_init_max] (stored as log A)."""
    A_init_max: float = 16.0
    """Upper end of the initial decay-rate range."""

    # --- MoE FFN ---------------------------------------------------------------------------
    n_experts: int = 4
    """E: SwiGLU experts per MoE layer."""
    top_k: int = 1
    """K: experts per token."""
    d_ff: int = 11008
    """F: hidden width of each expert."""
    router_weighting: str = "renormalized"
    """renormalized: p_i / sum(p_topk).detach() (value 1 at top-1, router still gets gradient);
    softmax: p_i (Switch)."""
    aux_loss_coef: float = 0.01
    """alpha of the Switch load-balancing loss alpha * E * sum_i f_i * P_i."""
    z_loss_coef: float = 0.001
    """Coefficient of the router z-loss mean(logsumexp(logits)^2)."""

    # --- rest ----------------------------------------------------------------------------------
    norm: str = "layernorm"
    """layernorm (bias-free, as Cohere2) or rmsnorm (as Llama)."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm / RMSNorm."""
    logit_scale: float = 1.0
    """Logits are multiplied by this (Cohere2 keeps it in its config)."""
    tie_embeddings: bool = True
    """The output projection reuses the input embedding matrix (no separate lm_head)."""
    initializer_range: float = 0.02
    """Std of the normal init of embeddings, projections and experts (residual outputs: / sqrt(2 n_layer))."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward: less activation memory, one more forward."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id; unset: the tokenizer's."""
    eos_token_id: int | None = None
    """End-of-sequence token id (generation stops on it); unset: the tokenizer's."""
    pad_token_id: int | None = None
    """Padding token id; unset: the tokenizer's."""

    # derived, not saved
    layer_kinds: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"AetherisConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "d_model", "n_layer", "n_heads", "head_dim", "d_state", "n_groups",
                     "d_conv", "chunk_size", "n_experts", "top_k", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "must be a positive integer")
        if not self.layout or any(c not in LAYER_KINDS for c in self.layout):
            unknown = sorted({c for c in self.layout if c not in LAYER_KINDS}) or ["(empty)"]
            valid = ", ".join(f"{k} = {v}" for k, v in LAYER_KINDS.items())
            raise bad("layout", f"unknown layer letter(s) {', '.join(unknown)}; valid letters: {valid}")
        if self.n_layer % len(self.layout) != 0:
            raise bad("n_layer", f"must be a multiple of len(layout)={len(self.layout)} so the pattern tiles")
        self.layer_kinds = self.layout * (self.n_layer // len(self.layout))
        if self.parallel_pairs and self.layer_kinds != "SM" * (self.n_layer // 2):
            raise bad("layout", "parallel_pairs needs the layout to be (S, M) pairs, e.g. layout='SM'")
        if self.n_heads % self.n_groups != 0:
            raise bad("n_groups", f"must divide n_heads={self.n_heads} (each group serves n_heads/n_groups heads)")
        if self.top_k > self.n_experts:
            raise bad("top_k", f"cannot exceed n_experts={self.n_experts}; use top_k <= n_experts")
        for name, choices in (("norm", NORMS), ("gate", GATES), ("xbc_activation", ACTIVATIONS),
                              ("router_weighting", ROUTER_WEIGHTINGS), ("scan_impl", SCAN_IMPLS)):
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {', '.join(choices)}")
        if not (0 < self.dt_min <= self.dt_max):
            raise bad("dt_min", f"need 0 < dt_min <= dt_max (dt_max={self.dt_max})")
        if not (0 < self.A_init_min <= self.A_init_max):
            raise bad("A_init_min", f"need 0 < A_init_min <= A_init_max (A_init_max={self.A_init_max})")
        if not math.isfinite(self.logit_scale) or self.logit_scale == 0:
            raise bad("logit_scale", "must be a finite non-zero number")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")

    # --- derived sizes ---------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        """H * P: width of the SSM output before out_proj."""
        return self.n_heads * self.head_dim

    @property
    def d_xbc(self) -> int:
        """Channels of the conv: x (G*P) + B (G*N) + C (H*N)."""
        return self.n_groups * self.head_dim + self.n_groups * self.d_state + self.n_heads * self.d_state

    @property
    def d_in_proj(self) -> int:
        """Rows of in_proj: z (H*P) + x, B, C (d_xbc) + dt (H)."""
        return self.d_inner + self.d_xbc + self.n_heads

    # --- plain-data round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, ignore_hf_keys: bool = False) -> AetherisConfig:
        """Build from a dict. Unknown keys are an error naming the nearest valid key.

        ``ignore_hf_keys`` tolerates the bookkeeping keys transformers adds to config.json.
        """
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif ignore_hf_keys and key in HF_BOOKKEEPING_KEYS:
                continue
            else:
                near = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(known))}"
                raise ValueError(f"unknown AetherisConfig key {key!r}{hint}")
        return cls(**kwargs)

    # --- parameter counts ----------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Total and per-token active parameter counts, computed from the shapes alone."""
        D, E, K, F = self.d_model, self.n_experts, self.top_k, self.d_ff
        norm = D  # bias-free LayerNorm or RMSNorm: one weight vector
        ssm = (self.d_in_proj * D + self.d_xbc * (self.d_conv + 1) + 3 * self.n_heads
               + (self.d_inner if self.ssm_norm else 0) + D * self.d_inner)
        expert = 3 * D * F
        n_s, n_m = self.layer_kinds.count("S"), self.layer_kinds.count("M")
        n_norms = self.n_layer // 2 if self.parallel_pairs else self.n_layer
        embed = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        shared = embed + (n_norms + 1) * norm + n_s * ssm + n_m * E * D
        return {"total": shared + n_m * E * expert, "active": shared + n_m * K * expert}
