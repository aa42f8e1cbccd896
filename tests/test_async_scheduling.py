"""Async scheduling (``async_scheduling=True``): a step is queued before the previous step's results are
applied, and its inputs that the previous step sampled come from the device. On CPU nothing overlaps, but
the bookkeeping is the same as on the GPU: outputs must equal synchronous stepping's exactly."""

from __future__ import annotations

import pytest

from helpers import make_adapter, make_tiny_model
from loraplex import LLM, LoRARequest, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("async") / "model", family="llama")


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("async-adapters")
    targets = [["q_proj", "v_proj", "lm_head"], ["embed_tokens", "o_proj", "down_proj"]]
    return {f"a{i}": make_adapter(model_dir, root / f"a{i}", seed=30 + i, r=8, target_modules=t)
            for i, t in enumerate(targets)}


PROMPTS = [[5, 17, 33, 99, 120, 7, 8, 250], [3, 4, 5, 6], [100, 101, 102, 103, 104, 105], [9, 8, 7, 6, 5, 4],
           [42, 43, 44], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72], [200, 180, 160], [11, 22, 33, 44, 55]]


def _params(i: int, stop_ids: list[int]) -> SamplingParams:
    """A mix: greedy and seeded sampling, logprobs, prompt logprobs, min_tokens, stop tokens that end some
    requests while a step of theirs is in flight, max_tokens 1."""
    kinds = [
        dict(max_tokens=12, temperature=0.0, logprobs=2),
        dict(max_tokens=10, temperature=0.9, top_p=0.9, seed=7),
        dict(max_tokens=1, temperature=0.0),
        dict(max_tokens=14, temperature=0.0, stop_token_ids=stop_ids, prompt_logprobs=1),
        dict(max_tokens=9, temperature=0.7, top_k=20, seed=3, logprobs=1, min_tokens=4, stop_token_ids=stop_ids),
        dict(max_tokens=16, temperature=0.0, stop_token_ids=stop_ids),
        dict(max_tokens=6, temperature=0.0, ignore_eos=True),
        dict(max_tokens=11, temperature=0.5, seed=11),
    ]
    return SamplingParams(**kinds[i % len(kinds)])


def _generate(model_dir: str, adapters: dict[str, str], async_scheduling: bool, stop_ids: list[int], **kw) -> list:
    llm = LLM(model_dir, dtype="float32", device="cpu", max_lora_rank=16, max_loras=2, block_size=4, seed=0,
              async_scheduling=async_scheduling, **kw)
    loras = [None, LoRARequest("a0", adapters["a0"]), LoRARequest("a1", adapters["a1"])]
    return llm.generate([{"prompt_token_ids": p} for p in PROMPTS], [_params(i, stop_ids) for i in range(len(PROMPTS))],
                        lora_request=[loras[i % 3] for i in range(len(PROMPTS))], use_tqdm=False)


def _same(got: list, want: list) -> None:
    for g, w in zip(got, want):
        go, wo = g.outputs[0], w.outputs[0]
        assert go.token_ids == wo.token_ids, g.request_id
        assert go.text == wo.text and go.finish_reason == wo.finish_reason and go.stop_reason == wo.stop_reason
        # logprobs within float rounding: a request that finished while a step of it was in flight made that
        # step's batch one row larger than the synchronous run's
        for a, b in zip(go.logprobs or [], wo.logprobs or []):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
        assert (g.prompt_logprobs is None) == (w.prompt_logprobs is None)
        for a, b in zip(g.prompt_logprobs or [], w.prompt_logprobs or []):
            assert (a is None) == (b is None) and (a is None or all(abs(a[t] - b[t]) < 1e-4 for t in a))
        assert (go.logprobs is None) == (wo.logprobs is None)


@pytest.mark.parametrize("kw", [
    dict(num_kv_blocks=256),
    dict(num_kv_blocks=256, max_num_batched_tokens=8, max_num_seqs=4),  # chunked prefill: chunks share steps with decodes
    dict(num_kv_blocks=10, max_num_seqs=4),  # preemption: requests recomputed with a token still in flight
], ids=["plain", "chunked", "preempted"])
def test_async_outputs_equal_synchronous(model_dir, adapters, kw) -> None:
    sync = _generate(model_dir, adapters, False, [], **kw)
    # stop tokens that the synchronous run produced mid-sequence: requests stop while a step is in flight
    stop_ids = sorted({o.outputs[0].token_ids[len(o.outputs[0].token_ids) // 2] for o in sync
                       if len(o.outputs[0].token_ids) > 3})[:3]
    want = _generate(model_dir, adapters, False, stop_ids, **kw)
    got = _generate(model_dir, adapters, True, stop_ids, **kw)
    _same(got, want)
    assert any(o.outputs[0].stop_reason in stop_ids for o in got)
    assert [len(o.outputs[0].token_ids) for o in got][2] == 1
    if kw["num_kv_blocks"] < 20:
        assert any(o.metrics["num_preemptions"] for o in got)


def test_async_steps_take_inputs_from_the_device_and_drop_late_tokens(model_dir, adapters) -> None:
    llm = LLM(model_dir, dtype="float32", device="cpu", max_loras=2, max_lora_rank=16, block_size=4, seed=0,
              num_kv_blocks=64, async_scheduling=True)
    eng = llm.engine
    fixes = []
    inner = eng.runner.execute

    def execute(batch, fix=None):
        if fix is not None:
            fixes.append(list(fix[0]))
        return inner(batch, fix)

    eng.runner.execute = execute
    eng.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=5, temperature=0.0), None, "a")
    eng.add_request({"prompt_token_ids": [9, 8]}, SamplingParams(max_tokens=8, temperature=0.0), None, "b")
    assert eng.step() == []  # the prefill is queued; nothing read back yet
    outs = eng.step()  # the first decode queued with both inputs from the device; the prefill's tokens read
    assert {o.request_id for o in outs} == {"a", "b"} and fixes == [[0, 1]]
    assert eng.requests["a"].num_pending == 1
    eng.abort_request("b")  # aborted with a token in flight: it is dropped when read back
    while eng.has_unfinished_requests():
        for o in eng.step():
            assert o.request_id == "a"
    assert eng.requests == {} and eng._in_flight is None
