"""Batched, device-resident world-model streams: the only object the envs talk to.

``Simulator`` owns B independent streams of a :class:`~world_model.checkpoint.WorldModel`. Each
stream's Swin-DPM window, control indices and random stream live on the device; ``step(actions)``
runs the sampler with ONE batched DiT call per denoising evaluation for all B streams, then the
reward / termination heads on the emitted latents (with a hazard head and ``termination="hazard"``,
also a per-stream random ending at the head's per-step rate, drawn from the stream's own random
stream so that it is seeded like the frames). Per-stream restarts are masked writes
(``reset(mask, ...)``), so nothing in the hot path loops over streams or syncs with the host.
Decoding to pixels is a separate call, so agents that want small or latent observations never pay
for a 720p decode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from world_model.checkpoint import WorldModel
from world_model.device import check_device, slow_precision
from world_model.dit import ContextCache
from world_model.errors import UsageError
from world_model.frames import block_mean
from world_model.heads import TERMINATIONS, per_step_hazard
from world_model.swin_dpm import MODES, SwinDPM, SwinDPMConfig, SwinDPMState, stream_uniform
from world_model.vae import frames_to_tensor, tensor_to_frames

# reward_fn(latents_prev (B, C, H, W), latents (B, C, H, W), actions (B,) long) -> reward (B,)
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
FrameSize = Literal["720p", "native"] | int | tuple[int, int]
# Requested frames up to this many times the VAE's native size per side are upsampled from the
# native decode (bilinear); larger ones come from the 720p decoder, resized down.
HR_THRESHOLD = 2


def sampler_config(world: WorldModel, mode: str | None = None, overrides: dict | None = None) -> SwinDPMConfig:
    """The checkpoint's default sampler settings, optionally with another ``mode`` and other fields.

    Args:
        world: the loaded checkpoint (its ``sampler`` dict holds the shipped settings).
        mode: "pipelined", "reconditioned" or "immediate"; None keeps the checkpoint's.
        overrides: SwinDPMConfig fields to change, e.g. ``{"guidance": 2.0, "ctx_noise": 0.25}``.

    Raises:
        UsageError: unknown fields (in the checkpoint or in ``overrides``), or invalid values.
    """
    return sampler_config_from(world.sampler, mode, overrides)


def sampler_config_from(stored: dict, mode: str | None = None, overrides: dict | None = None) -> SwinDPMConfig:
    """:func:`sampler_config` from a world's stored ``sampler`` dict (its ``config.json``), unloaded."""
    known = {f.name for f in dataclasses.fields(SwinDPMConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise UsageError(f"checkpoint sampler settings have unknown fields {unknown}; known: {sorted(known)}")
    if overrides is not None and not isinstance(overrides, dict):
        raise UsageError(f"sampler overrides must be a dict of SwinDPMConfig fields, got {overrides!r}")
    overrides = dict(overrides or {})
    if mode is not None and overrides.get("mode", mode) != mode:
        raise UsageError(
            f"sampler mode given twice: sampler_mode={mode!r} and sampler={{'mode': {overrides['mode']!r}}}"
        )
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"sampler overrides have unknown fields {unknown}; known: {sorted(known)}")
    settings = {**stored, **overrides}
    if mode is not None:
        if mode not in MODES:
            raise UsageError(f"sampler_mode must be None or one of {MODES}, got {mode!r}")
        settings["mode"] = mode
    try:
        return SwinDPMConfig(**settings)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{e} (sampler settings: {settings})") from e  # the bad value first


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(compile_model: bool | str) -> str | None:
    """torch.compile mode of a ``compile_model`` setting: falsy -> None (eager), truthy -> "default"."""
    if not isinstance(compile_model, str):
        return "default" if compile_model else None
    if compile_model in COMPILE_MODES:
        return compile_model
    raise UsageError(f"compile_model must be True, False or one of {COMPILE_MODES}, got {compile_model!r}")


class Simulator:
    """B world-model streams on one device.

    Example::

        sim = Simulator(world, num_envs=16)
        sim.reset(torch.ones(16, dtype=torch.bool), start_idx, generator=gen)
        latents, reward, terminated = sim.step(actions)       # (16, C, H, W), (16,), (16,)
        frames = sim.decode(latents, (84, 84))                # (16, 84, 84, 3) uint8
    """

    def __init__(
        self,
        world: WorldModel,
        num_envs: int,
        device: torch.device | str = "cpu",
        sampler: SwinDPMConfig | None = None,
        dtype: torch.dtype = torch.float32,
        reward_fn: RewardFn | None = None,
        compile_model: bool | str = False,
        context_cache: bool = True,
        backend: str = "torch",
        termination: str | None = None,
        obs_decoder: bool = False,
    ) -> None:
        """Move the model to ``device``, cache the control tables and allocate the stream state.

        Args:
            world: the loaded world model; its modules are moved to ``device`` in place.
            num_envs: B, number of streams.
            device: where models and stream state live.
            sampler: Swin-DPM settings; default the checkpoint's.
            dtype: compute dtype of the networks: float32, or bfloat16 / float16 via autocast
                (the stream state stays float32).
            reward_fn: optional replacement of the reward head.
            compile_model: run the full-window DiT calls through ``torch.compile`` (inductor; fixed
                shapes, since the batch never changes); the first step pays the compilation (about a
                minute on a 2-core CPU). True is torch.compile's "default" mode; a mode name from
                ``COMPILE_MODES`` picks another: "reduce-overhead" replays the call as a CUDA graph
                on a GPU (one launch instead of hundreds: what small batches are bound by there).
                Calls that use the context cache stay eager, so it only
                matters for samplers with one evaluation per shift and no guidance (pipelined k=1,
                the default; guidance runs through the cache with a block-causal DiT).
            context_cache: with a block-causal DiT and several model evaluations per shift
                (``steps_per_shift`` > 1, or ``immediate`` mode), run the context frames once per
                shift and reuse their keys/values (exact; see ``SwinDPM.step``).
            backend: who runs the full-window DiT calls: "torch" (eager, or compiled), or the
                DiT exported to ONNX and run by "onnxruntime" (CPU or CUDA; float32, equal to torch
                to ~1e-5) or "tensorrt" (CUDA); see ``world_model.export.onnx``. The export is
                cached on disk; the first use pays it (10-20 s on 2 CPU cores). Context-cache calls
                stay in torch, as with ``compile_model``.
            termination: how a step ends an episode (``HeadsConfig.termination``): "threshold" (the
                termination logit above its threshold) or "hazard" (that, or a draw at the hazard
                head's per-step rate; a world with a hazard head only); None: the world's own.
            obs_decoder: decode observations of a given (h, w) up to ``HR_THRESHOLD`` x the native size
                per side with the world's narrow observation decoder when it has one
                (``train-obs-decoder``); the envs pass True. False (here the default, so that the
                evaluations measure the world's own frames): with the VAE's ``decode``.

        Raises:
            UsageError: the sampler window does not fit the model or the start contexts.
        """
        if num_envs < 1:
            raise UsageError(f"num_envs must be >= 1, got {num_envs}")
        self.world = world
        self.num_envs = num_envs
        self.device = check_device(device)
        self.dtype = dtype
        slow = slow_precision(self.device, dtype)
        if slow is not None:  # asked for speed, would get a several-fold slowdown: say so once
            warnings.warn(f"dtype={dtype} on {self.device}: {slow}; dtype=float32 is faster here", stacklevel=2)
        if reward_fn is not None and not callable(reward_fn):
            raise UsageError(
                f"reward_fn must be a callable (z_prev, z_next, actions) -> (B,) rewards, got {reward_fn!r}"
            )
        self.reward_fn = reward_fn
        self.cfg = sampler if sampler is not None else sampler_config(world)
        self.sampler = SwinDPM(self.cfg, self.device)
        if self.sampler.window_len > world.dit.cfg.max_frames:
            raise UsageError(
                f"sampler window of {self.sampler.window_len} frames exceeds the DiT's max_frames="
                f"{world.dit.cfg.max_frames}"
            )
        if world.start_latents.shape[1] < self.cfg.context:
            raise UsageError(
                f"sampler context={self.cfg.context} needs start contexts of >= {self.cfg.context} "
                f"frames; the checkpoint's have {world.start_latents.shape[1]}"
            )
        self.vae = world.vae.to(self.device).eval()
        # agent-sized frames: the world's narrow decoder if it has one, else the VAE's
        self._uses_obs_decoder = obs_decoder and world.obs_decoder is not None
        self._decode_small = world.obs_decoder.to(self.device).eval() if self._uses_obs_decoder else self.vae.decode
        self.dit = world.dit.to(self.device).eval()
        self._context_fn = self._encode_context if context_cache and self.dit.cfg.causal else None
        self._dit_fn = self._full_window_fn(backend, compile_model)
        self.heads = world.heads.to(self.device).eval()
        self.termination = self.heads.cfg.termination if termination is None else termination
        if self.termination not in TERMINATIONS:
            raise UsageError(f"termination must be one of {TERMINATIONS} or None (the world's), got {termination!r}")
        if self.termination == "hazard" and self.heads.cfg.hazard_horizon == 0:
            raise UsageError("termination='hazard' needs a world with a hazard head (matrix-world train-hazard); "
                             "this world has none")
        # Cached once: the control tables (A+1 rows) and the start contexts.
        self.ctrl_tokens = world.control_tokens.to(self.device, torch.float32)  # (A+1, N, Dt)
        self.ctrl_mask = world.control_mask.to(self.device, torch.bool)  # (A+1, N)
        self.ctrl_pooled = world.control_pooled.to(self.device, torch.float32)  # (A+1, Dt)
        self.start_latents = world.start_latents[:, -self.cfg.context :].to(self.device, torch.float32)
        self.unknown_idx = world.num_actions  # control row of the reset context ("unknown" sentence)
        self.latent_shape: tuple[int, int, int] = tuple(self.start_latents.shape[2:])  # (C, H, W)
        self.native_hw: tuple[int, int] = tuple(self.vae.cfg.in_hw)
        self.hr_hw: tuple[int, int] = tuple(self.vae.cfg.hr_hw)

        b = num_envs
        with torch.inference_mode():
            self._unknown = torch.full((b,), self.unknown_idx, device=self.device, dtype=torch.long)
            self._zero_idx = torch.zeros(b, device=self.device, dtype=torch.long)
            self.state = self.sampler.init_state(
                self.start_latents[self._zero_idx], self._unknown, noise_key=self._zero_idx,
                memory_size=self.heads.cfg.hazard_memory,
            )

    # ------------------------------------------------------------------------ properties
    @property
    def num_actions(self) -> int:
        """A, number of actions."""
        return self.world.num_actions

    @property
    def num_starts(self) -> int:
        """S, number of recorded start contexts."""
        return self.start_latents.shape[0]

    @property
    def latest(self) -> torch.Tensor:
        """(B, C, H, W) the newest clean frame of every stream (a view of the state)."""
        return self.state.latents[:, self.cfg.context - 1]

    def _full_window_fn(self, backend: str, compile_model: bool | str) -> Callable[..., torch.Tensor]:
        """The callable of the full-window DiT calls: the module, compiled, or an exported graph."""
        from world_model.export.onnx import BACKENDS

        if backend not in BACKENDS:
            raise UsageError(f"backend must be one of {BACKENDS}, got {backend!r}")
        mode = compile_mode(compile_model)
        if backend == "torch":
            if mode is None:
                return self.dit
            compiled = torch.compile(self.dit, dynamic=False, mode=mode)
            if self.device.type != "cuda" or mode not in ("reduce-overhead", "max-autotune"):
                return compiled

            def graphed(*args: torch.Tensor) -> torch.Tensor:
                # CUDA-graph replays write into the same output buffer: mark each call a new step
                # and copy the result out, so no caller holds a tensor the next replay overwrites.
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(*args).clone()

            return graphed
        if mode is not None:
            raise UsageError(
                f"compile_model={compile_model!r} applies to backend='torch' only, got backend={backend!r}"
            )
        if backend == "onnxruntime" and self.dtype != torch.float32:
            raise UsageError(f"backend='onnxruntime' runs float32 graphs; got dtype={self.dtype} (use float32)")
        from world_model.export.onnx import OnnxDiT, check_backend

        check_backend(backend, self.device)
        if self._context_fn is not None and (self.sampler.steps > 1 or self.cfg.guidance != 1.0):
            return self.dit  # every call goes through the context cache (torch): nothing to export
        num_tokens = self.world.control_tokens.shape[1]
        return OnnxDiT.from_dit(self.dit, self.sampler.window_len, num_tokens, self.device, backend)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # ------------------------------------------------------------------------ hot path
    def _denoise(
        self, x: torch.Tensor, t: torch.Tensor, ctrl_idx: torch.Tensor, cache: ContextCache | None = None
    ) -> torch.Tensor:
        """Swin-DPM denoiser: x (B, L, C, H, W), t (B, L), ctrl_idx (B, L) -> v (B, L, C, H, W).

        With ``cache`` (the context frames' keys/values) x holds only the frames after them.
        """
        w = self.cfg.guidance
        if w == 1.0:
            return self._velocity(x, t, ctrl_idx, cache)
        # Classifier-free guidance on the frames in flight: the unconditional pass sees the
        # "unknown" control row on every noisy frame (with a cache, x holds only noisy frames).
        ctrl_u = ctrl_idx.clone()  # (B, L)
        ctrl_u[:, 0 if cache is not None else self.cfg.context :] = self.unknown_idx
        if cache is None:  # one pass over the doubled batch
            v_c, v_u = self._velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctrl_idx, ctrl_u])).chunk(2)
        else:  # two passes over the noisy frames, sharing the context's keys/values
            v_c, v_u = self._velocity(x, t, ctrl_idx, cache), self._velocity(x, t, ctrl_u, cache)
        return v_u + w * (v_c - v_u)

    def _velocity(
        self, x: torch.Tensor, t: torch.Tensor, ctrl_idx: torch.Tensor, cache: ContextCache | None = None
    ) -> torch.Tensor:
        """One DiT pass: x (B, L, C, H, W), t (B, L), ctrl_idx (B, L) -> v (B, L, C, H, W) float32."""
        tokens = self.ctrl_tokens[ctrl_idx]  # (B, L, N, Dt)
        mask = self.ctrl_mask[ctrl_idx]  # (B, L, N)
        with self._autocast():
            if cache is None:
                v = self._dit_fn(x, t, tokens, mask)  # (B, L, C, H, W)
            else:
                v = self.dit(x, t, tokens, mask, cache=cache)  # (B, G, C, H, W)
        return v.float()

    def _encode_context(self, x: torch.Tensor, t: torch.Tensor, ctrl_idx: torch.Tensor) -> ContextCache:
        """Keys/values of the window's context frames x (B, C_ctx, C, H, W) (see ``VideoDiT.encode_context``)."""
        with self._autocast():
            return self.dit.encode_context(x, t, self.ctrl_tokens[ctrl_idx], self.ctrl_mask[ctrl_idx])

    @torch.inference_mode()
    def reset(
        self,
        mask: torch.Tensor,
        start_idx: torch.Tensor | None,
        generator: torch.Generator | None = None,
        noise_key: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Restart the streams where ``mask`` is True from recorded start contexts (or given ones).

        Args:
            mask: (B,) bool streams to restart (others are untouched).
            start_idx: (B,) long index into the start contexts (ignored where ``mask`` is False);
                ignored (may be None) with ``context``.
            generator: draws the restarted streams' noise keys when ``noise_key`` is None.
            noise_key: (B,) long noise keys in [0, 2**63 - 1).
            context: (B, T, C, H, W) clean latents, T >= the sampler's context (the last ones are
                used), to start from instead of the recorded starts: e.g. :meth:`encode` of real
                frames, to imagine onwards from what an agent sees in the real game.

        Returns:
            (B, C, H, W) the newest clean frame of every stream (restarted ones: their start frame).
        """
        if context is not None:
            context = torch.as_tensor(context)
            want = (self.num_envs, self.cfg.context, *self.latent_shape)
            if context.dim() != 5 or context.shape[0] != want[0] or context.shape[1] < want[1] \
                    or tuple(context.shape[2:]) != want[2:]:
                raise UsageError(
                    f"context must be (B, T, C, H, W) latents with B={want[0]}, T >= {want[1]} and "
                    f"(C, H, W)={want[2:]}, got {tuple(context.shape)}"
                )
        elif start_idx is None:
            raise UsageError("reset needs start_idx (recorded starts) or context (given latents)")
        shapes = [("mask", mask)] + ([("start_idx", start_idx)] if context is None else [])
        for name, t in shapes:  # shapes only: no device sync
            if tuple(t.shape) != (self.num_envs,):
                raise UsageError(f"{name} must have shape ({self.num_envs},), one per stream, got {tuple(t.shape)}")
        mask = mask.to(self.device, torch.bool)
        if context is None:
            ctx = self.start_latents[start_idx.to(self.device, torch.long)]  # (B, C_ctx, C, H, W)
        else:
            ctx = context[:, -self.cfg.context :].to(self.device, torch.float32)  # (B, C_ctx, C, H, W)
        self.sampler.reset_where(self.state, mask, ctx, self._unknown, generator, noise_key)
        return self.latest.clone()

    @torch.inference_mode()
    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance every stream by one frame.

        Args:
            actions: (B,) long action ids in [0, A). The shape is checked here; the range is the
                caller's to check (the envs do), as reading the values back would sync the device.

        Returns:
            ``(latents, reward, terminated)``: (B, C, H, W) float32 new clean latents, (B,) float32
            rewards (``reward_fn``'s if given, else the reward head's, or the heads' ``terminal_reward``
            on a terminated transition) and (B,) bool terminations, all on the device.
        """
        if tuple(actions.shape) != (self.num_envs,):
            raise UsageError(f"actions must have shape ({self.num_envs},), one per stream, got {tuple(actions.shape)}")
        actions = actions.to(self.device, torch.long)
        z_prev = self.latest.clone()  # (B, C, H, W)
        _, z_next = self.sampler.step(
            self.state, self._denoise, actions, context_fn=self._context_fn
        )  # (B, C, H, W)
        ctrl = self.ctrl_pooled[actions]  # (B, Dt)
        x = self.heads.transition(z_prev, z_next)  # (B, 3C, H, W) float32, what every head reads
        with self._autocast():
            reward, term_logit = self.heads.reward_termination(x, ctrl)  # 2 x (B,)
        terminated = term_logit.float() > self.heads.cfg.term_threshold  # (B,)
        if self.termination == "hazard":  # an ending the frames cannot show, drawn at its rate
            # float32 whatever the dtype (a tiny head): a recurrent memory rounded to bfloat16 every step
            # would stop moving where it changes slowly (time on the grass), as it never does in training
            with torch.autocast(self.device.type, enabled=False):  # (B,), (B, M)
                hazard_logit, memory = self.heads.hazard_step(x, ctrl, self.state.memory)
            self.state.memory.copy_(memory)
            u = stream_uniform(self.state.noise_key, self.state.noise_step)  # (B,) per-stream, frames untouched
            terminated = terminated | (u < per_step_hazard(hazard_logit.float(), self.heads.cfg.hazard_horizon))
        if self.heads.cfg.terminal_reward is not None:  # the game's reward for an ending (CarRacing: -100)
            reward = torch.where(terminated, self.heads.cfg.terminal_reward, reward.float())
        if self.reward_fn is not None:
            reward = self.reward_fn(z_prev, z_next, actions)
            if not isinstance(reward, torch.Tensor) or reward.shape != (self.num_envs,):
                got = f"a tensor of shape {tuple(reward.shape)}" if isinstance(reward, torch.Tensor) else repr(reward)
                raise UsageError(f"reward_fn must return a ({self.num_envs},) tensor, one reward per stream, got {got}")
            reward = reward.to(self.device)
        return z_next, reward.float(), terminated

    @torch.inference_mode()
    def encode(self, frames: torch.Tensor | np.ndarray, chunk: int = 8) -> torch.Tensor:
        """uint8 RGB frames (B, H, W, 3) -> (B, C, h, w) float32 normalised latents (posterior mean).

        (H, W) must be the VAE's native (72, 128) or an integer multiple of it, e.g. the 720x1280
        render: such frames are block-averaged and rounded to the native size exactly as the recorder
        makes its training frames (``world_model.frames.block_mean``), ``chunk`` frames at a time.
        Other sizes (CarRacing's own 96x96 observation is another view) are an error.
        """
        x = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        (th, tw), shape = self.native_hw, tuple(x.shape)
        ok = x.dtype == np.uint8 and x.ndim == 4 and shape[-1] == 3 and shape[0] >= 1
        if not ok or shape[1] % th or shape[2] % tw or shape[1] // th != shape[2] // tw or shape[1] < th:
            raise UsageError(
                f"frames must be uint8 RGB of shape (B, H, W, 3) with (H, W) = k * {self.native_hw} for an "
                f"integer k >= 1 (the 72x128 training frames, or a 720x1280 render), got {shape} {x.dtype}"
            )
        out = []
        for i in range(0, shape[0], chunk):  # float copies of a few frames at a time
            part = block_mean(x[i : i + chunk], self.native_hw)  # (b, 72, 128, 3) uint8, a new array
            with self._autocast():
                out.append(self.vae.encode(frames_to_tensor(part, self.device)).float())  # (b, C, h, w)
        return torch.cat(out)

    # ------------------------------------------------------------------------ snapshots
    def _rows(self, rows: torch.Tensor | None, what: str) -> torch.Tensor:
        """(R,) long indices of distinct streams in [0, B) (None: all B), validated on the host."""
        if rows is None:
            return torch.arange(self.num_envs, device=self.device)
        r = torch.as_tensor(rows.astype(np.int64) if isinstance(rows, np.ndarray) and rows.dtype.kind == "u" else rows)
        r = r.cpu()
        ok = r.dim() == 1 and len(r) >= 1 and not r.dtype.is_floating_point and r.dtype != torch.bool
        if not ok or not bool(((r >= 0) & (r < self.num_envs)).all()) or len(r.unique()) != len(r):
            raise UsageError(
                f"{what}: rows must be a 1-d tensor of distinct stream indices in [0, {self.num_envs}), "
                f"got {rows!r}"
            )
        return r.to(self.device, torch.long)

    @torch.inference_mode()
    def get_state(self, rows: torch.Tensor | None = None) -> SwinDPMState:
        """A copy of the streams' state (all B, or the (R,) indices ``rows``), for :meth:`set_state`.

        The window latents, their control rows, each stream's noise key and counter and a recurrent
        hazard head's memory: all a stream's future depends on besides the actions. A copy, so later
        steps do not change it.
        """
        return self.state.select(self._rows(rows, "get_state"))

    @torch.inference_mode()
    def set_state(
        self, state: SwinDPMState, rows: torch.Tensor | None = None, noise_key: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Write a state from :meth:`get_state` into streams ``rows`` (default: all), in place.

        Restored streams replay exactly: the same actions give the same frames, rewards and
        terminations as after the snapshot (up to batched-matmul rounding when the rows move to
        another batch size). One snapshot row fills any number of streams (branching one state into
        R futures, e.g. a planner's candidate action sequences); they then share its noise stream, so
        their futures differ only through their actions, unless ``noise_key`` gives them new ones.

        Args:
            state: R or 1 rows, from a simulator whose sampler window and latent shape match.
            rows: (R,) distinct stream indices, default all B.
            noise_key: optional (R,) long new noise keys in [0, 2**63 - 1) for the written rows
                (their draw counters are kept).

        Returns:
            (B, C, H, W) the newest clean frame of every stream.
        """
        if not isinstance(state, SwinDPMState):
            raise UsageError(f"set_state needs a SwinDPMState (from get_state), got {type(state).__name__}")
        want = tuple(self.state.latents.shape[1:])
        if tuple(state.latents.shape[1:]) != want:
            raise UsageError(
                f"set_state: the state's window is {tuple(state.latents.shape[1:])} (L, C, H, W) but this "
                f"simulator's is {want}: it comes from another sampler window or latent space"
            )
        if tuple(state.memory.shape[1:]) != tuple(self.state.memory.shape[1:]):
            raise UsageError(
                f"set_state: the state's hazard memory has width {tuple(state.memory.shape[1:])} but this "
                f"simulator's has {tuple(self.state.memory.shape[1:])}: it comes from a world with another hazard head"
            )
        num_rows = self.num_actions + 1  # the control table: A actions and the "unknown" row
        if not bool(((state.ctrl_idx >= 0) & (state.ctrl_idx < num_rows)).all()):
            raise UsageError(
                f"set_state: the state's control rows are outside this world's table of {num_rows} rows "
                "(a state from a world with another action table)"
            )
        idx = self._rows(rows, "set_state")
        if state.batch_size not in (1, len(idx)):
            raise UsageError(
                f"set_state: a state of {state.batch_size} rows cannot fill {len(idx)} streams (needs 1 or {len(idx)})"
            )
        if state.batch_size != len(idx):  # one row broadcast to every written stream
            state = state.select(torch.zeros(len(idx), dtype=torch.long))
        if noise_key is not None:
            key = torch.as_tensor(noise_key)
            if tuple(key.shape) != (len(idx),) or key.dtype.is_floating_point or key.dtype == torch.bool \
                    or bool((key < 0).any()):
                raise UsageError(
                    f"set_state: noise_key must be {len(idx)} integer keys >= 0, one per written row, got {noise_key!r}"
                )
            state = dataclasses.replace(state, noise_key=key.to(torch.long))
        self.state.write(idx, state)
        return self.latest.clone()

    def _decoder(self, size: FrameSize) -> tuple[tuple[int, int], Callable[[torch.Tensor], torch.Tensor], str]:
        """The (h, w) of ``size``, the decoder that makes frames of it and that decoder's name.

        Raises:
            UsageError: a size that is none of "720p", "native", an int n or (h, w) with h, w >= 1.
        """
        native, hr = self.native_hw, self.hr_hw
        if size == "720p":
            hw = hr
        elif size == "native":
            return native, self.vae.decode, "VAE"
        else:  # (h, w), or an int n for (n, n)
            try:
                pair = isinstance(size, tuple | list)
                hw = tuple(map(operator.index, size)) if pair else (operator.index(size),) * 2
            except TypeError:  # not an int, nor a pair of ints (numpy ints count as ints)
                hw = ()
            if len(hw) != 2 or min(hw) < 1:
                raise UsageError(
                    f"frame size must be '720p', 'native', an int n or (h, w) with h, w >= 1, got {size!r}"
                )
        if hw != hr and hw[0] <= HR_THRESHOLD * native[0] and hw[1] <= HR_THRESHOLD * native[1]:
            return hw, self._decode_small, "observation decoder" if self._uses_obs_decoder else "VAE"
        return hw, self.vae.decode_hr, "VAE high-res"

    def decoder_name(self, size: FrameSize) -> str:
        """Which decoder makes frames of ``size``: "observation decoder", "VAE" or "VAE high-res"."""
        return self._decoder(size)[2]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, size: FrameSize = "720p") -> torch.Tensor:
        """Decode latents to uint8 frames on the device.

        ``"720p"`` (or the VAE's high-res size) uses the super-resolving ``decode_hr``; ``"native"``
        the VAE's training-resolution ``decode`` (what the road follower and the evaluations read).
        Another ``(h, w)``, an observation, is decoded at the training resolution and resized
        (antialiased) when it is at most ``HR_THRESHOLD`` x the native size per side, so agent-sized
        observations such as 84x84 never pay for the 720p decoder, by the world's observation decoder
        when it has one and the simulator was built with ``obs_decoder=True``, else by the VAE's
        ``decode``; larger sizes come from ``decode_hr`` resized down.

        Args:
            latents: (B, C, H, W) normalised latents.
            size: "720p", "native" or (h, w).

        Returns:
            (B, h, w, 3) uint8.
        """
        hw, decoder, _ = self._decoder(size)
        latents = latents.to(self.device, torch.float32)
        with self._autocast():
            x = decoder(latents)  # (B, 3, *native) or (B, 3, *hr)
        x = x.float()
        if tuple(x.shape[-2:]) != hw:
            x = F.interpolate(
                x, size=hw, mode="bilinear", antialias=True, align_corners=False
            )  # (B, 3, h, w)
        return tensor_to_frames(x, inplace=True)  # (B, h, w, 3); x is this call's own scratch
