"""Vision features of recently encoded images, so that repeated images and preempted requests do not run
the vision tower again.

Keyed by (image digest, adapter content hash): the features depend on the pixels and, through vision-tower
and projector LoRA, on the adapter of the request (the base model's key has no adapter). Least recently
used entries go first once the cached feature rows exceed the budget (``encoder_cache_size``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

Key = tuple[str, Optional[bytes]]


class EncoderCache:
    def __init__(self, capacity_rows: int) -> None:
        self.capacity_rows = capacity_rows
        self._entries: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self._rows = 0
        self.queries = 0  # images looked up (cumulative)
        self.hits = 0  # images found

    def get(self, key: Key) -> Optional[torch.Tensor]:
        self.queries += 1
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return features

    def put(self, key: Key, features: torch.Tensor) -> None:
        """Keep ``features`` (rows, hidden) for ``key``; an image larger than the whole budget is not kept."""
        if features.shape[0] > self.capacity_rows or key in self._entries:
            return
        while self._rows + features.shape[0] > self.capacity_rows:
            _, old = self._entries.popitem(last=False)
            self._rows -= old.shape[0]
        self._entries[key] = features.clone()  # not a view of the step's whole feature tensor
        self._rows += features.shape[0]

    def __len__(self) -> int:
        return len(self._entries)
