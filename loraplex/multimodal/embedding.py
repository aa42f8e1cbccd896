"""Merge vision features into token embeddings.

The routine works the same on a plain ``VocabParallelEmbedding`` and on a LoRA-wrapped one: it reads
``num_embeddings`` and calls the module, both of which a wrapper forwards to (or adds LoRA to), and it
never reaches past the module it is given.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from loraplex.multimodal.processing import PLACEHOLDER_BASE


def embed_multimodal(embed_tokens: nn.Module, input_ids: torch.Tensor,
                     image_features: Optional[torch.Tensor]) -> torch.Tensor:
    """``(T,)`` ids -> ``(T, hidden)`` embeddings with ``image_features`` at the image positions.

    Image positions are those holding a placeholder id (``>= max(PLACEHOLDER_BASE, num_embeddings)``, see
    ``processing.placeholder_id``); ids between ``num_embeddings`` and that bound are tokens an adapter added
    to its vocabulary, which its wrapped embedding looks up in its own table. Placeholder ids become 0 and
    every id is embedded (with the embedding's LoRA where it is wrapped), then the rows at image positions
    are overwritten, in order, by ``image_features`` ``(num_image_positions, hidden)``: text rows get the
    adapter's delta, image rows exactly the vision features. With ``image_features`` None the ids must hold
    no placeholders (the engine never prefills an image without its features).
    """
    bound = max(PLACEHOLDER_BASE, embed_tokens.num_embeddings)
    is_image = input_ids >= bound
    h = embed_tokens(input_ids.masked_fill(is_image, 0))  # (T, hidden)
    if image_features is None:
        return h
    where = is_image.nonzero().squeeze(1)  # (num_image_positions,)
    if where.numel() != image_features.shape[0]:
        raise ValueError(f"{where.numel()} image placeholder positions but {image_features.shape[0]} vision "
                         "feature rows")
    return h.index_copy(0, where, image_features.to(h.dtype))
