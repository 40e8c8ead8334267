"""Video DiT with per-frame noise levels and The Matrix's interactive module.

Input: a window of T noisy latent frames, each with its own flow time ``t`` (Swin-DPM / diffusion
forcing), and per-frame control tokens (the action sentence's text-encoder tokens). Output: the
rectified-flow velocity ``v = eps - x0`` for every frame (``x_t = (1 - t) x0 + t eps``).

Each block factorises attention into spatial self-attention (within a frame) and temporal
self-attention (across frames at the same spatial location, block-causal when ``cfg.causal`` so
that frame i only sees frames <= i). Every block is adaLN-Zero modulated per frame by the frame's
timestep embedding plus its pooled control embedding. After every ``cross_every`` blocks an
interactive module cross-attends from each frame's tokens to that frame's control tokens; its
output passes through a zero-initialised gate, so a freshly initialised model ignores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# Flow time t in [0, 1] is scaled to DiT's usual [0, 1000] range before the sinusoidal embedding.
TIME_SCALE = 1000.0
# Width of the sinusoidal timestep features (DiT's frequency_embedding_size).
TIME_FREQ_DIM = 256


@dataclass
class DiTConfig:
    """Video DiT hyper-parameters."""

    latent_channels: int = 8
    """C, channels of the (normalised) VAE latent."""
    latent_hw: tuple[int, int] = (9, 16)
    """(H, W) of the latent."""
    patch: int = 1
    """Patch size; tokens per frame P = ceil(H / patch) * ceil(W / patch). A latent whose sides
    are not multiples of ``patch`` is zero-padded at the bottom/right and the output cropped back
    (9x16 at patch 2: 5x8 = 40 tokens instead of 144)."""
    patch_shift: int = 0
    """Columns the patch grid is moved by, in [0, patch): the latent is rolled left by this many columns
    before patching and the velocity rolled back, so the grid lines fall elsewhere at no cost in tokens
    (the wrapped token holds the latent's first and last columns; the spatial position table tells it
    apart). CarRacing's car sits on latent columns 7-8 of 16, across a line of the patch-2 grid; with 1
    its two columns share one token column (docs/EXPERIMENTS.md, "A patch grid around the car")."""
    dim: int = 192
    """D, hidden width."""
    depth: int = 6
    """Number of DiT blocks."""
    heads: int = 6
    """Attention heads (dim must be divisible by heads)."""
    mlp_ratio: float = 4.0
    """MLP hidden width = mlp_ratio * dim."""
    max_frames: int = 16
    """Maximum window length T (size of the temporal position table)."""
    text_dim: int = 384
    """Dt, width of the control tokens (MiniLM: 384)."""
    cross_every: int = 2
    """Insert an interactive (cross-attention) module after every this many blocks (The Matrix: 2)."""
    causal: bool = True
    """Block-causal temporal attention: frame i attends frames <= i."""
    qk_norm: bool = True
    """RMS-normalise queries and keys per head (stabilises attention logits)."""


DIT_PRESETS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(latent_channels=4, latent_hw=(8, 8), dim=32, depth=2, heads=2, max_frames=8),
    "S": DiTConfig(dim=128, depth=4, heads=4),
    "B": DiTConfig(dim=256, depth=8, heads=8),
}


def get_preset(name: str, **overrides: object) -> DiTConfig:
    """A copy of ``DIT_PRESETS[name]`` with fields replaced by ``overrides``."""
    return replace(DIT_PRESETS[name], **overrides)


def sincos_1d(positions: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of arbitrary-shaped positions.

    Args:
        positions: (...) float tensor.
        dim: feature width (even).
        max_period: lowest frequency's period.

    Returns:
        (..., dim) float32 features ``[cos, sin]``.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=positions.device) / half
    )  # (half,)
    args = positions.float()[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (..., dim)


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """2D sin-cos position table (MAE/DiT): half the channels encode rows, half columns.

    Returns:
        (h * w, dim) float32, row-major over (h, w).
    """
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    emb = torch.cat([sincos_1d(ys.flatten(), dim // 2), sincos_1d(xs.flatten(), dim // 2)], dim=-1)
    return emb  # (h*w, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, T, P, D), shift/scale (B, T, D) -> (B, T, P, D)."""
    return x * (1 + scale[:, :, None]) + shift[:, :, None]


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed in the input's dtype.

    Under bf16 autocast q/k arrive in bf16 while the weight stays fp32; torch's RMSNorm then warns
    and takes its slow mixed-dtype path. Casting the weight keeps the fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d)."""
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    """Multi-head attention over the second-to-last axis with optional QK RMS-norm.

    Queries come from ``x``; keys and values from ``context`` (self-attention when None).
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attend.

        Args:
            x: (B', N, D) queries.
            context: (B', M, Dc) keys/values source; ``x`` when None.
            attn_mask: bool mask broadcastable to (B', heads, N, M' ); True = attend.
            is_causal: causal mask over N == M (no ``kv_prefix``).
            kv_prefix: cached (keys, values) (B', h, M0, d) of earlier positions, put in front of
                this call's keys/values (so M' = M0 + M).

        Returns:
            ``(out (B', N, D), (k, v))`` with this call's own keys/values (B', h, M, d) (normed),
            for a cache.
        """
        context = x if context is None else context
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)  # (B', h, N, d)
        kv = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        k, v = kv.unbind(0)  # 2 x (B', h, M, d)
        q, k = self.q_norm(q), self.k_norm(k)
        k_all, v_all = k, v
        if kv_prefix is not None:
            k_all, v_all = torch.cat([kv_prefix[0], k], dim=2), torch.cat([kv_prefix[1], v], dim=2)  # (B', h, M', d)
        # (B', h, N, d)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(rearrange(out, "b h n d -> b n (h d)")), (k, v)  # (B', N, D)


class DiTBlock(nn.Module):
    """Spatial attention, temporal attention and MLP, each adaLN-Zero modulated per frame."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.causal = cfg.causal
        self.norm_s = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn_s = Attention(d, cfg.heads, cfg.qk_norm)
        self.norm_t = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn_t = Attention(d, cfg.heads, cfg.qk_norm)
        self.norm_m = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        # 3 sub-layers x (shift, scale, gate); zero-init so every block starts as the identity.
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 9 * d))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        prefix_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Apply the block.

        Args:
            x: (B, T, P, D) tokens.
            c: (B, T, D) per-frame conditioning.
            kv_prefix: temporal keys/values (B*P, h, T0, d) of T0 earlier frames (a context cache);
                these frames come after them (block-causal DiTs only).
            prefix_mask: (T, T0+T) bool attention mask that goes with ``kv_prefix`` (built once per call).

        Returns:
            ``(x (B, T, P, D), (k, v))``: the temporal keys/values of these frames, (B*P, h, T, d).
        """
        b, t, p, _ = x.shape
        mods = self.ada(c).chunk(9, dim=-1)  # 9 x (B, T, D)
        sh_s, sc_s, g_s, sh_t, sc_t, g_t, sh_m, sc_m, g_m = mods

        # Spatial attention within each frame.
        h = modulate(self.norm_s(x), sh_s, sc_s)  # (B, T, P, D)
        h, _ = self.attn_s(rearrange(h, "b t p d -> (b t) p d"))  # (B*T, P, D)
        x = x + g_s[:, :, None] * rearrange(h, "(b t) p d -> b t p d", b=b)  # (B, T, P, D)

        # Temporal attention across frames at each spatial location.
        h = modulate(self.norm_t(x), sh_t, sc_t)  # (B, T, P, D)
        h = rearrange(h, "b t p d -> (b p) t d")  # (B*P, T, D)
        if kv_prefix is None:
            h, kv = self.attn_t(h, is_causal=self.causal)  # (B*P, T, D)
        else:  # frame i (after T0 cached ones) sees the cache and frames <= i
            h, kv = self.attn_t(h, attn_mask=prefix_mask, kv_prefix=kv_prefix)
        x = x + g_t[:, :, None] * rearrange(h, "(b p) t d -> b t p d", b=b, p=p)  # (B, T, P, D)

        h = self.mlp(modulate(self.norm_m(x), sh_m, sc_m))  # (B, T, P, D)
        return x + g_m[:, :, None] * h, kv


class InteractiveModule(nn.Module):
    """Frame-aligned cross-attention from each frame's tokens to its own control tokens.

    The output is scaled by ``tanh(gate)`` with ``gate`` initialised to zero (Flamingo-style), so
    inserting the module does not change a model's output until training opens the gate.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        # Text-encoder hidden states have their own scale; normalise before projecting.
        self.ctx_norm = nn.LayerNorm(cfg.text_dim, eps=1e-6)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qk_norm, context_dim=cfg.text_dim)
        self.gate = nn.Parameter(torch.zeros(cfg.dim))

    def forward(self, x: torch.Tensor, ctrl_tokens: torch.Tensor, ctrl_mask: torch.Tensor) -> torch.Tensor:
        """Add gated cross-attention.

        Args:
            x: (B, T, P, D) video tokens.
            ctrl_tokens: (B, T, N, Dt) control tokens of each frame.
            ctrl_mask: (B, T, N) bool, True = real token.

        Returns:
            (B, T, P, D).
        """
        b = x.shape[0]
        # A frame whose mask is all False would make SDPA return NaN: let it attend to everything
        # and zero its output instead (a masked write, no host sync).
        has_ctrl = ctrl_mask.any(dim=-1)  # (B, T)
        safe_mask = ctrl_mask | ~has_ctrl[..., None]  # (B, T, N)
        q = rearrange(self.norm(x), "b t p d -> (b t) p d")  # (B*T, P, D)
        ctx = rearrange(self.ctx_norm(ctrl_tokens), "b t n e -> (b t) n e")  # (B*T, N, Dt)
        mask = rearrange(safe_mask, "b t n -> (b t) 1 1 n")  # (B*T, 1, 1, N)
        h = rearrange(self.attn(q, ctx, attn_mask=mask)[0], "(b t) p d -> b t p d", b=b)  # (B, T, P, D)
        h = h * has_ctrl[:, :, None, None].to(h.dtype)
        return x + torch.tanh(self.gate) * h


@dataclass
class ContextCache:
    """Temporal keys/values of a window's first frames (block-causal DiT), one (k, v) per block."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    """Per block: keys and values, each (B*P, heads, frames, head_dim)."""
    frames: int
    """T0, number of cached frames (the positions the next frames continue from)."""


class VideoDiT(nn.Module):
    """Action-conditioned video diffusion transformer (velocity prediction, per-frame noise level)."""

    pos_spatial: torch.Tensor

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        h, w = cfg.latent_hw
        if cfg.patch < 1:
            raise ValueError(f"patch must be >= 1, got {cfg.patch}")
        if not 0 <= cfg.patch_shift < min(cfg.patch, w):
            raise ValueError(f"patch_shift must be in [0, patch={cfg.patch}) and below the latent width {w}, "
                             f"got {cfg.patch_shift}")
        if cfg.cross_every < 1:
            raise ValueError(f"cross_every must be >= 1, got {cfg.cross_every}")
        self.cfg = cfg
        self.grid = (-(-h // cfg.patch), -(-w // cfg.patch))  # ceil: padded bottom/right
        self.pad = (self.grid[0] * cfg.patch - h, self.grid[1] * cfg.patch - w)  # (rows, cols) of zeros
        d = cfg.dim
        patch_dim = cfg.latent_channels * cfg.patch**2

        self.patch_embed = nn.Linear(patch_dim, d)
        # Fixed spatial table, recomputed from the config (not stored in checkpoints).
        self.register_buffer("pos_spatial", sincos_2d(*self.grid, d), persistent=False)  # (P, D)
        self.pos_temporal = nn.Parameter(torch.zeros(cfg.max_frames, d))  # (T_max, D)
        nn.init.trunc_normal_(self.pos_temporal, std=0.02)

        self.t_embed = nn.Sequential(nn.Linear(TIME_FREQ_DIM, d), nn.SiLU(), nn.Linear(d, d))
        self.ctrl_embed = nn.Linear(cfg.text_dim, d)

        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.interactive = nn.ModuleList(InteractiveModule(cfg) for _ in range(cfg.depth // cfg.cross_every))

        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final = nn.Linear(d, patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        # adaLN-Zero: modulation and output layers start at zero (DiT).
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        for lin in (self.final_ada[-1], self.final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def gates(self) -> list[nn.Parameter]:
        """The interactive modules' gates (pre-tanh), e.g. to log how much control is used."""
        return [m.gate for m in self.interactive]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        ctrl_tokens: torch.Tensor,
        ctrl_mask: torch.Tensor,
        cache: ContextCache | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity of every frame.

        Args:
            x: (B, T, C, H, W) noisy latents, T <= max_frames (minus the cached frames).
            t: (B, T) flow time per frame in [0, 1] (0 clean, 1 pure noise).
            ctrl_tokens: (B, T, N, Dt) control tokens per frame.
            ctrl_mask: (B, T, N) bool, True = real token.
            cache: the window's first frames, run once by :meth:`encode_context`; ``x`` then holds
                the frames after them (block-causal DiTs only). Equal, to float rounding, to running
                the whole window and keeping the last T frames.

        Returns:
            (B, T, C, H, W) velocity ``eps - x0``.
        """
        return self._run(x, t, ctrl_tokens, ctrl_mask, cache)[0]

    def encode_context(
        self, x: torch.Tensor, t: torch.Tensor, ctrl_tokens: torch.Tensor, ctrl_mask: torch.Tensor
    ) -> ContextCache:
        """Run the window's first T0 frames once and keep their temporal keys/values per block.

        With block-causal temporal attention these frames never look at later ones, so their keys
        and values do not change while the frames after them are denoised (Swin-DPM's k Euler
        steps of one shift, or immediate mode's steps): :meth:`forward` with ``cache=`` reuses them.

        Args:
            x, t, ctrl_tokens, ctrl_mask: as :meth:`forward`, for the T0 context frames.

        Returns:
            The cache (per block: keys, values of shape (B*P, heads, T0, head_dim)).
        """
        if not self.cfg.causal:
            raise ValueError("a context cache needs block-causal temporal attention (DiTConfig.causal=True)")
        return self._run(x, t, ctrl_tokens, ctrl_mask, None)[1]

    def _run(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        ctrl_tokens: torch.Tensor,
        ctrl_mask: torch.Tensor,
        cache: ContextCache | None,
    ) -> tuple[torch.Tensor, ContextCache]:
        """Forward pass returning the velocity and every block's temporal keys/values."""
        b, n_frames, _, h, w = x.shape
        p = self.cfg.patch
        offset = 0 if cache is None else cache.frames
        if offset + n_frames > self.cfg.max_frames:
            raise ValueError(f"T={offset + n_frames} exceeds max_frames={self.cfg.max_frames}")

        s = self.cfg.patch_shift
        if s:  # roll left: latent column s lands on the grid's first column (slices export to ONNX)
            x = torch.cat([x[..., s:], x[..., :s]], dim=-1)  # (B, T, C, H, W)
        if any(self.pad):
            x = F.pad(x, (0, self.pad[1], 0, self.pad[0]))  # (B, T, C, gh*p, gw*p)
        # (B, T, P, C*p*p)
        tokens = rearrange(x, "b t c (gh p1) (gw p2) -> b t (gh gw) (c p1 p2)", p1=p, p2=p)
        tokens = self.patch_embed(tokens)  # (B, T, P, D)
        tokens = tokens + self.pos_spatial + self.pos_temporal[offset : offset + n_frames, None]  # (B, T, P, D)

        # Per-frame conditioning: timestep + masked mean of the frame's control tokens.
        mask_f = ctrl_mask.to(ctrl_tokens.dtype)[..., None]  # (B, T, N, 1)
        pooled = (ctrl_tokens * mask_f).sum(dim=2) / mask_f.sum(dim=2).clamp(min=1.0)  # (B, T, Dt)
        t_feat = sincos_1d(t * TIME_SCALE, TIME_FREQ_DIM).to(tokens.dtype)  # (B, T, 256)
        c = self.t_embed(t_feat) + self.ctrl_embed(pooled)  # (B, T, D)

        kvs = []
        prefix_mask = None
        if cache is not None:  # frame i (after the cached ones) attends to the cache and frames <= i
            prefix_mask = torch.ones(n_frames, offset + n_frames, dtype=torch.bool, device=x.device).tril(offset)
        for i, blk in enumerate(self.blocks):
            tokens, kv = blk(tokens, c, None if cache is None else cache.kv[i], prefix_mask)  # (B, T, P, D)
            kvs.append(kv)
            if (i + 1) % self.cfg.cross_every == 0:
                tokens = self.interactive[(i + 1) // self.cfg.cross_every - 1](tokens, ctrl_tokens, ctrl_mask)

        shift, scale = self.final_ada(c).chunk(2, dim=-1)  # 2 x (B, T, D)
        out = self.final(modulate(self.final_norm(tokens), shift, scale))  # (B, T, P, C*p*p)
        v = rearrange(out, "b t (gh gw) (c p1 p2) -> b t c (gh p1) (gw p2)", gh=self.grid[0], p1=p, p2=p)
        v = v[..., :h, :w]  # (B, T, C, H, W)
        if s:  # roll back right
            v = torch.cat([v[..., w - s :], v[..., : w - s]], dim=-1)
        return v, ContextCache(kv=kvs, frames=n_frames)  # (B, T, C, H, W)
