"""Incremental detokenization and stop strings for one sequence.

Each step decodes only a small window of recent tokens (the prefix-offset /
read-offset technique): ``ids[prefix_offset:read_offset]`` was already turned
into text, and the new text is ``decode(ids[prefix_offset:]) minus
decode(ids[prefix_offset:read_offset])``. Decoding the prefix along with the new
tokens keeps word-boundary spaces right (e.g. SentencePiece drops the leading
space of the first token it decodes), and a window whose decode ends in U+FFFD
holds an incomplete multi-byte character, so nothing is finalised until a later
token completes it.

Streaming policy (as in vLLM, slightly tighter): ``append`` returns finalised
text that can never be retracted. While stop strings are set and excluded from
the output, the longest tail of the text that is a proper prefix of some stop
string is held back; it is released once it can no longer start a stop string,
or by ``finish()``. When a stop string matches, ``text`` is truncated at once,
so no delta ever carries text after (or, unless ``include_stop_str_in_output``,
of) a stop string.
"""

from __future__ import annotations

from typing import Any, Optional

from loraplex.types import SamplingParams

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded with the first generated token to get its leading space right.
_PROMPT_CONTEXT = 5


def _rust_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a fast Hugging Face tokenizer, or None. Its ``decode`` is what
    the wrapper calls (we never ask for its space clean-up), minus the wrapper's conversions."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - transformers depends on tokenizers
        return None
    return backend if isinstance(backend, Tokenizer) else None


class IncrementalDetokenizer:
    """Turns the generated tokens of one sequence into text, step by step.

    Usage per step: ``delta = d.append(tok)``; ``d.check_stop_string()`` says
    whether a stop string ended the sequence (``text`` is already truncated).
    When the sequence ends for any other reason (EOS, stop token, max_tokens,
    abort) call ``finish()`` to get the held-back tail. The concatenation of
    every delta equals ``text``.

    ``text`` is the generated text only. With byte-level BPE it equals
    ``tokenizer.decode(generated_ids, skip_special_tokens=...,
    clean_up_tokenization_spaces=False)``; with SentencePiece-style tokenizers it
    keeps the leading space that the prompt context implies (like vLLM).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self._rust = _rust_tokenizer(tokenizer)
        self.params = params
        self.skip_special_tokens = params.skip_special_tokens
        self.stop: list[str] = list(params.stop or [])
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

        self.token_ids: list[int] = []  # generated tokens only
        ctx = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        # A prompt window that ends mid-character would make the diff misaligned;
        # decode the output on its own then.
        if ctx and self._decode(ctx).endswith(_REPLACEMENT):
            ctx = []
        self._ids: list[int] = ctx  # decode window source: prompt context + generated
        self._prefix_offset = 0
        self._read_offset = len(ctx)
        self._prefix_text: Optional[str] = None  # cache of decode(ids[prefix:read])

        self.text = ""  # output text, truncated at a stop string
        self._sent = 0  # len(text) already returned as deltas
        self.stop_reason: Optional[str] = None  # the stop string that matched
        self.finished = False

    def _decode(self, ids: list[int]) -> str:
        if self._rust is not None:  # the same decode without the Python wrapper (most of its cost per step)
            return self._rust.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def append(self, token_id: int) -> str:
        """Add one generated token; return the newly finalised text (maybe "")."""
        self.token_ids.append(int(token_id))
        if self.finished:
            # Nothing after a stop string or finish() reaches the text.
            return ""
        self._ids.append(int(token_id))
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(self._prefix_text) or full.endswith(_REPLACEMENT):
            # No new text yet (special token skipped, or an incomplete character).
            return ""
        self._advance(full[len(self._prefix_text) :])
        # Keep the window small: drop ids before the prefix offset.
        del self._ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        return self._emit(final=False)

    def _advance(self, new_text: str) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = None
        old_len = len(self.text)
        self.text += new_text
        if self.stop:
            self._find_stop(old_len)

    def _find_stop(self, old_len: int) -> None:
        """Truncate ``text`` at the stop string that completes first in the new text."""
        # A new match must end in the new text, so it starts at most max_len-1 chars before it.
        start = max(0, old_len - self._max_stop_len + 1)
        best: Optional[tuple[int, int, str]] = None  # (end, start, stop)
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1:
                cand = (i + len(s), i, s)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is None:
            return
        end, begin, s = best
        self.text = self.text[: end if self.params.include_stop_str_in_output else begin]
        self.stop_reason = s
        self.finished = True

    def _holdback(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        if not self.stop or self.params.include_stop_str_in_output:
            # Included stop strings may be streamed: the match truncates only what follows.
            return 0
        tail = self.text[-(self._max_stop_len - 1) :] if self._max_stop_len > 1 else ""
        for k in range(len(tail), 0, -1):
            suffix = tail[-k:]
            if any(len(s) > k and s.startswith(suffix) for s in self.stop):
                return k
        return 0

    def _emit(self, final: bool) -> str:
        end = len(self.text) if (final or self.finished) else len(self.text) - self._holdback()
        if end <= self._sent:
            return ""
        delta = self.text[self._sent : end]
        self._sent = end
        return delta

    def check_stop_string(self) -> Optional[str]:
        """The stop string that ended the sequence, or None.

        The search runs inside ``append`` (so a delta never carries text past a
        stop string); ``text`` is already truncated (or keeps the stop string with
        ``include_stop_str_in_output``)."""
        return self.stop_reason

    def finish(self) -> str:
        """End the sequence: flush an incomplete trailing character (as U+FFFD,
        like a full decode) and the held-back tail; return that last delta."""
        if not self.finished:
            if self._read_offset < len(self._ids):
                if self._prefix_text is None:
                    self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
                full = self._decode(self._ids[self._prefix_offset :])
                if len(full) > len(self._prefix_text):
                    self._advance(full[len(self._prefix_text) :])
            self.finished = True
        return self._emit(final=True)
