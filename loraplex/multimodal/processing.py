"""Turn a prompt plus images into the token ids and image tensors one request carries.

The prompt holds one image token per image (``<image>``, ``<|image_pad|>``: the model config's
``image_token_id``), as Hugging Face processors expect. Each image goes through the image processor the
model folder's ``preprocessor_config.json`` names (transformers ``AutoImageProcessor``), and its image
token is expanded into as many placeholder positions as the vision tower yields features for it. Every
placeholder position carries the image's *placeholder id*, an id outside the vocabulary
(``>= num_embeddings``) derived from a hash of the image's pixels: batching and caching can tell images
apart by id alone, and the embedding routine (``embedding.py``) finds image positions by id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import torch

from loraplex.errors import InvalidRequestError, ModelLoadError
from loraplex.multimodal.inputs import load_image

PLACEHOLDER_BASE = 1_000_000
PLACEHOLDER_RANGE = 1 << 30  # ids stay below 2**31


def image_digest(image: Any) -> str:
    """sha256 of an image's decoded pixels (mode and size included): equal pixels, equal digest,
    whatever the encoding they arrived in."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def placeholder_id(digest: str, num_embeddings: int) -> int:
    """The placeholder id of an image: ``>= max(1_000_000, num_embeddings)``, from its digest."""
    return max(PLACEHOLDER_BASE, num_embeddings) + int(digest[:16], 16) % PLACEHOLDER_RANGE


@dataclass
class ImageInput:
    """One image of a request, processed and placed."""

    index: int  # among the request's images, in prompt order
    offset: int  # first placeholder position in the prompt
    length: int  # placeholder positions = vision features the model writes there
    placeholder_id: int
    digest: str
    data: dict[str, torch.Tensor]  # the image processor's output for this image (pixel_values, image_grid_thw)


@dataclass
class MultiModalInputs:
    """What a request carries besides its token ids: its images and, for M-RoPE models, the
    3-D positions of its prompt tokens and the offset of later (generated) positions."""

    images: list[ImageInput]
    image_token_id: int  # shown in place of placeholder ids in outputs (as Hugging Face processors do)
    mrope_positions: Optional[torch.Tensor] = None  # (3, prompt_len) int64
    mrope_delta: int = 0  # a token at sequence index p >= prompt_len has position p + mrope_delta
    _placeholders: frozenset[int] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        self._placeholders = frozenset(img.placeholder_id for img in self.images)

    def visible_token_ids(self, token_ids: Sequence[int]) -> list[int]:
        """``token_ids`` with every placeholder id replaced by the model's image token id."""
        ph, tok = self._placeholders, self.image_token_id
        return [tok if t in ph else t for t in token_ids]

    def image_positions(self) -> set[int]:
        return {p for img in self.images for p in range(img.offset, img.offset + img.length)}


class SupportsImages(Protocol):
    """What a vision-language model class offers the processor (see models/vlm.py)."""

    supports_images: bool
    image_token_id: int

    def get_input_embeddings(self) -> torch.nn.Module: ...

    def image_prompt_token_ids(self) -> list[int]: ...

    def num_image_features(self, data: dict[str, torch.Tensor]) -> int:
        """Vision features (= placeholder positions) the model produces for one processed image."""

    # Optional, for M-RoPE models:
    # def mrope_positions(self, num_tokens: int, images: list[ImageInput]) -> tuple[torch.Tensor, int]


class MultiModalProcessor:
    """Per-engine image processing for one vision-language model folder."""

    def __init__(self, model_path: str, model: SupportsImages, max_image_pixels: Optional[int]) -> None:
        from transformers import AutoImageProcessor

        try:
            self.image_processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=False)
        except Exception as e:  # OSError (no preprocessor_config.json), ValueError (unknown processor)
            raise ModelLoadError(f"cannot load the image processor of {model_path!r} "
                                 f"(preprocessor_config.json): {e}") from e
        self.model = model
        self.architecture = type(model).__name__
        self.image_token_id = int(model.image_token_id)
        # Read through whatever wraps the embedding (a LoRA wrapper forwards num_embeddings).
        self.num_embeddings = int(model.get_input_embeddings().num_embeddings)
        self.max_image_pixels = max_image_pixels

    def image_placeholder(self, tokenizer: Any) -> str:
        """The text that stands for one image in a prompt: ``<|vision_start|><|image_pad|><|vision_end|>``
        (Qwen2-VL), ``<image>`` (LLaVA). Chat front ends put it where a message has an image."""
        return "".join(tokenizer.convert_ids_to_tokens(self.model.image_prompt_token_ids()))

    def process(self, token_ids: list[int], mm_data: Optional[dict]) -> tuple[list[int], Optional[MultiModalInputs]]:
        """Expand the image tokens of ``token_ids`` for the images in ``mm_data`` (``{"image": image or
        list}``); returns the expanded ids and the request's inputs (None without images)."""
        images = self._load_images(mm_data)
        slots = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        if len(slots) != len(images):
            raise InvalidRequestError(
                f"the prompt has {len(slots)} image token(s) (id {self.image_token_id}) but {len(images)} image(s) "
                f"were given; {self.architecture} needs exactly one image token per image, in prompt order")
        if not images:
            return token_ids, None
        out: list[int] = []
        items: list[ImageInput] = []
        prev = 0
        for k, (pos, image) in enumerate(zip(slots, images)):
            data = self._run_processor(image, k)
            n = int(self.model.num_image_features(data))
            digest = image_digest(image)
            pid = placeholder_id(digest, self.num_embeddings)
            out.extend(token_ids[prev:pos])
            items.append(ImageInput(k, len(out), n, pid, digest, data))
            out.extend([pid] * n)
            prev = pos + 1
        out.extend(token_ids[prev:])
        mm = MultiModalInputs(items, self.image_token_id)
        if hasattr(self.model, "mrope_positions"):
            mm.mrope_positions, mm.mrope_delta = self.model.mrope_positions(len(out), items)
        return out, mm

    def _load_images(self, mm_data: Optional[dict]) -> list[Any]:
        if not mm_data:
            return []
        if not isinstance(mm_data, dict):
            raise InvalidRequestError(f"multi_modal_data must be a dict like {{'image': ...}}, "
                                      f"got {type(mm_data).__name__}")
        unknown = sorted(set(mm_data) - {"image"})
        if unknown:
            raise InvalidRequestError(f"unsupported multi_modal_data modality {unknown[0]!r}; "
                                      f"{self.architecture} accepts: image")
        value = mm_data.get("image")
        items = list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])
        images = []
        for k, src in enumerate(items):
            try:
                images.append(load_image(src, allow_remote=False, max_pixels=self.max_image_pixels))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"image {k}: {e}") from None
        return images

    def _run_processor(self, image: Any, k: int) -> dict[str, torch.Tensor]:
        try:
            out = self.image_processor(images=[image], return_tensors="pt")
        except Exception as e:  # processors raise ValueError for odd sizes / modes, among others
            raise InvalidRequestError(f"image {k} ({image.size[0]}x{image.size[1]} {image.mode}): the image "
                                      f"processor refused it: {e}") from None
        return {name: v for name, v in out.items() if isinstance(v, torch.Tensor)}
