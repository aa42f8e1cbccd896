"""SamplingParams validation: every bad field raises InvalidRequestError naming it."""

from __future__ import annotations

import pytest

from loraplex.errors import InvalidRequestError
from loraplex.types import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"seed": -1}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids"),
        ({"n": 2}, "n="),
        ({"n": 0}, "n must"),
    ],
)
def test_invalid_sampling_params(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)


def test_top_k_zero_means_disabled() -> None:
    assert SamplingParams(top_k=0).top_k == -1


def test_valid_params_normalise() -> None:
    p = SamplingParams(temperature=0, stop="END", logprobs=20, seed=0, top_p=1.0, top_k=5)
    assert p.greedy and p.stop == ["END"] and p.stop_token_ids == []
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_token_ids_at_equals_slicing_the_whole_sequence() -> None:
    from loraplex.engine.request import PENDING_TOKEN, Request

    req = Request("r", None, [5, 6, 7, 8], SamplingParams(), None, None, frozenset(), 16)
    req.output_token_ids.extend([9, 10, 11])
    whole = req.all_token_ids
    for start in range(len(whole) + 1):
        for n in range(len(whole) - start + 2):
            assert req.token_ids_at(start, n) == whole[start:start + n], (start, n)
    req.num_pending = 1  # a token sampled on the device, not read back yet: a stand-in at its position
    whole = whole + [PENDING_TOKEN]
    assert req.num_tokens == len(whole)
    for start in range(len(whole) + 1):
        for n in range(len(whole) - start + 2):
            assert req.token_ids_at(start, n) == whole[start:start + n], (start, n)
