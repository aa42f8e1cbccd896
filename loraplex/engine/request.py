"""One request's state inside the engine."""

from __future__ import annotations

import enum
import time
from typing import Any, Optional

import numpy as np
import torch

from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.lora.adapter import LoRAAdapter
from loraplex.types import CompletionOutput, PositionLogprobs, RequestDelta, RequestOutput, SamplingParams


PENDING_TOKEN = -1  # host stand-in for a token still on the device


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 params: SamplingParams, adapter: Optional[LoRAAdapter], tokenizer: Any,
                 eos_token_ids: frozenset[int], max_tokens: int, mm: Optional[Any] = None,
                 vocab_size: Optional[int] = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids  # image positions hold placeholder ids (>= vocabulary)
        self.mm = mm  # MultiModalInputs (processed images, placeholder spans, M-RoPE positions) or None
        self.params = params
        self.adapter = adapter  # the adapter version this request runs with, from start to finish
        self.lora_name = adapter.name if adapter is not None else None
        self.eos_token_ids = eos_token_ids
        self.max_tokens = max_tokens  # params.max_tokens clipped to max_model_len
        self.output_token_ids: list[int] = []
        # Tokens sampled on the device but not yet read back (async scheduling): they follow output_token_ids,
        # count in num_tokens, and reach a step's inputs from the device (PENDING_TOKEN stands in on the host).
        self.num_pending = 0
        self.output_logprobs: Optional[list[PositionLogprobs]] = [] if params.logprobs is not None else None
        self.prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = None
        # prompt logprobs of the chunks prefilled so far (entry i: prompt token i), published when complete
        self.partial_prompt_logprobs: list[Optional[PositionLogprobs]] = [None]
        self.status = Status.WAITING
        # KV blocks in order. Only grows while the request runs; a re-admission assigns a new list.
        self.block_table: list[int] = []
        self._table_src: Optional[list[int]] = None  # the list _table_np mirrors
        self._table_np = np.empty(0, dtype=np.int32)
        self._table_len = 0
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        # prefix caching: hashes of its leading full blocks of known tokens (a chain, grown as needed), and how
        # many blocks of its table are committed under them
        self.block_hashes: list[bytes] = []
        self.num_committed_blocks = 0
        self.slot_waits = 0  # scheduling rounds it was passed over for want of an adapter slot
        # the vocabulary its tokens come from: the model's, or its adapter's when that adds tokens (None: not
        # given, the model's)
        self.vocab_size = vocab_size
        self.slot: int = -1  # adapter slot while running (-1: base model)
        self.generator: Optional[torch.Generator] = None
        self.detok = (IncrementalDetokenizer(tokenizer, self.visible_prompt_token_ids, params)
                      if tokenizer is not None else None)
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[Any] = None
        self.text_delta = ""  # text finalised since the last output (streaming)
        self.num_preemptions = 0
        self.arrival_time = time.monotonic()
        self.first_token_time: Optional[float] = None
        self.num_sent_tokens = -1  # output tokens already sent as deltas (-1: nothing sent yet)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_at(self, start: int, n: int) -> list[int]:
        """``all_token_ids[start:start + n]`` without building the whole list (a decode step reads one
        token; its cost must not grow with the sequence)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            out = self.output_token_ids[start - p:start - p + n]
        elif start + n <= p:
            return self.prompt_token_ids[start:start + n]
        else:
            out = self.prompt_token_ids[start:] + self.output_token_ids[:start + n - p]
        known = p + len(self.output_token_ids)
        pending = min(start + n, known + self.num_pending) - max(start, known)
        return out + [PENDING_TOKEN] * pending if pending > 0 else out  # positions of pending tokens

    def block_table_array(self) -> np.ndarray:
        """``block_table`` as int32 numpy, kept in step with it: only the blocks added since the last call are
        converted, so a decode step's host work does not grow with the sequence."""
        src, n = self.block_table, len(self.block_table)
        if self._table_src is not src or n < self._table_len:  # re-admitted (a new list) or freed
            self._table_src, self._table_len = src, 0
        if n > self._table_np.shape[0]:
            grown = np.empty(max(16, 2 * n), dtype=np.int32)
            grown[:self._table_len] = self._table_np[:self._table_len]
            self._table_np = grown
        if n > self._table_len:
            self._table_np[self._table_len:n] = src[self._table_len:n]
            self._table_len = n
        return self._table_np[:n]

    @property
    def visible_prompt_token_ids(self) -> list[int]:
        """The prompt as users see it: placeholder ids shown as the model's image token id."""
        return self.mm.visible_token_ids(self.prompt_token_ids) if self.mm is not None else self.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt, generated and pending tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and self.prompt_logprobs is None

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def to_output(self) -> RequestOutput:
        text = self.detok.text if self.detok is not None else ""
        delta, self.text_delta = self.text_delta, ""
        completion = CompletionOutput(
            index=0, text=text, text_delta=delta, token_ids=list(self.output_token_ids),
            logprobs=list(self.output_logprobs) if self.output_logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
        )
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=list(self.visible_prompt_token_ids),
            prompt_logprobs=self.prompt_logprobs, outputs=[completion], finished=self.finished,
            lora_name=self.lora_name,
            metrics={"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                     "num_preemptions": self.num_preemptions},
        )

    def to_delta(self) -> RequestDelta:
        """What changed since the previous delta (the first one carries the prompt)."""
        first = self.num_sent_tokens < 0
        start = max(self.num_sent_tokens, 0)
        self.num_sent_tokens = len(self.output_token_ids)
        delta, self.text_delta = self.text_delta, ""
        return RequestDelta(
            request_id=self.request_id, new_token_ids=self.output_token_ids[start:],
            new_logprobs=self.output_logprobs[start:] if self.output_logprobs is not None else None,
            text_delta=delta, finish_reason=self.finish_reason, stop_reason=self.stop_reason,
            prompt_token_ids=list(self.visible_prompt_token_ids) if first else None,
            prompt_logprobs=self.prompt_logprobs if first else None,
        )
