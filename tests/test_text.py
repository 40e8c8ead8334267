"""Text encoders: real MiniLM from the PyPI package, tiny random T5 / CLIP built offline."""

from pathlib import Path

import pytest
import torch

from world_model.actions import UNKNOWN_SENTENCE
from world_model.errors import UsageError
from world_model.text import TextEncoder, TextEncoderConfig, build_control_table, minilm_path

LEFT, RIGHT = "The car turns left.", "The car turns right."


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder(TextEncoderConfig(max_tokens=16))


def test_minilm(minilm: TextEncoder) -> None:
    emb = minilm.encode([LEFT, RIGHT, UNKNOWN_SENTENCE, "The car is turning to the left."])
    assert minilm.dim == 384
    assert emb.tokens.shape == (4, 16, 384) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (4, 16) and emb.mask.dtype == torch.bool
    assert emb.pooled.shape == (4, 384)
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(4))
    assert (emb.tokens[~emb.mask] == 0).all()  # padding zeroed
    sim = emb.pooled @ emb.pooled.T
    assert sim[0, 1] < 0.999 and sim[0, 2] < 0.999 and sim[1, 2] < 0.999  # all different
    assert sim[0, 3] > sim[0, 2]  # paraphrase closer than an unrelated sentence
    assert sim[0, 1] > sim[0, 2]


def test_minilm_deterministic_and_truncates(minilm: TextEncoder) -> None:
    a = minilm.encode([LEFT])
    b = minilm.encode([LEFT])
    assert torch.equal(a.tokens, b.tokens)
    long = minilm.encode(["word " * 50])
    assert long.mask.all() and long.tokens.shape[1] == 16


def _tiny_model_dir(tmp_path: Path, kind: str) -> Path:
    """Save a tiny random model of ``kind`` with the MiniLM (BERT WordPiece) tokenizer."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    torch.manual_seed(0)
    if kind == "t5":
        model = T5EncoderModel(
            T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
        )
    else:
        model = CLIPTextModel(
            CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=32, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
        )
    path = tmp_path / kind
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_tiny_t5_clip(tmp_path: Path, kind: str) -> None:
    path = _tiny_model_dir(tmp_path, kind)
    cfg = TextEncoderConfig(kind=kind, path=str(path), max_tokens=8)  # type: ignore[arg-type]
    enc = TextEncoder(cfg)
    assert enc.dim == 16
    emb = build_control_table([LEFT, RIGHT], cfg)
    assert emb.tokens.shape == (2, 8, 16) and emb.mask.shape == (2, 8) and emb.pooled.shape == (2, 16)
    assert not torch.allclose(emb.pooled[0], emb.pooled[1])
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(2))


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="'gpt'"):
        TextEncoder(TextEncoderConfig(kind="gpt"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="'t5'.*path"):
        TextEncoder(TextEncoderConfig(kind="t5"))
    missing = tmp_path / "nope"
    with pytest.raises(UsageError, match="nope"):
        TextEncoder(TextEncoderConfig(kind="clip", path=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="empty"):
        TextEncoder(TextEncoderConfig(kind="t5", path=str(empty)))
