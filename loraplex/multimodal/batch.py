"""The multimodal part of one step's batch, built by the model runner.

A prompt may be prefilled in chunks, but the scheduler never splits an image's placeholder block across
chunks, so every image lies wholly inside the step that holds its positions: its features are computed and
merged in that forward. Images are listed in flat-batch order, which is the order of their placeholder
positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from loraplex.lora.batch import LoRABatch
from loraplex.multimodal.processing import ImageInput


@dataclass
class MultiModalBatch:
    images: list[ImageInput]  # every image of the sequences prefilled this step, in flat-batch order
    slots: list[int]  # adapter slot of the request owning each image (-1: base model)
    # content hash of the adapter of the request owning each image (None: base model): the encoder cache's key
    identities: Optional[list[Optional[bytes]]] = None

    def subset(self, index: Sequence[int]) -> "MultiModalBatch":
        ident = self.identities
        return MultiModalBatch([self.images[i] for i in index], [self.slots[i] for i in index],
                               None if ident is None else [ident[i] for i in index])

    def lora_rows(self, rows_per_image: Sequence[int], device: torch.device) -> Optional[LoRABatch]:
        """LoRA batch info for a vision-side forward whose rows are grouped by image
        (``rows_per_image[i]`` rows for image i: its patches, or its merged features)."""
        if all(s < 0 for s in self.slots):
            return None
        return LoRABatch.from_seq_slots(self.slots, rows_per_image, device)


def gather_images(seqs: Sequence) -> Optional[MultiModalBatch]:
    """The images whose placeholders are among this step's new tokens (``seqs``: ScheduledSeq)."""
    images: list[ImageInput] = []
    slots: list[int] = []
    identities: list[Optional[bytes]] = []
    for s in seqs:
        mm = s.req.mm
        if mm is None:
            continue
        end = s.start + s.num_new_tokens
        for img in mm.images:
            if img.offset >= s.start and img.offset + img.length <= end:
                images.append(img)
                slots.append(s.slot)
                adapter = getattr(s.req, "adapter", None)
                identities.append(adapter.content_hash if adapter is not None else None)
            elif img.offset < end and img.offset + img.length > s.start:
                raise RuntimeError(f"request {s.req.request_id}: image {img.index} (positions {img.offset}.."
                                   f"{img.offset + img.length - 1}) is split across steps [{s.start}, {end})")
    return MultiModalBatch(images, slots, identities) if images else None


def mrope_positions(seqs: Sequence) -> torch.Tensor:
    """``(3, T)`` M-RoPE positions of this step's new tokens: prompt tokens take their precomputed 3-D
    position; later tokens (and every token of a text-only request) ``index + mrope_delta`` in all rows."""
    parts: list[torch.Tensor] = []
    for s in seqs:
        mm = s.req.mm
        start, end = s.start, s.start + s.num_new_tokens
        delta = mm.mrope_delta if mm is not None else 0
        pos = (torch.arange(start, end, dtype=torch.int64) + delta).expand(3, -1).clone()  # (3, n)
        table = mm.mrope_positions if mm is not None else None
        if table is not None and start < table.shape[1]:
            k = min(end, table.shape[1]) - start
            pos[:, :k] = table[:, start:start + k]
        parts.append(pos)
    return torch.cat(parts, dim=1)
