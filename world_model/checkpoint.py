"""Checkpoints: safetensors weights + JSON configs, never pickle (DESIGN.md §6, STYLE.md §2).

A module is stored as ``{name}.safetensors`` (its state dict) and ``{name}_config.json``
(``asdict(config)`` plus the class name and format version); loading rebuilds the module from the
stored config. A world model is a directory::

    config.json              format_version, action_names, sentences, sampler, meta, module configs
    vae.safetensors          + vae_config.json
    dit.safetensors          + dit_config.json
    heads.safetensors        + heads_config.json
    obs_decoder.safetensors  + obs_decoder_config.json (optional: ``matrix-world train-obs-decoder``)
    control.safetensors      control tokens / mask / pooled (A+1 rows) and start latents
    manifest.json            sha256 of every file, library versions, the recipe that produced it

Every write is atomic (temporary name in the same directory, then ``os.replace``), and loading
fails with a :class:`CheckpointError` naming the file / field / parameter that does not match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from world_model.device import check_device
from world_model.dit import DiTConfig, VideoDiT
from world_model.errors import UsageError
from world_model.heads import HeadsConfig, RewardTerminationHeads
from world_model.vae import FrameVAE, ObsDecoder, ObsDecoderConfig, VAEConfig

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
CONTROL_FILE = "control.safetensors"
MODULE_NAMES = ("vae", "dit", "heads")
HASH_CHUNK = 1 << 20

M = TypeVar("M", bound=nn.Module)


class CheckpointError(UsageError):
    """A checkpoint is missing, corrupt, too new, or does not match the code."""


# ---------------------------------------------------------------------------------- file helpers
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # clone(): safetensors refuses tensors that share storage (views, tied weights).
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON: {e}") from e


def _load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read tensors from {path}: {e}") from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_version(version: Any, where: Path) -> None:
    if not isinstance(version, int):
        raise CheckpointError(f"{where}: format_version missing or not an integer ({version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format_version {version} is newer than this code supports ({FORMAT_VERSION}); "
            "upgrade matrix-world"
        )


# ---------------------------------------------------------------------------------- configs
def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def config_from_dict(config_cls: type, data: dict[str, Any], where: str) -> Any:
    """Rebuild a dataclass config from its ``asdict`` JSON form.

    JSON turns tuples into lists; fields annotated as tuples get tuples back. Fields absent from
    ``data`` keep their defaults (older checkpoints); unknown fields are an error.

    Raises:
        CheckpointError: ``data`` has fields ``config_cls`` does not know, or values it rejects.
    """
    known = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise CheckpointError(
            f"{where}: unknown {config_cls.__name__} field(s) {unknown}; known fields: {sorted(known)}"
        )
    kwargs = {k: _tuplify(v) if "tuple" in str(known[k].type) else v for k, v in data.items()}
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as err:  # the config's own validation (e.g. VAEConfig.hr_base)
        raise CheckpointError(f"{where}: invalid {config_cls.__name__}: {err}") from err


# ---------------------------------------------------------------------------------- modules
def save_module(directory: str | os.PathLike, name: str, module: nn.Module, config: Any) -> None:
    """Write ``{name}.safetensors`` and ``{name}_config.json`` into ``directory`` atomically.

    Args:
        directory: target directory (created if missing).
        name: file stem, e.g. "dit".
        module: the (uncompiled) module; its state dict is saved.
        config: the dataclass config the module was built from.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**asdict(config), "class": type(module).__name__, "format_version": FORMAT_VERSION}
    _atomic_save_tensors(directory / f"{name}.safetensors", module.state_dict())
    _atomic_write_json(directory / f"{name}_config.json", meta)


