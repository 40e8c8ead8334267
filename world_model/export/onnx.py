"""The DiT's full-window call as an ONNX graph, run by ONNX Runtime (CPU, CUDA) or TensorRT.

The hot path of every env step is one DiT evaluation of the whole Swin-DPM window
(``VideoDiT.forward(x, t, tokens, mask)``). This module exports exactly that call, with a dynamic
batch axis (one file serves any ``num_envs``) and a fixed window length, and wraps the runtime in
a callable with the DiT's own signature, so :class:`world_model.simulator.Simulator` swaps it in
for the torch module (``backend="onnxruntime"`` / ``"tensorrt"``). Context-cache calls (immediate
mode, guidance with a causal DiT) stay in torch.

Exports are cached on disk (``$MATRIX_WORLD_CACHE``, default ``~/.cache/matrix_world``), named by a
hash of the weights, the config, the window length and the torch version; a missing or stale file
is re-exported (10-20 s for DiT-S on 2 CPU cores) and written atomically.

Backends:

* ``"onnxruntime"``: ``CPUExecutionProvider`` on a CPU device (float32; exact to ~1e-5 of torch),
  ``CUDAExecutionProvider`` on a CUDA device (needs ``onnxruntime-gpu``).
* ``"tensorrt"``: ONNX Runtime's ``TensorrtExecutionProvider`` (fp16 allowed, engines cached next to
  the ONNX file), falling back to CUDA for unsupported nodes; needs ``onnxruntime-gpu`` and
  ``tensorrt`` on a CUDA machine.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from world_model.errors import UsageError

BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt")
OPSET = 18  # opset 23's fused Attention rejects the DiT's broadcast masks in onnxruntime 1.32
CACHE_ENV = "MATRIX_WORLD_CACHE"
INPUT_NAMES = ("x", "t", "tokens", "mask")


class _FullWindow(nn.Module):
    """``VideoDiT.forward`` without the optional cache argument (the traced signature)."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.dit(x, t, tokens, mask)  # (B, T, C, H, W)


def cache_dir() -> Path:
    """Where exported graphs (and TensorRT engines) are kept."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "matrix_world")).expanduser()


def export_key(dit: nn.Module, frames: int, num_tokens: int) -> str:
    """Hash of everything the exported graph depends on: weights, config, shapes, torch, opset."""
    h = hashlib.sha256()
    for name, tensor in sorted(dit.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    meta = {"cfg": dataclasses.asdict(dit.cfg), "frames": frames, "num_tokens": num_tokens,
            "torch": torch.__version__, "opset": OPSET}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def example_inputs(dit: nn.Module, frames: int, num_tokens: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs of one full-window call: x (B, T, C, H, W), t (B, T), tokens (B, T, N, Dt), mask (B, T, N)."""
    cfg = dit.cfg
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, frames, cfg.latent_channels, *cfg.latent_hw, generator=gen)
    t = torch.rand(batch, frames, generator=gen)
    tokens = torch.randn(batch, frames, num_tokens, cfg.text_dim, generator=gen)
    mask = torch.ones(batch, frames, num_tokens, dtype=torch.bool)
    mask[..., num_tokens // 2 :] = False  # padded control tokens, as in the real table
    return x, t, tokens, mask


def export_dit(dit: nn.Module, path: str | os.PathLike, frames: int, num_tokens: int) -> Path:
    """Export the full-window call of ``dit`` (float32, dynamic batch) to ``path`` (atomic write).

    Raises:
        UsageError: the ONNX exporter is not installed (``pip install -e ".[export]"``).
    """
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as err:
        raise UsageError('ONNX export needs onnx and onnxscript: pip install -e ".[export]"') from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _FullWindow(copy.deepcopy(dit).cpu().float()).eval()  # traced on the CPU; the live module stays as is
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {name: {0: batch} for name in INPUT_NAMES}
    # the exporter narrates its passes on stdout and warns about its own internals: keep both quiet
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, example_inputs(dit, frames, num_tokens), dynamo=True, opset_version=OPSET,
            input_names=list(INPUT_NAMES), output_names=["v"], dynamic_shapes=dynamic, verbose=False,
        )  # fmt: skip
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        program.save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def cached_export(dit: nn.Module, frames: int, num_tokens: int, directory: str | os.PathLike | None = None) -> Path:
    """The exported graph of ``dit`` for a ``frames``-frame window, exporting it once if missing."""
    path = Path(directory or cache_dir()) / f"dit-{export_key(dit, frames, num_tokens)}.onnx"
    if not path.is_file():
        t0 = time.perf_counter()
        export_dit(dit, path, frames, num_tokens)
        print(f"exported the DiT to {path} ({time.perf_counter() - t0:.0f} s, once)", file=sys.stderr)
    return path


