"""Checkpoints: module and world round-trips, and errors that name what does not match."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from world_model.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    WorldModel,
    load_module,
    load_world,
    save_module,
    save_world,
)
from world_model.dit import DIT_PRESETS, DiTConfig, VideoDiT
from world_model.errors import UsageError
from world_model.heads import HeadsConfig, RewardTerminationHeads
from world_model.vae import VAE_PRESETS, FrameVAE, VAEConfig

TEXT_DIM, N_TOKENS, ACTIONS = 12, 5, ["L", "R"]


def tiny_world(seed: int = 0) -> WorldModel:
    torch.manual_seed(seed)
    vae_cfg = VAE_PRESETS["tiny"]
    dit_cfg = replace(DIT_PRESETS["tiny"], latent_hw=(9, 16), text_dim=TEXT_DIM)
    vae = FrameVAE(vae_cfg)
    vae.set_latent_stats(torch.randn(4), torch.rand(4) + 0.5)
    dit = VideoDiT(dit_cfg)
    with torch.no_grad():  # make the zero-initialised output layers non-trivial
        dit.final.weight.normal_()
        for gate in dit.gates():
            gate.fill_(0.5)
    heads = RewardTerminationHeads(HeadsConfig(latent_channels=4, text_dim=TEXT_DIM, hidden=16))
    a1 = len(ACTIONS) + 1
    return WorldModel(
        vae=vae, dit=dit, heads=heads,
        control_tokens=torch.randn(a1, N_TOKENS, TEXT_DIM),
        control_mask=torch.rand(a1, N_TOKENS) > 0.3,
        control_pooled=torch.nn.functional.normalize(torch.randn(a1, TEXT_DIM), dim=-1),
        action_names=list(ACTIONS), sentences=["left", "right", "unknown"],
        start_latents=torch.randn(3, 2, 4, 9, 16),
        sampler={"context": 2, "groups": 4}, meta={"note": "test"},
    )


def test_module_roundtrip(tmp_path: Path) -> None:
    dit = tiny_world().dit
    save_module(tmp_path, "dit", dit, dit.cfg)
    loaded = load_module(tmp_path, "dit", VideoDiT, DiTConfig)
    assert loaded.cfg == dit.cfg and isinstance(loaded.cfg.latent_hw, tuple)
    for (k, v), (k2, v2) in zip(dit.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_world_roundtrip(tmp_path: Path) -> None:
    world = tiny_world()
    save_world(tmp_path / "ckpt", world, recipe={"cmd": "test"})
    loaded = load_world(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["ckpt"]
    for name in ("control_tokens", "control_mask", "control_pooled", "start_latents"):
        assert torch.equal(getattr(world, name), getattr(loaded, name)), name
    assert loaded.action_names == ACTIONS and loaded.num_actions == 2
    assert loaded.sentences == world.sentences
    assert loaded.sampler == world.sampler and loaded.meta == world.meta
    assert not loaded.dit.training and not any(p.requires_grad for p in loaded.dit.parameters())
    torch.testing.assert_close(loaded.vae.latent_scale, world.vae.latent_scale)

    world.dit.eval()
    world.vae.eval()
    x = torch.randn(1, 2, 4, 9, 16)
    t = torch.rand(1, 2)
    ctrl, mask = world.control_tokens[None, :2], world.control_mask[None, :2]
    with torch.no_grad():
        assert torch.equal(world.dit(x, t, ctrl, mask), loaded.dit(x, t, ctrl, mask))
        assert torch.equal(world.vae.decode(x[:, 0]), loaded.vae.decode(x[:, 0]))
        z = x[:, 0]
        pooled = world.control_pooled[:1]
        assert torch.equal(world.heads(z, z, pooled)[0], loaded.heads(z, z, pooled)[0])
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["recipe"] == {"cmd": "test"} and "torch" in manifest["versions"]
    assert "dit.safetensors" in manifest["files"]

    save_world(tmp_path / "ckpt", tiny_world(seed=1), recipe={})  # overwrite an existing checkpoint
    assert not torch.equal(load_world(tmp_path / "ckpt").start_latents, world.start_latents)


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_module_errors(tmp_path: Path) -> None:
    vae = FrameVAE(VAE_PRESETS["tiny"])
    with pytest.raises(CheckpointError, match="vae_config.json"):
        load_module(tmp_path, "vae", FrameVAE, VAEConfig)
    save_module(tmp_path, "vae", vae, vae.cfg)
    assert issubclass(CheckpointError, UsageError)

    cfg_path = tmp_path / "vae_config.json"
    _edit_json(cfg_path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match="format_version 2 is newer"):
        load_module(tmp_path, "vae", FrameVAE, VAEConfig)

    _edit_json(cfg_path, format_version=FORMAT_VERSION, bogus_field=3)
    with pytest.raises(CheckpointError, match="bogus_field"):
        load_module(tmp_path, "vae", FrameVAE, VAEConfig)

    _edit_json(cfg_path, **{"class": "VideoDiT"})
    with pytest.raises(CheckpointError, match="VideoDiT"):
        load_module(tmp_path, "vae", FrameVAE, VAEConfig)

    # weights of a wider model under this config: names every mismatching parameter and shapes
    save_module(tmp_path, "vae", vae, vae.cfg)
    wide = FrameVAE(replace(VAE_PRESETS["tiny"], latent_channels=6))
    save_module(tmp_path, "wide", wide, wide.cfg)
    (tmp_path / "wide.safetensors").replace(tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"latent_shift: expected shape \(4,\), found \(6,\)"):
        load_module(tmp_path, "vae", FrameVAE, VAEConfig)

    (tmp_path / "vae.safetensors").unlink()
    with pytest.raises(CheckpointError, match="vae.safetensors"):
        load_module(tmp_path, "vae", FrameVAE, VAEConfig)

    heads = RewardTerminationHeads(HeadsConfig(terminal_reward=-100.0))  # a world's ending reward: checked
    save_module(tmp_path, "heads", heads, heads.cfg)
    assert load_module(tmp_path, "heads", RewardTerminationHeads, HeadsConfig).cfg.terminal_reward == -100.0
    for bad in ("NaN", '"-100"'):  # a hand edit: NaN, or the number as a string
        path = tmp_path / "heads_config.json"
        path.write_text(path.read_text().replace("-100.0", bad))
        with pytest.raises(CheckpointError, match="terminal_reward must be None or a finite number"):
            load_module(tmp_path, "heads", RewardTerminationHeads, HeadsConfig)
        save_module(tmp_path, "heads", heads, heads.cfg)


def test_world_errors(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match="ckpt"):
        load_world(ckpt)
    save_world(ckpt, tiny_world(), recipe={})

    (ckpt / "control.safetensors").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="control.safetensors is corrupt"):
        load_world(ckpt)

    save_world(ckpt, tiny_world(), recipe={})
    _edit_json(ckpt / "manifest.json", format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match="manifest.json.*newer"):
        load_world(ckpt)

    save_world(ckpt, tiny_world(), recipe={})
    (ckpt / "heads.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing.*heads.safetensors"):
        load_world(ckpt)

    bad = tiny_world()
    bad.sentences = bad.sentences[:2]
    with pytest.raises(CheckpointError, match="sentences"):
        save_world(tmp_path / "bad", bad, recipe={})
    bad = tiny_world()
    bad.start_latents = torch.zeros(3, 2, 4, 8, 8)
    with pytest.raises(CheckpointError, match="start_latents"):
        save_world(tmp_path / "bad", bad, recipe={})
    assert not (tmp_path / "bad").exists()