def load_module(
    directory: str | os.PathLike,
    name: str,
    module_cls: type[M],
    config_cls: type,
    map_location: torch.device | str = "cpu",
) -> M:
    """Rebuild a module from ``{name}_config.json`` and load ``{name}.safetensors`` strictly.

    Args:
        directory: checkpoint directory.
        name: file stem used by :func:`save_module`.
        module_cls: class to build, called as ``module_cls(config)``.
        config_cls: its dataclass config.
        map_location: device for the module.

    Returns:
        The module on ``map_location`` (train mode, as ``nn.Module`` builds it).

    Raises:
        CheckpointError: missing file, newer format, other class, unknown config field, or
            parameter names / shapes that do not match the rebuilt module.
    """
    directory = Path(directory)
    cfg_path = directory / f"{name}_config.json"
    meta = _read_json(cfg_path)
    _check_version(meta.pop("format_version", None), cfg_path)
    cls_name = meta.pop("class", None)
    if cls_name != module_cls.__name__:
        raise CheckpointError(f"{cfg_path}: stores class {cls_name!r}, expected {module_cls.__name__!r}")
    config = config_from_dict(config_cls, meta, str(cfg_path))
    try:
        module = module_cls(config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot build {module_cls.__name__} from its config: {e}") from e

    weights_path = directory / f"{name}.safetensors"
    state = _load_tensors(weights_path)
    expected = module.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing parameters {missing}")
    if unexpected:
        problems.append(f"unexpected parameters {unexpected}")
    for k in sorted(set(expected) & set(state)):
        if expected[k].shape != state[k].shape:
            problems.append(
                f"{k}: expected shape {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
            )
    if problems:
        raise CheckpointError(
            f"{weights_path} does not match {module_cls.__name__}({config}): " + "; ".join(problems)
        )
    module.load_state_dict(state, strict=True)
    return module.to(map_location)


# ---------------------------------------------------------------------------------- world model
@dataclass
class WorldModel:
    """Everything the simulator needs, as one bundle.

    Attributes:
        vae: frame autoencoder.
        dit: video DiT.
        heads: reward / termination heads.
        control_tokens: (A+1, N, Dt) text-encoder tokens of each control sentence.
        control_mask: (A+1, N) bool, True = real token.
        control_pooled: (A+1, Dt) pooled, L2-normalised control embeddings.
        action_names: A action names ("D", "DL", ...).
        sentences: A+1 control sentences, the unknown sentence last.
        start_latents: (S, Tc, C, H, W) float32 normalised latents of real recorded context windows.
        sampler: default Swin-DPM settings (free-form JSON).
        meta: free-form JSON (data source, training steps, metrics ...).
        obs_decoder: optional narrow decoder for agent-sized observations (``train-obs-decoder``).
    """

    vae: FrameVAE
    dit: VideoDiT
    heads: RewardTerminationHeads
    control_tokens: torch.Tensor
    control_mask: torch.Tensor
    control_pooled: torch.Tensor
    action_names: list[str]
    sentences: list[str]
    start_latents: torch.Tensor
    sampler: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    obs_decoder: ObsDecoder | None = None

    @property
    def num_actions(self) -> int:
        """A, number of actions (the control table has A+1 rows)."""
        return len(self.action_names)

    def validate(self, where: str = "world model") -> None:
        """Check that every part agrees on shapes.

        Raises:
            CheckpointError: naming the first field whose shape disagrees.
        """
        a1 = self.num_actions + 1
        dcfg, vcfg, hcfg = self.dit.cfg, self.vae.cfg, self.heads.cfg
        checks: list[tuple[bool, str]] = [
            (len(self.sentences) == a1,
             f"sentences has {len(self.sentences)} rows, expected num_actions + 1 = {a1}"),
            (self.control_tokens.ndim == 3 and self.control_tokens.shape[0] == a1
             and self.control_tokens.shape[2] == dcfg.text_dim,
             f"control_tokens shape {tuple(self.control_tokens.shape)}, expected ({a1}, N, {dcfg.text_dim})"),
            (tuple(self.control_mask.shape) == tuple(self.control_tokens.shape[:2])
             and self.control_mask.dtype == torch.bool,
             f"control_mask shape/dtype {tuple(self.control_mask.shape)}/{self.control_mask.dtype}, "
             f"expected {tuple(self.control_tokens.shape[:2])}/torch.bool"),
            (tuple(self.control_pooled.shape) == (a1, dcfg.text_dim),
             f"control_pooled shape {tuple(self.control_pooled.shape)}, expected ({a1}, {dcfg.text_dim})"),
            (hcfg.text_dim == dcfg.text_dim,
             f"heads.text_dim {hcfg.text_dim} != dit.text_dim {dcfg.text_dim}"),
            (vcfg.latent_channels == dcfg.latent_channels == hcfg.latent_channels,
             f"latent_channels differ: vae {vcfg.latent_channels}, dit {dcfg.latent_channels}, "
             f"heads {hcfg.latent_channels}"),
            (tuple(vcfg.latent_hw) == tuple(dcfg.latent_hw) == tuple(hcfg.latent_hw),
             f"latent_hw differ: vae {vcfg.latent_hw}, dit {dcfg.latent_hw}, heads {hcfg.latent_hw}"),
            (self.start_latents.ndim == 5
             and tuple(self.start_latents.shape[2:]) == (dcfg.latent_channels, *dcfg.latent_hw)
             and self.start_latents.shape[1] <= dcfg.max_frames,
             f"start_latents shape {tuple(self.start_latents.shape)}, expected "
             f"(S, Tc<={dcfg.max_frames}, {dcfg.latent_channels}, {dcfg.latent_hw[0]}, {dcfg.latent_hw[1]})"),
        ]
        if self.obs_decoder is not None:
            od, vae = self.obs_decoder, self.vae
            checks.append((od.cfg.latent_channels == vcfg.latent_channels
                           and len(od.cfg.channels) == len(vcfg.channels)
                           and torch.equal(od.latent_shift.cpu(), vae.latent_shift.cpu())
                           and torch.equal(od.latent_scale.cpu(), vae.latent_scale.cpu()),
                           f"obs_decoder (latent_channels {od.cfg.latent_channels}, {len(od.cfg.channels)} "
                           f"upsamplings) does not decode this VAE's latents ({vcfg.latent_channels} channels, "
                           f"{len(vcfg.channels)} upsamplings, the same latent statistics)"))
        for ok, msg in checks:
            if not ok:
                raise CheckpointError(f"{where}: {msg}")


def _versions() -> dict[str, str]:
    import safetensors

    import world_model

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "world_model": world_model.__version__,
    }


