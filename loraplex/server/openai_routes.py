"""``/v1/completions`` and ``/v1/chat/completions``: OpenAI's request and response shapes over
:class:`Serving` (streaming as server-sent events, ``n``, ``echo``, logprobs, images in chat)."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse

from loraplex.multimodal.inputs import load_image
from loraplex.server import protocol as P
from loraplex.server.serving import APIError, Serving
from loraplex.types import RequestOutput, SamplingParams


async def create_completion(sv: Serving, body: P.CompletionRequest, http: Request) -> Any:
    lora = sv.resolve_adapter(body.model)
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
    if body.logprobs is not None and not 0 <= body.logprobs <= SamplingParams.MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be in [0, {SamplingParams.MAX_LOGPROBS}]", param="logprobs")
    rid = P.random_id("cmpl")
    jobs, texts = [], []
    for i, p in enumerate(prompts):
        text, ids = sv.engine.tokenize(p if isinstance(p, str) else {"prompt_token_ids": p})
        texts.append(text if text is not None else sv.tok.decode(ids))
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        params = sv.sampling(body, len(ids), max_tokens, body.logprobs,
                             body.logprobs if body.echo and body.logprobs is not None else None)
        for j in range(body.n):
            jobs.append(({"prompt_token_ids": ids, "prompt": text}, sv.with_seed(params, j), lora, f"{rid}-{i}-{j}"))
    k = body.logprobs or 0

    def choice_logprobs(out: RequestOutput, ntok_sent: int, echo_now: bool) -> Optional[P.CompletionLogprobs]:
        if body.logprobs is None:
            return None
        c = out.outputs[0]
        toks, lps = c.token_ids[ntok_sent:], c.logprobs[ntok_sent:]
        if echo_now:
            toks = out.prompt_token_ids + toks
            lps = (out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + lps
        return sv.completion_logprobs(toks, lps, k, 0)

    streams = sv.add_all(jobs)
    if body.stream:
        sent_tokens = [0] * len(jobs)
        echoed = [False] * len(jobs)

        def chunk(idx: int, out: RequestOutput) -> Optional[P.CompletionResponse]:
            c = out.outputs[0]
            text = c.text_delta
            echo_now = body.echo and not echoed[idx]
            if echo_now:
                text = texts[idx // body.n] + text
                echoed[idx] = True
            lp = choice_logprobs(out, sent_tokens[idx], echo_now)
            sent_tokens[idx] = len(c.token_ids)
            if not (text or lp or out.finished):
                return None
            return P.CompletionResponse(id=rid, model=model_name, choices=[P.CompletionChoice(
                index=idx, text=text, logprobs=lp, finish_reason=c.finish_reason, stop_reason=c.stop_reason)])

        return StreamingResponse(sv.event_stream(
            http, streams, chunk, lambda u: P.CompletionResponse(id=rid, model=model_name, choices=[], usage=u),
            bool(body.stream_options and body.stream_options.include_usage)), media_type="text/event-stream")

    outs, usage = await sv.collect(http, streams)
    choices = []
    for idx, out in enumerate(outs):
        c = out.outputs[0]
        text = (texts[idx // body.n] + c.text) if body.echo else c.text
        choices.append(P.CompletionChoice(index=idx, text=text, logprobs=choice_logprobs(out, 0, body.echo),
                                          finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    return P.CompletionResponse(id=rid, model=model_name, choices=choices, usage=usage).model_dump()


async def create_chat_completion(sv: Serving, body: P.ChatCompletionRequest, http: Request) -> Any:
    lora = sv.resolve_adapter(body.model)
    model_name = body.model or sv.served
    if not body.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    raw = [m.model_dump(exclude_none=True) for m in body.messages]
    ids, sources = sv.engine.chat_prompt(raw, body.add_generation_prompt)
    if sources and sv.eng.mm_processor is None:
        raise APIError(400, f"model {sv.served!r} ({type(sv.eng.model).__name__}) does not accept images",
                       param="messages")
    images = []
    if sources:  # decoding (and, if allowed, fetching) images is slow: off the event loop
        limit = sv.eng.config.model_config.max_image_pixels
        images = await asyncio.get_running_loop().run_in_executor(None, lambda: [
            load_image(src, allow_remote=sv.cfg.allow_remote_images, max_pixels=limit) for src in sources])
    top = body.top_logprobs if body.top_logprobs is not None else 0
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if not 0 <= top <= SamplingParams.MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs must be in [0, {SamplingParams.MAX_LOGPROBS}]", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sv.sampling(body, len(ids), max_tokens, top if body.logprobs else None, None)
    rid = P.random_id("chatcmpl")
    prompt: dict[str, Any] = {"prompt_token_ids": ids}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    jobs = [(prompt, sv.with_seed(params, j), lora, f"{rid}-{j}") for j in range(body.n)]
    echo_text = _text_of(raw[-1].get("content")) if body.echo else ""

    streams = sv.add_all(jobs)
    if body.stream:
        sent_tokens = [0] * len(jobs)

        def chunk(j: int, out: RequestOutput) -> Optional[P.ChatCompletionChunk]:
            c = out.outputs[0]
            lp = None
            if body.logprobs:
                lp = sv.chat_logprobs(c.token_ids[sent_tokens[j]:], c.logprobs[sent_tokens[j]:], top)
            sent_tokens[j] = len(c.token_ids)
            if not (c.text_delta or out.finished or (lp and lp.content)):
                return None
            return P.ChatCompletionChunk(id=rid, model=model_name, choices=[P.ChatStreamChoice(
                index=j, delta=P.DeltaMessage(content=c.text_delta), logprobs=lp, finish_reason=c.finish_reason)])

        first = tuple(P.ChatCompletionChunk(id=rid, model=model_name, choices=[P.ChatStreamChoice(
            index=j, delta=P.DeltaMessage(role="assistant", content=echo_text))]) for j in range(len(jobs)))
        return StreamingResponse(sv.event_stream(
            http, streams, chunk, lambda u: P.ChatCompletionChunk(id=rid, model=model_name, choices=[], usage=u),
            bool(body.stream_options and body.stream_options.include_usage), first),
            media_type="text/event-stream")

    outs, usage = await sv.collect(http, streams)
    choices = []
    for j, out in enumerate(outs):
        c = out.outputs[0]
        lp = sv.chat_logprobs(c.token_ids, c.logprobs, top) if body.logprobs else None
        choices.append(P.ChatChoice(index=j, message=P.ChatResponseMessage(content=echo_text + c.text),
                                    logprobs=lp, finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    return P.ChatCompletionResponse(id=rid, model=model_name, choices=choices, usage=usage).model_dump()


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if part.get("type") == "text")
    return content or ""
