"""Images from what users send: PIL images, encoded bytes, ``data:`` URLs and, only when the caller
allows it, ``http(s)`` URLs.

    img = load_image("data:image/png;base64,iVBORw0...")            # -> PIL.Image.Image (decoded)
    img = load_image(raw_bytes, max_pixels=4096 * 4096)
    load_image("https://example.com/cat.png")                        # InvalidRequestError: remote URLs refused

Every failure raises :class:`InvalidRequestError` naming what is wrong (the source kind, its size, the
decoder's complaint). The pixel limit is checked from the image header, before the pixels are decoded.
Local file paths and ``file:`` URLs are never read (a server must not open files for its clients).
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
from typing import Any, Optional

from loraplex.errors import InvalidRequestError

DEFAULT_MAX_REMOTE_BYTES = 32 * 1024 * 1024
_REMOTE_SCHEMES = ("http://", "https://")


def load_image(source: Any, allow_remote: bool = False, max_pixels: Optional[int] = None,
               timeout: float = 10.0, max_remote_bytes: int = DEFAULT_MAX_REMOTE_BYTES) -> Any:
    """Turn ``source`` into a decoded ``PIL.Image.Image``.

    ``source``: a PIL image, encoded image bytes, a ``data:`` URL (an OpenAI ``image_url``), or an
    ``http(s)`` URL when ``allow_remote`` is set. ``max_pixels``: refuse images with more pixels
    (width * height); None means no limit beyond PIL's decompression-bomb guard.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, "image")
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), max_pixels, "image bytes")
    if isinstance(source, str):
        url = source.strip()
        if url[:5].lower() == "data:":
            return _decode(_parse_data_url(url), max_pixels, "data: URL")
        if url.lower().startswith(_REMOTE_SCHEMES):
            if not allow_remote:
                raise InvalidRequestError(f"remote image URL {_short(url)!r} refused: remote images are disabled "
                                          "(send the image inline as a data: URL, or enable remote images)")
            return _decode(_fetch(url, timeout, max_remote_bytes), max_pixels, f"image at {_short(url)!r}")
        kinds = "a data: URL" + (" or an http(s) URL" if allow_remote else "")
        raise InvalidRequestError(f"image URL {_short(url)!r} is not {kinds} (local paths are never read)")
    raise InvalidRequestError(f"an image must be a PIL image, encoded bytes or a data: URL, "
                              f"got {type(source).__name__}")


def _short(url: str, n: int = 64) -> str:
    return url if len(url) <= n else url[:n] + "..."


def _parse_data_url(url: str) -> bytes:
    """``data:[<media type>][;base64],<data>`` -> bytes (RFC 2397)."""
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise InvalidRequestError(f"malformed data: URL {_short(url)!r}: no ',' before the data")
    params = [p.strip().lower() for p in head.split(";")]
    media = params[0]
    if media and not media.startswith("image/"):
        raise InvalidRequestError(f"data: URL has media type {media!r}; expected image/*")
    if "base64" in params[1:]:
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidRequestError(f"data: URL holds invalid base64 ({len(payload)} characters): {e}") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise InvalidRequestError("data: URL holds no image data")
    return data


def _fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    import urllib.request

    req = urllib.request.Request(url, headers={"User-Agent": "loraplex"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (scheme checked above)
            data = resp.read(max_bytes + 1)
    except Exception as e:  # URLError, HTTPError, timeouts, connection resets
        raise InvalidRequestError(f"cannot fetch image URL {_short(url)!r}: {e}") from None
    if len(data) > max_bytes:
        raise InvalidRequestError(f"image at {_short(url)!r} is larger than {max_bytes} bytes")
    return data


def _check_pixels(size: tuple[int, int], max_pixels: Optional[int], what: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise InvalidRequestError(f"{what} has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise InvalidRequestError(f"{what} is {w}x{h} = {w * h} pixels, above the limit max_image_pixels="
                                  f"{max_pixels}")


def _decode(data: bytes, max_pixels: Optional[int], what: str) -> Any:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # UnidentifiedImageError, DecompressionBombError, OSError, ...
        raise InvalidRequestError(f"cannot decode {what} ({len(data)} bytes): {e}") from None
    _check_pixels(img.size, max_pixels, what)  # from the header, before decoding the pixels
    try:
        img.load()
    except Exception as e:  # truncated or corrupt pixel data
        raise InvalidRequestError(f"cannot decode {what} ({len(data)} bytes, {img.format} "
                                  f"{img.size[0]}x{img.size[1]}): {e}") from None
    return img