def save_world(directory: str | os.PathLike, world: WorldModel, recipe: dict[str, Any]) -> Path:
    """Write a world-model checkpoint directory atomically.

    Everything is written into ``<directory>.tmp-<pid>`` and then renamed over ``directory`` (an
    existing checkpoint there is replaced), so readers never see a half-written checkpoint.

    Args:
        directory: target checkpoint directory.
        world: the bundle to save (validated first).
        recipe: how it was produced (command line, data manifest hash ...), stored in the manifest.

    Returns:
        The checkpoint directory.
    """
    world.validate()
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    modules = {"vae": (world.vae, world.vae.cfg), "dit": (world.dit, world.dit.cfg),
               "heads": (world.heads, world.heads.cfg)}
    if world.obs_decoder is not None:
        modules["obs_decoder"] = (world.obs_decoder, world.obs_decoder.cfg)
    for name, (module, cfg) in modules.items():
        save_module(tmp, name, module, cfg)
    _atomic_save_tensors(tmp / CONTROL_FILE, {
        "tokens": world.control_tokens.float(),
        "mask": world.control_mask.bool(),
        "pooled": world.control_pooled.float(),
        "start_latents": world.start_latents.float(),
    })
    _atomic_write_json(tmp / CONFIG_FILE, {
        "format_version": FORMAT_VERSION,
        "action_names": list(world.action_names),
        "sentences": list(world.sentences),
        "sampler": world.sampler,
        "meta": world.meta,
        **{name: asdict(cfg) for name, (_, cfg) in modules.items()},
    })
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    _atomic_write_json(tmp / MANIFEST_FILE, {
        "format_version": FORMAT_VERSION,
        "files": {f: _sha256(tmp / f) for f in files},
        "versions": _versions(),
        "recipe": recipe,
    })

    old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)
    return directory


