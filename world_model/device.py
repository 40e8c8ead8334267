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


# x86 CPU features that make autocast to a 16-bit float faster than float32 (oneDNN kernels);
# without them, autocast emulates the format and is slower: bfloat16 training ran at 0.12x float32 on
# a 2-core AVX2 AMD EPYC (`python benchmarks/bench_train.py --vae-presets --dit-presets S --steps 3 --threads 1`).
CPU_FEATURES = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
                torch.float16: ("_is_amx_fp16_supported",)}


def slow_precision(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why autocast to ``dtype`` on ``device`` would be slower than float32, or None if it is not.

    Only x86 CPUs are judged (by their AVX512-BF16 / AMX feature bits, through torch's own CPU probes)
    and CUDA devices without bfloat16; other devices are assumed to support what they are asked for.
    """
    if dtype == torch.float32:
        return None
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16"
        return None
    if device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    names = CPU_FEATURES.get(dtype, ())
    probes = [getattr(torch.cpu, name, None) for name in names]
    if not names or any(probe is None for probe in probes) or any(probe() for probe in probes):
        return None  # no probe for this dtype in this torch: do not second-guess
    features = " / ".join(name.removeprefix("_is_").removesuffix("_supported").upper() for name in names)
    return (
        f"this CPU has no {features}: {str(dtype).removeprefix('torch.')} is emulated there and runs "
        "several times slower than float32"
    )