def check_backend(backend: str, device: torch.device, engine_dir: Path | None = None) -> list:
    """ONNX Runtime execution providers for ``backend`` on ``device``; nothing is exported or opened.

    Raises:
        UsageError: unknown backend, a CPU device for TensorRT, onnxruntime missing, or
            the providers are not in this onnxruntime build.
    """
    if backend not in BACKENDS[1:]:
        raise UsageError(f"ONNX backend must be one of {BACKENDS[1:]}, got {backend!r}")
    providers = _providers(backend, device, engine_dir or cache_dir() / "trt_engines")
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise UsageError(f'backend={backend!r} needs onnxruntime: pip install -e ".[export]"') from err
    names = [p if isinstance(p, str) else p[0] for p in providers]
    missing = [n for n in names if n not in ort.get_available_providers()]
    if missing:
        raise UsageError(
            f"backend={backend!r} on {device} needs ONNX Runtime providers {missing}; this "
            f"onnxruntime has {ort.get_available_providers()} (install onnxruntime-gpu / tensorrt)"
        )
    return providers


def _resolve(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current device>`` (ORT needs the index torch will put the tensors on)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _providers(backend: str, device: torch.device, engine_dir: Path) -> list:
    if backend == "tensorrt":
        if device.type != "cuda":
            raise UsageError(f"backend='tensorrt' needs a CUDA device, got device={str(device)!r}")
        trt = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_dir)}
        return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {"device_id": device.index or 0})]
    if device.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index or 0})]
    return ["CPUExecutionProvider"]


class OnnxDiT:
    """An ONNX Runtime session with the call signature of ``VideoDiT.forward`` (full window, no cache).

    Example::

        fn = OnnxDiT.from_dit(world.dit, frames=8, num_tokens=16)
        v = fn(x, t, tokens, mask)            # (B, 8, C, H, W) float32, any B
    """

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu", backend: str = "onnxruntime",
                 threads: int | None = None) -> None:
        """Open ``path`` with the execution providers of ``backend`` on ``device``.

        Args:
            path: an ONNX file written by :func:`export_dit`.
            device: where inputs come from and outputs go (cpu, or cuda for the GPU providers).
            backend: "onnxruntime" or "tensorrt".
            threads: intra-op threads of the CPU provider (default: torch's thread count).

        Raises:
            UsageError: see :func:`check_backend`.
        """
        import onnxruntime as ort

        self.device = _resolve(torch.device(device))
        self.path = Path(path)
        providers = check_backend(backend, self.device, self.path.parent / "trt_engines")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between runs: torch (the VAE decode, the sampler's updates) runs right
        # after each call on the same cores, and spinning ORT threads would take them from it
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # no memory arena: it keeps the peak of every call (attention scores grow with the batch),
        # which doubled the env's peak RSS at 64 envs for no speed (4.5 vs 2.3 GiB; docs/ARCHITECTURE.md)
        opts.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)

    @classmethod
    def from_dit(cls, dit: nn.Module, frames: int, num_tokens: int, device: torch.device | str = "cpu",
                 backend: str = "onnxruntime", directory: str | os.PathLike | None = None) -> OnnxDiT:
        """Export ``dit`` (or reuse its cached export) and open it (settings are checked first)."""
        check_backend(backend, _resolve(torch.device(device)))  # a bad setting fails before the export
        return cls(cached_export(dit, frames, num_tokens, directory), device, backend)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, C, H, W), t (B, T), tokens (B, T, N, Dt), mask (B, T, N) bool -> v (B, T, C, H, W) float32."""
        inputs = (x.float(), t.float(), tokens.float(), mask.bool())
        if self.device.type == "cpu":  # zero-copy numpy views in, a torch view of ORT's output out
            feed = {n: a.contiguous().numpy() for n, a in zip(INPUT_NAMES, inputs, strict=True)}
            return torch.from_numpy(self.session.run(["v"], feed)[0])
        # GPU: bind the torch buffers, no host round trip. The contiguous copies must outlive the run,
        # and ORT runs on its own stream: wait for torch's queued writes to the inputs first.
        bound = [a.contiguous() for a in inputs]
        binding = self.session.io_binding()
        index = self.device.index
        for name, a in zip(INPUT_NAMES, bound, strict=True):
            binding.bind_input(name, self.device.type, index, np.bool_ if a.dtype == torch.bool else np.float32,
                               tuple(a.shape), a.data_ptr())
        out = torch.empty(x.shape, dtype=torch.float32, device=self.device)
        binding.bind_output("v", self.device.type, index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)  # ORT synchronises its own stream at the end of the run
        return out
