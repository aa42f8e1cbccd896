"""Offline API in vLLM's style: ``LLM(model=...).generate(prompts, params, lora_request=...)``."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from loraplex.config import EngineConfig
from loraplex.errors import AdapterError, InvalidRequestError
from loraplex.types import LoRARequest, PromptType, RequestOutput, SamplingParams

LoRAArg = Union[LoRARequest, str, None]


class LLM:
    """One base model and its adapters, for offline batched generation.

    Keyword arguments are the fields of the engine's config dataclasses
    (``loraplex.config``): ``dtype``, ``device``, ``max_model_len``, ``max_num_seqs``,
    ``max_loras``, ``max_lora_rank``, ``max_cpu_loras``, ``num_kv_blocks``, ``seed``, ...
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        from loraplex.engine.engine import LLMEngine

        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    # ---- adapters -------------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> None:
        """Register (and validate) an adapter ahead of use; raises AdapterError."""
        self.engine.add_lora(lora_request)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def list_loras(self) -> list[str]:
        return self.engine.list_loras()

    def pin_lora(self, name: str) -> None:
        """Keep adapter ``name`` resident in a device slot until :meth:`unpin_lora` (its requests never wait
        for a load); one slot always stays unpinned."""
        self.engine.pin_lora(name)

    def unpin_lora(self, name: str) -> None:
        self.engine.unpin_lora(name)

    def _lora_name(self, arg: LoRAArg) -> Optional[str]:
        if arg is None:
            return None
        if isinstance(arg, LoRARequest):
            self.engine.add_lora(arg)  # no-op when already registered with this path
            return arg.name
        if isinstance(arg, str):  # "name" or "name@version"
            name = arg.partition("@")[0]
            pool = self.engine.pool
            if name not in self.engine.list_loras() and pool is not None and pool.resolvers:
                self.engine.add_lora(pool.resolve(name))  # found by a resolver (lora_resolvers)
            if name not in self.engine.list_loras():
                raise InvalidRequestError(f"unknown adapter {arg!r}; registered adapters: {self.engine.list_loras()}")
            return arg
        raise InvalidRequestError(f"lora_request must be a LoRARequest, an adapter name or None, got {type(arg).__name__}")

    def get_metrics(self) -> dict[str, float]:
        """Engine figures: KV cache usage, and the prefix cache's prompt tokens looked up and found
        (cumulative), hit rate, cached blocks and evictions; with ``enable_lora_merging``, the merges and
        restores (cumulative) and whether an adapter is merged now."""
        return self.engine.cache_stats()

    # ---- generation -----------------------------------------------------------------------
    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 lora_request: Union[LoRAArg, Sequence[LoRAArg]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        ``prompts``: a string, a list of strings, ``{"prompt_token_ids": [...]}`` dicts, or a
        list of those. ``sampling_params`` and ``lora_request`` are one for all or one per
        prompt. Every request is validated before any runs, so a bad one raises
        ``InvalidRequestError``/``AdapterError`` without leaving work behind.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        n = len(prompts)
        params = self._per_prompt(sampling_params if sampling_params is not None else SamplingParams(),
                                  SamplingParams, n, "sampling_params")
        loras = self._per_prompt(lora_request, (LoRARequest, str, type(None)), n, "lora_request")
        names = [self._lora_name(l) for l in loras]

        engine = self.engine
        ids: list[str] = []
        try:
            for p, sp, name in zip(prompts, params, names):
                ids.append(engine.add_request(p, sp, name))
        except (InvalidRequestError, AdapterError) as e:
            for rid in ids:
                engine.abort_request(rid)
            raise type(e)(f"prompt {len(ids)}: {e}") from e

        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and n > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="generate", unit="req")
        kind, engine.output_kind = engine.output_kind, "final"  # only finished requests' outputs are needed
        try:
            pending = set(ids)
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
            raise
        finally:
            engine.output_kind = kind
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]

    def chat(self, messages: Union[list[dict], Sequence[list[dict]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             lora_request: Union[LoRAArg, Sequence[LoRAArg]] = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template: Optional[str] = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them (OpenAI-style message dicts),
        formatted with ``chat_template`` (a file path or an inline Jinja string) or else the chat template
        of the model folder. Content may be a list of parts, images included (``image_url`` with a
        ``data:`` URL, or ``{"type": "image", "image": PIL image}``)."""
        from loraplex.multimodal.chat import load_chat_template

        template = load_chat_template(chat_template) if chat_template is not None else None
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        loras = self._per_prompt(lora_request, (LoRARequest, str, type(None)), len(convs), "lora_request")
        prompts = []
        for conv, lora in zip(convs, loras):
            # rendered with the tokenizer (and its chat template) of the conversation's adapter when it adds tokens
            tok = self.engine.tokenizer_for(self._lora_name(lora))
            ids, images = self.engine.chat_prompt(conv, add_generation_prompt, template, tok)
            prompts.append({"prompt_token_ids": ids, **({"multi_modal_data": {"image": images}} if images else {})})
        return self.generate(prompts, sampling_params, lora_request, use_tqdm)

    @staticmethod
    def _per_prompt(value: Any, kind: Any, n: int, what: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise InvalidRequestError(f"{what} has {len(value)} entries for {n} prompts")
            for v in value:
                if not isinstance(v, kind):
                    raise InvalidRequestError(f"{what} entries must be {kind}, got {type(v).__name__}")
            return list(value)
        if not isinstance(value, kind):
            raise InvalidRequestError(f"{what} must be {kind} or a list of them, got {type(value).__name__}")
        return [value] * n
