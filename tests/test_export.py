"""ONNX export of the DiT's full-window call and the ONNX Runtime backend (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import build_tiny_world
from world_model.errors import UsageError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from world_model.export import onnx as wm_onnx  # noqa: E402
from world_model.simulator import Simulator  # noqa: E402

B = 3


@pytest.fixture(scope="module")
def world():
    return build_tiny_world()


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private export cache (MATRIX_WORLD_CACHE) per test."""
    monkeypatch.setenv(wm_onnx.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def started(world, **kw) -> Simulator:
    sim = Simulator(world, B, **kw)
    sim.reset(torch.ones(B, dtype=torch.bool), torch.arange(B) % sim.num_starts, noise_key=torch.arange(7, 7 + B))
    return sim


def test_exported_dit_matches_torch_at_any_batch_and_is_cached(world, cache: Path, monkeypatch) -> None:
    frames, tokens = 8, world.control_tokens.shape[1]
    fn = wm_onnx.OnnxDiT.from_dit(world.dit, frames, tokens)
    files = list(cache.glob("dit-*.onnx"))
    assert len(files) == 1 and not list(cache.glob(".tmp-*"))  # one atomic write
    for batch in (1, 5):  # one export serves every batch size
        args = wm_onnx.example_inputs(world.dit, frames, tokens, batch)
        with torch.inference_mode():
            want = world.dit(*args)
        got = fn(*args)
        assert got.shape == want.shape == (batch, frames, *want.shape[2:]) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    def no_export(*a, **k):
        raise AssertionError("exported again although the cached graph matches")

    monkeypatch.setattr(wm_onnx, "export_dit", no_export)
    assert wm_onnx.OnnxDiT.from_dit(world.dit, frames, tokens).path == files[0]


@pytest.mark.parametrize("shift", [0, 1])
def test_padded_patch_dit_exports(cache: Path, shift: int) -> None:
    """A DiT whose patch does not divide the latent (9x16 at patch 2: padded, then cropped) exports too,
    and so does one on a shifted grid (patch_shift: rolled, then rolled back)."""
    from dataclasses import replace

    from world_model.dit import DIT_PRESETS, VideoDiT

    torch.manual_seed(0)
    cfg = replace(DIT_PRESETS["tiny"], latent_channels=8, latent_hw=(9, 16), patch=2, patch_shift=shift, text_dim=16)
    dit = VideoDiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))  # leave adaLN-Zero's all-zero output
    fn = wm_onnx.OnnxDiT.from_dit(dit, 6, 3)
    args = wm_onnx.example_inputs(dit, 6, 3, 2)
    with torch.inference_mode():
        want = dit(*args)
    got = fn(*args)
    assert got.shape == want.shape == (2, 6, 8, 9, 16) and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_export_key_follows_weights_and_window(world) -> None:
    key = wm_onnx.export_key(world.dit, 8, 4)
    assert key == wm_onnx.export_key(world.dit, 8, 4)
    assert key != wm_onnx.export_key(world.dit, 5, 4)
    other = build_tiny_world(seed=1).dit
    assert key != wm_onnx.export_key(other, 8, 4)


def test_export_key_follows_the_patch_grid() -> None:
    """Same weights on a moved patch grid (patch_shift) are another graph: another cache entry."""
    from dataclasses import replace

    from world_model.dit import DIT_PRESETS, VideoDiT

    cfg = replace(DIT_PRESETS["tiny"], latent_channels=8, latent_hw=(9, 16), patch=2, text_dim=16)
    plain, moved = VideoDiT(cfg), VideoDiT(replace(cfg, patch_shift=1))
    moved.load_state_dict(plain.state_dict())
    assert wm_onnx.export_key(plain, 6, 3) != wm_onnx.export_key(moved, 6, 3)


def test_onnxruntime_backend_rollout_matches_torch(world, cache: Path) -> None:
    """Same keys, same actions: the ORT simulator emits the torch simulator's latents (float tolerance)."""
    ref, ort = started(world), started(world, backend="onnxruntime")
    assert isinstance(ort._dit_fn, wm_onnx.OnnxDiT) and list(cache.glob("dit-*.onnx"))  # the graph runs
    for a in (0, 4, 8, 2, 2, 6):
        want, r_want, d_want = ref.step(torch.full((B,), a))
        got, r_got, d_got = ort.step(torch.full((B,), a))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r_got, r_want, rtol=1e-4, atol=1e-4)
        assert torch.equal(d_got, d_want)
    frames_ref, frames_ort = ref.decode(ref.latest, (84, 84)), ort.decode(ort.latest, (84, 84))
    assert np.abs(frames_ref.int().numpy() - frames_ort.int().numpy()).max() <= 1


def test_context_cache_sampler_exports_nothing(world, cache: Path) -> None:
    """Immediate mode with a causal DiT runs every call through the context cache (torch)."""
    from world_model.simulator import sampler_config

    sim = started(world, sampler=sampler_config(world, "immediate"), backend="onnxruntime")
    ref = started(world, sampler=sampler_config(world, "immediate"))
    torch.testing.assert_close(sim.step(torch.zeros(B))[0], ref.step(torch.zeros(B))[0])
    assert not cache.exists() or not list(cache.iterdir())


def test_vector_env_backend_kwarg(tiny_world_dir: Path, cache: Path) -> None:
    from matrix_env.vector import MatrixWorldVectorEnv

    torch_env = MatrixWorldVectorEnv(num_envs=2, world=tiny_world_dir, obs_size=(32, 32))
    ort_env = MatrixWorldVectorEnv(num_envs=2, world=tiny_world_dir, obs_size=(32, 32), backend="onnxruntime")
    a, _ = torch_env.reset(seed=3)
    b, _ = ort_env.reset(seed=3)
    assert isinstance(ort_env.sim._dit_fn, wm_onnx.OnnxDiT)
    assert np.array_equal(a, b)  # resets copy recorded frames: no model call
    for action in ([1, 2], [5, 0], [8, 8]):
        a = torch_env.step(np.array(action))[0]
        b = ort_env.step(np.array(action))[0]
    assert a.shape == b.shape == (2, 32, 32, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "tvm"}, "backend must be one of \\('torch', 'onnxruntime', 'tensorrt'\\), got 'tvm'"),
        ({"backend": "onnxruntime", "compile_model": True}, "compile_model=True applies to backend='torch' only"),
        ({"backend": "onnxruntime", "dtype": torch.bfloat16}, "runs float32 graphs; got dtype=torch.bfloat16"),
        ({"backend": "tensorrt"}, "backend='tensorrt' needs a CUDA device, got device='cpu'"),
    ],
)
def test_bad_backend_settings_are_named(world, cache: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Simulator(world, 1, **kwargs)
