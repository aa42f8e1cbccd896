"""Adapter residency: registered adapters, a host-memory LRU cache, device slots.

Three tiers: *registered* (name -> PEFT folder; validated when registered),
*host* (``max_cpu_loras`` loaded adapters, LRU; evicted ones are re-read from
their folder when needed again) and *device* (``max_loras`` slots in the
stacked wrapper buffers). A slot is pinned while any running request uses it
(reference count); only unpinned slots are evicted, least recently used first.
When every slot is pinned a request simply waits: running requests always
finish or are preempted, which unpins their slots, so waiting never deadlocks.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Callable, Optional

from loraplex.errors import AdapterError
from loraplex.lora.adapter import LoRAAdapter, load_adapter
from loraplex.lora.model_lora import LoRAModel
from loraplex.types import LoRARequest


class LoRAPool:
    def __init__(self, lora_model: LoRAModel, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 loader: Callable[..., LoRAAdapter] = load_adapter) -> None:
        self.lora_model = lora_model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self._load = loader
        self.registered: dict[str, LoRARequest] = {}
        self._host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self._slot_name: list[Optional[str]] = [None] * max_loras
        self._slot_uid: list[int] = [0] * max_loras
        self._refs: list[int] = [0] * max_loras
        self._last_use: list[int] = [0] * max_loras
        self._tick = itertools.count(1)
        self.num_slot_loads = 0  # how many times an adapter was copied into a slot (metrics, tests)

    # ---- registration -------------------------------------------------------------------
    def register(self, req: LoRARequest) -> LoRAAdapter:
        """Validate and cache ``req``; raises :class:`AdapterError`. Registering the same
        name and path again is a no-op; another path under a registered name is an error."""
        old = self.registered.get(req.name)
        if old is not None:
            if old.path != req.path:
                raise AdapterError(f"adapter name {req.name!r} is already registered with path {old.path!r}; "
                                   f"remove it before registering {req.path!r}")
            return self._host_get(req.name)
        adapter = self._load(req.name, req.path, self.lora_model.spec, self.max_lora_rank)
        self.registered[req.name] = req
        self._host_put(adapter)
        return adapter

    def unregister(self, name: str) -> None:
        if name not in self.registered:
            raise AdapterError(f"adapter {name!r} is not registered; registered: {sorted(self.registered)}")
        slot = self.slot_of(name)
        if slot is not None:
            if self._refs[slot] > 0:
                raise AdapterError(f"adapter {name!r} is in use by {self._refs[slot]} running request(s)")
            self._clear_slot(slot)
        self._host.pop(name, None)
        del self.registered[name]

    def is_registered(self, name: str) -> bool:
        return name in self.registered

    # ---- host tier ----------------------------------------------------------------------
    def _host_put(self, adapter: LoRAAdapter) -> None:
        self._host[adapter.name] = adapter
        self._host.move_to_end(adapter.name)
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)

    def _host_get(self, name: str) -> LoRAAdapter:
        adapter = self._host.get(name)
        if adapter is None:  # evicted from host memory: read its folder again
            req = self.registered[name]
            adapter = self._load(req.name, req.path, self.lora_model.spec, self.max_lora_rank)
        self._host_put(adapter)
        return adapter

    @property
    def host_resident(self) -> list[str]:
        return list(self._host)

    # ---- device slots -------------------------------------------------------------------
    def slot_of(self, name: str) -> Optional[int]:
        try:
            return self._slot_name.index(name)
        except ValueError:
            return None

    @property
    def device_resident(self) -> list[Optional[str]]:
        return list(self._slot_name)

    def can_acquire(self, name: str) -> bool:
        return self.slot_of(name) is not None or any(r == 0 for r in self._refs)

    def acquire(self, name: str) -> Optional[int]:
        """Pin a slot holding ``name`` (loading it if needed) and return it, or None
        when every slot is pinned by other adapters. Raises AdapterError if the
        adapter's folder can no longer be read."""
        if name not in self.registered:
            raise AdapterError(f"adapter {name!r} is not registered; registered: {sorted(self.registered)}")
        slot = self.slot_of(name)
        if slot is None:
            free = [s for s in range(self.max_loras) if self._refs[s] == 0]
            if not free:
                return None
            empty = [s for s in free if self._slot_name[s] is None]
            slot = empty[0] if empty else min(free, key=lambda s: self._last_use[s])
            adapter = self._host_get(name)
            self.lora_model.set_slot(slot, adapter)
            self._slot_name[slot] = name
            self._slot_uid[slot] = adapter.uid
            self.num_slot_loads += 1
        self._refs[slot] += 1
        self._last_use[slot] = next(self._tick)
        return slot

    def release(self, slot: int) -> None:
        if self._refs[slot] <= 0:
            raise RuntimeError(f"LoRA slot {slot} released more often than acquired")
        self._refs[slot] -= 1

    def _clear_slot(self, slot: int) -> None:
        self.lora_model.set_slot(slot, None)
        self._slot_name[slot] = None
        self._slot_uid[slot] = 0
