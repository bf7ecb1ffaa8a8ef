"""The Aetheris hybrid language model: Mamba-2 (SSD) mixers interleaved with sparse MoE FFNs.

One file, top to bottom: norms -> SSM mixer -> MoE FFN -> blocks -> the model -> the decode cache.
Imports only torch (and the sibling ops/config modules). Sources: Mamba-2 / SSD (Dao & Gu 2024),
MambaInLlama (Wang et al. 2024) for the attention-shaped mixer, Switch Transformer (Fedus et al. 2022)
and ST-MoE (Zoph et al. 2022) for the router losses.

Shape glossary:
    B batch, T time, D d_model, H SSM heads, P head dim, N state size, G groups (x and B are shared
    by the R = H/G heads of a group, like K/V in GQA), E experts, K top-k, F expert hidden size,
    V vocab, M = B*T flattened tokens, C conv channels (x, B and C of the SSM, concatenated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import AetherisConfig
from . import kernels
from .ssd import causal_conv, segment_index, ssd_chunked, ssd_reference, ssd_step


def no_weight_decay(*params: nn.Parameter) -> None:
    """Tag parameters the optimizer must not decay (read by ``Aetheris.param_groups``)."""
    for p in params:
        p._no_weight_decay = True


def make_norm(cfg: AetherisConfig, dim: int) -> nn.Module:
    # Cohere2 uses a bias-free LayerNorm; Llama-family teachers use RMSNorm.
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=False)
    return nn.RMSNorm(dim, eps=cfg.norm_eps)


# ---------------------------------------------------------------------------------------------------
# SSM mixer
# ---------------------------------------------------------------------------------------------------

@dataclass
class SSMState:
    """Fixed-size decode state of one mixer: the last d_conv-1 conv inputs and the SSM state."""
    conv: Tensor  # (B, d_conv-1, C)
    ssm: Tensor   # (B, H, P, N) fp32


class SSMMixer(nn.Module):
    """Multi-head Mamba-2 mixer with attention-shaped projections.

    in_proj rows are, in order: z (H*P) | x (G*P) | B (G*N) | C (H*N) | dt (H), so that a teacher's
    W_V, W_K, W_Q land on x, B, C and its W_O on out_proj.
    """

    def __init__(self, cfg: AetherisConfig):
        super().__init__()
        self.cfg = cfg
        H, P, N, G = cfg.n_heads, cfg.head_dim, cfg.d_state, cfg.n_groups
        self.split_sizes = [H * P, G * P, G * N, H * N, H]  # z, x, B, C, dt
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_in_proj, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(cfg.d_xbc, cfg.d_conv))  # (C, K) depthwise, causal
        self.conv_bias = nn.Parameter(torch.empty(cfg.d_xbc))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = nn.RMSNorm(H * P, eps=cfg.norm_eps) if cfg.ssm_norm else None
        self.out_proj = nn.Linear(H * P, cfg.d_model, bias=False)
        self.matvec = False  # decode steps through the compiled matvec (``compile_for_decode``)

    def _act(self, xbc: Tensor) -> Tensor:
        return F.silu(xbc) if self.cfg.xbc_activation == "silu" else xbc

    def _gate(self, y: Tensor, z: Tensor) -> Tensor:
        # silu: Mamba-2. sigmoid: 2*sigmoid(z) is exactly 1 at z = 0, a pass-through gate for transfer.
        y = y * (F.silu(z) if self.cfg.gate == "silu" else 2 * torch.sigmoid(z))
        return self.norm(y) if self.norm is not None else y

    def _split_xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _, x, B, C, _ = self.split_sizes
        return xbc.split([x, B, C], dim=-1)

    def _scan(self, x, dt, A, B, C, seg, initial_state):
        impl = self.cfg.scan_impl
        if impl == "reference":
            return ssd_reference(x, dt, A, B, C, seg=seg, initial_state=initial_state)
        if impl == "mamba_ssm" or (impl == "auto" and kernels.mamba_ssm_available(x.device)):
            return kernels.ssd_mamba_ssm(x, dt, A, B, C, self.cfg.chunk_size, seg=seg, initial_state=initial_state)
        return ssd_chunked(x, dt, A, B, C, self.cfg.chunk_size, seg=seg, initial_state=initial_state)

    def forward(self, u: Tensor, seg: Tensor | None = None, pad_mask: Tensor | None = None,
                state: SSMState | None = None) -> tuple[Tensor, SSMState]:
        """u (B, T, D) -> (B, T, D), plus the state after the last step (for decoding).

        seg: (B, T) segment index for packed documents. pad_mask: (B, T) True at real tokens; padded
        steps feed zeros to the conv and scan, so left padding leaves the state exactly as if the
        sequence had started at its first real token.
        """
        cfg = self.cfg
        Bsz, T, _ = u.shape
        H, P, N, G = cfg.n_heads, cfg.head_dim, cfg.d_state, cfg.n_groups
        # 1. Project.
        z, xbc, dt = self.in_proj(u).split([self.split_sizes[0], cfg.d_xbc, H], dim=-1)
        if pad_mask is not None:
            xbc = xbc * pad_mask[..., None].to(xbc.dtype)
        # 2. Causal depthwise conv on x, B, C (reset at document starts), then activation.
        xbc, conv_state = causal_conv(xbc, self.conv_weight, self.conv_bias, seg,
                                      state.conv if state is not None else None)
        if pad_mask is not None:
            xbc = xbc * pad_mask[..., None].to(xbc.dtype)  # pads contribute nothing, not even the conv bias
        x, B, C = self._split_xbc(self._act(xbc))
        x = x.view(Bsz, T, G, P)
        # 3. Selective scan with a scalar decay per head: a_t = exp(dt_t * A).
        dt = F.softplus(dt + self.dt_bias)                                   # (B, T, H)
        A = -torch.exp(self.A_log.float())                                   # (H,)
        y, ssm_state = self._scan(x, dt, A, B.view(Bsz, T, G, N), C.view(Bsz, T, H, N), seg,
                                  state.ssm if state is not None else None)
        # 4. D skip (x is shared by the heads of its group), gate, project out.
        y = y + self.D.view(1, 1, G, H // G, 1).mul(x[:, :, :, None]).reshape(Bsz, T, H, P)
        y = self._gate(y.reshape(Bsz, T, H * P), z)
        return self.out_proj(y), SSMState(conv_state, ssm_state.float())

    def step(self, u: Tensor, state: SSMState) -> Tensor:
        """One decoding step: u (B, D) -> (B, D); updates ``state`` in place. O(1) in the context length."""
        cfg = self.cfg
        Bsz = u.shape[0]
        H, P, N, G = cfg.n_heads, cfg.head_dim, cfg.d_state, cfg.n_groups
        z, xbc, dt = self._project(self.in_proj, u).split([self.split_sizes[0], cfg.d_xbc, H], dim=-1)
        # Conv over the window [last K-1 inputs, this input]: one multiply-add per tap, in place.
        conv, w = state.conv, self.conv_weight                                # (B, K-1, C), (C, K)
        K = w.shape[1]
        out = torch.addcmul(self.conv_bias, xbc, w[:, K - 1])
        for j in range(K - 1):
            out.addcmul_(conv[:, j], w[:, j])
        if K > 1:
            conv[:, :-1] = conv[:, 1:].clone()
            conv[:, -1] = xbc
        x, B, C = self._split_xbc(self._act(out))
        x = x.view(Bsz, G, P)
        dt = F.softplus(dt + self.dt_bias)
        y, _ = ssd_step(state.ssm, x, dt, -torch.exp(self.A_log.float()), B.view(Bsz, G, N), C.view(Bsz, H, N))
        # D skip (x is shared by the heads of its group): y (B, G, R, P) += D (G, R, 1) * x (B, G, 1, P).
        y = y.to(u.dtype).view(Bsz, G, H // G, P).addcmul_(self.D.view(G, H // G, 1), x[:, :, None])
        return self._project(self.out_proj, self._gate(y.view(Bsz, H * P), z))

    def _project(self, linear: nn.Module, x: Tensor) -> Tensor:
        # An nn.Linear, or its PackedLinear once packed; or nn.Linear's weight through the compiled matvec.
        return kernels.decode_linear(x, linear.weight) if self.matvec else linear(x)

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> SSMState:
        cfg = self.cfg
        return SSMState(
            conv=torch.zeros(batch_size, cfg.d_conv - 1, cfg.d_xbc, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, cfg.n_heads, cfg.head_dim, cfg.d_state, device=device, dtype=torch.float32),
        )


# ---------------------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------------------

class MoE(nn.Module):
    """E SwiGLU experts, top-k routing by an fp32 router, tokens dispatched sorted by expert.

    Expert weights are stacked as in nn.Linear: w_gate, w_up (E, F, D) and w_down (E, D, F), so a
    teacher MLP copies straight in. Dropless: every token is processed by its K experts.
    """

    def __init__(self, cfg: AetherisConfig):
        super().__init__()
        self.cfg = cfg
        E, D, Fh = cfg.n_experts, cfg.d_model, cfg.d_ff
        self.router = nn.Linear(D, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, Fh, D))
        self.w_up = nn.Parameter(torch.empty(E, Fh, D))
        self.w_down = nn.Parameter(torch.empty(E, D, Fh))
        self.last_load: Tensor | None = None  # (E,) fraction of routed assignments per expert, last forward
        self.packed_experts: list[tuple[Tensor, Tensor, Tensor]] | None = None  # (gate, up, down) per expert
        self.matvec = False  # batch-1 steps through the compiled matvec (``compile_for_decode``)
        self.down_blocks: Tensor | None = None  # (E, c, D, F/c): w_down in column blocks (``block_down``)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (M, D) -> router logits (M, E) fp32, combine weights (M, K), expert indices (M, K)."""
        # The router runs in fp32 even under bf16 autocast: small logit differences decide routing.
        f = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(f), self.router.weight.to(f))
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.cfg.top_k, dim=-1)                       # (M, K)
        if self.cfg.router_weighting == "renormalized":
            # Value: the usual renormalised top-k weights (exactly 1 at top-1, so an upcycled expert
            # reproduces its MLP). The normaliser is detached, so d(weight)/d(logits) is not zero and
            # the router learns from the main loss even at top-1.
            weights = top_p / top_p.sum(-1, keepdim=True).detach()
        else:
            weights = top_p                                                      # Switch: p_i * E_i(x)
        return logits, weights, top_i

    def aux_loss(self, logits: Tensor, top_i: Tensor, valid: Tensor | None = None) -> Tensor:
        """Switch load balancing alpha*E*sum_i f_i*P_i plus router z-loss; each scaled exactly once.

        valid (M,) bool: the real tokens; padding takes no part in the balance or the z-loss.
        """
        E = self.cfg.n_experts
        if valid is not None:
            logits, top_i = logits[valid], top_i[valid]
            if logits.shape[0] == 0:
                return logits.new_zeros(())
        probs = logits.softmax(-1)
        f = torch.bincount(top_i.flatten(), minlength=E).float() / top_i.numel()  # fraction routed
        P_mean = probs.mean(0)                                                  # mean router prob
        balance = self.cfg.aux_loss_coef * E * (f * P_mean).sum()
        z_loss = self.cfg.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
        return balance + z_loss

    def experts(self, xs: Tensor, counts: list[int]) -> Tensor:
        """Run tokens already sorted by expert: xs (M*K, D), counts per expert -> (M*K, D)."""
        outs = [self.expert(e, x_e) for e, x_e in enumerate(xs.split(counts)) if x_e.shape[0] > 0]
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[-1])

    def expert(self, e: int, x: Tensor) -> Tensor:
        """SwiGLU expert e: x (m, D) -> (m, D)."""
        if self.packed_experts is not None:  # the decode layout (``pack_for_decode``)
            gate, up, down = self.packed_experts[e]
            h = F.silu(kernels.packed_linear(x, gate)) * kernels.packed_linear(x, up)  # (m, F)
            return kernels.packed_linear(h, down)
        linear = kernels.decode_linear if self.matvec else F.linear
        h = F.silu(linear(x, self.w_gate[e])) * linear(x, self.w_up[e])                 # (m, F)
        if self.down_blocks is not None:
            return kernels.blocked_linear(h, self.down_blocks[e])
        return linear(h, self.w_down[e])

    def dispatch(self, x: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (M, D) -> output (M, D), router logits (M, E), expert indices (M, K). valid (M,) bool marks the
        real tokens that the reported expert load counts (padding is routed too, but not counted)."""
        K = self.cfg.top_k
        logits, weights, top_i = self.route(x)
        # 1. Sort the M*K (token, expert) assignments by expert.
        flat_e = top_i.flatten()                                      # (M*K,)
        order = flat_e.argsort(stable=True)
        token_of = order // K                                         # token index of each sorted slot
        counts = torch.bincount(flat_e, minlength=self.cfg.n_experts)
        # 2. One dense matmul per expert over its contiguous group of tokens.
        ys = self.experts(x[token_of], counts.tolist())               # (M*K, D)
        # 3. Weight and scatter back to token order (adds the K contributions of each token).
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        # The output takes the experts' dtype, not x's: under autocast x (a norm output) is fp32 while the
        # expert matmuls return bf16, and index_add_ needs one dtype on both sides.
        out = ys.new_zeros(x.shape[0], ys.shape[-1]).index_add_(0, token_of, ys)
        if valid is None:
            self.last_load = counts.detach().float() / flat_e.numel()
        else:
            real = top_i[valid].flatten()
            self.last_load = torch.bincount(real, minlength=self.cfg.n_experts).float() / max(real.numel(), 1)
        return out, logits, top_i

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, D) -> (B, T, D) and the (already scaled) aux loss. pad_mask (B, T): True at real tokens."""
        valid = pad_mask.reshape(-1) if pad_mask is not None else None
        out, logits, top_i = self.dispatch(x.reshape(-1, x.shape[-1]), valid)
        return out.view(x.shape), self.aux_loss(logits, top_i, valid)

    def step(self, x: Tensor) -> Tensor:
        """Decoding: x (B, D) -> (B, D). Same routing, no aux loss.

        One row (batch-1 decoding) skips the sort/scatter machinery: its K experts run directly on it.
        The matmuls are matrix-vector products bound by streaming the weights, so the dispatch ops
        (argsort, bincount, index, index_add) were a large share of the step's time.
        """
        if x.shape[0] != 1:
            return self.dispatch(x)[0]
        _, weights, top_i = self.route(x)
        out = None
        for k, e in enumerate(top_i[0].tolist()):
            y = self.expert(e, x) * weights[:, k:k + 1].to(x.dtype)                     # (1, D)
            out = y if out is None else out + y
        return out

    def pack(self) -> None:
        """Replace the stacked expert weights by one oneDNN-packed copy per expert matrix (``pack_for_decode``)."""
        self.packed_experts = [tuple(kernels.pack_weight(w[e]) for w in (self.w_gate, self.w_up, self.w_down))
                               for e in range(self.cfg.n_experts)]
        del self.w_gate, self.w_up, self.w_down  # the packed copies are the weights now: no second copy

    def block_down(self, block: int) -> bool:
        """Replace w_down by its column blocks (``kernels.block_columns``: rows of at most ``block`` inputs, for
        the compiled matvec); False (nothing changed) when F has no divisor giving such blocks."""
        blocks = [kernels.block_columns(self.w_down[e], block) for e in range(self.cfg.n_experts)]
        if blocks[0] is None:
            return False
        self.down_blocks = torch.stack(blocks)
        del self.w_down  # the blocks are the weight now: no second copy
        return True

    def unblock_down(self) -> None:
        """Undo ``block_down``: w_down (E, D, F) again, a parameter."""
        self.w_down = nn.Parameter(torch.stack([kernels.unblock_columns(b) for b in self.down_blocks]))
        self.down_blocks = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed_experts is not None:  # a packed model still saves the stacked (E, F, D) / (E, D, F) weights
            for i, name in enumerate(("w_gate", "w_up", "w_down")):
                destination[prefix + name] = torch.stack([p[i].to_dense() for p in self.packed_experts])
        if self.down_blocks is not None:
            destination[prefix + "w_down"] = torch.stack([kernels.unblock_columns(b) for b in self.down_blocks])

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if self.packed_experts is not None or self.down_blocks is not None:
            raise RuntimeError(PACKED_LOAD)
        super()._load_from_state_dict(state_dict, prefix, *args)


# ---------------------------------------------------------------------------------------------------
# Blocks and model
# ---------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm residual layer: h + mixer(norm(h)), the mixer an SSM ("S") or an MoE FFN ("M")."""

    def __init__(self, cfg: AetherisConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = make_norm(cfg, cfg.d_model)
        self.mixer = SSMMixer(cfg) if kind == "S" else MoE(cfg)

    def forward(self, h: Tensor, seg: Tensor | None, pad_mask: Tensor | None) -> tuple[Tensor, Tensor, SSMState | None]:
        if self.kind == "S":
            y, state = self.mixer(self.norm(h), seg, pad_mask)
            return h + y, h.new_zeros(()), state
        y, aux = self.mixer(self.norm(h), pad_mask)
        return h + y, aux, None

    def step(self, h: Tensor, state: SSMState | None) -> Tensor:
        n = self.norm(h)
        return h + (self.mixer.step(n, state) if self.kind == "S" else self.mixer.step(n))


class ParallelPair(nn.Module):
    """Cohere2-style parallel block for an (S, M) pair: h + ssm(n) + moe(n), n = norm(h)."""

    def __init__(self, cfg: AetherisConfig):
        super().__init__()
        self.norm = make_norm(cfg, cfg.d_model)
        self.ssm = SSMMixer(cfg)
        self.moe = MoE(cfg)

    def forward(self, h: Tensor, seg: Tensor | None, pad_mask: Tensor | None) -> tuple[Tensor, Tensor, SSMState]:
        n = self.norm(h)
        y, state = self.ssm(n, seg, pad_mask)
        m, aux = self.moe(n, pad_mask)
        return h + y + m, aux, state

    def step(self, h: Tensor, state: SSMState) -> Tensor:
        n = self.norm(h)
        return h + self.ssm.step(n, state) + self.moe.step(n)


@dataclass
class AetherisOutput:
    logits: Tensor                         # (B, T, V)
    loss: Tensor | None = None             # ce_loss + aux_loss, what training backpropagates
    ce_loss: Tensor | None = None          # mean next-token cross-entropy over labels != -100
    aux_loss: Tensor | None = None         # sum over MoE layers of their scaled aux losses
    expert_load: Tensor | None = None      # (n_moe_layers, E) fraction of assignments per expert
    cache: AetherisCache | None = None     # decode state after the last position


@dataclass
class AetherisCache:
    """Decode state of the whole model: one SSMState per SSM mixer. Its size never grows with T."""
    states: list[SSMState] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(s.conv.numel() * s.conv.element_size() + s.ssm.numel() * s.ssm.element_size()
                   for s in self.states)

    def select(self, index: Tensor) -> AetherisCache:
        """Keep batch rows ``index`` (e.g. to drop finished sequences)."""
        return AetherisCache([SSMState(s.conv[index], s.ssm[index]) for s in self.states])

    def cat(self, other: AetherisCache) -> AetherisCache:
        """Rows of ``self`` followed by rows of ``other`` (e.g. to let new requests join a running batch)."""
        return AetherisCache([SSMState(torch.cat([a.conv, b.conv]), torch.cat([a.ssm, b.ssm]))
                              for a, b in zip(self.states, other.states)])


IGNORE_INDEX = -100  # one ignore index everywhere (HF's convention)


class Aetheris(nn.Module):
    """The hybrid language model. ``forward`` trains and prefills; ``step`` decodes one token."""

    def __init__(self, cfg: AetherisConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.parallel_pairs:
            self.layers = nn.ModuleList(ParallelPair(cfg) for _ in range(cfg.n_layer // 2))
        else:
            self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_kinds)
        self.norm_f = make_norm(cfg, cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.decode_layout = "linear"      # "packed" / "packed-head" (``pack_for_decode``), "compiled" (``compile_for_decode``)
        self.packed_head: Tensor | None = None  # the tied head's packed copy ("packed-head"), next to the embedding
        self.init_weights()
        self.tag_no_weight_decay()

    # --- weights ---------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialisation in one place. Mamba-2 defaults for dt/A; GPT-2 scaling for residual outputs."""
        cfg = self.cfg
        std = cfg.initializer_range
        residual_std = std / math.sqrt(2 * cfg.n_layer)
        nn.init.normal_(self.embed.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for module in self.modules():
            if isinstance(module, SSMMixer):
                nn.init.normal_(module.in_proj.weight, std=std)
                nn.init.normal_(module.out_proj.weight, std=residual_std)
                bound = 1 / math.sqrt(cfg.d_conv)  # nn.Conv1d's default for a depthwise conv
                nn.init.uniform_(module.conv_weight, -bound, bound)
                nn.init.zeros_(module.conv_bias)
                # dt ~ log-uniform in [dt_min, dt_max]; store its softplus inverse as the bias.
                dt = torch.exp(torch.rand(cfg.n_heads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                               + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                module.A_log.copy_(torch.log(torch.empty(cfg.n_heads).uniform_(cfg.A_init_min, cfg.A_init_max)))
                nn.init.ones_(module.D)
            elif isinstance(module, MoE):
                nn.init.normal_(module.router.weight, std=std)
                nn.init.normal_(module.w_gate, std=std)
                nn.init.normal_(module.w_up, std=std)
                nn.init.normal_(module.w_down, std=residual_std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)

    def tag_no_weight_decay(self) -> None:
        """Tag A_log, dt_bias, D, conv bias and norm weights (again after loading replaced the tensors)."""
        for module in self.modules():
            if isinstance(module, SSMMixer):
                no_weight_decay(module.conv_bias, module.dt_bias, module.A_log, module.D)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                no_weight_decay(module.weight)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: tagged parameters (A_log, dt_bias, D, norms, biases) get no weight decay."""
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            (no_decay if getattr(p, "_no_weight_decay", False) or p.ndim < 2 else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- forward -----------------------------------------------------------------------------------
    def logits(self, h: Tensor) -> Tensor:
        h = self.norm_f(h)
        if self.packed_head is not None:
            return kernels.packed_linear(h, self.packed_head) * self.cfg.logit_scale
        if self.decode_layout == "compiled":
            head = self.embed.weight if self.lm_head is None else self.lm_head.weight
            return kernels.decode_linear(h, head) * self.cfg.logit_scale
        if self.lm_head is not None:
            return self.lm_head(h) * self.cfg.logit_scale  # an nn.Linear, or its PackedLinear once packed
        return F.linear(h, self.embed.weight) * self.cfg.logit_scale

    # --- a packed model (``pack_for_decode``) is inference only ----------------------------------------
    def inference_only(self) -> bool:
        """Packed (``pack_for_decode``), or compiled with blocked expert weights (``compile_for_decode``)."""
        return self.decode_layout in PACKED_LAYOUTS or any(
            m.down_blocks is not None for m in self.modules() if isinstance(m, MoE))

    def train(self, mode: bool = True) -> Aetheris:
        if mode and self.inference_only():
            raise RuntimeError(kernels.PACKED_INFERENCE_ONLY)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # .to(), .float(), .cuda() reach parameters and buffers only, never the packed copies.
        if self.inference_only():
            raise RuntimeError("this model's weights are packed for decoding (aetheris.model.pack_for_decode or "
                               "compile_for_decode); move or cast the model (.to(), .float(), ...) before packing it, "
                               "not after")
        return super()._apply(fn, recurse)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, doc_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, logits_to_keep: int = 0) -> AetherisOutput:
        """input_ids (B, T). labels (B, T), shifted here (position t predicts t+1), -100 ignored.

        doc_ids (B, T): packed documents; every mixer resets its state wherever the id changes.
        attention_mask (B, T): 1 at real tokens, 0 at (left) padding.
        logits_to_keep: if > 0, only the last that many positions get logits (prefill needs one; with a
        262k vocabulary full logits are 1 MiB per token).
        """
        seg = segment_index(doc_ids) if doc_ids is not None else None
        pad_mask = attention_mask.bool() if attention_mask is not None else None
        h = self.embed(input_ids)                                          # (B, T, D)
        aux = h.new_zeros((), dtype=torch.float32)
        states = []
        for layer in self.layers:
            if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, layer_aux, state = checkpoint(layer, h, seg, pad_mask, use_reentrant=False)
            else:
                h, layer_aux, state = layer(h, seg, pad_mask)
            aux = aux + layer_aux
            if state is not None:
                states.append(state)
        if logits_to_keep > 0:
            if labels is not None:
                raise ValueError("logits_to_keep cannot be combined with labels (the loss needs every position)")
            h = h[:, -logits_to_keep:]
        logits = self.logits(h)                                            # (B, T, V)
        out = AetherisOutput(logits=logits, aux_loss=aux, cache=AetherisCache(states),
                             expert_load=self.expert_load())
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_logits = shift_logits.to(torch.promote_types(shift_logits.dtype, torch.float32))
            shift_labels = labels[:, 1:].reshape(-1)
            out.ce_loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
            out.loss = out.ce_loss + aux
        return out

    def expert_load(self) -> Tensor | None:
        loads = [m.last_load for m in self.modules() if isinstance(m, MoE) and m.last_load is not None]
        return torch.stack(loads) if loads else None

    # --- decoding ----------------------------------------------------------------------------------
    def empty_cache(self, batch_size: int) -> AetherisCache:
        p = self.embed.weight
        return AetherisCache([m.empty_state(batch_size, p.device, p.dtype)
                              for m in self.modules() if isinstance(m, SSMMixer)])

    @torch.no_grad()
    def step(self, input_ids: Tensor, cache: AetherisCache) -> Tensor:
        """input_ids (B,) -> next-token logits (B, V); advances ``cache`` in place by one token."""
        h = self.embed(input_ids)                                          # (B, D)
        states = iter(cache.states)
        for layer in self.layers:
            has_ssm = isinstance(layer, ParallelPair) or layer.kind == "S"
            h = layer.step(h, next(states) if has_ssm else None)
        return self.logits(h)


# ---------------------------------------------------------------------------------------------------
# Decode weight layout (inference only)
# ---------------------------------------------------------------------------------------------------

DECODE_LAYOUTS = ("linear", "packed", "packed-head", "compiled")
PACKED_LAYOUTS = ("packed", "packed-head")
PACKED_LOAD = ("this model's weights are packed for decoding (aetheris.model.pack_for_decode or compile_for_decode): "
               "load weights into an unpacked model, then pack it")


class PackedLinear(nn.Module):
    """A bias-free ``nn.Linear`` whose weight is held only in oneDNN's prepacked layout (``kernels.pack_weight``).

    Same call, same state-dict key (``weight``, written back in (out, in) layout), so a packed model still
    saves normal checkpoints. Inference only: calling it with gradients enabled is an error.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear packs bias-free linears only (every Aetheris projection is bias-free)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = kernels.pack_weight(linear.weight)  # a plain attribute: not a parameter, not a buffer

    def forward(self, x: Tensor) -> Tensor:
        return kernels.packed_linear(x, self.packed)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.packed.to_dense()

    def _load_from_state_dict(self, *args):
        raise RuntimeError(PACKED_LOAD)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False, layout=oneDNN-packed"


def pack_for_decode(model: Aetheris, tied_head: bool = False) -> str | None:
    """Put the weights that batch-1 decoding streams into oneDNN's prepacked layout, in place.

    Packed: every SSM mixer's in_proj / out_proj, every expert's gate / up / down matrices, and an untied
    lm_head. Each packed copy *replaces* its weight (no extra memory), and ``state_dict`` writes the weights
    back in their usual layout, so saving a packed model writes a normal checkpoint. Not packed: the router
    (E x D: 16 KB at Tiny Aya's width) and the embedding (a lookup). A tied head is the embedding itself, which the
    lookup still needs in its own layout: ``tied_head=True`` adds a packed copy of it (V x D more bytes;
    docs/BENCHMARKS.md measures what it buys). Prefill (``forward``) and batched steps run on the packed
    weights too: oneDNN's packed layout is at least as fast as ``F.linear`` for matrix-matrix products.

    Afterwards the model is inference only: it is put in eval mode, and training, gradients, ``.to()`` and
    ``load_state_dict`` are errors that say so. Returns None when packed, else why the model was left
    unpacked (one line: not on CPU, no oneDNN, or a dtype other than float32 / bfloat16).
    """
    reason = kernels.packed_linear_unsupported(model.embed.weight)
    if reason is not None:
        return reason
    if model.decode_layout == "compiled":  # the packed weights replace what the compiled matvec read
        _set_matvec(model, False)
    if model.decode_layout == "packed-head" or (model.decode_layout == "packed" and not tied_head):
        return f"the model is already packed ({model.decode_layout})"
    if model.decode_layout == "linear":  # ("packed" asked for tied_head: only the head is left to add)
        model.eval()
        for mixer in [m for m in model.modules() if isinstance(m, SSMMixer)]:
            mixer.in_proj, mixer.out_proj = PackedLinear(mixer.in_proj), PackedLinear(mixer.out_proj)
        for moe in [m for m in model.modules() if isinstance(m, MoE)]:
            moe.pack()
        if model.lm_head is not None:
            model.lm_head = PackedLinear(model.lm_head)
    if tied_head and model.lm_head is None:
        model.packed_head = kernels.pack_weight(model.embed.weight)
    model.decode_layout = "packed-head" if tied_head else "packed"
    return None


def apply_decode_layout(model: Aetheris, layout: str) -> str | None:
    """Put ``model`` in decode ``layout`` (one of ``DECODE_LAYOUTS``) in place: "linear" leaves it as it is,
    "compiled" is ``compile_for_decode``, "packed" / "packed-head" ``pack_for_decode``. Returns None when applied,
    else why the model was left as it was (one line)."""
    if layout not in DECODE_LAYOUTS:
        raise ValueError(f"decode layout {layout!r} is not one of {', '.join(DECODE_LAYOUTS)}")
    if layout == "linear":
        return None
    if layout == "compiled":
        return compile_for_decode(model)
    return pack_for_decode(model, tied_head=layout == "packed-head")


def _set_matvec(model: Aetheris, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, (SSMMixer, MoE)):
            m.matvec = on
            if not on and isinstance(m, MoE) and m.down_blocks is not None:
                m.unblock_down()
    model.decode_layout = "compiled" if on else "linear"


def compile_for_decode(model: Aetheris, block_over: int = 4096, block: int = 2048) -> str | None:
    """Run batch-1 decode steps' weight products through the compiled matvec (``kernels.decode_linear``).

    Covers what ``pack_for_decode`` packs (the SSM projections, the experts, the head) and, unlike it, the tied
    head too at no memory cost: the kernel reads ``nn.Linear``'s own layout, so no weight is copied or moved.
    Only experts whose down projections have rows longer than ``block_over`` inputs (Tiny Aya's student: 11,008;
    the demo's: 256) get those weights reordered into column blocks of at most ``block`` inputs, replacing them
    (``MoE.block_down``: ~2.4x faster there). A model without such weights stays a normal model (``.to()``,
    ``state_dict``, training: batches and autograd run ``F.linear``); one with blocked weights is inference only,
    as a packed model is, and still saves normal checkpoints. Compiles the kernels for every weight shape now
    (seconds; Inductor caches the C++ on disk) rather than inside the first request. Returns None when on, else
    why the model was left as it was (one line: not on the CPU, a dtype other than float32 / bfloat16, no C++
    compiler for Inductor, or already packed).
    """
    if model.decode_layout in PACKED_LAYOUTS:
        return (f"the model's weights are packed ({model.decode_layout}); load it again to use the compiled "
                "layout instead")
    reason = kernels.compiled_matvec_unsupported(model.embed.weight)
    if reason is not None:
        return reason
    _set_matvec(model, True)
    model.eval()
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        if moe.down_blocks is None and moe.cfg.d_ff > block_over:
            moe.block_down(block)
    with torch.no_grad():  # every weight shape once, so no compile waits for a request
        for product, weight in decode_products(model).values():
            product(weight.new_zeros(1, kernels.in_features(weight)), weight)
    return None


def decode_products(model: Aetheris) -> dict[tuple, tuple]:
    """One (product, weight) per distinct weight shape that a compiled batch-1 step multiplies by, keyed by
    (product, shape): the projections, the gate/up and down (or down blocks) of an expert, the head."""
    out = {}
    for m in model.modules():
        if isinstance(m, SSMMixer):
            pairs = [(kernels.decode_linear, m.in_proj.weight), (kernels.decode_linear, m.out_proj.weight)]
        elif isinstance(m, MoE):
            pairs = [(kernels.decode_linear, m.w_gate[0]), (kernels.decode_linear, m.w_up[0]),
                     (kernels.blocked_linear, m.down_blocks[0]) if m.down_blocks is not None
                     else (kernels.decode_linear, m.w_down[0])]
        else:
            continue
        for product, weight in pairs:
            out.setdefault((product, tuple(weight.shape)), (product, weight))
    head = model.embed.weight if model.lm_head is None else model.lm_head.weight
    out.setdefault((kernels.decode_linear, tuple(head.shape)), (kernels.decode_linear, head))
    return out
