"""Swin-DPM: The Matrix's sliding-window sampler for endless, action-conditioned latent video.

The window holds ``context`` clean frames (flow time 0) followed by ``G`` noisy frames at
staggered flow times ``(1/G, 2/G, ..., 1)`` (the head, right after the context, is the least
noisy; ``level_shift`` can warp these times). One *shift* runs ``k`` Euler steps of the
rectified flow (``x <- x + (t' - t) v``) over the whole window, lowering every noisy frame by one
level; the head reaches 0 and is emitted, the window slides by one frame (the emitted frame
becomes the newest context frame, the oldest one drops out), and a pure-noise frame enters at the
tail. Memory is flat: the window has a fixed length.

Three ways for the newest action to reach the frames (DESIGN.md §4, "action latency"):

* ``"pipelined"``: the new action conditions only the pure-noise tail frame, which is emitted
  ``G - 1`` shifts later (action latency G - 1 frames; The Matrix's released sampler).
* ``"reconditioned"``: every step the control of *all* in-flight frames is replaced by the newest
  action, so the emitted head was conditioned on it at least for its last ``1/G`` of denoising
  (latency 0, but a weaker effect; the earlier trajectory followed older actions).
* ``"immediate"``: the window is ``context + 1``; the single noisy frame is denoised from 1 to 0 in
  ``immediate_steps`` Euler steps inside one env step (latency 0, ``immediate_steps`` model
  evaluations per frame; meant for the few-step SCM student). This is exactly the pipelined
  sampler with ``G = 1`` and ``k = immediate_steps``, and shares its code path.

Noise: every stream (batch row) has its own counter-based random stream, keyed by a 63-bit
``noise_key`` and a per-row draw counter (like JAX's PRNG keys): the noise a row receives depends
only on its key and on how many draws it has made, never on the other rows. So a batch of B
streams produces exactly the samples of B separate batch-1 samplers with the same keys, which is
what makes ``make_vec(N)`` equal N single envs, without a Python loop over per-env generators. Keys
are drawn from an explicit ``torch.Generator`` (or passed in, e.g. drawn from an env's
``np_random``). Passing a ``generator`` to :meth:`SwinDPM.step` switches to plain
``torch.randn(generator=...)`` noise shared by the batch instead.

Start: :meth:`SwinDPM.init_state` / :meth:`SwinDPM.reset_where` fill the in-flight frames with
noise at their own levels around the last context frame, ``x_g = (1 - t_g) ctx[-1] + t_g eps`` with
the reset control, i.e. the forward process applied to a "the scene does not move" guess of the
next frames. It costs no model evaluation (a masked write, so resets of single streams inside a
batched step stay cheap) and keeps every in-flight frame on its training noise level; the first
``G - 1`` emitted frames are therefore pulled towards the last context frame, which matches a car
at the start of an episode. (The alternative, ``G`` warm-up shifts with the reset action, costs
``G * k`` evaluations per reset and cannot be a masked write.)

Context noise (``ctx_noise``): the model *sees* the clean context frames lightly noised to flow
time ``ctx_noise`` (fresh noise each shift, the window keeps the clean frames); models trained
with noised context drift less.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

SamplerMode = Literal["pipelined", "reconditioned", "immediate"]
MODES: tuple[str, ...] = ("pipelined", "reconditioned", "immediate")

# denoise_fn(x (B, L, C, H, W), t (B, L), ctrl_idx (B, L) long) -> v (B, L, C, H, W); with a context
# cache (see SwinDPM.step) it is called as denoise_fn(x_noisy, t_noisy, ctrl_noisy, cache) for the G noisy frames.
DenoiseFn = Callable[..., torch.Tensor]
# context_fn(x_ctx (B, C_ctx, C, H, W), t_ctx (B, C_ctx), ctrl_ctx (B, C_ctx)) -> an opaque cache
ContextFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]

# Keys are drawn in [0, 2**63 - 1) so that they fit a signed int64 (torch.long / np.int64).
KEY_HIGH = 2**63 - 1
_M32 = 0xFFFFFFFF
# Domain-separation constants of the stream hash (arbitrary odd 32-bit values).
_KEY_SALT, _STEP_SALT, _POS_SALT = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35
_UNIFORM_SALT = 0x27D4EB2F  # stream_uniform's draws: independent of the noise at the same counter


@dataclass
class SwinDPMConfig:
    """Swin-DPM sampler settings (stored in a checkpoint's ``sampler`` dict)."""

    context: int = 4
    """C_ctx, clean context frames in the window (flow time 0)."""
    groups: int = 4
    """G, noisy frames in flight (one latent frame per noise group) in the windowed modes."""
    steps_per_shift: int = 1
    """k, Euler evaluations of the whole window per shift (The Matrix's distilled sampler: 1)."""
    mode: SamplerMode = "pipelined"
    """How the newest action reaches the frames in flight; see the module docstring."""
    immediate_steps: int = 4
    """Euler steps from noise to a clean frame in ``"immediate"`` mode."""
    ctx_noise: float = 0.0
    """Flow time of the noise the model sees on the clean context frames (0 = none)."""
    level_shift: float = 1.0
    """s, warps every flow time of the noisy frames, ``t -> s t / (1 + (s - 1) t)`` (SD3's time
    shift; 0 and 1 stay fixed), the sub-step times of a shift (k > 1, immediate mode) included.
    1 = evenly spaced levels ``(1/G, ..., 1)``; s < 1 moves them towards clean (a frame's last Euler
    step starts nearer to 0, its first steps are longer); s > 1 towards noise (more, shorter steps
    where the layout forms). Inference-only: the trainer's diffusion-forcing half draws independent
    uniform levels, so warped windows stay in distribution. Measured effects: docs/ARCHITECTURE.md."""
    guidance: float = 1.0
    """Classifier-free guidance scale w on the actions of the frames in flight:
    ``v = v_u + w (v_c - v_u)``, where v_u sees the "unknown" control row on the noisy frames (the
    trainer's per-frame control dropout teaches that row, approximately). 1 = off (one model pass);
    other values cost a second pass over the noisy frames (the context frames' keys/values are
    shared when the DiT is block-causal). Applied by the denoiser the caller passes (``Simulator``)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("context", "groups", "steps_per_shift", "immediate_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= self.ctx_noise < 1.0:
            raise ValueError(f"ctx_noise must be in [0, 1), got {self.ctx_noise}")
        if not (math.isfinite(self.level_shift) and self.level_shift > 0.0):
            raise ValueError(f"level_shift must be a finite number > 0 (1 = evenly spaced), got {self.level_shift}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0.0):
            raise ValueError(f"guidance must be a finite number >= 0 (1 = off), got {self.guidance}")


@dataclass
class SwinDPMState:
    """Batched window state. The sampler updates these buffers in place (fixed addresses)."""

    latents: torch.Tensor
    """(B, L, C, H, W) float32: ``context`` clean frames, then the noisy frames (head first)."""
    ctrl_idx: torch.Tensor
    """(B, L) long: control-table row conditioning each window frame."""
    noise_key: torch.Tensor
    """(B,) long: key of each row's random stream."""
    noise_step: torch.Tensor
    """(B,) long: number of draws each row has made from its stream."""
    memory: torch.Tensor
    """(B, M) float32: the state of a recurrent head reading the stream's emitted frames (the simulator's
    recurrent hazard head; M = 0 without one). The sampler never reads it; a reset zeroes it."""

    @property
    def batch_size(self) -> int:
        """B, number of streams."""
        return self.latents.shape[0]

    def fields(self) -> tuple[torch.Tensor, ...]:
        """The five buffers, in declaration order."""
        return (self.latents, self.ctrl_idx, self.noise_key, self.noise_step, self.memory)

    def select(self, rows: torch.Tensor) -> SwinDPMState:
        """A copy of the rows ``rows`` ((R,) long indices): R streams, sharing no memory with this state."""
        return SwinDPMState(*(f.index_select(0, rows.to(f.device)) for f in self.fields()))

    def write(self, rows: torch.Tensor, src: SwinDPMState) -> None:
        """Overwrite rows ``rows`` ((R,) long, distinct) with ``src``'s R rows, in place (fixed addresses)."""
        for dst, val in zip(self.fields(), src.fields(), strict=True):
            dst.index_copy_(0, rows.to(dst.device), val.to(dst.device, dst.dtype))


# ---------------------------------------------------------------------------------------- noise
def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit integer hash ("lowbias32", C. Wellons) on int64 tensors holding [0, 2**32).

    Products may wrap around int64; only their low 32 bits are kept, which wrapping preserves.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _stream_draw(noise_key: torch.Tensor, noise_step: torch.Tensor, salt: int) -> torch.Tensor:
    """(B,) 32-bit value of each row's draw ``noise_step`` (``salt`` separates independent uses)."""
    key_lo, key_hi = noise_key & _M32, (noise_key >> 32) & _M32  # (B,) each
    seed = _hash32(key_lo ^ _hash32(key_hi ^ _KEY_SALT))  # (B,)
    return _hash32(seed ^ _hash32((noise_step & _M32) ^ salt))  # (B,)


def stream_uniform(noise_key: torch.Tensor, noise_step: torch.Tensor) -> torch.Tensor:
    """(B,) float32 uniforms in (0, 1), one per row, a pure function of ``(noise_key[b], noise_step[b])``.

    Independent of the noise :func:`stream_normal` draws at the same counter (another salt), and it
    does not advance the counter: using it leaves every frame of the stream unchanged. The simulator
    draws its hazard endings with it (same seed, same endings; ``make_vec(N)`` equals N single envs).
    """
    bits = _hash32(_stream_draw(noise_key, noise_step, _UNIFORM_SALT))  # (B,)
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)  # (B,) 24 bits, exact in float32


