"""Shared training machinery: distributed setup, bf16, EMA, LR schedule, crash-safe checkpoints.

Every trainer runs unchanged as one process or under ``torchrun --nproc_per_node N`` (gloo on CPU,
NCCL on CUDA; ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` are read from the environment).

Run directory (outside the repo, e.g. ``~/runs/vae``)::

    RUN/config.json                   the Args the run was started with (checked on resume)
    RUN/state/step_000123/            one training checkpoint, written as state/.tmp-step_000123/ and renamed
        model.safetensors             raw (un-wrapped) model weights
        ema.safetensors               EMA weights
        optimizer.safetensors         optimizer tensors, flattened: "state.<param>.<key>"
        optimizer.json                optimizer param_groups and non-tensor state
        rng_rank<r>.safetensors       torch CPU/CUDA, trainer generators, numpy, python RNG (per rank)
        rng_rank<r>.json              numpy / python RNG scalars, per rank
        trainer.json                  step, world_size, time, anything the trainer adds
        config.json                   copy of the run's Args
    RUN/tb/                           TensorBoard scalars (rank 0)
    RUN/model/                        the exported final (EMA) model, unless --out says otherwise
    RUN/control_table.safetensors     train-dit only: the control table, encoded once per run
    RUN/debug/                        per-rank weight hashes when ``--debug-hashes`` is on

Nothing is pickled: tensors go to safetensors, everything else to JSON.

Resume guarantee: a rerun with the same ``RUN`` loads the newest complete ``state/step_*`` and
continues at that step, with the model, EMA, optimizer and every RNG restored. The data order is a
pure function of ``(seed, epoch, rank, world_size)`` (see :class:`ResumableBatchSampler`), so the
resumed run sees exactly the batches the uninterrupted run would have seen from that step on, not
only from the epoch boundary. With ``num_workers=0`` (or workers that draw no randomness) and the
same thread count, the final weights are bitwise equal to an uninterrupted run on CPU (tested).
Exception: train-vae's 720p crop stream reads videos sequentially and restarts from a seed that
includes the resume step, so with videos present the HR crops after a resume differ.
A resume must use the same world size (checked) and the same Args except the fields each trainer
lists in ``RESUME_FREE`` (checked; the error names every differing field).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from world_model.device import slow_precision
from world_model.errors import UsageError

STATE_DIR = "state"
CKPT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
RUN_CONFIG = "config.json"


# ----------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the (possibly single-process) job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that logs and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is initialised (``WORLD_SIZE`` > 1)."""
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group from torchrun's environment, or run as a single process.

    Args:
        device: "auto" (CUDA if available, else CPU), "cpu" or "cuda".

    Returns:
        The rank, world size, local rank and the device this process uses.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Destroy the process group if one was created."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Synchronise all ranks (no-op for a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a copy; ``x`` itself is left alone)."""
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def reduce_scalars(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Rank-averaged values of scalar tensors, with one all-reduce and one host sync for all of them."""
    values = all_reduce_mean(torch.stack([v.detach().float() for v in losses.values()]))  # (K,)
    return dict(zip(losses, values.tolist(), strict=True))


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` holds on any rank (one all-reduce when distributed), so all ranks decide alike."""
    if not info.distributed:
        return flag
    value = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def wrap_ddp(module: nn.Module, info: DistInfo, find_unused: bool = False) -> nn.Module:
    """Wrap in DistributedDataParallel when running on several ranks; the module itself otherwise."""
    if not info.distributed:
        return module
    ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(module: nn.Module) -> nn.Module:
    """The raw module under a DDP wrapper (what checkpoints store)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


# ----------------------------------------------------------------------------- numerics
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_bf16(requested: bool, device: torch.device) -> bool:
    """Whether bf16 autocast is used: requested, and computed in hardware by the device (else a note,
    and fp32: on a CPU without AVX512-BF16 / AMX, bf16 is emulated and much slower than fp32)."""
    if not requested:
        return False
    reason = slow_precision(device, torch.bfloat16)
    if reason is not None:
        print(f"note: --bf16 requested but {reason}; running in fp32", flush=True)
        return False
    return True


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def cosine_lr(step: int, total: int, base_lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to ``base_lr`` then cosine decay to ``min_ratio * base_lr`` at ``total``.

    A pure function of ``step``, so it needs no state in checkpoints.
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + np.cos(np.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every param group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of a module's parameters and buffers.

    ``decay`` ramps up as ``min(decay, (1 + step) / (10 + step))`` so short runs are not stuck at
    the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        """Copy ``model`` (its raw module) as the EMA shadow."""
        import copy

        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self._param_names = {name for name, _ in self.module.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend ``model``'s parameters into the shadow; buffers (e.g. latent stats) are copied."""
        d = min(self.decay, (1 + step) / (10 + step))
        src = unwrap(model).state_dict()
        for name, ema_t in self.module.state_dict().items():  # state_dict tensors alias the weights
            if name in self._param_names:
                ema_t.lerp_(src[name], 1.0 - d)
            else:
                ema_t.copy_(src[name])


def weights_hash(module: nn.Module) -> str:
    """SHA-256 over the state dict (names, shapes, dtypes and bytes), for equality checks."""
    digest = hashlib.sha256()
    for name, t in sorted(unwrap(module).state_dict().items()):
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- data order
class ResumableBatchSampler:
    """Endless stream of index batches for one rank, a pure function of the step.

    Epoch ``e`` is the permutation ``np.random.default_rng([seed, e]).permutation(n)``, truncated to
    ``steps_per_epoch * world_size * batch_size`` items; step ``s`` is batch ``s % steps_per_epoch``
    of epoch ``s // steps_per_epoch``, and rank ``r`` takes the ``r``-th of ``world_size``
    consecutive slices. Starting the sampler at ``start_step`` therefore yields exactly the batches
    an uninterrupted run yields from that step on, for the same ``(n, batch_size, world_size, seed)``.
    With ``weights`` (one non-negative number per item) an epoch is instead ``n`` draws with
    replacement with probabilities proportional to the weights, from the same per-epoch generator,
    so weighted runs resume exactly too.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_step: int = 0,
        weights: np.ndarray | None = None,
    ) -> None:
        """Check that one step's worth of items exists and the weights fit (raises UsageError otherwise)."""
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (n,) or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise UsageError(
                    f"sampling weights of shape {weights.shape}: expected ({n},) finite, non-negative, not all 0"
                )
            weights = weights / weights.sum()
        self.weights = weights
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start_step = seed, start_step
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation) cache
        self.steps_per_epoch = n // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise UsageError(
                f"the data holds {n} training samples, fewer than one step needs "
                f"(--batch-size {batch_size} x {world_size} ranks); record more data or lower --batch-size"
            )

    def epoch_of(self, step: int) -> int:
        """Epoch that step ``step`` belongs to."""
        return step // self.steps_per_epoch

    def batch(self, step: int) -> list[int]:
        """Dataset indices of this rank's batch at ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.n) if self.weights is None else rng.choice(self.n, self.n, p=self.weights)
            self._perm = (epoch, order)
        perm = self._perm[1]
        start = (i * self.world_size + self.rank) * self.batch_size
        return perm[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        """Batches from ``start_step`` on, forever (the trainer stops at its step budget)."""
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


# ----------------------------------------------------------------------------- data
def resolve_episodes(
    roots: Sequence[Path], holdout_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """Validated (train, held-out) training-split episode folders of one or more data directories.

    Each root is split with ``world_model.data.loader.split_episodes`` (deterministic, stable when
    episodes are added). Episodes stored with ``split != "train"`` (e.g. the randomised-colour
    evaluation split) are left out entirely: trainers never read them. Every kept episode's arrays
    are opened (mmap) once, so a missing or corrupt file fails here, named, before training starts.

    Raises:
        UsageError: a missing or empty data directory, no training-split episode, or a missing or
            corrupt episode file (named).
    """
    from world_model.data.episodes import EPISODES_DIR, list_episodes, open_episode, read_meta
    from world_model.data.loader import split_episodes

    if not roots:
        raise UsageError("--data needs at least one recorded data directory")
    train: list[Path] = []
    heldout: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise UsageError(f"--data {str(root)!r} does not exist or is not a directory")
        if not list_episodes(root):
            raise UsageError(f"--data {str(root)!r} holds no complete episodes under {EPISODES_DIR}/")
        train_names, held_names = split_episodes(root, holdout_fraction=holdout_fraction, seed=seed)
        for names, out in ((train_names, train), (held_names, heldout)):
            for name in names:
                ep = root / EPISODES_DIR / name
                if read_meta(ep).get("split", "train") != "train":
                    continue
                open_episode(ep)
                out.append(ep)
    if not train:
        raise UsageError(
            f"--data {[str(r) for r in roots]} holds no training-split episodes (split='eval' episodes are "
            "for evaluation only)"
        )
    return train, heldout


def data_root(episode: Path) -> Path:
    """The data directory an episode folder belongs to (``DATA/episodes/<name>``)."""
    return Path(episode).parent.parent


def window_dataset(
    episodes: list[Path], window: int, source: str = "frames", latents: dict[Path, Path] | None = None
) -> Dataset:
    """``WindowDataset`` over episodes from one or more data directories (one dataset per root, concatenated).

    Args:
        episodes: episode folders (as from :func:`resolve_episodes`).
        window: T, frames per item.
        source: "frames" or "latents".
        latents: data root -> latent cache root (needed for ``source="latents"``).
    """
    from world_model.data.loader import WindowDataset

    by_root: dict[Path, list[str]] = {}
    for ep in episodes:
        by_root.setdefault(data_root(ep), []).append(ep.name)
    parts = [
        WindowDataset(
            root,
            window=window,
            source=source,
            latents_root=None if latents is None else latents[root],
            episodes=names,
        )
        for root, names in by_root.items()
    ]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def data_fingerprint(roots: Sequence[Path]) -> dict[str, str]:
    """Data directory -> SHA-256 of its manifest.json (identifies the data a model was trained on)."""
    from world_model.data.episodes import MANIFEST, sha256_file

    out = {}
    for root in roots:
        path = Path(root) / MANIFEST
        out[str(Path(root).resolve())] = sha256_file(path) if path.exists() else ""
    return out


def parent_summary(model_dir: Path | None, summary_file: str) -> dict | None:
    """The recipe of a warm-start parent model (its summary JSON minus the episode lists), for provenance.

    Args:
        model_dir: the ``--init-from`` model dir, or None.
        summary_file: "train_vae.json" or "train_dit.json".

    Returns:
        None without a parent; else ``{"path": ..., "command": ..., "args": ..., ...}``. Nested
        parents stay nested under ``init_from``. A world directory as parent (e.g. the shipped
        default world) gives its :func:`read_summary` (``world_recipe``: its recipe's commands); a
        directory with neither gives only the path.
    """
    if model_dir is None:
        return None
    model_dir = Path(model_dir).expanduser()
    prev = read_summary(model_dir, summary_file) or {}
    return {"path": str(model_dir), **{k: v for k, v in prev.items() if not k.endswith("_episodes")}}


def read_summary(model_dir: Path, summary_file: str) -> dict | None:
    """A trainer's summary JSON in ``model_dir``, or the same fields read off a world directory.

    Args:
        model_dir: a train-vae / train-dit output directory, or a world directory.
        summary_file: "train_vae.json" or "train_dit.json".

    Returns:
        The summary (a world's has ``world_recipe``, its whole recipe, instead of ``command``, and
        ``world_sampler`` / ``world_term_threshold`` / ``world_terminal_reward``), or None when
        ``model_dir`` has neither.

    Raises:
        UsageError: the summary file is corrupt.
    """
    from world_model.checkpoint import world_provenance

    path = Path(model_dir) / summary_file
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} is corrupt: {err}") from err
    world = world_provenance(model_dir)
    if world is None:
        return None
    if summary_file == "train_vae.json":
        return {"world_recipe": world["commands"], "args": world["vae_args"], "eval": world["vae_eval"],
                "steps": world["vae_steps"], "latent_space_sha256": world["latent_space_sha256"]}
    a = world["dit_args"]
    return {"world_recipe": world["commands"], "args": a, "context": a.get("context"), "window": a.get("window"),
            "action_names": world["action_names"], "latents_vae_sha256": world["latent_space_sha256"],
            "eval": world["dit_eval"], "steps": world["dit_steps"],
            "termination_pos_weight": world["termination_pos_weight"], "world_sampler": world["sampler"],
            "world_term_threshold": world["term_threshold"], "world_terminal_reward": world["terminal_reward"]}


def stage_commands(summary: dict) -> list[list[str]]:
    """The commands that produced a model, parents first (follows ``init_from`` and ``teacher``).

    A world parent (``world_recipe``, see :func:`parent_summary`) contributes its whole recipe, and
    so does the world of every generated-latent set a ``train-vae --gen-latents`` run used, followed
    by its ``rollout-latents`` command. A distilled DiT's teacher (``train-dit --teacher``) contributes
    its own lineage before the student's command. A command reached twice (the same world as
    warm start and teacher) is listed once, at its first place.
    """
    parents = [summary.get(k) for k in ("init_from", "teacher")]
    own = [summary["command"]] if summary.get("command") else []
    gen = summary.get("gen_latents") or []
    rollouts = [c for g in gen for c in [*g.get("world_recipe", []), g.get("command")] if c]
    lineage = [c for parent in parents if isinstance(parent, dict) for c in stage_commands(parent)]
    commands = [*summary.get("world_recipe", []), *lineage, *rollouts, *own]
    seen: set[tuple[str, ...]] = set()
    unique = []
    for c in commands:
        if tuple(c) not in seen:
            seen.add(tuple(c))
            unique.append(c)
    return unique


# ----------------------------------------------------------------------------- config
def to_jsonable(obj: Any) -> Any:
    """Dataclasses / Paths / tuples -> plain JSON values (dataclasses recurse)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj.expanduser().resolve())  # absolute: a resume from another cwd compares equal
    return obj


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where nested JSON values ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def field_defaults(cls: type) -> dict[str, Any]:
    """The JSON values of a dataclass's field defaults (fields without one are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = to_jsonable(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_jsonable(f.default_factory())
    return out


def check_run_config(
    run_dir: Path,
    config: dict[str, Any],
    ignore: tuple[str, ...],
    resuming: bool,
    write: bool = True,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Write ``RUN/config.json``, or, when resuming, check the new Args against it.

    Args:
        run_dir: the run directory.
        config: the current Args as JSON values.
        ignore: top-level fields that may change between restarts (they do not change the math,
            e.g. ``ckpt_every`` or ``num_workers``).
        resuming: a checkpoint exists; a mismatch is then an error.
        write: write the file (rank 0); every rank checks, so every rank raises the same error.
        defaults: the Args' field defaults (:func:`field_defaults`): a field the stored config lacks
            (added to the trainer after the run began) counts as its default, so such a run resumes.

    Raises:
        UsageError: naming every differing field with both values.
    """
    path = Path(run_dir) / RUN_CONFIG
    if resuming and path.exists():
        old = {**(defaults or {}), **json.loads(path.read_text())}
        keep = lambda d: {k: v for k, v in d.items() if k not in ignore}  # noqa: E731
        fields = _diff(keep(old), keep(config))
        if fields:
            details = "; ".join(f"{f}: run has {_get(old, f)!r}, now {_get(config, f)!r}" for f in fields)
            raise UsageError(
                f"cannot resume {run_dir}: the arguments differ from {path} in {', '.join(fields)} "
                f"({details}). "
                "Use the original arguments, or a new --run-dir."
            )
    if write:
        _write_json(path, config)