def world_provenance(directory: str | os.PathLike) -> dict[str, Any] | None:
    """What a world directory records about its own making, or None if ``directory`` is no world.

    Lets a world stand in for a trainer's output directory (``train-dit --init-from WORLD``,
    ``encode-latents --vae WORLD``, ``build-world --vae WORLD --dit WORLD``): its modules are stored under the
    same file names, and this gives the provenance a trainer's summary JSON would have.

    Returns:
        ``{"path", "action_names", "sampler", "term_threshold", "terminal_reward", "termination_pos_weight", "commands"
        (the world's recipe, in order), "vae_args", "dit_args", "latent_space_sha256", "vae_steps",
        "dit_steps", "vae_eval", "dit_eval"}``.
    """
    directory = Path(directory)
    if not ((directory / CONFIG_FILE).is_file() and (directory / MANIFEST_FILE).is_file()):
        return None
    cfg = _read_json(directory / CONFIG_FILE)
    meta = cfg.get("meta", {})
    recipe = _read_json(directory / MANIFEST_FILE).get("recipe", {})
    return {
        "path": str(directory.resolve()),
        "action_names": list(cfg.get("action_names", [])),
        "sampler": dict(cfg.get("sampler", {})),
        "term_threshold": cfg.get("heads", {}).get("term_threshold"),
        "terminal_reward": cfg.get("heads", {}).get("terminal_reward"),
        "termination_pos_weight": meta.get("termination_pos_weight"),
        "commands": list(recipe.get("commands", [])),
        "vae_args": recipe.get("vae_args", {}),
        "dit_args": recipe.get("dit_args", {}),
        "latent_space_sha256": meta.get("vae_sha256"),
        "vae_steps": meta.get("vae_steps"),
        "dit_steps": meta.get("dit_steps"),
        "vae_eval": meta.get("vae_eval", {}),
        "dit_eval": meta.get("dit_eval", {}),
    }


def load_world(directory: str | os.PathLike, device: torch.device | str = "cpu") -> WorldModel:
    """Load and verify a checkpoint written by :func:`save_world`.

    Verifies the manifest's hashes, the format version and every shape; the models come back in
    eval mode with ``requires_grad=False``.

    Raises:
        CheckpointError: naming the file, field or parameter that does not match.
        UsageError: ``device`` is not one this torch can use (:func:`world_model.device.check_device`).
    """
    device = check_device(device)
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory missing: {directory}")
    manifest_path = directory / MANIFEST_FILE
    manifest = _read_json(manifest_path)
    _check_version(manifest.get("format_version"), manifest_path)
    for fname, digest in manifest.get("files", {}).items():
        path = directory / fname
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path} (listed in {manifest_path})")
        if _sha256(path) != digest:
            raise CheckpointError(f"checkpoint file {path} is corrupt: sha256 differs from {manifest_path}")

    cfg_path = directory / CONFIG_FILE
    cfg = _read_json(cfg_path)
    _check_version(cfg.get("format_version"), cfg_path)
    for key in ("action_names", "sentences"):
        if key not in cfg:
            raise CheckpointError(f"{cfg_path}: missing field {key!r}")

    classes = {"vae": (FrameVAE, VAEConfig), "dit": (VideoDiT, DiTConfig),
               "heads": (RewardTerminationHeads, HeadsConfig)}
    if "obs_decoder" in cfg:  # optional (train-obs-decoder)
        classes["obs_decoder"] = (ObsDecoder, ObsDecoderConfig)
    modules: dict[str, nn.Module] = {}
    for name, (module_cls, config_cls) in classes.items():
        module = load_module(directory, name, module_cls, config_cls, map_location=device)
        if name in cfg and config_from_dict(config_cls, cfg[name], f"{cfg_path}[{name!r}]") != module.cfg:
            raise CheckpointError(
                f"{cfg_path}: {name!r} config differs from {directory / f'{name}_config.json'}"
            )
        modules[name] = module.eval().requires_grad_(False)

    control = _load_tensors(directory / CONTROL_FILE, device)
    missing = sorted({"tokens", "mask", "pooled", "start_latents"} - set(control))
    if missing:
        raise CheckpointError(f"{directory / CONTROL_FILE}: missing tensors {missing}")
    world = WorldModel(
        vae=modules["vae"],  # type: ignore[arg-type]
        dit=modules["dit"],  # type: ignore[arg-type]
        heads=modules["heads"],  # type: ignore[arg-type]
        control_tokens=control["tokens"],
        control_mask=control["mask"],
        control_pooled=control["pooled"],
        action_names=list(cfg["action_names"]),
        sentences=list(cfg["sentences"]),
        start_latents=control["start_latents"],
        sampler=cfg.get("sampler", {}),
        meta=cfg.get("meta", {}),
        obs_decoder=modules.get("obs_decoder"),  # type: ignore[arg-type]
    )
    world.validate(str(directory))
    return world