def stream_normal(noise_key: torch.Tensor, noise_step: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal samples of one draw from each row's counter-based stream.

    Row b's samples are a pure function of ``(noise_key[b], noise_step[b], shape)``, computed with
    integer hashing (exact on every device) and a Box-Muller transform. The key is folded to a
    32-bit stream seed and each draw to a 32-bit value: two episodes share a noise stream with
    probability 2**-32 per pair (about E / 2**32 of E episodes share one with some other), which is
    harmless for training; widening the hash would change every frame the shipped numbers were
    measured with.

    Args:
        noise_key: (B,) long, non-negative stream keys.
        noise_step: (B,) long, the draw counter of each row.
        shape: per-row sample shape.

    Returns:
        (B, *shape) float32 on ``noise_key``'s device.
    """
    numel = math.prod(shape)
    pairs = (numel + 1) // 2
    draw = _stream_draw(noise_key, noise_step, _STEP_SALT)  # (B,)
    pos = _hash32(torch.arange(2 * pairs, device=noise_key.device, dtype=torch.long) ^ _POS_SALT)  # (2P,)
    bits = _hash32((_hash32(draw[:, None] ^ pos) + draw[:, None]) & _M32)  # (B, 2P)
    # 24 high bits -> uniform in (0, 1), exactly representable in float32
    u = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)  # (B, 2P)
    u1, u2 = u[:, :pairs], u[:, pairs:]  # (B, P) each
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)  # (B, 2P)
    return z[:, :numel].reshape(-1, *shape)  # (B, *shape)


def draw_keys(batch_size: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """(B,) long stream keys in [0, 2**63 - 1) from ``generator`` (drawn on its device, then moved)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.randint(0, KEY_HIGH, (batch_size,), generator=generator, dtype=torch.long, device=gen_device)
    return keys.to(device)


# -------------------------------------------------------------------------------------- sampler
def shift_levels(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The level warp ``s t / (1 + (s - 1) t)``: monotone on [0, 1], fixes 0 and 1, identity at s = 1."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


class SwinDPM:
    """The sliding-window sampler. Holds no parameters; level tables are computed once.

    Example::

        sampler = SwinDPM(SwinDPMConfig(context=4, groups=4))
        state = sampler.init_state(ctx_latents, ctrl_idx, generator)
        state, frame = sampler.step(state, denoise_fn, action_idx)   # frame (B, C, H, W)
    """

    def __init__(self, cfg: SwinDPMConfig, device: torch.device | str = "cpu") -> None:
        """Build the level tables.

        Args:
            cfg: sampler settings.
            device: where the tables live (the device of the states it will step).
        """
        self.cfg = cfg
        self.device = torch.device(device)
        immediate = cfg.mode == "immediate"
        self.context = cfg.context
        self.groups = 1 if immediate else cfg.groups
        self.steps = cfg.immediate_steps if immediate else cfg.steps_per_shift
        self.window_len = self.context + self.groups
        g, k = self.groups, self.steps
        # Flow time of noisy group g (0 = head) after j of the k Euler steps: (g + 1)/G - j/(G k).
        j = torch.arange(k + 1, dtype=torch.float64)[:, None]  # (k+1, 1)
        grp = torch.arange(g, dtype=torch.float64)[None, :]  # (1, G)
        noisy_levels = shift_levels(((grp + 1) * k - j) / (g * k), cfg.level_shift)  # (k+1, G)
        ctx_levels = torch.zeros(k + 1, self.context, dtype=torch.float64)  # (k+1, C_ctx)
        levels = torch.cat([ctx_levels, noisy_levels], dim=1).float()  # (k+1, L)
        self.levels = levels.to(self.device)  # (k+1, L): row j = flow times before Euler step j
        # Model input times: context frames are seen at ctx_noise.
        self.t_in = self.levels[:k].clone()  # (k, L)
        self.t_in[:, : self.context] = cfg.ctx_noise
        self.dt = (self.levels[1:] - self.levels[:k])[:, self.context :].contiguous()  # (k, G), -1/(G k) unshifted
        self.start_levels = self.levels[0, self.context :]  # (G,) flow times of the frames in flight

    @property
    def evals_per_step(self) -> int:
        """Model evaluations per emitted frame."""
        return self.steps

    @property
    def action_latency(self) -> int:
        """Frames between an action and the first emitted frame conditioned on it (0 = same step)."""
        return self.groups - 1 if self.cfg.mode == "pipelined" else 0

    # ------------------------------------------------------------------------------ state
    def init_state(
        self,
        ctx_latents: torch.Tensor,
        ctrl_idx: torch.Tensor,
        generator: torch.Generator | None = None,
        noise_key: torch.Tensor | None = None,
        memory_size: int = 0,
    ) -> SwinDPMState:
        """Allocate a state and start every row from ``ctx_latents``.

        Args:
            ctx_latents: (B, C_ctx, C, H, W) clean context frames (at least ``context``; the last
                ``context`` are used).
            ctrl_idx: (B,) or (B, C_ctx) long control rows of the context frames; the (B,) form, or
                the last column, also conditions the initial frames in flight.
            generator: draws the stream keys when ``noise_key`` is None.
            noise_key: (B,) long stream keys in [0, 2**63 - 1).
            memory_size: M, width of the per-stream memory of a recurrent head (``SwinDPMState.memory``).

        Returns:
            A fresh state on the sampler's device.
        """
        b, _, c, h, w = ctx_latents.shape
        dev = self.device
        state = SwinDPMState(
            latents=torch.zeros(b, self.window_len, c, h, w, device=dev, dtype=torch.float32),
            ctrl_idx=torch.zeros(b, self.window_len, device=dev, dtype=torch.long),
            noise_key=torch.zeros(b, device=dev, dtype=torch.long),
            noise_step=torch.zeros(b, device=dev, dtype=torch.long),
            memory=torch.zeros(b, memory_size, device=dev, dtype=torch.float32),
        )
        mask = torch.ones(b, device=dev, dtype=torch.bool)
        return self.reset_where(state, mask, ctx_latents, ctrl_idx, generator, noise_key)

    def reset_where(
        self,
        state: SwinDPMState,
        mask: torch.Tensor,
        ctx_latents: torch.Tensor,
        ctrl_idx: torch.Tensor,
        generator: torch.Generator | None = None,
        noise_key: torch.Tensor | None = None,
    ) -> SwinDPMState:
        """Restart the rows where ``mask`` is True; other rows are untouched (masked writes only).

        The arguments are full-batch tensors; their values in unmasked rows are ignored. Keys drawn
        from ``generator`` are drawn for all B rows, so the generator advances the same way
        whatever the mask.

        Args:
            state: the state to update in place.
            mask: (B,) bool rows to restart.
            ctx_latents: (B, C_ctx', C, H, W) clean context frames, C_ctx' >= ``context``.
            ctrl_idx: (B,) or (B, C_ctx') long control rows of the context frames.
            generator: draws new stream keys when ``noise_key`` is None.
            noise_key: (B,) long new stream keys.

        Returns:
            ``state`` (updated in place).
        """
        c_ctx = self.context
        if ctx_latents.shape[1] < c_ctx:
            raise ValueError(f"need {c_ctx} context frames, got {ctx_latents.shape[1]}")
        dev = self.device
        mask = mask.to(dev)
        ctx = ctx_latents[:, -c_ctx:].to(dev, torch.float32)  # (B, C_ctx, C, H, W)
        ctrl_idx = ctrl_idx.to(dev, torch.long)
        if ctrl_idx.dim() == 1:
            ctrl_idx = ctrl_idx[:, None].expand(-1, c_ctx)  # (B, C_ctx)
        ctrl_ctx = ctrl_idx[:, -c_ctx:]  # (B, C_ctx)
        if noise_key is None:
            noise_key = draw_keys(state.batch_size, generator, dev)
        noise_key = noise_key.to(dev, torch.long)

        key = torch.where(mask, noise_key, state.noise_key)  # (B,)
        step0 = torch.zeros_like(state.noise_step)  # (B,)
        eps = stream_normal(key, step0, (self.groups, *ctx.shape[2:]))  # (B, G, C, H, W)
        lv = self.start_levels[None, :, None, None, None]  # (1, G, 1, 1, 1)
        in_flight = (1.0 - lv) * ctx[:, -1:] + lv * eps  # (B, G, C, H, W)
        window = torch.cat([ctx, in_flight], dim=1)  # (B, L, C, H, W)
        ctrl = torch.cat([ctrl_ctx, ctrl_ctx[:, -1:].expand(-1, self.groups)], dim=1)  # (B, L)

        m5 = mask[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        state.latents.copy_(torch.where(m5, window, state.latents))
        state.ctrl_idx.copy_(torch.where(mask[:, None], ctrl, state.ctrl_idx))
        state.noise_key.copy_(key)
        state.noise_step.copy_(torch.where(mask, step0 + 1, state.noise_step))
        state.memory.masked_fill_(mask[:, None], 0.0)
        return state

    # ------------------------------------------------------------------------------- step
    def _noise(
        self, state: SwinDPMState, shape: tuple[int, ...], generator: torch.Generator | None
    ) -> torch.Tensor:
        """One draw of (B, *shape) standard normals (per-row streams unless ``generator``)."""
        if generator is not None:
            b = state.batch_size
            return torch.randn((b, *shape), generator=generator, device=self.device, dtype=torch.float32)
        eps = stream_normal(state.noise_key, state.noise_step, shape)
        state.noise_step.add_(1)
        return eps

    def step(
        self,
        state: SwinDPMState,
        denoise_fn: DenoiseFn,
        new_ctrl_idx: torch.Tensor,
        generator: torch.Generator | None = None,
        context_fn: ContextFn | None = None,
    ) -> tuple[SwinDPMState, torch.Tensor]:
        """One shift: condition on the newest action, denoise, emit the head, slide the window.

        Args:
            state: window state, updated in place.
            denoise_fn: ``(x (B, L, C, H, W), t (B, L), ctrl_idx (B, L)) -> v (B, L, C, H, W)``,
                the rectified-flow velocity ``eps - x0``.
            new_ctrl_idx: (B,) long control row of the newest action.
            generator: if given, noise comes from it instead of the per-row streams.
            context_fn: for a block-causal model, runs the context frames once per shift and returns
                a cache; the k Euler steps then call ``denoise_fn(x_noisy, t_noisy, ctrl_noisy,
                cache)`` on the G noisy frames only. Within a shift the context frames, their noise,
                levels and controls do not change, so this is exact; it saves ``(k - 1) * C_ctx``
                frame evaluations per shift and is used when k > 1 or with guidance (whose two
                passes then share the context).

        Returns:
            ``(state, frame)`` with frame (B, C, H, W), a new tensor: the emitted clean latent.
        """
        c_ctx, b = self.context, state.batch_size
        lat, ctrl = state.latents, state.ctrl_idx  # (B, L, C, H, W), (B, L)
        new_ctrl_idx = new_ctrl_idx.to(self.device, torch.long)
        if self.cfg.mode == "reconditioned":
            ctrl[:, c_ctx:] = new_ctrl_idx[:, None]  # every frame in flight follows the newest action
        else:
            ctrl[:, -1] = new_ctrl_idx  # only the pure-noise tail frame

        x_in = lat
        if self.cfg.ctx_noise > 0.0:
            s = self.cfg.ctx_noise
            eps_ctx = self._noise(state, (c_ctx, *lat.shape[2:]), generator)  # (B, C_ctx, C, H, W)
            noisy_ctx = (1.0 - s) * lat[:, :c_ctx] + s * eps_ctx  # (B, C_ctx, C, H, W)
        if context_fn is not None and (self.steps > 1 or self.cfg.guidance != 1.0):
            ctx_in = noisy_ctx if self.cfg.ctx_noise > 0.0 else lat[:, :c_ctx]  # (B, C_ctx, C, H, W)
            cache = context_fn(ctx_in, self.t_in[0, :c_ctx].expand(b, -1), ctrl[:, :c_ctx])
            for j in range(self.steps):
                t = self.t_in[j, c_ctx:].expand(b, -1)  # (B, G)
                v = denoise_fn(lat[:, c_ctx:], t, ctrl[:, c_ctx:], cache)  # (B, G, C, H, W)
                lat[:, c_ctx:].add_(self.dt[j][None, :, None, None, None] * v.to(lat.dtype))
        else:
            for j in range(self.steps):  # k Euler steps (a fixed, small count; not a loop over envs)
                if self.cfg.ctx_noise > 0.0:
                    x_in = torch.cat([noisy_ctx, lat[:, c_ctx:]], dim=1)  # (B, L, C, H, W)
                t = self.t_in[j].expand(b, -1)  # (B, L)
                v = denoise_fn(x_in, t, ctrl)  # (B, L, C, H, W)
                lat[:, c_ctx:].add_(self.dt[j][None, :, None, None, None] * v[:, c_ctx:].to(lat.dtype))

        frame = lat[:, c_ctx].clone()  # (B, C, H, W) head, now at flow time 0
        fresh = self._noise(state, tuple(lat.shape[2:]), generator)  # (B, C, H, W)
        # Slide by one: context drops its oldest frame and gains the head; the tail gets fresh noise.
        lat.copy_(torch.cat([lat[:, 1:], fresh[:, None]], dim=1))  # (B, L, C, H, W)
        # The new tail's control is a placeholder until the next step writes the newest action.
        ctrl.copy_(torch.cat([ctrl[:, 1:], ctrl[:, -1:]], dim=1))  # (B, L)
        return state, frame
