"""The real CarRacing-v3 seen through MatrixWorld's action table and observation pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.real_env import RealCarRacingEnv


def test_real_env_observations_actions_and_determinism() -> None:
    env = RealCarRacingEnv(obs_size=(84, 84), render_mode="rgb_array")
    obs, _ = env.reset(seed=3)
    assert obs.shape == (84, 84, 3) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    assert env.get_action_meanings()[:3] == ["D", "DL", "DR"]
    rollout = [env.step(a)[0] for a in (0, 0, 1, 2)]
    assert env.render().shape == (720, 1280, 3)
    obs2, _ = env.reset(seed=3)
    assert np.array_equal(obs, obs2)
    assert all(np.array_equal(o, env.step(a)[0]) for o, a in zip(rollout, (0, 0, 1, 2), strict=True))
    env.step(np.array(3))  # a 0-d array, as SB3's predict returns for one observation
    with pytest.raises(ValueError, match="driving action"):
        env.step(9)
    with pytest.raises(ValueError, match=r"action 1.7 is not a driving action"):
        env.step(1.7)  # not silently action 1
    with pytest.raises(ValueError, match=r"action True is not a driving action"):
        env.step(True)
    env.close()
    with pytest.raises(ValueError, match=r"render_mode.*got 'human'"):
        RealCarRacingEnv(render_mode="human")
    assert RealCarRacingEnv(frame_skip=2).metadata["render_fps"] == 25  # CarRacing's 50 physics steps/s
    assert RealCarRacingEnv.metadata["render_fps"] == 12


def test_real_env_through_a_world_vae_shows_its_decoded_frames() -> None:
    """With ``vae`` the observation is the world decoder's drawing of the real frame, not the frame."""
    from tests.conftest import build_tiny_world
    from world_model.data.record import resize_frame
    from world_model.eval.suite import decode_latents, encode_frames

    vae = build_tiny_world().vae.eval()
    plain, through = RealCarRacingEnv(obs_size=(84, 84)), RealCarRacingEnv(obs_size=(84, 84), vae=vae)
    obs, _ = plain.reset(seed=5)
    seen, _ = through.reset(seed=5)
    assert seen.shape == (84, 84, 3) and seen.dtype == np.uint8 and not np.array_equal(seen, obs)
    native, _ = RealCarRacingEnv().reset(seed=5)  # (72, 128, 3): the training-resolution frame
    small = decode_latents(vae, encode_frames(vae, native[None]))  # the same path by hand
    assert np.array_equal(seen, resize_frame(small[0], 84, 84))
    assert np.array_equal(through.reset(seed=5)[0], seen)  # deterministic: the posterior mean, no sampling
    plain.close()
    through.close()

    from world_model.vae import ObsDecoder, ObsDecoderConfig  # a world's observation decoder draws instead

    torch.manual_seed(0)
    dec = ObsDecoder(ObsDecoderConfig(latent_channels=vae.cfg.latent_channels, channels=(4, 4, 4))).eval()
    drawn, _ = RealCarRacingEnv(obs_size=(84, 84), vae=vae, decoder=dec).reset(seed=5)
    by_hand = decode_latents(dec, encode_frames(vae, native[None]))
    assert np.array_equal(drawn, resize_frame(by_hand[0], 84, 84)) and not np.array_equal(drawn, seen)
    with pytest.raises(ValueError, match="decoder= needs vae="):
        RealCarRacingEnv(decoder=dec)