def _get(d: dict[str, Any], dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k, "<missing>") if isinstance(d, dict) else "<missing>"
    return d


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- checkpoints
def _tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    return {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}


def optimizer_to_flat(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into safetensors-able tensors and JSON scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{pid}.{key}"] = val
            else:
                scalars[f"{pid}.{key}"] = val
    return _tensors(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = val
    for name, val in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    groups = []
    for g in meta["param_groups"]:
        # JSON turned tuples (betas) into lists; "params" stays a list
        groups.append({k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()})
    return {"state": state, "param_groups": groups}


def _save_optimizer(stem: Path, optimizer: torch.optim.Optimizer) -> None:
    """``STEM.safetensors`` (state tensors) + ``STEM.json`` (param groups, scalars)."""
    tensors, meta = optimizer_to_flat(optimizer.state_dict())
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(meta))


def _load_optimizer(stem: Path, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Inverse of :func:`_save_optimizer`."""
    meta = json.loads(stem.with_suffix(".json").read_text())
    tensors = load_file(str(stem.with_suffix(".safetensors")), device=str(device))
    optimizer.load_state_dict(optimizer_from_flat(tensors, meta))


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG this process draws from, as tensors + JSON scalars."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    for name, g in generators.items():
        tensors[f"gen_{name}"] = g.get_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, py_state, py_gauss = random.getstate()
    tensors["python_state"] = torch.tensor(py_state, dtype=torch.int64)
    scalars = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, py_gauss]}
    return _tensors(tensors), scalars


def set_rng_state(
    tensors: dict[str, torch.Tensor], scalars: dict[str, Any], generators: dict[str, torch.Generator]
) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("torch_cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    for name, g in generators.items():
        g.set_state(tensors[f"gen_{name}"])
    kind, pos, has_gauss, gauss = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_gauss = scalars["python"]
    random.setstate((version, tuple(int(v) for v in tensors["python_state"].tolist()), py_gauss))


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` in ``RUN/state``, oldest first (temporary dirs skipped)."""
    folder = Path(run_dir) / STATE_DIR
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and p.name[len(CKPT_PREFIX) :].isdigit():
            out.append((int(p.name[len(CKPT_PREFIX) :]), p))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, found by listing ``RUN/state/step_*`` (no pointer file to go stale)."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    info: DistInfo,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 2,
    aux: dict[str, tuple[nn.Module, torch.optim.Optimizer]] | None = None,
) -> Path:
    """Write ``RUN/state/step_<step>/`` atomically; every rank must call it (each saves its RNG).

    ``aux`` holds further trained modules with their own optimizers (e.g. a discriminator), saved
    as ``aux_<name>.safetensors`` and ``aux_<name>_optimizer.*``.

    The folder is filled as ``state/.tmp-step_<step>/`` and renamed by rank 0 once every file is
    synced, so a kill at any moment leaves either the old set of checkpoints or the new one.
    Older checkpoints beyond ``keep`` are deleted afterwards.

    Returns:
        The final checkpoint folder.
    """
    name = f"{CKPT_PREFIX}{step:06d}"
    folder = Path(run_dir) / STATE_DIR
    tmp, final = folder / f"{TMP_PREFIX}{name}", folder / name
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_t, rng_s = rng_state(generators)
    save_file(rng_t, str(tmp / f"rng_rank{info.rank}.safetensors"))
    (tmp / f"rng_rank{info.rank}.json").write_text(json.dumps(rng_s))
    if info.is_main:
        save_file(_tensors(unwrap(model).state_dict()), str(tmp / "model.safetensors"))
        save_file(_tensors(ema.module.state_dict()), str(tmp / "ema.safetensors"))
        _save_optimizer(tmp / "optimizer", optimizer)
        for aux_name, (module, opt) in (aux or {}).items():
            save_file(_tensors(unwrap(module).state_dict()), str(tmp / f"aux_{aux_name}.safetensors"))
            _save_optimizer(tmp / f"aux_{aux_name}_optimizer", opt)
        trainer = {"step": step, "world_size": info.world_size, "time": time.time(), **(extra or {})}
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    barrier()
    if info.is_main:
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # same step saved twice (e.g. the final step after a resume): replace
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: Path,
    info: DistInfo,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    aux: dict[str, tuple[nn.Module, torch.optim.Optimizer]] | None = None,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` in place; returns ``trainer.json``.

    ``aux`` must name the same extra modules and optimizers that were saved (e.g. a critic).

    Raises:
        UsageError: the checkpoint was written with another world size, or a file is missing/corrupt.
    """
    path = Path(path)
    try:
        trainer = json.loads((path / "trainer.json").read_text())
        if trainer["world_size"] != info.world_size:
            raise UsageError(
                f"checkpoint {path} was written by {trainer['world_size']} ranks, this run has "
                f"{info.world_size}; resume with the same number of processes (the data order depends on it)"
            )
        unwrap(model).load_state_dict(load_file(str(path / "model.safetensors"), device=str(info.device)))
        ema.module.load_state_dict(load_file(str(path / "ema.safetensors"), device=str(info.device)))
        _load_optimizer(path / "optimizer", optimizer, info.device)
        for name, (module, opt) in (aux or {}).items():
            unwrap(module).load_state_dict(load_file(str(path / f"aux_{name}.safetensors"), device=str(info.device)))
            _load_optimizer(path / f"aux_{name}_optimizer", opt, info.device)
        rng_t = load_file(str(path / f"rng_rank{info.rank}.safetensors"))
        rng_s = json.loads((path / f"rng_rank{info.rank}.json").read_text())
        set_rng_state(rng_t, rng_s, generators)
    except (FileNotFoundError, json.JSONDecodeError, KeyError, RuntimeError, OSError) as err:
        raise UsageError(f"checkpoint {path} is incomplete or corrupt ({type(err).__name__}: {err})") from err
    return trainer


def clean_stale_tmp(run_dir: Path, info: DistInfo) -> None:
    """Remove half-written checkpoint folders left by a killed run (rank 0)."""
    if info.is_main:
        for p in (Path(run_dir) / STATE_DIR).glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)
    barrier()


def write_debug_hash(run_dir: Path, info: DistInfo, name: str, module: nn.Module, step: int) -> None:
    """Write ``RUN/debug/<name>_rank<r>.txt`` with the step and the weight hash (DDP equality checks)."""
    folder = Path(run_dir) / "debug"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}_rank{info.rank}.txt").write_text(f"{step} {weights_hash(module)}\n")


# ----------------------------------------------------------------------------- logging
class Logger:
    """TensorBoard scalars and a tqdm bar showing loss and samples/s, on rank 0 only."""

    def __init__(self, run_dir: Path, info: DistInfo, total: int, start: int, desc: str) -> None:
        """Open the TensorBoard writer (``RUN/tb``) and the progress bar."""
        self.info = info
        self.writer = None
        self.bar = None
        self._recent: deque[tuple[float, int]] = deque(maxlen=20)  # (time, samples) of recent steps
        self._recent.append((time.perf_counter(), 0))
        if info.is_main:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            # steps are logged at their 1-based count, so a resume at `start` purges only later ones
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start + 1)
            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

    def step(self, step: int, samples: int, scalars: dict[str, float]) -> None:
        """Record one optimiser step: ``samples`` global samples, and scalars to log at ``step``."""
        if not self.info.is_main:
            return
        self._recent.append((time.perf_counter(), samples))
        elapsed = self._recent[-1][0] - self._recent[0][0]
        sps = sum(n for _, n in list(self._recent)[1:]) / max(elapsed, 1e-9)  # over the last <= 19 steps
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.add_scalar("perf/samples_per_s", sps, step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{scalars.get('loss/total', float('nan')):.4f}", sps=f"{sps:.1f}")

    def print(self, msg: str) -> None:
        """Print a line on rank 0 (above the progress bar)."""
        if self.info.is_main:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def report(self, step: int, metrics: dict[str, Any]) -> None:
        """Print evaluation metrics on one line and log the numeric ones to TensorBoard (rank 0)."""
        if not self.info.is_main:
            return
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
        self.print("eval  " + "  ".join(parts))
        for k, v in metrics.items():
            if isinstance(v, int | float) and self.writer is not None:
                self.writer.add_scalar(k if "/" in k else f"eval/{k}", v, step)

    def close(self) -> None:
        """Flush TensorBoard and close the bar."""
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
