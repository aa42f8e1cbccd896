"""Images inside OpenAI-style chat messages.

    messages, images = split_chat_images(messages, placeholder="<image>")

A message's ``content`` may be a list of parts: ``{"type": "text", "text": ...}``, ``{"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}}`` (OpenAI) or ``{"type": "image", "image": <PIL image |
bytes | data: URL>}``. Each image part becomes ``placeholder`` (the text that stands for one image in the
model's prompts, :meth:`MultiModalProcessor.image_placeholder`) inside plain-string content, so any chat
template renders it, and the image sources are returned in prompt order for ``multi_modal_data``. Sources
are not loaded here: the engine loads them (``data:`` URLs only); a server that allows remote images loads
them itself with ``load_image(url, allow_remote=True)`` first.
"""

from __future__ import annotations

from typing import Any

from loraplex.errors import InvalidRequestError


def split_chat_images(messages: list[dict], placeholder: str) -> tuple[list[dict], list[Any]]:
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
