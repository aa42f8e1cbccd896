"""Chat messages to a prompt: chat templates, and images inside OpenAI-style messages.

    template = load_chat_template("template.jinja")      # or an inline Jinja string; checked once
    ids, images = render_chat(tokenizer, messages, chat_template=template)
    messages, images = split_chat_images(messages, placeholder="<image>")

:func:`render_chat` needs only a tokenizer, so the HTTP process renders with its own and the offline engine
(:meth:`LLMEngine.chat_prompt`) with its.

A message's ``content`` may be a list of parts: ``{"type": "text", "text": ...}``, ``{"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}}`` (OpenAI) or ``{"type": "image", "image": <PIL image |
bytes | data: URL>}``. Each image part becomes ``placeholder`` (the text that stands for one image in the
model's prompts, :meth:`MultiModalProcessor.image_placeholder`) inside plain-string content, so any chat
template renders it, and the image sources are returned in prompt order for ``multi_modal_data``. Sources
are not loaded here: the engine loads them (``data:`` URLs only); a server that allows remote images loads
them itself with ``load_image(url, allow_remote=True)`` first.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from loraplex.errors import InvalidRequestError

_NO_TEMPLATE = ("the model folder has no chat template; pass chat_template= (LLM.chat) or --chat-template "
                "(loraplex serve), or send plain prompts")


def load_chat_template(value: str) -> str:
    """A chat template given as a file path (read as UTF-8) or inline Jinja, checked to compile.

    Raises ValueError naming ``value`` when it is neither an existing file nor Jinja (``{{`` or ``{%``), when
    the file is empty or not UTF-8, and with the line of the syntax error when it does not compile."""
    if os.path.isdir(value):
        raise ValueError(f"chat template {value!r} is a folder, not a template file")
    if os.path.isfile(value):
        name = f"chat template file {value!r}"
        try:
            with open(value, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{name} is not UTF-8 text: {e}") from e
        if not text.strip():
            raise ValueError(f"{name} is empty")
    elif "{{" in value or "{%" in value:
        name, text = "inline chat template", value
    else:
        shown = value if len(value) <= 200 else value[:200] + "..."
        raise ValueError(f"chat template {shown!r}: no such file, and not an inline Jinja template "
                         "(no '{{' or '{%' in it)")
    import jinja2

    try:
        _environment().from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{name} does not compile: line {e.lineno}: {e.message}") from e
    return text


def _environment() -> Any:
    """A sandbox with the syntax Hugging Face templates use: loop controls and ``{% generation %}`` blocks."""
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):  # transformers marks assistant text with it; rendering ignores it
        tags = {"generation"}

        def parse(self, parser: Any) -> list:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols", GenerationBlock])


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True,
                chat_template: Optional[str] = None, image_placeholder: str = "") -> tuple[list[int], list]:
    """A conversation (OpenAI-style message dicts) rendered and tokenised: its token ids, and the image
    sources its content parts hold, in prompt order (each image part becomes ``image_placeholder``).

    ``chat_template`` (the template text, see :func:`load_chat_template`) overrides the tokenizer's own.
    Every problem with the messages or the template raises :class:`InvalidRequestError`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"message {i} is a {type(message).__name__}, expected a dict with role "
                                      "and content")
        _check_unicode(message, f"message {i}")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise InvalidRequestError(_NO_TEMPLATE)
    messages, images = split_chat_images(list(messages), image_placeholder)
    try:
        ids = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=
                                            add_generation_prompt, tokenize=True, return_dict=False)
    except Exception as e:  # jinja raises many kinds (and raise_exception() in templates a bare TemplateError)
        raise InvalidRequestError(f"the chat template failed on these messages{_template_line(e)}: "
                                  f"{type(e).__name__}: {e}") from e
    return list(ids), images


def _check_unicode(value: Any, where: str) -> None:
    """Refuse text that UTF-8 cannot encode (lone surrogates such as U+D800) before the tokenizer sees it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(f"{where} is not valid Unicode: lone surrogate U+{ord(value[e.start]):04X} "
                                      f"at character {e.start}") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, f"{where}: a key")
            _check_unicode(v, f"{where}.{k}" if "." in where or "[" in where else f"{where}: {k}")
    elif isinstance(value, (list, tuple)):
        for j, v in enumerate(value):
            _check_unicode(v, f"{where}[{j}]")


def _template_line(e: BaseException) -> str:
    """ " at line N" of the template where jinja failed, when it says (syntax errors) or its traceback does."""
    line = getattr(e, "lineno", None)
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":  # jinja maps template frames to template lines
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" at template line {line}" if line else ""


def split_chat_images(messages: list[dict], placeholder: str) -> tuple[list[dict], list[Any]]:
    """Messages with their image parts replaced by ``placeholder`` in plain-string content, and the image
    sources in order."""
    out: list[dict] = []
    images: list[Any] = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        text = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text.append(part.get("text") or "")
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not url:
                    raise InvalidRequestError(f"message {i}: image_url part without a url")
                images.append(url)
                text.append(placeholder)
            elif kind == "image":
                if part.get("image") is None:
                    raise InvalidRequestError(f"message {i}: image part without an image")
                images.append(part["image"])
                text.append(placeholder)
            else:
                raise InvalidRequestError(f"message {i}: unsupported content part {kind!r}; "
                                          "supported: text, image_url, image")
        out.append({**message, "content": "".join(text)})
    return out, images
