"""Loading a model folder's tokenizer (used by the engine and by the server's HTTP process)."""

from __future__ import annotations

from typing import Any

from loraplex.errors import ModelLoadError


def load_tokenizer(path: str) -> Any:
    """The Hugging Face tokenizer of ``path`` (never remote code); ModelLoadError if it cannot load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, ... here
        raise ModelLoadError(f"cannot load the tokenizer from {path!r}: {e}") from e
