"""Simulator: batched streams of a tiny random world model."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import world_model.device as device_mod
from tests.conftest import TINY_SAMPLER, build_tiny_world
from world_model.device import slow_precision
from world_model.errors import UsageError
from world_model.simulator import Simulator, compile_mode, sampler_config
from world_model.swin_dpm import SwinDPMConfig
from world_model.train.common import resolve_bf16

B = 3


@pytest.fixture(scope="module")
def world():
    return build_tiny_world()


def started(world, num_envs: int = B, keys: list[int] | None = None, **kw) -> Simulator:
    sim = Simulator(world, num_envs, **kw)
    keys = keys or list(range(100, 100 + num_envs))
    sim.reset(
        torch.ones(num_envs, dtype=torch.bool),
        torch.arange(num_envs) % sim.num_starts,
        noise_key=torch.tensor(keys),
    )
    return sim


def test_step_shapes_and_types(world) -> None:
    sim = started(world)
    c, h, w = sim.latent_shape
    latents, reward, terminated = sim.step(torch.tensor([0, 1, 2]))
    assert latents.shape == (B, c, h, w) and latents.dtype == torch.float32
    assert reward.shape == (B,) and reward.dtype == torch.float32
    assert terminated.shape == (B,) and terminated.dtype == torch.bool
    torch.testing.assert_close(sim.latest, latents)  # the emitted frame is the newest context frame


def test_termination_uses_the_heads_threshold() -> None:
    """terminated = logit > heads.cfg.term_threshold (the tiny heads' logits are ~ -10)."""
    world = build_tiny_world()
    sim = started(world)
    assert not sim.step(torch.tensor([0, 1, 2]))[2].any()
    world.heads.cfg.term_threshold = -20.0
    assert sim.step(torch.tensor([0, 1, 2]))[2].all()


def test_decode_sizes_and_small_obs_skip_720p(world, monkeypatch: pytest.MonkeyPatch) -> None:
    sim = started(world)
    latents = sim.latest.clone()
    assert sim.decode(latents, "720p").shape == (B, 720, 1280, 3)
    assert sim.decode(latents, "native").shape == (B, 72, 128, 3)
    assert sim.decode(latents, (200, 300)).shape == (B, 200, 300, 3)

    def boom(z: torch.Tensor) -> torch.Tensor:
        raise AssertionError("decode_hr must not run for small observations")

    monkeypatch.setattr(sim.vae, "decode_hr", boom)
    frames = sim.decode(latents, (84, 84))
    assert frames.shape == (B, 84, 84, 3) and frames.dtype == torch.uint8
    assert sim.decode(latents, 84).shape == (B, 84, 84, 3)  # an int n: (n, n)
    for bad in ((0, 5), "ab", (84,), 84.0):
        with pytest.raises(UsageError, match=r"frame size must be '720p', 'native', an int n or \(h, w\)"):
            sim.decode(latents, bad)


def test_masked_reset_touches_only_masked_streams(world) -> None:
    sim = started(world)
    for _ in range(2):
        sim.step(torch.tensor([0, 4, 8]))
    before = sim.state.latents.clone()
    new = sim.reset(
        torch.tensor([False, True, False]), torch.tensor([0, 2, 0]), noise_key=torch.tensor([0, 7, 0])
    )
    torch.testing.assert_close(sim.state.latents[[0, 2]], before[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(new[1], sim.start_latents[2, -1])
    assert not torch.allclose(sim.state.latents[1], before[1])
    state = sim.state.latents.clone()  # wrong shapes are errors before any state changes
    with pytest.raises(UsageError, match=r"mask must have shape \(3,\), one per stream, got \(1,\)"):
        sim.reset(torch.tensor([True]), torch.tensor([0, 0, 0]))
    with pytest.raises(UsageError, match=r"actions must have shape \(3,\), one per stream, got \(1,\)"):
        sim.step(torch.tensor([3]))  # would broadcast action 3 to every stream
    torch.testing.assert_close(sim.state.latents, state, rtol=0, atol=0)


def test_same_keys_same_rollout_and_actions_matter(world) -> None:
    def rollout(actions: list[int]) -> torch.Tensor:
        sim = started(world, 1, keys=[5])
        return torch.stack([sim.step(torch.tensor([a]))[0] for a in actions])

    a = rollout([0, 0, 0, 0])
    torch.testing.assert_close(a, rollout([0, 0, 0, 0]), rtol=0, atol=0)
    b = rollout([2, 2, 2, 2])
    # pipelined, G = 2: the first frame was in flight before the action; later ones follow it
    assert (a[2:] - b[2:]).abs().mean() > 1e-3


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="torch.compile on CPU needs a C++ compiler"
)
def test_compiled_dit_matches_eager(world) -> None:
    """compile_model=True (torch.compile, inductor on CPU) gives the eager rollout to float tolerance."""
    actions = [0, 4, 8, 2, 2]
    eager, compiled = started(world), started(world, compile_model=True)
    for a in actions:
        want = eager.step(torch.full((B,), a))[0]
        got = compiled.step(torch.full((B,), a))[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compile_model_names_a_mode(world) -> None:
    assert [compile_mode(v) for v in (False, True, "reduce-overhead")] == [None, "default", "reduce-overhead"]
    with pytest.raises(UsageError, match="compile_model must be True, False or one of .*got 'fastest'"):
        Simulator(world, 1, compile_model="fastest")


def test_memory_flat_over_200_steps(world) -> None:
    sim = started(world, 2)
    ptrs = [
        t.data_ptr()
        for t in sim.state.fields()
    ]
    for i in range(200):
        latents, _, _ = sim.step(torch.tensor([i % 9, (i * 7) % 9]))
    assert [
        t.data_ptr()
        for t in sim.state.fields()
    ] == ptrs
    assert sim.state.latents.shape[1] == sim.sampler.window_len and torch.isfinite(latents).all()


@pytest.mark.filterwarnings("ignore:dtype=torch.bfloat16 on cpu")  # on a CPU that emulates it
def test_reward_fn_override_and_bf16(world) -> None:
    calls = []

    def reward_fn(prev: torch.Tensor, new: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        calls.append(actions.clone())
        return actions.float() * 10

    sim = started(world, reward_fn=reward_fn, dtype=torch.bfloat16)
    latents, reward, _ = sim.step(torch.tensor([1, 2, 3]))
    assert reward.tolist() == [10.0, 20.0, 30.0] and len(calls) == 1
    assert torch.isfinite(latents).all() and latents.dtype == torch.float32


def fake_cpu(monkeypatch, machine: str, bf16: bool) -> None:
    """Pretend to run on a CPU of architecture ``machine`` with or without native bfloat16."""
    monkeypatch.setattr(device_mod.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)


def test_emulated_bfloat16_is_named_warned_and_not_trained_with(world, monkeypatch, capsys) -> None:
    """An x86 CPU without AVX512-BF16 / AMX emulates bfloat16 (0.12x fp32 training speed measured):
    the env warns when asked for it, and --bf16 training / encoding falls back to fp32 with a note."""
    cpu = torch.device("cpu")
    fake_cpu(monkeypatch, "x86_64", bf16=False)
    reason = slow_precision(cpu, torch.bfloat16)
    assert reason is not None and "AVX512_BF16 / AMX_TILE" in reason and "bfloat16" in reason
    assert slow_precision(cpu, torch.float32) is None
    with pytest.warns(UserWarning, match=r"dtype=torch.bfloat16 on cpu: this CPU has no AVX512_BF16"):
        Simulator(world, 1, dtype=torch.bfloat16)
    assert resolve_bf16(True, cpu) is False and resolve_bf16(False, cpu) is False
    assert "--bf16 requested but this CPU has no AVX512_BF16 / AMX_TILE" in capsys.readouterr().out

    fake_cpu(monkeypatch, "x86_64", bf16=True)  # a CPU that computes it: no warning, bf16 is used
    assert slow_precision(cpu, torch.bfloat16) is None and resolve_bf16(True, cpu) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Simulator(world, 1, dtype=torch.bfloat16)
    fake_cpu(monkeypatch, "aarch64", bf16=False)  # no probe for other architectures: not second-guessed
    assert slow_precision(cpu, torch.bfloat16) is None


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch) -> None:
    from matrix_env.env import parse_dtype
    from world_model.device import fast_dtype

    cpu = torch.device("cpu")
    for machine, bf16, want in (("x86_64", True, torch.bfloat16), ("x86_64", False, torch.float32),
                                ("aarch64", True, torch.float32)):  # unknown hardware: float32
        fake_cpu(monkeypatch, machine, bf16=bf16)
        assert fast_dtype(cpu) == want and parse_dtype("auto", "cpu") == want, (machine, bf16)
        if want == torch.bfloat16:
            assert slow_precision(cpu, want) is None  # auto never picks what the env would warn about
    fake_cpu(monkeypatch, "x86_64", bf16=True)
    from matrix_env.env import MatrixWorldEnv
    from matrix_env.vector import MatrixWorldVectorEnv

    assert MatrixWorldEnv(world=build_tiny_world(), obs_type="latent", dtype="auto").sim.dtype == torch.bfloat16
    envs = MatrixWorldVectorEnv(2, world=build_tiny_world(), obs_type="latent", dtype="auto")
    assert envs.sim.dtype == torch.bfloat16
    assert parse_dtype("auto", "cpu", 16, "onnxruntime") == torch.float32  # exported graphs run float32
    assert parse_dtype("bfloat16") == torch.bfloat16  # an explicit choice is kept
    gpu = torch.device("cuda")  # a GPU: bfloat16 only where it was measured faster (64 envs and more)
    for capability, envs, want in (((9, 0), 16, torch.float32), ((9, 0), 64, torch.bfloat16),
                                   ((7, 5), 1024, torch.float32)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert fast_dtype(gpu, envs) == want, (capability, envs)
    with pytest.raises(UsageError, match=r"dtype must be one of \['bfloat16', 'float16', 'float32', 'auto'\], "
                                         r"got 'fast'"):
        parse_dtype("fast")


def test_terminal_reward_replaces_the_heads_reward_on_an_ending() -> None:
    """heads.cfg.terminal_reward (CarRacing: -100 for leaving the playfield, which the Huber-trained
    reward head predicts as about -1.5) is the reward of every terminated transition; a reward_fn
    still decides the reward itself."""
    world = build_tiny_world()
    with torch.no_grad():
        world.heads.mlp[-1].bias[1] = 10.0  # every transition terminates
    head_reward = started(world).step(torch.tensor([0, 1, 2]))[1]
    world.heads.cfg.terminal_reward = -100.0
    _, reward, terminated = started(world).step(torch.tensor([0, 1, 2]))
    assert terminated.all() and reward.tolist() == [-100.0] * B and (head_reward > -50).all()
    with torch.no_grad():
        world.heads.mlp[-1].bias[1] = -10.0  # none terminates: the head's reward stands
    _, reward, terminated = started(world).step(torch.tensor([0, 1, 2]))
    assert not terminated.any() and (reward > -50).all()
    with torch.no_grad():
        world.heads.mlp[-1].bias[1] = 10.0
    _, reward, _ = started(world, reward_fn=lambda p, n, a: a.float()).step(torch.tensor([0, 1, 2]))
    assert reward.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("returned", "got"),
    [(lambda a: a.float()[:, None], r"got a tensor of shape \(3, 1\)"),  # would broadcast on an autoreset
     (lambda a: torch.ones(2), r"got a tensor of shape \(2,\)"),
     (lambda a: 1.0, "got 1.0")],
)
def test_reward_fn_must_return_one_reward_per_stream(world, returned, got) -> None:
    sim = started(world, reward_fn=lambda prev, new, actions: returned(actions))
    with pytest.raises(UsageError, match=r"reward_fn must return a \(3,\) tensor.*" + got):
        sim.step(torch.tensor([1, 2, 3]))
    with pytest.raises(UsageError, match="reward_fn must be a callable.*got 3"):
        started(world, reward_fn=3)


@pytest.mark.parametrize(
    "sampler",
    [
        SwinDPMConfig(context=2, groups=2, steps_per_shift=3, mode="pipelined", ctx_noise=0.2),
        SwinDPMConfig(context=2, groups=2, mode="reconditioned", steps_per_shift=2),
        SwinDPMConfig(context=2, mode="immediate", immediate_steps=4),
    ],
    ids=["pipelined-k3-ctxnoise", "reconditioned-k2", "immediate-4"],
)
def test_context_cache_is_exact(world, sampler: SwinDPMConfig) -> None:
    """Several evaluations per shift: running the context once and reusing its keys/values changes nothing."""
    cached, full = started(world, sampler=sampler), started(world, sampler=sampler, context_cache=False)
    assert cached._context_fn is not None and full._context_fn is None
    for a in [0, 4, 8, 2, 2, 7]:
        want = full.step(torch.full((B,), a))[0]
        got = cached.step(torch.full((B,), a))[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["pipelined", "immediate"])
def test_guidance_combines_the_two_passes_and_shares_the_context(world, mode: str) -> None:
    """guidance w: v = v_u + w (v_c - v_u), v_u with the unknown control on the frames in flight;
    the context-cached two-pass path equals one pass over the doubled batch."""
    cfg = SwinDPMConfig(**{**TINY_SAMPLER, "mode": mode, "guidance": 2.5, "ctx_noise": 0.1})
    cached, full = started(world, sampler=cfg), started(world, sampler=cfg, context_cache=False)
    assert cached._context_fn is not None
    for a in [0, 4, 8, 2]:
        want = full.step(torch.full((B,), a))[0]
        got = cached.step(torch.full((B,), a))[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    sim = started(world, sampler=cfg, context_cache=False)
    x = sim.state.latents.clone()  # (B, L, C, H, W)
    t = torch.rand(B, x.shape[1])
    ctrl = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 0, 1, 2]])[:, : x.shape[1]]
    ctrl_u = ctrl.clone()
    ctrl_u[:, cfg.context :] = sim.unknown_idx
    with torch.inference_mode():
        v_c, v_u, v = sim._velocity(x, t, ctrl), sim._velocity(x, t, ctrl_u), sim._denoise(x, t, ctrl)
    torch.testing.assert_close(v, v_u + 2.5 * (v_c - v_u), rtol=1e-4, atol=1e-5)
    assert (v_c - v_u).abs().max() > 1e-3  # the actions matter, so the test is not vacuous


def test_guidance_strengthens_the_action_effect(world) -> None:
    """From one start, two action sequences differ more under guidance 3 than without guidance."""
    def gap(w: float) -> float:
        cfg = SwinDPMConfig(**{**TINY_SAMPLER, "guidance": w})
        a, b = started(world, sampler=cfg, keys=[7, 7, 7]), started(world, sampler=cfg, keys=[7, 7, 7])
        d = 0.0
        for _ in range(4):
            d += (a.step(torch.full((B,), 1))[0] - b.step(torch.full((B,), 2))[0]).abs().mean().item()
        return d

    assert gap(3.0) > 1.5 * gap(1.0) > 0.0
    with pytest.raises(ValueError, match="guidance"):
        SwinDPMConfig(guidance=-1.0)


@pytest.mark.parametrize("mode", ["pipelined", "reconditioned", "immediate"])
def test_sampler_modes(world, mode: str) -> None:
    cfg = sampler_config(world, mode)
    sim = started(world, sampler=cfg)
    assert sim.cfg.mode == mode
    latents, _, _ = sim.step(torch.tensor([0, 1, 2]))
    assert torch.isfinite(latents).all()


def test_bad_sampler_settings(world) -> None:
    with pytest.raises(UsageError, match="max_frames"):
        Simulator(world, 1, sampler=SwinDPMConfig(context=4, groups=8))
    with pytest.raises(UsageError, match="mode"):
        sampler_config(world, "warp")
    for name, value in (("steps_per_shift", 2.0), ("context", "2"), ("groups", True)):
        with pytest.raises(UsageError, match=f"{name} must be an int >= 1, got {value!r}"):
            sampler_config(world, None, {name: value})
    assert sampler_config(world).context == TINY_SAMPLER["context"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(world) -> None:
    # Simulator moves the world's modules to its device (in place): give the GPU its own copy
    cpu, gpu = started(world), started(build_tiny_world(), device="cuda")
    for a in ([0, 1, 2], [3, 4, 5]):
        lat_cpu, rew_cpu, _ = cpu.step(torch.tensor(a))
        lat_gpu, rew_gpu, _ = gpu.step(torch.tensor(a))
    # same keys -> same noise on every device (integer hashing); the networks differ by rounding only
    torch.testing.assert_close(lat_gpu.cpu(), lat_cpu, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(rew_gpu.cpu(), rew_cpu, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_match_eager() -> None:
    """compile_model="reduce-overhead" (CUDA-graph replays) gives the eager CUDA rollout, step after step."""
    eager = started(build_tiny_world(), device="cuda")
    graphed = started(build_tiny_world(), device="cuda", compile_model="reduce-overhead")
    for a in [0, 4, 8, 2, 2, 6]:
        want = eager.step(torch.full((B,), a))[0]
        got = graphed.step(torch.full((B,), a))[0]
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
