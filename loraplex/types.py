"""Shared vocabulary of loraplex: sampling parameters, adapter requests and
request outputs. Every other module imports these from here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from loraplex.errors import InvalidRequestError

# One dict per position: token id -> logprob (the chosen token plus the top-k).
PositionLogprobs = dict[int, float]


@dataclass
class SamplingParams:
    """How to sample one request, with vLLM's names and defaults.

    ``temperature == 0`` means greedy. ``top_k == -1`` (or 0) disables top-k,
    ``top_p == 1`` disables nucleus sampling, ``min_p == 0`` disables min-p (tokens whose
    probability is below ``min_p`` times the most likely token's are dropped).
    ``logprobs``/``prompt_logprobs`` is
    the number of top alternatives returned per position (the chosen token is
    always included). ``stop`` strings end the text and are not included in it.
    """

    n: int = 1
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = -1
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    # Upper bound for logprobs/prompt_logprobs (as in vLLM's max_logprobs).
    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop else []
        self.stop_token_ids = list(self.stop_token_ids) if self.stop_token_ids else []
        if self.top_k == 0:
            self.top_k = -1
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"invalid sampling parameter: {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad(f"n must be an integer >= 1, got {self.n!r}")
        if self.n != 1:
            raise bad(f"n={self.n} is not supported by LLM.generate; send the prompt n times")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise bad(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise bad(f"top_p must be in (0, 1], got {p!r}")
        mp = self.min_p
        if not isinstance(mp, (int, float)) or not (0 <= mp <= 1):
            raise bad(f"min_p must be in [0, 1], got {mp!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad(f"top_k must be -1 (disabled) or an integer >= 1, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise bad(f"seed must be a non-negative integer, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad(f"stop strings must be non-empty strings, got {s!r}")
        for t_id in self.stop_token_ids:
            if not isinstance(t_id, int) or t_id < 0:
                raise bad(f"stop_token_ids must be non-negative integers, got {t_id!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= self.MAX_LOGPROBS):
                raise bad(f"{name} must be an integer in [0, {self.MAX_LOGPROBS}], got {v!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class LoRARequest:
    """Names a LoRA adapter: a PEFT folder at ``path`` registered as ``name``.

    ``lora_int_id`` is accepted for vLLM compatibility and otherwise unused.
    """

    name: str
    path: str
    lora_int_id: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidRequestError(f"LoRARequest.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.path, str) or not self.path:
            raise InvalidRequestError(f"LoRARequest.path must be a non-empty string, got {self.path!r}")

    @property
    def lora_name(self) -> str:  # vLLM's attribute name
        return self.name

    @property
    def lora_path(self) -> str:  # vLLM's attribute name
        return self.path


@dataclass
class CompletionOutput:
    """One generated sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list[PositionLogprobs]]
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None while running
    stop_reason: Union[int, str, None] = None  # the stop string or stop token id that ended it
    text_delta: str = ""  # text finalised since this request's previous output (for streaming)

    @property
    def cumulative_logprob(self) -> Optional[float]:
        if self.logprobs is None:
            return None
        return float(sum(lp[t] for lp, t in zip(self.logprobs, self.token_ids)))

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What ``LLM.generate`` returns per prompt (and the engine per step)."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]]
    outputs: list[CompletionOutput]
    finished: bool
    lora_name: Optional[str] = None
    metrics: dict = field(default_factory=dict)


@dataclass
class RequestDelta:
    """What one engine step added to a request: the engine process sends these to the HTTP
    process instead of whole :class:`RequestOutput` snapshots, so a step's message grows with
    the batch, not with the length of every sequence. Output tokens only ever append."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: Optional[list[PositionLogprobs]]
    text_delta: str
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    # Set on a request's first delta only: the prompt as the engine ran it (image positions
    # expanded) and, when asked for, its logprobs.
    prompt_token_ids: Optional[list[int]] = None
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


PromptType = Union[str, dict, Sequence[int]]
