"""Incremental detokenizer: agreement with a full decode, multi-byte
characters split across byte-level BPE tokens, special tokens, stop strings."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.types import SamplingParams

CORPUS = [
    "Hello world, this is a café in Zürich.",
    "漢字 and かな are written in Japan; 漢字 came from China.",
    "Emoji time 😀🎉 — naïve résumé, déjà vu!",
    "The quick brown fox jumps over the lazy dog. 12345",
    "é è ê ë à â ç ô ö ü ß 中文 한국어 🙂",
]
SPECIALS = ["<eos>", "<pad>"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 5, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>", clean_up_tokenization_spaces=False
    )


def full_decode(tok: PreTrainedTokenizerFast, ids: list[int], skip: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def run(tok, prompt: list[int], ids: list[int], **kw) -> tuple[IncrementalDetokenizer, list[str]]:
    d = IncrementalDetokenizer(tok, prompt, SamplingParams(**kw))
    deltas = []
    for t in ids:
        deltas.append(d.append(t))
        if d.check_stop_string() is not None:
            break
    deltas.append(d.finish())
    return d, deltas


def test_multibyte_characters_are_split_across_tokens(tok) -> None:
    # Sanity check of the fixture: some token decodes to an incomplete character.
    singles = [tok.decode([i]) for i in range(len(tok))]
    assert any("\ufffd" in s for s in singles)


def test_incremental_equals_full_decode_on_real_text(tok) -> None:
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        d, deltas = run(tok, [], ids)
        assert d.text == text == "".join(deltas)
        # Never finalise a replacement char for a character that is merely incomplete.
        assert all("\ufffd" not in x for x in deltas)


def byte_token_ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """One token per UTF-8 byte of `text` (the byte-level alphabet tokens)."""
    # GPT-2's printable stand-ins for the 256 bytes, as used by the ByteLevel pre-tokenizer.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tok.convert_tokens_to_ids([table[b] for b in text.encode("utf-8")])


def test_streaming_never_emits_incomplete_characters(tok) -> None:
    text = "a漢😀é z"
    ids = byte_token_ids(tok, text)
    assert len(ids) == len(text.encode("utf-8")) and tok.unk_token_id not in ids
    d = IncrementalDetokenizer(tok, [], SamplingParams())
    out = [d.append(t) for t in ids]
    assert "".join(out) == text
    assert all("\ufffd" not in x for x in out)
    # Partial characters produce empty deltas, the completing byte the whole character.
    assert out[1:4] == ["", "", "漢"]
    assert out[4:8] == ["", "", "", "😀"]


def test_incomplete_character_at_end_is_flushed_like_full_decode(tok) -> None:
    ids = byte_token_ids(tok, "ok漢")[:-1]
    d = IncrementalDetokenizer(tok, [], SamplingParams())
    assert "".join(d.append(t) for t in ids) == "ok"
    assert d.finish() == full_decode(tok, ids)[2:]
    assert d.text == full_decode(tok, ids)


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_equals_full_decode_random(tok, skip: bool) -> None:
    rng = random.Random(0)
    vocab = len(tok)
    prompt_pool = tok.encode(CORPUS[1], add_special_tokens=False)
    for trial in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        prompt = prompt_pool[: rng.randrange(0, len(prompt_pool))]
        d, deltas = run(tok, prompt, ids, skip_special_tokens=skip)
        assert d.text == full_decode(tok, ids, skip), (trial, ids)
        assert "".join(deltas) == d.text
        assert d.check_stop_string() is None


def test_skip_special_tokens(tok) -> None:
    eos = tok.convert_tokens_to_ids("<eos>")
    ids = tok.encode("Hello world", add_special_tokens=False) + [eos]
    d, _ = run(tok, [], ids, skip_special_tokens=True)
    assert d.text == "Hello world"
    d, _ = run(tok, [], ids, skip_special_tokens=False)
    assert d.text == "Hello world<eos>"


def test_stop_string_truncates_and_is_not_streamed(tok) -> None:
    text = "Hello world, this is a café in Zürich."
    ids = tok.encode(text, add_special_tokens=False)
    d, deltas = run(tok, [], ids, stop=["café"])
    assert d.check_stop_string() == "café"
    assert d.text == "Hello world, this is a "
    assert "".join(deltas) == d.text
    assert all("caf" not in x for x in deltas)


def test_include_stop_str_in_output(tok) -> None:
    text = "漢字 and かな are written in Japan"
    ids = tok.encode(text, add_special_tokens=False)
    d, deltas = run(tok, [], ids, stop=["かな", "Japan"], include_stop_str_in_output=True)
    assert d.check_stop_string() == "かな"
    assert d.text == "漢字 and かな"
    assert "".join(deltas) == d.text


def test_partial_stop_prefix_is_held_then_released(tok) -> None:
    ids = tok.encode("Hello world, this", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["world peace"]))
    streamed = ""
    for t in ids:
        streamed += d.append(t)
        # Whatever could still become "world peace" is held back.
        assert "world" not in streamed or "world," in streamed
    assert d.check_stop_string() is None
    streamed += d.finish()
    assert streamed == d.text == "Hello world, this"


def test_stop_strings_random(tok) -> None:
    rng = random.Random(1)
    vocab = len(tok)
    for trial in range(200):
        if trial % 2:
            ids = tok.encode(rng.choice(CORPUS), add_special_tokens=False)
        else:
            ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        full = full_decode(tok, ids)
        clean = full.replace("\ufffd", "")
        if len(clean) < 2:
            continue
        # Stop strings: substrings of the output (that avoid U+FFFD) plus one that never occurs.
        stops = []
        for _ in range(rng.randrange(1, 3)):
            a = rng.randrange(len(full))
            s = full[a : a + rng.randrange(1, 5)]
            if s and "\ufffd" not in s:
                stops.append(s)
        stops.append("§never§")
        include = bool(rng.randrange(2))
        d, deltas = run(tok, [], ids, stop=stops, include_stop_str_in_output=include)
        # Reference: the occurrence that completes first (ties: the longer one).
        best = None
        for s in stops:
            i = full.find(s)
            if i != -1 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is None:  # every candidate crossed a U+FFFD
            assert d.check_stop_string() is None and d.text == full
            continue
        end, start, s = best
        assert d.check_stop_string() == s, (trial, stops)
        assert d.text == (full[:end] if include else full[:start])
        assert "".join(deltas) == d.text
        for stop in stops:
            assert stop not in (d.text[: -len(s)] if include else d.text)


def test_appends_after_stop_are_ignored(tok) -> None:
    ids = tok.encode("Hello world, this is", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=[","]))
    out = "".join(d.append(t) for t in ids)
    assert out == d.text == "Hello world"
    assert d.check_stop_string() == ","
    assert d.finish() == ""
