"""Adapter residency: registered adapters, a host-memory LRU cache, device slots.

Three tiers: *registered* (name -> the current :class:`LoRAAdapter` version, validated
when registered), *host* (``max_cpu_loras`` loaded adapters, LRU; an evicted one is
re-read from its folder when a new request needs it) and *device* (slots in the stacked
wrapper buffers: the memory of ``max_loras`` adapters of ``max_lora_rank``; with the Triton
backend an adapter takes the pages of its own rank, so more adapters of lower rank fit, see
:class:`~loraplex.lora.backends.base.PageTable`).

A request resolves its adapter once, when it is added, and keeps that version (the
object, identified by ``uid``) until it finishes. So an adapter that is reloaded or
unloaded meanwhile changes nothing for requests already in flight: they finish with
the weights they started with, and the old version's memory is released when the
last of them finishes. New requests see the change at once.

A slot is pinned while any running request uses it (reference count); only unpinned
slots are evicted, stale versions first, then least recently used, as many as the
incoming adapter's rank needs. When every slot is
pinned a request waits: running requests always finish or are preempted, which unpins
their slots, so waiting never deadlocks.

A registration may carry a ``root`` folder: then every read of the adapter's folder, the
first and every re-read after host eviction, must find each file resolving inside it
(see :func:`load_adapter`). Names obey :func:`validate_adapter_name`.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from loraplex import envs
from loraplex.errors import AdapterError
from loraplex.lora.adapter import LoRAAdapter, load_adapter
from loraplex.lora.model_lora import LoRAModel
from loraplex.types import LoRARequest

MAX_ADAPTER_NAME_LEN = 256
# First character a letter or digit, then letters, digits, '.', '_', '-', '/'. ':' is reserved for the server's
# ``base:adapter`` model syntax and '@' for ``name@version`` pinning. ASCII only.
ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


def validate_adapter_name(name: str) -> None:
    """Raise :class:`AdapterError` unless ``name`` is a valid adapter name: 1 to 256 characters, the first an
    ASCII letter or digit, the rest ASCII letters, digits, ``.``, ``_``, ``-`` or ``/`` (so ``org/name-v1.2_x``
    is valid). ``:`` is reserved for the server's ``base:adapter`` syntax and ``@`` for ``name@version``."""
    ok = isinstance(name, str) and len(name) <= MAX_ADAPTER_NAME_LEN and ADAPTER_NAME_RE.fullmatch(name)
    if not ok:
        shown = name if not isinstance(name, str) or len(name) <= 40 else name[:40] + "..."
        size = f" ({len(name)} characters)" if isinstance(name, str) else ""
        raise AdapterError(f"invalid adapter name {shown!r}{size}: a name has at most {MAX_ADAPTER_NAME_LEN} "
                           "characters, starts with a letter or digit and continues with letters, digits, "
                           "'.', '_', '-' or '/' (':' and '@' are reserved)")


@dataclass(frozen=True)
class _Current:
    """What identifies a registered name's current version while its weights may be out of memory."""

    uid: int
    vocab_size: Optional[int]  # when it adds tokens
    content_hash: bytes
    source_stat: tuple = ()  # its files as read (a re-read of the same files keeps the hash: load_adapter)

    @property
    def version(self) -> str:
        return self.content_hash.hex()[:12]  # as LoRAAdapter.version


KEEP_VERSIONS = 2  # earlier versions of a name kept in memory after a reload, for name@version requests


