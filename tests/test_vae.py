"""FrameVAE: shapes, latent normalisation, determinism, backward, frame conversion."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from world_model.vae import VAE_PRESETS, FrameVAE, frames_to_tensor, kl, tensor_to_frames


@pytest.fixture
def vae() -> FrameVAE:
    torch.manual_seed(0)
    return FrameVAE(VAE_PRESETS["tiny"]).eval()


def test_shapes(vae: FrameVAE) -> None:
    cfg = vae.cfg
    x = torch.rand(2, 3, *cfg.in_hw) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, cfg.latent_channels, 9, 16) and cfg.latent_hw == (9, 16)
    assert vae.decode(z).shape == x.shape
    assert vae.decode_hr(z).shape == (2, 3, 720, 1280) and cfg.hr_hw == (720, 1280)
    out = vae(x)
    assert out["recon"].shape == x.shape and out["mean"].shape == out["logvar"].shape == z.shape


def test_crops_fully_convolutional(vae: FrameVAE) -> None:
    x = torch.zeros(1, 3, 32, 48)
    z = vae.encode(x)
    assert z.shape == (1, vae.cfg.latent_channels, 4, 6)
    assert vae.decode(z).shape == x.shape


def test_odd_sr_factor() -> None:
    vae = FrameVAE(replace(VAE_PRESETS["tiny"], sr_factor=3))
    assert vae.decode_hr(torch.zeros(1, 4, 2, 3)).shape == (1, 3, 48, 72)


def test_hr_starts_as_upsampled_decode(vae: FrameVAE) -> None:
    z = torch.randn(1, vae.cfg.latent_channels, 9, 16)
    lo = vae.decode(z)
    hi = vae.decode_hr(z)
    up = torch.nn.functional.interpolate(lo, scale_factor=vae.cfg.sr_factor, mode="nearest")
    torch.testing.assert_close(hi, up)


def test_latent_normalisation(vae: FrameVAE) -> None:
    x = torch.rand(1, 3, 72, 128) * 2 - 1
    z0 = vae.encode(x)
    recon0 = vae.decode(z0)
    shift, scale = torch.arange(4.0), torch.full((4,), 2.0)
    vae.set_latent_stats(shift, scale)
    mean, _ = vae.encode_dist(x)
    torch.testing.assert_close(vae.encode(x), (mean - shift[:, None, None]) / scale[:, None, None])
    # decode undoes the normalisation, so the frame is unchanged
    torch.testing.assert_close(vae.decode(vae.encode(x)), recon0)
    with pytest.raises(ValueError, match="positive"):
        vae.set_latent_stats(shift, torch.zeros(4))


def test_sampling_determinism(vae: FrameVAE) -> None:
    x = torch.rand(2, 3, 72, 128) * 2 - 1
    a = vae.encode(x, torch.Generator().manual_seed(1), sample=True)
    b = vae.encode(x, torch.Generator().manual_seed(1), sample=True)
    c = vae.encode(x, torch.Generator().manual_seed(2), sample=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_backward_and_kl(vae: FrameVAE) -> None:
    vae.train()
    x = torch.rand(2, 3, 72, 128) * 2 - 1
    out = vae(x, generator=torch.Generator().manual_seed(0))
    loss = (out["recon"] - x).pow(2).mean() + vae.cfg.kl_weight * kl(out["mean"], out["logvar"])
    loss.backward()
    assert vae.enc_in.weight.grad is not None and torch.isfinite(vae.enc_in.weight.grad).all()
    assert kl(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).item() == 0.0


def test_frame_conversion_roundtrip() -> None:
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 5, 72, 128, 3), dtype=np.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (2, 5, 3, 72, 128) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    before = x.clone()
    back = tensor_to_frames(x)
    assert back.dtype == torch.uint8 and np.array_equal(back.numpy(), frames)
    assert torch.equal(x, before)  # the default leaves the input alone
    assert np.array_equal(tensor_to_frames(x, inplace=True).numpy(), frames)  # scratch mode: same frames
    assert tensor_to_frames(torch.full((3, 2, 2), 5.0)).eq(255).all()
    with pytest.raises(TypeError):
        frames_to_tensor(np.zeros((2, 2, 3), dtype=np.float32))


def test_encoder_fingerprint_follows_the_encoder_not_the_decoder(vae: FrameVAE) -> None:
    before = vae.encoder_fingerprint()
    with torch.no_grad():
        vae.to_rgb.weight.add_(0.1)  # a decoder-only fine-tune keeps the latent space
        vae.hr_out.weight.add_(0.1)
    assert vae.encoder_fingerprint() == before and len(before) == 64
    with torch.no_grad():
        next(vae.encoder.parameters()).add_(0.1)
    assert vae.encoder_fingerprint() != before
    moved = vae.encoder_fingerprint()
    vae.set_latent_stats(torch.ones(vae.cfg.latent_channels), torch.full((vae.cfg.latent_channels,), 2.0))
    assert vae.encoder_fingerprint() != moved
