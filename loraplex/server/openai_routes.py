"""``/v1/completions`` and ``/v1/chat/completions``: OpenAI's request and response shapes over
:class:`Serving` (streaming as server-sent events, ``n``, ``echo``, logprobs, images in chat)."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse

from loraplex.multimodal.chat import render_chat
from loraplex.multimodal.inputs import load_image
from loraplex.server import protocol as P
from loraplex.server.engine_client import RequestState
from loraplex.server.serving import APIError, Job, Serving
from loraplex.types import RequestDelta


async def create_completion(sv: Serving, body: P.CompletionRequest, http: Request) -> Any:
    lora = await sv.resolve_adapter(body.model)
    model_name = body.model or sv.served
    raw = body.prompt
    if isinstance(raw, str):
        prompts: list[Any] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        prompts = [list(raw)]
    else:
        prompts = list(raw)
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    sv.check_seqs(len(prompts), body.n)
    for i, p in enumerate(prompts):  # every prompt, before any is tokenised
        if isinstance(p, str):
            sv.check_chars(len(p), "prompt")
        else:
            sv.check_ids(p, "prompt", lora)
    rid = P.random_id("cmpl")
    jobs, texts = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            text, ids = p, await sv.tokenize(p, "prompt", lora)
        else:
            text, ids = None, p
        if body.echo:
            texts.append(text if text is not None else await sv.detokenize(ids, lora))
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        params = sv.sampling(body, len(ids), max_tokens, body.logprobs,
                             body.logprobs if body.echo and body.logprobs is not None else None, lora)
        for j in range(body.n):
            jobs.append(Job({"prompt_token_ids": ids, "prompt": text}, sv.with_seed(params, j), lora, f"{rid}-{i}-{j}"))
    k = body.logprobs or 0

    def choice_logprobs(st: RequestState, toks: list[int], lps: Optional[list], echo_now: bool
                        ) -> Optional[P.CompletionLogprobs]:
        if body.logprobs is None:
            return None
        lps = lps or []
        if echo_now:
            toks = st.prompt_token_ids + toks
            lps = (st.prompt_logprobs or [None] * len(st.prompt_token_ids)) + lps
        return sv.completion_logprobs(toks, lps, k, 0, lora)

    streams = await sv.add_all(jobs)
    if body.stream:
        echoed = [False] * len(jobs)

        def chunk(idx: int, d: RequestDelta, st: RequestState) -> Optional[P.CompletionResponse]:
            text = d.text_delta
            echo_now = body.echo and not echoed[idx]
            if echo_now:
                text = texts[idx // body.n] + text
                echoed[idx] = True
            lp = choice_logprobs(st, d.new_token_ids, d.new_logprobs, echo_now)
            if not (text or lp or d.finished):
                return None
            return P.CompletionResponse(id=rid, model=model_name, choices=[P.CompletionChoice(
                index=idx, text=text, logprobs=lp, finish_reason=d.finish_reason, stop_reason=d.stop_reason)])

        return StreamingResponse(sv.event_stream(
            http, streams, chunk, lambda u: P.CompletionResponse(id=rid, model=model_name, choices=[], usage=u),
            bool(body.stream_options and body.stream_options.include_usage)), media_type="text/event-stream")

    states, usage = await sv.collect(http, streams)
    choices = []
    for idx, st in enumerate(states):
        text = (texts[idx // body.n] + st.text) if body.echo else st.text
        choices.append(P.CompletionChoice(index=idx, text=text,
                                          logprobs=choice_logprobs(st, st.token_ids, st.logprobs, body.echo),
                                          finish_reason=st.finish_reason, stop_reason=st.stop_reason))
    return P.CompletionResponse(id=rid, model=model_name, choices=choices, usage=usage).model_dump()


async def create_chat_completion(sv: Serving, body: P.ChatCompletionRequest, http: Request) -> Any:
    lora = await sv.resolve_adapter(body.model)
    model_name = body.model or sv.served
    if not body.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    sv.check_seqs(1, body.n)
    raw = [m.model_dump(exclude_none=True) for m in body.messages]
    sv.check_chars(sum(len(_text_of(m.get("content"))) for m in raw), "messages")
    ids, sources = await sv.in_tokenizer_thread(
        lambda: render_chat(sv.tokenizer_for(lora), raw, body.add_generation_prompt, sv.chat_template,
                            sv.client.info["image_placeholder"]))
    if sources and not sv.client.info["accepts_images"]:
        raise APIError(400, f"model {sv.served!r} ({sv.client.info['model_class']}) does not accept images",
                       param="messages")
    if not sources:  # with images the engine checks the expanded prompt
        sv.check_ids(ids, "messages", lora)
    images = []
    if sources:  # decoding (and, if allowed, fetching) images is slow: off the event loop
        limit = sv.client.info["max_image_pixels"]
        images = await asyncio.get_running_loop().run_in_executor(None, lambda: [
            load_image(src, allow_remote=sv.cfg.allow_remote_images, max_pixels=limit) for src in sources])
    top = body.top_logprobs if body.top_logprobs is not None else 0
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sv.sampling(body, len(ids), max_tokens, top if body.logprobs else None, None, lora)
    rid = P.random_id("chatcmpl")
    prompt: dict[str, Any] = {"prompt_token_ids": ids}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    jobs = [Job(prompt, sv.with_seed(params, j), lora, f"{rid}-{j}") for j in range(body.n)]
    echo_text = _text_of(raw[-1].get("content")) if body.echo else ""

    streams = await sv.add_all(jobs)
    if body.stream:
        def chunk(j: int, d: RequestDelta, st: RequestState) -> Optional[P.ChatCompletionChunk]:
            lp = sv.chat_logprobs(d.new_token_ids, d.new_logprobs or [], top, lora) if body.logprobs else None
            if not (d.text_delta or d.finished or (lp and lp.content)):
                return None
            return P.ChatCompletionChunk(id=rid, model=model_name, choices=[P.ChatStreamChoice(
                index=j, delta=P.DeltaMessage(content=d.text_delta), logprobs=lp, finish_reason=d.finish_reason)])

        first = tuple(P.ChatCompletionChunk(id=rid, model=model_name, choices=[P.ChatStreamChoice(
            index=j, delta=P.DeltaMessage(role="assistant", content=echo_text))]) for j in range(len(jobs)))
        return StreamingResponse(sv.event_stream(
            http, streams, chunk, lambda u: P.ChatCompletionChunk(id=rid, model=model_name, choices=[], usage=u),
            bool(body.stream_options and body.stream_options.include_usage), first),
            media_type="text/event-stream")

    states, usage = await sv.collect(http, streams)
    choices = []
    for j, st in enumerate(states):
        lp = sv.chat_logprobs(st.token_ids, st.logprobs or [], top, lora) if body.logprobs else None
        choices.append(P.ChatChoice(index=j, message=P.ChatResponseMessage(content=echo_text + st.text),
                                    logprobs=lp, finish_reason=st.finish_reason, stop_reason=st.stop_reason))
    return P.ChatCompletionResponse(id=rid, model=model_name, choices=choices, usage=usage).model_dump()


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content
                       if isinstance(part, dict) and part.get("type") == "text")
    return content or ""
