"""Frame autoencoder: 72x128 RGB frames <-> compact latents, plus a cheap 720p super-resolving head.

The encoder downsamples 8x (three stride-2 convolutions), so a 72x128 frame becomes a (Cz, 9, 16)
latent. The decoder mirrors it; its last full-resolution feature map feeds two heads:

* ``decode``: a 3x3 conv to RGB at training resolution (72x128);
* ``decode_hr``: a super-resolving head to ``sr_factor`` x the training resolution (720x1280). It
  adds a learned residual on top of the upsampled ``decode`` image (``hr_base``: nearest, or
  bilinear), so at initialisation (zero-init last conv) ``decode_hr`` is exactly the upsampled
  low-res frame. The head is kept cheap because the env decodes 720p on CPU every step: transposed
  conv x2 on the feature map, a 1x1 (or 3x3, ``hr_kernel``) conv to ``3 * s * s`` channels and
  ``PixelShuffle(s)`` with ``s = sr_factor / 2``.

Latents are normalised with two buffers (``latent_shift``, ``latent_scale``) that the trainer sets
after fitting (``set_latent_stats``), so the DiT sees roughly unit-variance latents.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Clamp of the encoder's log-variance, as in LDM's DiagonalGaussianDistribution.
LOGVAR_RANGE = (-30.0, 20.0)
# Max GroupNorm groups; channel counts in the presets are multiples of it or smaller.
MAX_NORM_GROUPS = 8
HR_BASES = ("nearest", "bilinear")


@dataclass
class VAEConfig:
    """Frame VAE hyper-parameters."""

    in_hw: tuple[int, int] = (72, 128)
    """Training resolution (H, W) of the frames; must be divisible by 2 ** len(channels)."""
    latent_channels: int = 8
    """Cz, channels of the latent."""
    channels: tuple[int, ...] = (32, 64, 128)
    """Encoder widths, one stride-2 downsampling per entry (3 entries -> latent is in_hw / 8)."""
    sr_factor: int = 10
    """decode_hr output size = in_hw * sr_factor (72x128 -> 720x1280)."""
    sr_channels: int = 16
    """Width of the super-resolving head's hidden feature map."""
    hr_base: str = "nearest"
    """Image the 720p head adds its residual to: the low-res decode upsampled "nearest" (10x10
    blocks; the first worlds) or "bilinear" (smooth; ``train-vae --hr-only --hr-base bilinear``)."""
    hr_kernel: int = 1
    """Kernel of the head's last conv (1: each 5x5 output block sees one feature vector; 3: its
    neighbours too, so adjacent blocks agree)."""
    kl_weight: float = 1e-6
    """Weight of ``kl()`` in the trainer's loss (LDM's value for a sum-over-latent KL)."""

    def __post_init__(self) -> None:
        if self.hr_base not in HR_BASES:
            raise ValueError(f"hr_base must be one of {HR_BASES}, got {self.hr_base!r}")
        if self.hr_kernel not in (1, 3):
            raise ValueError(f"hr_kernel must be 1 or 3, got {self.hr_kernel!r}")

    @property
    def downsample(self) -> int:
        """Spatial reduction factor of the encoder."""
        return 2 ** len(self.channels)

    @property
    def latent_hw(self) -> tuple[int, int]:
        """(h, w) of the latent for a frame of size ``in_hw``."""
        return (self.in_hw[0] // self.downsample, self.in_hw[1] // self.downsample)

    @property
    def hr_hw(self) -> tuple[int, int]:
        """(H, W) of ``decode_hr`` output for a latent of size ``latent_hw``."""
        return (self.in_hw[0] * self.sr_factor, self.in_hw[1] * self.sr_factor)


VAE_PRESETS: dict[str, VAEConfig] = {
    "tiny": VAEConfig(channels=(8, 8, 8), latent_channels=4, sr_channels=4),
    "default": VAEConfig(),
}


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, MAX_NORM_GROUPS), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 residual block (LDM style)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c_in, H, W) -> (B, c_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def decoder_trunk(cz: int, chans: tuple[int, ...]) -> nn.Sequential:
    """The decoder's trunk: (B, Cz, h, w) -> (B, chans[0], 2^n h, 2^n w), n = len(chans), normalised and activated.

    A conv and a ResBlock at the latent's size, then per entry of ``chans`` (widest last) a nearest 2x
    upsampling, a conv and (except at full resolution) a ResBlock.
    """
    dec: list[nn.Module] = [nn.Conv2d(cz, chans[-1], 3, padding=1), ResBlock(chans[-1], chans[-1])]
    widths = (*chans[::-1], chans[0])  # e.g. (128, 64, 32, 32): in/out width of each upsampling
    for i in range(len(chans)):
        dec += [
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(widths[i], widths[i + 1], 3, padding=1),
        ]
        # No ResBlock at full resolution: it would dominate decode cost on CPU.
        if i < len(chans) - 1:
            dec.append(ResBlock(widths[i + 1], widths[i + 1]))
    dec += [_norm(chans[0]), nn.SiLU()]
    return nn.Sequential(*dec)


class FrameVAE(nn.Module):
    """Convolutional frame VAE with a training-resolution decoder and a 720p super-resolving head.

    Fully convolutional: any (H, W) divisible by ``cfg.downsample`` works (e.g. training crops).
    """

    latent_shift: torch.Tensor
    latent_scale: torch.Tensor

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chans = tuple(cfg.channels)
        cz = cfg.latent_channels

        # Encoder: (B, 3, H, W) -> (B, 2*Cz, H/8, W/8)
        self.enc_in = nn.Conv2d(3, chans[0], 3, padding=1)
        enc: list[nn.Module] = []
        prev = chans[0]
        for c in chans:
            enc += [ResBlock(prev, c), nn.Conv2d(c, c, 3, stride=2, padding=1)]
            prev = c
        enc += [ResBlock(prev, prev), _norm(prev), nn.SiLU(), nn.Conv2d(prev, 2 * cz, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)

        self.decoder = decoder_trunk(cz, chans)  # (B, Cz, h, w) -> (B, chans[0], 8h, 8w)
        self.to_rgb = nn.Conv2d(chans[0], 3, 3, padding=1)

        # Super-resolving head on the decoder's last feature map.
        self.sr_pre = 2 if cfg.sr_factor % 2 == 0 else 1
        self.sr_shuffle = cfg.sr_factor // self.sr_pre
        self.hr_up = (
            nn.ConvTranspose2d(chans[0], cfg.sr_channels, self.sr_pre, stride=self.sr_pre)
            if self.sr_pre > 1
            else nn.Conv2d(chans[0], cfg.sr_channels, 1)
        )
        self.hr_out = nn.Conv2d(cfg.sr_channels, 3 * self.sr_shuffle**2, cfg.hr_kernel, padding=cfg.hr_kernel // 2)
        self.hr_shuffle = nn.PixelShuffle(self.sr_shuffle)
        nn.init.zeros_(self.hr_out.weight)
        nn.init.zeros_(self.hr_out.bias)

        self.register_buffer("latent_shift", torch.zeros(cz))
        self.register_buffer("latent_scale", torch.ones(cz))

    # ------------------------------------------------------------------ latents
    @torch.no_grad()
    def set_latent_stats(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        """Set the per-channel normalisation: ``z_norm = (z_raw - shift) / scale``.

        Args:
            shift: (Cz,) per-channel mean of raw latents.
            scale: (Cz,) per-channel std of raw latents (must be > 0).
        """
        cz = self.cfg.latent_channels
        shift = torch.as_tensor(shift, dtype=self.latent_shift.dtype).reshape(cz)
        scale = torch.as_tensor(scale, dtype=self.latent_scale.dtype).reshape(cz)
        if not bool((scale > 0).all()):
            raise ValueError(f"latent scale must be positive, got {scale.tolist()}")
        self.latent_shift.copy_(shift)
        self.latent_scale.copy_(scale)

    def encoder_fingerprint(self) -> str:
        """SHA-256 of what fixes the latent space: the encoder's weights and the latent normalisation.

        Computed from the weights in memory, so a latent IDM or any other model trained on these
        latents can record it and refuse another encoder. A decoder-only fine-tune
        (``--freeze-encoder``, ``--hr-only``) keeps it. Not the same value as
        :func:`world_model.data.latents.latent_space_sha256` (the provenance id that ``train_vae.json``
        and worlds record for latent caches and DiTs, a hash of a weights *file*).
        """
        h = hashlib.sha256()
        parts = {"enc_in": self.enc_in.state_dict(), "encoder": self.encoder.state_dict(),
                 "latent": {"shift": self.latent_shift, "scale": self.latent_scale}}
        for part, tensors in parts.items():
            for name, t in sorted(tensors.items()):
                h.update(f"{part}.{name}:{tuple(t.shape)}".encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    def _normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_shift[:, None, None]) / self.latent_scale[:, None, None]

    def _denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_scale[:, None, None] + self.latent_shift[:, None, None]

    # ------------------------------------------------------------------ encoder
    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (un-normalised) posterior of a batch of frames.

        Args:
            x: (B, 3, H, W) frames in [-1, 1].

        Returns:
            ``(mean, logvar)``, each (B, Cz, H/8, W/8).
        """
        moments = self.encoder(self.enc_in(x))  # (B, 2*Cz, h, w)
        mean, logvar = moments.chunk(2, dim=1)  # 2 x (B, Cz, h, w)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Normalised latent of a batch of frames.

        Args:
            x: (B, 3, H, W) frames in [-1, 1].
            generator: RNG for the posterior sample (only used when ``sample``).
            sample: draw from the posterior instead of returning its mean.

        Returns:
            (B, Cz, H/8, W/8) normalised latent.
        """
        mean, logvar = self.encode_dist(x)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self._normalise(z)

    # ------------------------------------------------------------------ decoder
    def decode_features(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder trunk shared by ``decode`` and ``decode_hr``.

        Args:
            z: (B, Cz, h, w) normalised latent.

        Returns:
            (B, channels[0], 8h, 8w) feature map (already normalised and activated).
        """
        return self.decoder(self._denormalise(z))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents to frames at training resolution.

        Args:
            z: (B, Cz, h, w) normalised latent.

        Returns:
            (B, 3, 8h, 8w) frames, roughly in [-1, 1].
        """
        return self.to_rgb(self.decode_features(z))

    def hr_from_features(self, feats: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        """Super-resolving head: features + low-res frame -> high-res frame.

        Args:
            feats: (B, channels[0], H, W) output of ``decode_features``.
            low_res: (B, 3, H, W) output of ``to_rgb`` on ``feats``.

        Returns:
            (B, 3, H * sr_factor, W * sr_factor) frames, roughly in [-1, 1].
        """
        s = self.sr_shuffle
        h = F.silu(self.hr_up(feats))  # (B, sr_channels, H*pre, W*pre)
        detail = self.hr_out(h)  # (B, 3*s*s, H*pre, W*pre)
        if self.cfg.hr_base == "bilinear":
            out = self.hr_shuffle(detail)  # (B, 3, H*sr, W*sr), a new tensor: add in place
            out += F.interpolate(low_res, scale_factor=self.cfg.sr_factor, mode="bilinear")
            return out
        # The nearest-upsampled low-res frame, added before the shuffle: each of the s*s sub-pixel
        # channels of colour c gets low_res[c] (upsampled by pre). This avoids materialising and
        # adding a separate 720p tensor (measured ~2x faster on CPU than interpolate + add at 720p).
        base = low_res
        if self.sr_pre > 1:
            base = F.interpolate(low_res, scale_factor=self.sr_pre, mode="nearest")  # (B, 3, H*pre, W*pre)
        b, _, hp, wp = detail.shape
        detail = detail.view(b, 3, s * s, hp, wp) + base[:, :, None]  # (B, 3, s*s, H*pre, W*pre)
        return self.hr_shuffle(detail.view(b, 3 * s * s, hp, wp))  # (B, 3, H*sr, W*sr)

    def decode_hr(self, z: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents straight to high resolution (720p for the default config).

        Args:
            z: (B, Cz, h, w) normalised latent.

        Returns:
            (B, 3, 8h * sr_factor, 8w * sr_factor) frames, roughly in [-1, 1].
        """
        feats = self.decode_features(z)  # (B, channels[0], H, W)
        return self.hr_from_features(feats, self.to_rgb(feats))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training pass: encode, sample the posterior, decode at training resolution.

        Args:
            x: (B, 3, H, W) frames in [-1, 1].
            generator: RNG for the posterior sample.

        Returns:
            dict with ``recon`` (B, 3, H, W), raw ``mean`` and ``logvar`` (B, Cz, H/8, W/8).
        """
        mean, logvar = self.encode_dist(x)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z_raw = mean + torch.exp(0.5 * logvar) * eps  # (B, Cz, h, w)
        recon = self.decode(self._normalise(z_raw))
        return {"recon": recon, "mean": mean, "logvar": logvar}


@dataclass
class ObsDecoderConfig:
    """A narrow training-resolution decoder for agent-sized observations (``matrix-world train-obs-decoder``)."""

    latent_channels: int = 8
    """Cz, channels of the latent (the world's VAE's)."""
    channels: tuple[int, ...] = (16, 32, 64)
    """Widths as in ``VAEConfig.channels`` (the VAE's: (32, 64, 128)); one 2x upsampling per entry."""


class ObsDecoder(nn.Module):
    """The VAE's ``decode`` (latent -> frame at training resolution) at a fraction of its cost.

    Same layout as the VAE's decoder trunk and ``to_rgb``, narrower; trained to reproduce the VAE's
    ``decode`` of the same latents (distillation), so observations at 84x84 look like the VAE's
    frames resized. It reads normalised latents and holds a copy of the VAE's latent statistics.
    """

    latent_shift: torch.Tensor
    latent_scale: torch.Tensor

    def __init__(self, cfg: ObsDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chans = tuple(cfg.channels)
        self.decoder = decoder_trunk(cfg.latent_channels, chans)
        self.to_rgb = nn.Conv2d(chans[0], 3, 3, padding=1)
        self.register_buffer("latent_shift", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_scale", torch.ones(cfg.latent_channels))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Cz, h, w) normalised latents -> (B, 3, 2^n h, 2^n w) frames in about [-1, 1], as ``FrameVAE.decode``."""
        raw = z * self.latent_scale[:, None, None] + self.latent_shift[:, None, None]  # (B, Cz, h, w)
        return self.to_rgb(self.decoder(raw))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`decode`."""
        return self.decode(z)


def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), summed over (C, H, W), averaged over the batch.

    This is LDM's convention, the one ``VAEConfig.kl_weight = 1e-6`` is tuned for.

    Args:
        mean: (B, Cz, h, w) raw posterior mean.
        logvar: (B, Cz, h, w) raw posterior log-variance.

    Returns:
        Scalar tensor.
    """
    per_elem = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return per_elem.flatten(1).sum(dim=1).mean()


def frames_to_tensor(
    frames: np.ndarray | torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """uint8 frames (..., H, W, 3) -> float32 tensor (..., 3, H, W) in [-1, 1].

    Args:
        frames: uint8 array or tensor with channels last.
        device: where to put the result (default: where ``frames`` is; CPU for numpy).
    """
    x = torch.as_tensor(frames, device=device)
    if x.dtype != torch.uint8:
        raise TypeError(f"frames must be uint8, got {x.dtype}")
    return x.movedim(-1, -3).float().div_(127.5).sub_(1.0)  # (..., 3, H, W)


def tensor_to_frames(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Float tensor (..., 3, H, W) in [-1, 1] -> uint8 tensor (..., H, W, 3) (same device).

    Values outside [-1, 1] are clamped. ``inplace`` reuses a float32 ``x`` the caller no longer
    needs as scratch (at 720p it saves three frame-sized allocations, ~3 ms per frame on 2 cores).
    """
    y = x.detach().float()
    if not inplace and y.data_ptr() == x.data_ptr():  # .float() made no copy: do not touch the caller's x
        y = y.clone()
    u8 = y.clamp_(-1.0, 1.0).add_(1.0).mul_(127.5).round_().to(torch.uint8)
    return u8.movedim(-3, -1).contiguous()  # (..., H, W, 3), C-contiguous (OpenCV draws on it in place)
