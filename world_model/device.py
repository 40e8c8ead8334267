"""The torch device a user asked for, checked once where models are loaded or streams allocated."""

from __future__ import annotations

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
