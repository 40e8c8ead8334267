"""VideoDiT: shape, backward, determinism, control conditioning, block-causality."""

from dataclasses import replace

import pytest
import torch

from world_model.dit import DIT_PRESETS, DiTConfig, VideoDiT

TEXT_DIM = 12
N_TOKENS = 5


def make(cfg: DiTConfig, seed: int = 0) -> VideoDiT:
    torch.manual_seed(seed)
    return VideoDiT(cfg)


def perturb_zero_init(model: VideoDiT, seed: int = 1) -> None:
    """Randomise the zero-initialised layers so every path influences the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().sum() == 0 and not name.endswith("gate"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for gate in model.gates():
            gate.fill_(1.0)


def inputs(cfg: DiTConfig, b: int = 2, t: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, cfg.latent_channels, *cfg.latent_hw, generator=g)
    times = torch.rand(b, t, generator=g)
    ctrl = torch.randn(b, t, N_TOKENS, cfg.text_dim, generator=g)
    mask = torch.ones(b, t, N_TOKENS, dtype=torch.bool)
    mask[:, :, -2:] = False
    return x, times, ctrl, mask


@pytest.fixture
def cfg() -> DiTConfig:
    return replace(DIT_PRESETS["tiny"], text_dim=TEXT_DIM)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"latent_channels": 8, "latent_hw": (9, 16)},
        {"patch": 2},
        {"latent_channels": 8, "latent_hw": (9, 16), "patch": 2},
        {"latent_channels": 8, "latent_hw": (9, 16), "patch": 2, "patch_shift": 1},
    ],
)
def test_shape(cfg: DiTConfig, overrides: dict) -> None:
    cfg = replace(cfg, **overrides)
    model = make(cfg)
    x, t, ctrl, mask = inputs(cfg, t=3)
    assert model(x, t, ctrl, mask).shape == x.shape


def test_zero_init_output(cfg: DiTConfig) -> None:
    model = make(cfg)
    assert model(*inputs(cfg)).abs().max() == 0  # adaLN-Zero: final layer starts at zero


def test_backward(cfg: DiTConfig) -> None:
    model = make(cfg)
    perturb_zero_init(model)
    model(*inputs(cfg)).pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["interactive.0.gate"].abs().sum() > 0


def test_determinism(cfg: DiTConfig) -> None:
    a, b = make(cfg, seed=3), make(cfg, seed=3)
    perturb_zero_init(a)
    perturb_zero_init(b)
    args = inputs(cfg)
    assert torch.equal(a(*args), b(*args))


def test_control_changes_output_only_when_gate_open(cfg: DiTConfig) -> None:
    model = make(cfg)
    perturb_zero_init(model)
    x, t, ctrl, mask = inputs(cfg)
    # same pooled (masked mean) control, different tokens: only the interactive module sees it
    ctrl2 = ctrl.clone()
    ctrl2[:, :, 0] += 1.0
    ctrl2[:, :, 1] -= 1.0
    assert not torch.allclose(model(x, t, ctrl, mask), model(x, t, ctrl2, mask))
    with torch.no_grad():
        for gate in model.gates():
            gate.zero_()
    torch.testing.assert_close(model(x, t, ctrl, mask), model(x, t, ctrl2, mask))
    # padded tokens are ignored
    ctrl3 = ctrl.clone()
    ctrl3[:, :, -1] += 5.0
    torch.testing.assert_close(model(x, t, ctrl, mask), model(x, t, ctrl3, mask))


def test_all_masked_frame_is_finite(cfg: DiTConfig) -> None:
    model = make(cfg)
    perturb_zero_init(model)
    x, t, ctrl, mask = inputs(cfg)
    mask[0, 1] = False
    assert torch.isfinite(model(x, t, ctrl, mask)).all()


@pytest.mark.parametrize("causal", [True, False])
def test_causality(cfg: DiTConfig, causal: bool) -> None:
    cfg = replace(cfg, causal=causal)
    model = make(cfg)
    perturb_zero_init(model)
    x, t, ctrl, mask = inputs(cfg, t=4)
    x2, t2, ctrl2 = x.clone(), t.clone(), ctrl.clone()
    x2[:, 2:] += 1.0  # change frames 2, 3 (latent, noise level and control)
    t2[:, 2:] = 0.5
    ctrl2[:, 2:] += 1.0
    out, out2 = model(x, t, ctrl, mask), model(x2, t2, ctrl2, mask)
    past_equal = torch.allclose(out[:, :2], out2[:, :2], atol=1e-6)
    assert past_equal == causal
    assert not torch.allclose(out[:, 2:], out2[:, 2:])


def test_too_many_frames(cfg: DiTConfig) -> None:
    model = make(cfg)
    with pytest.raises(ValueError, match="max_frames"):
        model(*inputs(cfg, t=cfg.max_frames + 1))


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="patch must be >= 1, got 0"):
        VideoDiT(replace(DIT_PRESETS["tiny"], patch=0))
    with pytest.raises(ValueError, match=r"patch_shift must be in \[0, patch=2\) .* got 2"):
        VideoDiT(replace(DIT_PRESETS["tiny"], patch=2, patch_shift=2))
    with pytest.raises(ValueError, match=r"patch_shift must be in \[0, patch=1\) .* got 1"):
        VideoDiT(replace(DIT_PRESETS["tiny"], patch_shift=1))
    with pytest.raises(ValueError, match=r"below the latent width 2, got 3"):
        VideoDiT(replace(DIT_PRESETS["tiny"], latent_hw=(2, 2), patch=4, patch_shift=3))


def test_padded_patch_grid(cfg: DiTConfig) -> None:
    """A 9x16 latent at patch 2 is zero-padded at the bottom to 10x16 (5x8 tokens per frame): the same
    model on a 10x16 latent with a zero last row gives the same velocities, cropped to 9 rows."""
    cfg = replace(cfg, latent_channels=8, latent_hw=(9, 16), patch=2)
    model = make(cfg)
    perturb_zero_init(model)
    assert model.grid == (5, 8) and model.pos_spatial.shape == (40, cfg.dim)
    padded = VideoDiT(replace(cfg, latent_hw=(10, 16)))
    padded.load_state_dict(model.state_dict())
    x, t, ctrl, mask = inputs(cfg, t=3)
    with torch.no_grad():
        out = model(x, t, ctrl, mask)  # (B, 3, 8, 9, 16)
        want = padded(torch.nn.functional.pad(x, (0, 0, 0, 1)), t, ctrl, mask)  # (B, 3, 8, 10, 16)
    assert out.shape == x.shape
    torch.testing.assert_close(out, want[..., :9, :], rtol=0, atol=0)


@pytest.mark.parametrize("hw, grid", [((9, 16), (5, 8)), ((9, 15), (5, 8))])
def test_shifted_patch_grid(cfg: DiTConfig, hw: tuple[int, int], grid: tuple[int, int]) -> None:
    """patch_shift=1 is the same DiT on the latent rolled left by one column, its velocity rolled back:
    the grid moves, the token count (5x8 on 9x16 at patch 2) and the weights do not; with a padded
    column (9x15) the padding stays at the right of the rolled latent."""
    cfg = replace(cfg, latent_channels=8, latent_hw=hw, patch=2)
    plain = make(cfg)
    perturb_zero_init(plain)
    shifted = VideoDiT(replace(cfg, patch_shift=1))
    shifted.load_state_dict(plain.state_dict())
    assert shifted.grid == plain.grid == grid
    x, t, ctrl, mask = inputs(cfg, t=3)
    with torch.no_grad():
        got = shifted(x, t, ctrl, mask)  # (B, 3, 8, 9, 16)
        want = plain(x.roll(-1, dims=-1), t, ctrl, mask).roll(1, dims=-1)
        assert not torch.allclose(got, plain(x, t, ctrl, mask), atol=1e-4)  # the grid did move
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"latent_channels": 8, "latent_hw": (9, 16), "patch": 2},
     {"latent_channels": 8, "latent_hw": (9, 16), "patch": 2, "patch_shift": 1}],
)
def test_context_cache_equals_the_full_window(cfg: DiTConfig, overrides: dict) -> None:
    """encode_context(first frames) + forward(later frames, cache) == forward(whole window)[later]."""
    cfg = replace(cfg, **overrides)
    model = make(cfg).eval()
    perturb_zero_init(model)
    x, t, ctrl, mask = inputs(cfg, t=6)
    with torch.no_grad():
        full = model(x, t, ctrl, mask)  # (B, 6, C, H, W)
        cache = model.encode_context(x[:, :4], t[:, :4], ctrl[:, :4], mask[:, :4])
        assert cache.frames == 4 and len(cache.kv) == cfg.depth
        later = model(x[:, 4:], t[:, 4:], ctrl[:, 4:], mask[:, 4:], cache=cache)
    torch.testing.assert_close(later, full[:, 4:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_frames"):
        model(*inputs(cfg, t=cfg.max_frames - 3), cache=cache)
    bidirectional = make(replace(cfg, causal=False))
    with pytest.raises(ValueError, match="block-causal"):
        bidirectional.encode_context(x[:, :4], t[:, :4], ctrl[:, :4], mask[:, :4])