class LoRAPool:
    def __init__(self, lora_model: LoRAModel, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 loader: Callable[..., LoRAAdapter] = load_adapter, resolvers: Sequence[Any] = ()) -> None:
        self.resolvers = list(resolvers)  # loraplex.lora.resolvers: where unregistered adapters are looked for
        self.lora_model = lora_model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self._load = loader
        self.registered: dict[str, LoRARequest] = {}
        self._current: dict[str, _Current] = {}  # name -> what identifies its current version
        self._root: dict[str, Optional[str]] = {}  # name -> the folder its files must resolve inside, or None
        self._versions: dict[str, OrderedDict[str, LoRAAdapter]] = {}  # name -> earlier versions kept, oldest first
        self._pinned: dict[str, int] = {}  # name -> the device slot it holds for good
        self._host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.num_slots = lora_model.num_slots  # max_loras, or more when slots take their own rank (pages)
        self._slot: list[Optional[LoRAAdapter]] = [None] * self.num_slots
        self._slot_of_uid: dict[int, int] = {}  # adapter uid -> the slot holding it (lookups run per admission)
        self._refs: list[int] = [0] * self.num_slots
        self._last_use: list[int] = [0] * self.num_slots
        self._tick = itertools.count(1)
        self.num_slot_loads = 0  # how many times an adapter was copied into a slot (metrics, tests)
        # slot loads started plus those seen completed: a step that admitted nothing retries while it moves
        self.load_progress = 0
        self._loads: dict[int, Any] = {}  # slot -> CUDA event of its upload still in flight (side stream)
        # slot -> CUDA event recorded after the last step that read it (mark_used): an upload that overwrites
        # the slot's memory waits for that step only, not for every step queued
        self._read_by: dict[int, Any] = {}
        self._load_started: dict[int, float] = {}  # slot -> when its upload started (time.monotonic)
        # Admit a request whose adapter is still being copied into its slot: the step that runs it makes the
        # compute stream wait for the copy on the device (``load_event``; the host never waits), where by
        # default the request waits until the host sees the copy done, one or two steps later (with async
        # scheduling the host schedules a step while the one before it still runs). LORAPLEX_ADMIT_LOADING=1:
        # at once, so the step that starts the copy waits for it (a few MB through the copy engine); =next:
        # from the next scheduling round, when the copy has usually finished beside the step before and the
        # wait costs nothing. Both opt-in: on an H200 (1,000 adapters) the default already held a miss to one
        # round at p99 and at most, and =next was within one run's spread (docs/benchmarks.md, 2026-12-01).
        mode = envs.LORAPLEX_ADMIT_LOADING
        self.admit_loading = mode == "1"
        self.admit_next_round = mode == "next"
        self._round = 0  # scheduling rounds (new_round), to tell a copy started in an earlier round
        self._load_round: dict[int, int] = {}  # slot -> the round its upload started in
        # (adapter, event, seconds) since the last drain_events(): "hit" (admitted with its adapter in a slot),
        # "load" (an upload into a slot completed, seconds since it started), "read" (re-read from disk after
        # host eviction, seconds). The server turns them into per-adapter metrics; bounded for engines that
        # nobody drains (offline generation).
        self._events: deque[tuple[str, str, float]] = deque(maxlen=10_000)

    # ---- registration -------------------------------------------------------------------
    def resolve(self, name: str) -> LoRARequest:
        """Find unregistered adapter ``name`` with the resolvers, in order (fetching it into the local disk
        cache when remote; safe off the engine thread); AdapterError when none has it."""
        validate_adapter_name(name)
        if not self.resolvers:
            raise AdapterError(f"unknown adapter {name!r}; registered adapters: {sorted(self.registered)}")
        for r in self.resolvers:
            try:
                path = r.fetch(name)
            except AdapterError:
                raise
            except Exception as e:  # network, permissions, a store that is down
                raise AdapterError(f"adapter {name!r}: resolver {r.uri!r} failed: {type(e).__name__}: {e}") from e
            if path is not None:
                return LoRARequest(name, path)
        raise AdapterError(f"unknown adapter {name!r}: not registered, and no resolver has it "
                           f"({', '.join(r.uri for r in self.resolvers)})")

    def read(self, req: LoRARequest, root: Optional[str] = None,
             known: Optional[tuple[tuple, bytes]] = None) -> LoRAAdapter:
        """Read and validate ``req``'s folder without registering it (safe off the engine thread).
        ``root``: every file read must resolve inside it (``AdapterError`` otherwise). ``known``: what an
        earlier read of the same folder saw (see ``load_adapter``)."""
        validate_adapter_name(req.name)
        kw = {"known": known} if known is not None else {}  # a custom loader need not take it
        adapter = self._load(req.name, req.path, self.lora_model.spec, self.max_lora_rank, root=root, **kw)
        if adapter.vocab_size is not None:
            from loraplex.multimodal.processing import PLACEHOLDER_BASE

            if getattr(self.lora_model.model, "supports_images", False) and adapter.vocab_size > PLACEHOLDER_BASE:
                raise AdapterError(f"adapter {req.name!r} ({req.path}): a vocabulary of {adapter.vocab_size} tokens "
                                   f"reaches the image placeholder ids of a vision-language model (from "
                                   f"{PLACEHOLDER_BASE})")
            from loraplex.tokenizer import load_tokenizer

            try:
                adapter.tokenizer = load_tokenizer(req.path)
            except Exception as e:
                raise AdapterError(f"adapter {req.name!r} ({req.path}): cannot load its tokenizer: {e}") from e
            if len(adapter.tokenizer) > adapter.vocab_size:
                raise AdapterError(f"adapter {req.name!r} ({req.path}): its tokenizer has {len(adapter.tokenizer)} "
                                   f"tokens, more than the {adapter.vocab_size} rows of its embedding and head")
        self.lora_model.stage(adapter)  # pinned, in the slots' dtype (CUDA): slot uploads never stall
        return adapter

    def register(self, req: LoRARequest, reload: bool = False, adapter: Optional[LoRAAdapter] = None,
                 root: Optional[str] = None) -> LoRAAdapter:
        """Validate and cache ``req``; raises :class:`AdapterError`.

        Registering a name again with the same path is a no-op (the first registration's
        ``root`` stays); with another path it is an error, unless ``reload`` is set: then the
        folder is read again and becomes the name's current version (requests in flight keep
        the version they started with). ``adapter``: the result of :meth:`read` for ``req``
        with the same ``root``, when it was read beforehand. ``root``: remembered for the
        name, so every later re-read of its folder (after host eviction) is confined to it too."""
        validate_adapter_name(req.name)
        old = self.registered.get(req.name)
        if old is not None and not reload:
            if old.path != req.path:
                raise AdapterError(f"adapter name {req.name!r} is already registered with path {old.path!r}; "
                                   f"unload it or reload it explicitly to use {req.path!r}")
            return self.get(req.name)
        if adapter is None:
            adapter = self.read(req, root=root)
        if old is not None:  # a reload: keep the version it replaces for name@version requests
            previous = self._in_memory(req.name)
            if previous is not None and previous.version != adapter.version:
                kept = self._versions.setdefault(req.name, OrderedDict())
                kept[previous.version] = previous
                while len(kept) > KEEP_VERSIONS:
                    kept.popitem(last=False)
        was_pinned = self.unpin(req.name)
        self.registered[req.name] = req
        self._set_current(adapter)
        self._root[req.name] = root
        self._host_put(adapter)
        if was_pinned:
            self.pin(req.name)
        return adapter

    def unregister(self, name: str) -> None:
        """Forget ``name`` for new requests. Requests in flight finish with their version;
        its slot is freed for reuse once they are done."""
        if name not in self.registered:
            raise AdapterError(f"adapter {name!r} is not registered; registered: {sorted(self.registered)}")
        self.unpin(name)
        del self.registered[name]
        del self._current[name]
        self._versions.pop(name, None)
        del self._root[name]
        self._host.pop(name, None)
        for s, a in enumerate(self._slot):
            if a is not None and a.name == name and self._refs[s] == 0:
                self._clear_slot(s)

    def _in_memory(self, name: str) -> Optional[LoRAAdapter]:
        """The current version of ``name`` if it is in host memory or a slot (no read), else None."""
        adapter = self._host.get(name)
        if adapter is None:
            current = self._current.get(name)
            slot = self._slot_of_uid.get(current.uid) if current else None
            adapter = self._slot[slot] if slot is not None else None
        return adapter

    def _set_current(self, adapter: LoRAAdapter) -> None:
        self._current[adapter.name] = _Current(adapter.uid, adapter.vocab_size, adapter.content_hash,
                                               adapter.source_stat)

    def needs_read(self, name: str) -> bool:
        """Whether a request for registered ``name`` would have to re-read its folder (evicted from host memory
        and from every slot): the server does that read off its step loop first (:meth:`adopt`)."""
        return name in self.registered and self._in_memory(name) is None

    def read_current(self, name: str) -> tuple[LoRARequest, LoRAAdapter, float]:
        """Re-read ``name``'s folder (safe off the engine thread): (its registration, the adapter, seconds)."""
        req, root = self.registered[name], self._root[name]
        current = self._current.get(name)
        known = (current.source_stat, current.content_hash) if current is not None and current.source_stat else None
        t0 = time.monotonic()
        return req, self.read(req, root=root, known=known), time.monotonic() - t0

    def adopt(self, req: LoRARequest, adapter: LoRAAdapter, seconds: float) -> None:
        """Take a re-read of :meth:`read_current` as ``req.name``'s current version, unless the name was
        unloaded or re-registered meanwhile."""
        if self.registered.get(req.name) is not req or self._in_memory(req.name) is not None:
            return
        self._set_current(adapter)
        self._host_put(adapter)
        self._events.append((req.name, "read", seconds))

    def version_of(self, name: str) -> Optional[str]:
        current = self._current.get(name)
        return current.version if current else None

    def versions_of(self, name: str) -> list[str]:
        """Versions of ``name`` that requests may name: the current one, then those kept, newest first."""
        if name not in self._current:
            return []
        return [self._current[name].version] + list(reversed(self._versions.get(name, {})))

    def get_version(self, name: str, version: str) -> LoRAAdapter:
        """``name@version``: the current version when it is that one, else a kept earlier version."""
        if name not in self.registered:
            raise AdapterError(f"adapter {name!r} is not registered; registered: {sorted(self.registered)}")
        if self._current[name].version == version:
            return self.get(name)
        kept = self._versions.get(name, {}).get(version)
        if kept is None:
            raise AdapterError(f"adapter {name!r} has no version {version!r}; versions: {self.versions_of(name)}")
        return kept

    # ---- pinning ------------------------------------------------------------------------------
    @property
    def pinned(self) -> list[str]:
        return sorted(self._pinned)

    def pin(self, name: str) -> None:
        """Keep ``name``'s current version in a device slot and in host memory until :meth:`unpin` (a reload
        moves the pin to the new version). At least one slot always stays for unpinned adapters."""
        if name in self._pinned:
            return
        adapter = self.get(name)
        pages = self.lora_model.pages
        held = sum(pages.pages_needed(self._slot[s].max_rank) for s in self._pinned.values() if self._slot[s])
        if held + pages.pages_needed(adapter.max_rank) > pages.num_pages - pages.pages_needed(self.max_lora_rank):
            raise AdapterError(f"cannot pin adapter {name!r}: with it the pinned adapters ({len(self._pinned)} now) "
                               "would take the device memory that must stay for the other adapters (room for one "
                               f"of max_lora_rank={self.max_lora_rank}, out of max_loras={self.max_loras})")
        slot = self.acquire(adapter)
        while slot is None and self.loading:
            self.wait_for_loads()
            slot = self.acquire(adapter)
        if slot is None:
            raise AdapterError(f"cannot pin adapter {name!r} now: every device slot is in use by running requests")
        self._pinned[name] = slot

    def unpin(self, name: str) -> bool:
        """Release ``name``'s pin; returns whether it was pinned."""
        slot = self._pinned.pop(name, None)
        if slot is not None:
            self.release(slot)
        return slot is not None

    def vocab_size_of(self, name: str) -> Optional[int]:
        """The vocabulary size of ``name``'s current version when it adds tokens, else None."""
        current = self._current.get(name)
        return current.vocab_size if current else None

    def is_registered(self, name: str) -> bool:
        return name in self.registered

    def get(self, name: str) -> LoRAAdapter:
        """The current version of ``name`` (re-read from its folder if evicted from host memory)."""
        if name not in self.registered:
            raise AdapterError(f"adapter {name!r} is not registered; registered: {sorted(self.registered)}")
        adapter = self._in_memory(name)  # host memory, or a device slot holding the current version
        if adapter is None:
            _, adapter, seconds = self.read_current(name)
            self._set_current(adapter)
            self._events.append((name, "read", seconds))
        self._host_put(adapter)
        return adapter

    # ---- host tier ----------------------------------------------------------------------
    def _host_put(self, adapter: LoRAAdapter) -> None:
        self._host[adapter.name] = adapter
        self._host.move_to_end(adapter.name)
        while len(self._host) > self.max_cpu_loras:  # least recently used first; pinned adapters stay
            victim = next((n for n in self._host if n not in self._pinned), None)
            if victim is None:
                break
            del self._host[victim]

    @property
    def host_resident(self) -> list[str]:
        return list(self._host)

    # ---- device slots -------------------------------------------------------------------
    def _is_current(self, adapter: LoRAAdapter) -> bool:
        current = self._current.get(adapter.name)
        return current is not None and current.uid == adapter.uid

    def slot_of(self, adapter: LoRAAdapter) -> Optional[int]:
        return self._slot_of_uid.get(adapter.uid)

    @property
    def device_resident(self) -> list[Optional[str]]:
        return [a.name if a is not None else None for a in self._slot]

    def slot_refcount(self, slot: int) -> int:
        return self._refs[slot]

    def _ready(self, slot: int) -> bool:
        """Whether ``slot``'s upload (if any) has completed on the device."""
        done = self._loads.get(slot)
        if done is None:
            return True
        if not done.query():
            return False
        del self._loads[slot]
        self._load_round.pop(slot, None)
        self._loaded(slot)
        return True

    def _loaded(self, slot: int) -> None:
        self.load_progress += 1
        started = self._load_started.pop(slot, None)
        adapter = self._slot[slot]
        if started is not None and adapter is not None:
            self._events.append((adapter.name, "load", time.monotonic() - started))

    def drain_events(self) -> list[tuple[str, str, float]]:
        events = list(self._events)
        self._events.clear()
        return events

    @property
    def loading(self) -> bool:
        """Whether an adapter is still being copied into a slot."""
        return any(not self._ready(s) for s in list(self._loads))

    def wait_for_loads(self) -> None:
        """Block until every slot upload in flight has completed (when nothing else can run)."""
        for slot, done in list(self._loads.items()):
            done.synchronize()
            self._loaded(slot)
        self._loads.clear()
        self._load_round.clear()

    def acquire(self, adapter: LoRAAdapter) -> Optional[int]:
        """Pin a slot holding ``adapter`` and return it; or start copying ``adapter`` into a free slot
        (CUDA: on a side stream) and return None until the copy has completed; None too when every slot is
        pinned by other adapters. A request given None waits; the others go on."""
        slot = self.slot_of(adapter)
        hit = slot is not None and slot not in self._loads  # resident, no copy in flight
        if slot is None:
            free = [s for s in range(self.num_slots) if self._refs[s] == 0 and s not in self._loads]
            if not free:
                return None
            # empty slots first, then stale versions, then the least recently used
            order = sorted(free, key=lambda s: (self._slot[s] is not None,
                                                self._slot[s] is not None and self._is_current(self._slot[s]),
                                                self._last_use[s]))
            slot = order[0]
            # evict in that order until the adapter's rank fits in the freed memory (pages); none if it cannot
            freed = [s for s in order[:1] if self._slot[s] is not None]
            for s in order[1:]:
                if self._slot[s] is None:  # empty: frees nothing (hundreds of them in paged pools)
                    continue
                if self.lora_model.fits(adapter, freed):
                    break
                freed.append(s)
            if not self.lora_model.fits(adapter, freed):
                return None
            after = self._readers(freed + [slot])  # before the clears: they take the same events
            for s in freed:
                if s != slot:
                    self._clear_slot(s, after)
            t0 = time.monotonic()
            done = self.lora_model.set_slot(slot, adapter, after)
            if self._slot[slot] is not None:  # evicted by the overwrite
                self._slot_of_uid.pop(self._slot[slot].uid, None)
            self._slot[slot] = adapter
            self._slot_of_uid[adapter.uid] = slot
            self._last_use[slot] = next(self._tick)
            self.num_slot_loads += 1
            self.load_progress += 1
            self._load_started[slot] = t0
            if done is not None:
                self._loads[slot] = done
                self._load_round[slot] = self._round
            else:
                self._loaded(slot)
        if not (self._ready(slot) or self.admit_loading
                or (self.admit_next_round and self._load_round[slot] < self._round)):
            return None
        if hit:
            self._events.append((adapter.name, "hit", 0.0))  # admitted without a copy
        self._refs[slot] += 1
        self._last_use[slot] = next(self._tick)
        return slot

    def load_event(self, slot: int) -> Optional[Any]:
        """The CUDA event of ``slot``'s upload while it may still be in flight (None once it was seen done): a
        step that reads the slot waits for it on the device (``admit_loading``)."""
        return self._loads.get(slot)

    def drain_set(self, adapter: LoRAAdapter) -> set[int]:
        """Busy slots that, once their running requests finish, free the memory ``adapter`` needs: the fewest
        running requests first, then the least recently used; pinned slots never. Empty when ``adapter`` has
        a slot, or when no such set exists (every other slot pinned). The scheduler stops adding requests to
        these slots while ``adapter`` starves, and only to these: the rest of the batch goes on."""
        if self.slot_of(adapter) is not None:
            return set()
        pinned = set(self._pinned.values())
        idle = [s for s in range(self.num_slots) if self._refs[s] == 0 and s not in self._loads
                and self._slot[s] is not None]
        busy = sorted((s for s in range(self.num_slots) if self._refs[s] > 0 and s not in pinned),
                      key=lambda s: (self._refs[s], self._last_use[s]))
        chosen: list[int] = []
        for s in busy:
            if (idle or chosen) and self.lora_model.fits(adapter, idle + chosen):
                break
            chosen.append(s)
        return set(chosen) if (idle or chosen) and self.lora_model.fits(adapter, idle + chosen) else set()

    @property
    def waits_on_device(self) -> bool:
        """Whether a step may read a slot whose copy the host has not seen complete (``load_event``)."""
        return self.admit_loading or self.admit_next_round

    def new_round(self) -> None:
        """A scheduling round begins (the scheduler, once per schedule)."""
        self._round += 1

    def poll(self) -> None:
        """Note the slot uploads that have completed (their load latency is taken here: once a step)."""
        for s in list(self._loads):
            self._ready(s)

    def release(self, slot: int) -> None:
        if self._refs[slot] <= 0:
            raise RuntimeError(f"LoRA slot {slot} released more often than acquired")
        self._refs[slot] -= 1
        adapter = self._slot[slot]
        if self._refs[slot] == 0 and adapter is not None and not self._is_current(adapter):
            self._clear_slot(slot)  # a stale version nobody uses: free its slot now

    def mark_used(self, slots: Iterable[int], event: Any) -> None:
        """A step that reads ``slots`` was queued; ``event`` (CUDA) completes after it."""
        for s in slots:
            self._read_by[s] = event

    def _readers(self, slots: Iterable[int]) -> list:
        """The events after which ``slots``' memory may be overwritten (each slot's last reading step)."""
        return [self._read_by.pop(s) for s in dict.fromkeys(slots) if s in self._read_by]

    def _clear_slot(self, slot: int, after: Optional[list] = None) -> None:
        self.lora_model.set_slot(slot, None, self._readers([slot]) if after is None else after)
        old = self._slot[slot]
        if old is not None:
            self._slot_of_uid.pop(old.uid, None)
        self._slot[slot] = None
