"""Stage 1 weight transfer: a teacher transformer's weights into an Aetheris student.

Sources: MambaInLlama (Wang et al. 2024) for attention -> SSM, sparse upcycling (Komatsuzaki et al.
2023) for MLP -> experts.

1. ``student_config(teacher_config)``: the student's shape follows the teacher (width, heads,
   head_dim = d_state, kv heads = groups, vocab, norm, logit_scale, tied embeddings, FFN width).
2. ``layer_map(n_teacher_layers, n_pairs)``: pair k covers a contiguous group of teacher layers and is
   initialised from one of them (the last of the group by default).
3. ``transfer(teacher, student)``: per pair, from the initialising teacher layer,

       C <- W_Q·s (H*N rows)     B <- W_K   (G*N rows)     x <- W_V   (G*P rows)     out_proj <- W_O
       (s = the teacher's attention scaling head_dim^-1/2, or 1 with attention_scale=False)
       z rows 0 (with gate="sigmoid": y * 2*sigmoid(0) = y, a pass-through gate; gate="silu" would give
       y * silu(0) = 0, dead mixers, so the transfer refuses it and ``student_config`` defaults to sigmoid)
       dt rows 0, dt_bias / A_log: Mamba-2 defaults or from the teacher's attention span
       conv: identity (last tap 1, others 0, bias 0);  D = 0
       every expert <- the teacher's SwiGLU MLP (optionally perturbed);  router ~ N(0, router_std)

   and norms, embeddings, logit_scale copied. With A = 0, dt = 1, ``xbc_activation="identity"`` and
   ``ssm_norm=False`` the mixer then computes causal linear attention from the teacher's own Q/K/V/O:
   ``y_t = W_O · Σ_{s≤t} s·(q_t·k_s) v_s`` (x and B stay group-sized: the scan serves head h from group
   h // (H/G), exactly like repeat_kv). The scaling keeps the kernel on the scale of the teacher's
   attention logits; without it the unnormalised sum is too large by sqrt(head_dim) (11x at Tiny Aya).

Every student tensor is either copied from a named teacher tensor or set by a named rule; the returned
map says which, and a shape mismatch is an error (never a silent partial copy). On the ``meta`` device
(or with ``shape_only=True``) only shapes are checked: the full-scale mapping test runs that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from aetheris.config import AetherisConfig
from aetheris.teacher import SUPPORTED, check_supported

DT_INITS = ("mamba2", "span")


@dataclass(frozen=True)
class PairMap:
    """Student pair ``pair`` stands in for teacher layers ``first..last`` and is initialised from ``init``."""
    pair: int
    first: int
    last: int
    init: int

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)


def default_pairs(n_teacher_layers: int) -> int:
    """12 pairs for Tiny Aya's 36 layers (3 teacher layers per pair); 1:1 when the depth is not a multiple of 3."""
    return n_teacher_layers // 3 if n_teacher_layers % 3 == 0 else n_teacher_layers


def layer_map(n_teacher_layers: int, n_pairs: int | None = None, init: str = "last") -> list[PairMap]:
    """Contiguous groups of teacher layers, as even as possible (earlier groups take the remainder)."""
    n_pairs = default_pairs(n_teacher_layers) if n_pairs is None else n_pairs
    if not 1 <= n_pairs <= n_teacher_layers:
        raise ValueError(f"n_pairs={n_pairs} must be between 1 and the teacher's {n_teacher_layers} layers")
    if init not in ("last", "first"):
        raise ValueError(f"init={init!r}: choose last or first (which teacher layer of a group initialises its pair)")
    base, extra = divmod(n_teacher_layers, n_pairs)
    out, start = [], 0
    for k in range(n_pairs):
        size = base + (1 if k < extra else 0)
        first, last = start, start + size - 1
        out.append(PairMap(k, first, last, last if init == "last" else first))
        start += size
    return out


