"""Real tokenizers for the tokenization tests (from registry packages, never committed)."""

import json
import shutil
from pathlib import Path

import pytest

from jalign.data.tokenize import load_tokenizer


def sentencepiece_tokenizer(directory: Path):
    """Mistral's SentencePiece model (32k vocab) from the mistral-common package, as a fast
    tokenizer without a chat template of its own."""
    try:
        import mistral_common
    except ImportError:
        pytest.fail("mistral-common is not installed: pip install -e '.[test]'")
    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    assert model.exists(), f"{model} missing from mistral-common"
    shutil.copy(model, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    tok = load_tokenizer(str(directory))
    assert len(tok) == 32000
    return tok
