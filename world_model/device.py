"""The torch device a user asked for, checked once where models are loaded or streams allocated, and
whether it computes a low precision in hardware."""

from __future__ import annotations

import platform

import torch

from world_model.errors import UsageError


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device`` that this torch can use.

    Raises:
        UsageError: not a torch device, a CUDA device while torch sees none, or ``cuda:N`` past the last one.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UsageError(
            f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r} ({err})"
        ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise UsageError(
                f"device={str(device)!r}, but this torch {torch.__version__} ({build}) sees no CUDA device; "
                "use device='cpu', or install a CUDA build of torch on a machine with a GPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"device={str(device)!r}, but torch sees {torch.cuda.device_count()} CUDA device(s): "
                f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
    return device


# x86 CPU features that make autocast to bfloat16 faster than float32 (oneDNN kernels); without them
# autocast emulates the format: DiT training ran at 0.12x float32 and the batched env at 0.10-0.14x on
# a 2-core AVX2 AMD EPYC (README, "Env speed"). float16 is not judged (no measurement here).
CPU_BF16_FEATURES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_bf16() -> bool | None:
    """Whether this x86 CPU computes bfloat16 (one of ``CPU_BF16_FEATURES`` reported by torch's probes);
    None where that cannot be told: another architecture, or a torch without the probes."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    probes = [getattr(torch.cpu, name, None) for name in CPU_BF16_FEATURES]
    if any(probe is None for probe in probes):
        return None
    return any(probe() for probe in probes)


# from this many streams on, bfloat16 beat float32 on one H200 (README, "On a GPU": 1.4x at 64 envs
# and above; below, kernel launches bound a step and bfloat16's casts cost more than they save)
CUDA_BF16_MIN_ENVS = 64


def fast_dtype(device: torch.device, num_envs: int = 1) -> torch.dtype:
    """The faster precision for the env's networks on ``device`` with ``num_envs`` streams
    (``dtype="auto"``), from this project's measurements: bfloat16 on an x86 CPU whose AVX512-BF16 or
    AMX feature bit torch reports (the batched env at 16 envs ran 1.58-1.86x float32 eager there,
    2.9-3.3x with ``compile_model=True``; 0.10-0.14x on a CPU without them) and on a CUDA GPU of
    compute capability >= 8.0 from ``CUDA_BF16_MIN_ENVS`` streams on; float32 everywhere else,
    unknown hardware included.
    """
    if device.type == "cuda":
        native = torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if native and num_envs >= CUDA_BF16_MIN_ENVS else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16() is True else torch.float32


def slow_precision(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why autocast to ``dtype`` on ``device`` would be slower than float32, or None if it is not.

    Judged: bfloat16 on x86 CPUs (their AVX512-BF16 / AMX feature bits, through torch's own CPU
    probes) and on CUDA GPUs (native from compute capability 8.0, Ampere; older ones emulate it).
    Other devices and dtypes are assumed to support what they are asked for.
    """
    if dtype != torch.bfloat16:
        return None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            name = torch.cuda.get_device_name(device)
            return f"this GPU ({name}, compute capability {major}.{minor}) has no native bfloat16"
        return None
    if device.type != "cpu" or cpu_bf16() is not False:
        return None  # a feature present, or nothing to tell it by: do not second-guess
    features = " / ".join(name.removeprefix("_is_").removesuffix("_supported").upper() for name in CPU_BF16_FEATURES)
    return f"this CPU has no {features}: bfloat16 is emulated there (measured at 0.10-0.14x float32 on an AVX2 CPU)"