def student_config(teacher_config, n_pairs: int | None = None, parallel_pairs: bool = False,
                   **overrides) -> AetherisConfig:
    """The student's AetherisConfig derived from the teacher's HF config; ``overrides`` set other fields
    (n_experts, top_k, gate, ...) but not the ones the transfer needs to match the teacher. The gate defaults
    to sigmoid, the one the transfer's zeroed z rows pass through."""
    model_type = check_supported(teacher_config)
    tc = teacher_config
    n_pairs = default_pairs(tc.num_hidden_layers) if n_pairs is None else n_pairs
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    norm_eps = getattr(tc, "layer_norm_eps", None) or getattr(tc, "rms_norm_eps", None) or 1e-5
    derived = dict(
        vocab_size=tc.vocab_size, d_model=tc.hidden_size, n_layer=2 * n_pairs, layout="SM",
        parallel_pairs=parallel_pairs, n_heads=tc.num_attention_heads, head_dim=head_dim, d_state=head_dim,
        n_groups=kv, d_ff=tc.intermediate_size, norm=SUPPORTED[model_type][2], norm_eps=float(norm_eps),
        logit_scale=float(getattr(tc, "logit_scale", 1.0) or 1.0),
        tie_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        max_seq_len=int(getattr(tc, "max_position_embeddings", 8192) or 8192),
        bos_token_id=tc.bos_token_id, eos_token_id=_first(tc.eos_token_id), pad_token_id=tc.pad_token_id,
    )
    clash = sorted(set(overrides) & set(derived) - {"parallel_pairs", "max_seq_len", "bos_token_id",
                                                     "eos_token_id", "pad_token_id"})
    if clash:
        raise ValueError(f"student fields {', '.join(clash)} follow the teacher and cannot be overridden")
    return AetherisConfig(**{"gate": "sigmoid", **derived, **overrides})


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) and x else x


def check_compatible(teacher_config, cfg: AetherisConfig, pairs: list[PairMap] | None = None) -> None:
    """Raise ValueError naming every student field that does not fit the teacher (before any training)."""
    model_type = check_supported(teacher_config)
    expected = student_config(teacher_config, n_pairs=cfg.n_layer // 2 if cfg.n_layer % 2 == 0 else None,
                              parallel_pairs=cfg.parallel_pairs)
    problems = []
    for name in ("vocab_size", "d_model", "n_heads", "head_dim", "d_state", "n_groups", "d_ff", "norm", "logit_scale"):
        if getattr(cfg, name) != getattr(expected, name):
            problems.append(f"{name}={getattr(cfg, name)!r} (teacher needs {getattr(expected, name)!r})")
    if cfg.layer_kinds != "SM" * (cfg.n_layer // 2):
        problems.append(f"layout={cfg.layout!r} (stage 1 needs (S, M) pairs: layout='SM')")
    if cfg.gate != "sigmoid":
        problems.append(f"gate={cfg.gate!r} (the transfer zeroes the z rows and silu(0) = 0 would make every "
                        "transferred mixer output 0; set student.options.gate=sigmoid, which passes them through)")
    if cfg.tie_embeddings and not expected.tie_embeddings:
        problems.append("tie_embeddings=True (the teacher has a separate lm_head; set tie_embeddings=False)")
    if pairs is not None and len(pairs) != cfg.n_layer // 2:
        problems.append(f"n_layer={cfg.n_layer} ({cfg.n_layer // 2} pairs, but the layer map has {len(pairs)})")
    if problems:
        raise ValueError(f"student config does not fit teacher {model_type}: " + "; ".join(problems))


def pair_modules(student: nn.Module, k: int) -> tuple[list[nn.Module], nn.Module, nn.Module]:
    """(norms, SSM mixer, MoE) of student pair k; norms[0] feeds the SSM, norms[-1] the MoE."""
    if student.cfg.parallel_pairs:
        layer = student.layers[k]
        return [layer.norm], layer.ssm, layer.moe
    s, m = student.layers[2 * k], student.layers[2 * k + 1]
    return [s.norm, m.norm], s.mixer, m.mixer


class _Copier:
    """Copies tensors (or only checks shapes) and records where every student tensor came from."""

    def __init__(self, student: nn.Module, shape_only: bool):
        self.names = {id(p): n for n, p in student.named_parameters()}
        self.shape_only = shape_only
        self.sources: dict[str, str] = {}

    @torch.no_grad()
    def set(self, param: Tensor, value: Tensor | None, source: str, rows: slice | None = None) -> None:
        name = self.names[id(param)]
        target = param if rows is None else param[rows]
        if value is not None and tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"shape mismatch copying {source} {tuple(value.shape)} into {name}"
                             f"{'' if rows is None else f'[{rows.start}:{rows.stop}]'} {tuple(target.shape)}")
        if not self.shape_only and value is not None:
            target.copy_(value.to(device=target.device, dtype=target.dtype))
        key = name if rows is None else f"{name}[{rows.start}:{rows.stop}]"
        self.sources[key] = source

    @torch.no_grad()
    def fill(self, param: Tensor, rule: str, fn, rows: slice | None = None) -> None:
        """Set ``param`` (or some of its rows) by ``fn(tensor)`` in place; ``rule`` names it in the map."""
        target = param if rows is None else param[rows]
        if not self.shape_only:
            fn(target)
        key = self.names[id(param)] if rows is None else f"{self.names[id(param)]}[{rows.start}:{rows.stop}]"
        self.sources[key] = rule


def span_dt(span: float, n_heads: int) -> Tensor:
    """dt per head such that with A = -1 the state keeps 1% of a token after ``span`` steps (exp(-dt*span) = 0.01)."""
    return torch.full((n_heads,), math.log(100.0) / max(span, 1.0))


def transfer(teacher: nn.Module, student: nn.Module, pairs: list[PairMap] | None = None, *,
             dt_init: str = "mamba2", attention_scale: bool = True, expert_noise: float = 0.0,
             router_std: float = 1e-3, shape_only: bool | None = None, seed: int = 0) -> dict[str, str]:
    """Copy the teacher into ``student`` in place; return {student tensor (or row range): source}.

    ``dt_init``: ``mamba2`` keeps the student's Mamba-2 dt/A initialisation; ``span`` sets A = -1 and dt
    from each initialising layer's attention span (sliding window, else the context length).
    ``attention_scale``: C <- W_Q times the teacher's attention scaling (head_dim^-1/2), so the linear
    kernel q·k is on the scale of the teacher's attention logits; False copies W_Q unscaled.
    ``expert_noise``: each expert's weights get ``noise * std(w) * N(0, 1)`` added, so experts can diverge.
    """
    tcfg = teacher.config
    model_type = check_supported(tcfg)
    cfg: AetherisConfig = student.cfg
    pairs = layer_map(tcfg.num_hidden_layers, cfg.n_layer // 2) if pairs is None else pairs
    check_compatible(tcfg, cfg, pairs)
    if dt_init not in DT_INITS:
        raise ValueError(f"dt_init={dt_init!r}: choose {' or '.join(DT_INITS)}")
    if shape_only is None:
        shape_only = any(p.is_meta for p in student.parameters()) or any(p.is_meta for p in teacher.parameters())
    gen = torch.Generator().manual_seed(seed)
    c = _Copier(student, shape_only)
    H, P, N, G = cfg.n_heads, cfg.head_dim, cfg.d_state, cfg.n_groups
    z_end = H * P
    x_rows = slice(z_end, z_end + G * P)
    b_rows = slice(x_rows.stop, x_rows.stop + G * N)
    c_rows = slice(b_rows.stop, b_rows.stop + H * N)
    dt_rows = slice(c_rows.stop, c_rows.stop + H)
    tl = teacher.model.layers
    layer_types = getattr(tcfg, "layer_types", None)

    # 1. Embeddings, final norm, head.
    c.set(student.embed.weight, teacher.model.embed_tokens.weight, "model.embed_tokens.weight")
    c.set(student.norm_f.weight, teacher.model.norm.weight, "model.norm.weight")
    if student.lm_head is not None:
        head = teacher.lm_head.weight
        c.set(student.lm_head.weight, head, "lm_head.weight" + (" (tied to embed_tokens)" if tcfg.tie_word_embeddings else ""))

    for pm in pairs:
        layer = tl[pm.init]
        at, mlp = layer.self_attn, layer.mlp
        src = f"model.layers.{pm.init}"
        norms, ssm, moe = pair_modules(student, pm.pair)
        # 2. Norms: Cohere2 has one pre-norm per (parallel) block; Llama a second one before the MLP.
        post = getattr(layer, "post_attention_layernorm", None)
        c.set(norms[0].weight, layer.input_layernorm.weight, f"{src}.input_layernorm.weight")
        if len(norms) == 2:
            if post is not None:
                c.set(norms[1].weight, post.weight, f"{src}.post_attention_layernorm.weight")
            else:
                c.set(norms[1].weight, layer.input_layernorm.weight, f"{src}.input_layernorm.weight (parallel block's one norm)")
        # 3. Attention -> SSM: z | x <- V | B <- K | C <- Q | dt.
        w = ssm.in_proj.weight
        c.fill(w, "zeros (pass-through z gate)", lambda t: t.zero_(), slice(0, z_end))
        c.set(w, at.v_proj.weight, f"{src}.self_attn.v_proj.weight", x_rows)
        c.set(w, at.k_proj.weight, f"{src}.self_attn.k_proj.weight", b_rows)
        if attention_scale:
            scale = float(getattr(at, "scaling", None) or at.head_dim ** -0.5)
            c.set(w, at.q_proj.weight * scale, f"{src}.self_attn.q_proj.weight * {scale:.6g} (attention scaling)", c_rows)
        else:
            c.set(w, at.q_proj.weight, f"{src}.self_attn.q_proj.weight", c_rows)
        c.fill(w, "zeros (dt from dt_bias only)", lambda t: t.zero_(), dt_rows)
        c.set(ssm.out_proj.weight, at.o_proj.weight, f"{src}.self_attn.o_proj.weight")
        c.fill(ssm.conv_weight, "identity conv (last tap 1)", lambda t: t.zero_()[:, -1].fill_(1.0))
        c.fill(ssm.conv_bias, "zeros", lambda t: t.zero_())
        c.fill(ssm.D, "zeros (no skip: attention has none)", lambda t: t.zero_())
        if dt_init == "span":
            sliding = layer_types is not None and layer_types[pm.init] == "sliding_attention"
            span = getattr(tcfg, "sliding_window", None) if sliding else None
            span = span or getattr(tcfg, "max_position_embeddings", 8192)
            dt = span_dt(float(span), H)
            c.fill(ssm.dt_bias, f"softplus^-1(ln(100)/{span}) (attention span)",
                   lambda t, dt=dt: t.copy_(dt + torch.log(-torch.expm1(-dt))))
            c.fill(ssm.A_log, "zeros (A = -1)", lambda t: t.zero_())
        else:
            c.fill(ssm.dt_bias, "Mamba-2 default (kept)", lambda t: None)
            c.fill(ssm.A_log, "Mamba-2 default (kept)", lambda t: None)
        if ssm.norm is not None:
            c.fill(ssm.norm.weight, "ones", lambda t: t.fill_(1.0))
        # 4. MLP -> every expert (sparse upcycling), small router.
        for name, teacher_w in (("w_gate", mlp.gate_proj.weight), ("w_up", mlp.up_proj.weight),
                                ("w_down", mlp.down_proj.weight)):
            _copy_experts(c, getattr(moe, name), teacher_w, f"{src}.mlp.{name[2:]}_proj.weight", expert_noise, gen)
        c.fill(moe.router.weight, f"N(0, {router_std}) (small router)",
               lambda t: t.copy_(torch.randn(t.shape, generator=gen) * router_std))

    if model_type == "cohere2" or cfg.logit_scale != 1.0:
        c.sources["config.logit_scale"] = f"config.logit_scale = {cfg.logit_scale}"
    return c.sources


@torch.no_grad()
def _copy_experts(c: _Copier, param: Tensor, teacher_w: Tensor, source: str, noise: float, gen) -> None:
    E = param.shape[0]
    if tuple(param.shape[1:]) != tuple(teacher_w.shape):
        raise ValueError(f"shape mismatch copying {source} {tuple(teacher_w.shape)} into each expert of "
                         f"{c.names[id(param)]} {tuple(param.shape[1:])}")
    if not c.shape_only:
        w = teacher_w.to(device=param.device, dtype=param.dtype)
        for e in range(E):
            param[e].copy_(w)
            if noise > 0:
                param[e].add_(torch.randn(w.shape, generator=gen).to(w) * (noise * float(w.float().std())))
    c.sources[c.names[id(param)]] = f"{source} -> all {E} experts" + (f" (+{noise}·std noise)" if noise > 0 else "")


def unmapped(student: nn.Module, sources: dict[str, str]) -> list[str]:
    """Student parameters not (fully) covered by the map; empty when the transfer set every tensor."""
    covered: dict[str, int] = {}
    for key in sources:
        name, _, rows = key.partition("[")
        if rows:
            a, b = rows.rstrip("]").split(":")
            covered[name] = covered.get(name, 0) + int(b) - int(a)
        else:
            covered[name] = -1
    missing = []
    for name, p in student.named_parameters():
        got = covered.get(name)
        if got is None or (got != -1 and got != p.shape[0]):
            missing.append(name)
    return missing
