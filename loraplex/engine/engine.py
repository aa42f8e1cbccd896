"""The engine: add requests, step the model, collect outputs.

``LLMEngine`` owns the model runner, the scheduler, the adapter pool and the
sampler. ``step()`` runs one batch (prefill chunks and decodes together) and
returns the outputs of every request that got a token (a prompt chunk that ends
inside its prompt gives none); finished ones have ``finished=True``.
Bad requests are refused in ``add_request`` with :class:`InvalidRequestError`
(or :class:`AdapterError` when the adapter's folder cannot be read again); a
request that was accepted runs to the end with the adapter version it started with.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from loraplex import envs
from loraplex.attention.registry import get_attention_backend
from loraplex.config import EngineConfig
from loraplex.distributed.parallel_state import broadcast_from_first, get_tp_size, min_over_ranks
from loraplex.engine.kv_cache import BlockAllocator
from loraplex.engine.model_runner import ModelRunner, resolve_dtype
from loraplex.engine.request import Request, Status
from loraplex.engine.sampler import (PendingSample, Sampler, apply_min_tokens, compute_logprobs, make_generator,
                                     prompt_logprobs)
from loraplex.engine.scheduler import ScheduledSeq, Scheduler
from loraplex.errors import AdapterError, InvalidRequestError
from loraplex.lora.backends.base import get_backend
from loraplex.lora.model_lora import LoRAModel
from loraplex.lora.pool import LoRAPool
from loraplex.models.loader import load_hf_config, load_model
from loraplex.multimodal.processing import MultiModalProcessor
from loraplex.tokenizer import load_tokenizer
from loraplex.transfer import to_device
from loraplex.types import LoRARequest, RequestOutput, SamplingParams

logger = logging.getLogger("loraplex")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def _eos_ids(path: str, hf_config: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()

    def add(v: Any) -> None:
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)

    add(getattr(hf_config, "eos_token_id", None))
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        from transformers import GenerationConfig

        add(GenerationConfig.from_pretrained(path).eos_token_id)
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return frozenset(ids)


@dataclass
class _Launched:
    """A step queued on the device whose results the host has not applied yet."""

    seqs: list[ScheduledSeq]
    reqs: list[Request]  # the requests that sample, in the order of the sampled rows
    row_of: dict[str, int]  # request id -> its row among the sampled tokens
    logits_spans: list[tuple[int, int]]
    logits: torch.Tensor  # kept for prompt logprobs (such steps are applied at once)
    prompt_lp: list[bool]
    sample: Optional[PendingSample]
    sync: bool  # apply at once (prompt logprobs read this step's logits)


def _shutdown_at_exit(tp: Any, engine_ref: "weakref.ref") -> None:
    """Interpreter exit: stop the tensor-parallel ranks of an engine that was not shut down (its graphs first,
    when the engine still exists: NCCL keeps a communicator that captured graphs reference)."""
    engine = engine_ref()
    if engine is not None:
        engine.shutdown()
    elif not tp.closed:
        # the engine is unreachable, but its graphs may still exist in garbage that only the cycle collector
        # frees (a program that dropped its LLM without shutting it down): free them before the group goes
        import gc

        gc.collect()
        tp.close()


# One tensor-parallel group per process: layers read its size when they are built (a process that joined a group
# itself builds its shard) and their collectives use it
_SHARED_GROUP = ("this process's tensor-parallel group now has {size} ranks, not the size this engine was built "
                 "for (another engine started or stopped a group): its collectives would go to that group and "
                 "hang. Shut that engine down first (llm.engine.shutdown()), or run this one in its own process")


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model_config
        self.device = _resolve_device(config.device_config.device)
        if self.device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1:
            # On the GPU the host runs small tensors and kernel launches: a pool of intra-op threads per
            # process only contends for cores (measured on an H200: 845-895 -> 1,113 tokens/s served, 1,103-1,117 ->
            # 1,229 offline, docs/benchmarks.md). Set OMP_NUM_THREADS to choose otherwise.
            logger.info("loraplex: torch intra-op threads %d -> 1 on %s (set OMP_NUM_THREADS to override)",
                        torch.get_num_threads(), self.device)
            torch.set_num_threads(1)
        self.hf_config = load_hf_config(mc.model)
        self.dtype = resolve_dtype(mc.dtype, self.hf_config, self.device)
        self.tokenizer = load_tokenizer(mc.tokenizer or mc.model)
        self.eos_token_ids = _eos_ids(mc.model, self.hf_config, self.tokenizer)
        text_config = self.hf_config.get_text_config()  # the config itself for text-only models
        max_pos = int(getattr(text_config, "max_position_embeddings", 0) or 0) or 4096
        if mc.max_model_len is not None and mc.max_model_len > max_pos:
            raise ValueError(f"max_model_len={mc.max_model_len} exceeds the model's "
                             f"max_position_embeddings={max_pos}")
        self.max_model_len = mc.max_model_len or max_pos
        self.vocab_size = int(text_config.vocab_size)

        # Tensor parallelism: rank 0 (this engine, unless a worker already joined a group) starts the others
        # before any layer is built, since layers read their rank and the group size when they are made.
        self._tp = None
        tp = config.parallel_config.tensor_parallel_size
        if tp > 1 and get_tp_size() == 1:
            from loraplex.distributed.tp_engine import TensorParallelGroup

            self._tp = TensorParallelGroup(tp, config.parallel_config.distributed_timeout)
            if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # started by torchrun: join its group
                if self._tp.join_env(config) > 0:
                    from loraplex.distributed.tp_engine import serve_steps

                    serve_steps(config, int(os.environ["RANK"]), self._tp.control)
                    # Rank 0 has stopped: this rank's program ends here. Tear the group down first and skip the
                    # interpreter's teardown, whose destruction of gloo's threads can abort the process.
                    from loraplex.distributed.tp_engine import destroy_group

                    destroy_group()
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(0)
            else:
                self._tp.start(config)
            # at exit: the worker ranks stop; the engine itself is held weakly (it may be freed long before)
            atexit.register(_shutdown_at_exit, self._tp, weakref.ref(self))
        self._tp_finished: list[str] = []
        self._tp_size = get_tp_size()  # the group the layers are built for: every step checks it is still this one
        torch.manual_seed(mc.seed)
        model = load_model(mc.model, self.hf_config, self.dtype, self.device, mc.load_format)
        lc = config.lora_config
        self.pool: Optional[LoRAPool] = None
        lora_backend = None
        if lc.enable_lora:
            lora_backend = get_backend(lc.lora_backend, self.device)
            lora_model = LoRAModel(model, lc.max_loras, lc.max_lora_rank, lora_backend)
            from loraplex.lora.resolvers import make_resolvers

            self.pool = LoRAPool(lora_model, lc.max_loras, lc.max_lora_rank, lc.cpu_capacity,
                                 resolvers=make_resolvers(lc.lora_resolvers, lc.lora_cache_dir))
            if self._tp is not None:
                lora_model.observer = self._tp.record_slot
        # enable_lora_merging: the adapter of steps that all use it merged into the weights (lora/merge.py)
        self.merger: Optional[Any] = None
        if lc.enable_lora_merging and self.pool is not None:  # EngineConfig checked: LoRA on; every rank keeps one
            from loraplex.lora.merge import LoRAMerger

            self.merger = LoRAMerger(self.pool.lora_model)
            logger.info("loraplex: LoRA merging on: %.2f GiB kept for the linear layers' base weights",
                        self.merger.memory_bytes / 2**30)
        self.model = model
        self.mm_processor: Optional[MultiModalProcessor] = None
        if getattr(model, "supports_images", False):
            self.mm_processor = MultiModalProcessor(mc.model, model, mc.max_image_pixels)
            if config.cache_config.encoder_cache_size > 0:
                from loraplex.multimodal.encoder_cache import EncoderCache

                model.encoder_cache = EncoderCache(config.cache_config.encoder_cache_size)

        sc = config.scheduler_config
        if sc.enable_chunked_prefill:  # vLLM's default budget with chunked prefill (SchedulerConfig checks >= seqs)
            self.max_num_batched_tokens = sc.max_num_batched_tokens or max(2048, sc.max_num_seqs)
        else:
            self.max_num_batched_tokens = sc.max_num_batched_tokens or max(self.max_model_len, 2048)
            if self.max_num_batched_tokens < self.max_model_len:
                raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                                 f"max_model_len ({self.max_model_len}) without chunked prefill: prompts are "
                                 "prefilled in one step (enable_chunked_prefill=True splits them)")
        cc = config.cache_config
        from loraplex.kernels.common import CompileWatch

        CompileWatch.pause()  # start-up compiles what steps need; compiles count again once it is done
        graphs, lora_kernels = self._graph_plan(lora_backend)
        # On CUDA the KV cache gets the memory a profiled step leaves (item 7 of issue 9). Under tensor
        # parallelism every rank runs this constructor, so the profile's dummy steps (and their collectives),
        # the warm-up and the graph captures below happen in the same order on all of them, and the block count
        # is the smallest any rank can hold (_num_kv_blocks).
        profile = self.device.type == "cuda" and cc.num_kv_blocks is None
        self.memory_profile: Optional[dict[str, int]] = None  # what the profile measured, when one ran
        self.runner = ModelRunner(model, config, self.device, self.dtype,
                                  0 if profile else self._num_kv_blocks(model, sc.max_num_seqs), self.max_model_len,
                                  self.max_num_batched_tokens)
        if self.pool is not None and get_tp_size() > 1:  # DoRA scales summed over the ranks, before their step
            self.runner.before_step = self.pool.lora_model.finish_pending
        if profile:
            self.runner.bind_kv_cache(self._profiled_kv_blocks(model, sc.max_num_seqs, graphs))
        num_blocks = self.runner.num_blocks
        if graphs:
            self.runner.capture_graphs(lora=lora_kernels, capture=self.device.type == "cuda")
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            self.runner.warm_up(lora=self.pool is not None)
            if self.pool is not None:
                self.pool.lora_model.warm_up()  # the kernels of batched adapter loads
            logger.info("loraplex: eager step kernels warmed up in %.1f s", time.perf_counter() - t0)
            CompileWatch.start()
        self.allocator = BlockAllocator(num_blocks, cc.block_size, enable_caching=cc.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, self.pool, sc.max_num_seqs, self.max_num_batched_tokens,
                                   sc.enable_chunked_prefill, sc.long_prefill_token_threshold)
        self.sampler = Sampler(self.vocab_size, mc.seed)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        # What step() returns for the requests it touched: RequestOutput snapshots ("snapshot"), RequestDelta
        # objects ("delta": the server's engine process), or snapshots of finished requests only ("final":
        # LLM.generate, which would otherwise copy every sequence's tokens every step)
        self.output_kind = "snapshot"
        # Host time of the last step: its wall time less the wait for the device (the time the GPU could be
        # idle for want of the host's work); exported by the server as loraplex_engine_step_host_seconds.
        self.last_step_host_seconds = 0.0
        # LORAPLEX_STEP_TRACE: one JSON line a step (what it launched, how long the call took), for telling what
        # a load's slow steps hold; _launched_kind is the kind of forward the last launch ran.
        self._trace = None
        self._launched_kind, self._traced_seqs = "", []
        trace_path = envs.LORAPLEX_STEP_TRACE
        if trace_path:
            try:
                self._trace = open(trace_path, "a", buffering=1)  # a line at a time: readable while it runs
            except OSError as e:
                raise ValueError(f"LORAPLEX_STEP_TRACE={trace_path!r}: cannot open it for appending: {e}") from e
            self._trace_t0, self._trace_unix0 = time.perf_counter(), time.time()
        # Async scheduling: a step's results are applied during the next step, after it is queued. Under tensor
        # parallelism rank 0 broadcasts each step's sampled tokens, which the other ranks' next step reads.
        self.async_scheduling = mc.async_scheduling if mc.async_scheduling is not None else self.device.type == "cuda"
        self._in_flight: Optional[_Launched] = None
        logger.info("loraplex engine: %s on %s (%s), %d KV blocks of %d tokens", mc.model, self.device,
                    self.dtype, num_blocks, cc.block_size)

    # ---- setup ----------------------------------------------------------------------------
    def _graph_plan(self, lora_backend: Any) -> tuple[bool, bool]:
        """(capture CUDA graphs?, with the Triton LoRA kernels inside?), with the reason logged when not. On a
        CPU, ``LORAPLEX_EMULATE_CUDA_GRAPHS=1`` (tests) sets up the graphs' buffers and runs graph steps eagerly
        over them (:meth:`ModelRunner.capture_graphs` with ``capture=False``), in every rank's process."""
        mc = self.config.model_config
        emulate = self.device.type == "cpu" and envs.LORAPLEX_EMULATE_CUDA_GRAPHS
        if (self.device.type != "cuda" and not emulate) or mc.enforce_eager:
            return False, False
        backend = get_attention_backend(self.config.cache_config.attention_backend, self.device).name
        if backend != "triton":
            logger.info("loraplex: no CUDA graphs: they need the triton attention backend, not %r", backend)
            return False, False
        lora_kernels = lora_backend is not None and lora_backend.name == "triton"
        if lora_backend is not None and not lora_kernels:
            logger.info("loraplex: decode steps with adapters run eagerly: CUDA graphs need the triton LoRA backend")
        return True, lora_kernels

    def _num_kv_blocks(self, model: torch.nn.Module, max_num_seqs: int, reserve: int = 1 << 30) -> int:
        """KV blocks for ``max_num_seqs`` full-length sequences, at most what the budget holds: on CUDA,
        ``gpu_memory_utilization`` of the card less what is in use now and ``reserve`` bytes (activations,
        logits, graphs); on CPU, ``cpu_kv_cache_gib``."""
        cc = self.config.cache_config
        if cc.num_kv_blocks is not None:
            return cc.num_kv_blocks
        per_block = ModelRunner.kv_bytes_per_block(model, cc.block_size, self.dtype)
        wanted = max_num_seqs * math.ceil(self.max_model_len / cc.block_size) + 1
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * cc.gpu_memory_utilization) - (total - free) - reserve
        else:
            budget = int(cc.cpu_kv_cache_gib * (1 << 30))
        blocks = min_over_ranks(min(wanted, budget // per_block))  # every rank holds the same blocks
        if blocks < math.ceil(self.max_model_len / cc.block_size):
            raise ValueError(f"KV cache budget holds {blocks} blocks of {cc.block_size} tokens, fewer than one "
                             f"max_model_len={self.max_model_len} sequence needs; lower max_model_len or raise "
                             "gpu_memory_utilization / cpu_kv_cache_gib")
        return blocks

    def _profiled_kv_blocks(self, model: torch.nn.Module, max_num_seqs: int, graphs: bool) -> int:
        """The KV cache's blocks from a profile: an eager step of ``max_num_batched_tokens`` prompt tokens
        (all rows' logits, adapters' work buffers) measures the activation peak; the graphs' memory pool is
        reserved as the peak of a step of the largest graph's tokens. Logs the split of the card's memory."""
        from loraplex.engine.cuda_graph import mixed_sizes

        runner, dev = self.runner, self.device
        lora = self.pool is not None
        t0 = time.perf_counter()
        peak = runner.profile_peak(self.max_num_batched_tokens, lora)
        graph_tokens = max(mixed_sizes(self.max_num_batched_tokens)[-1], self.config.scheduler_config.max_num_seqs)
        graph_peak = runner.profile_peak(graph_tokens, lora) if graphs else 0
        torch.cuda.empty_cache()
        slack = 256 << 20  # the sampler's work, allocator fragmentation
        blocks = self._num_kv_blocks(model, max_num_seqs, reserve=peak + graph_peak + slack)
        free, total = torch.cuda.mem_get_info(dev)
        per_block = ModelRunner.kv_bytes_per_block(model, self.config.cache_config.block_size, self.dtype)
        gib = 1 << 30
        logger.info("loraplex: memory (profiled in %.1f s): %.2f GiB in use (weights, adapter slots), step "
                    "activations %.2f GiB at %d tokens, CUDA graphs %.2f GiB reserved, KV cache %.2f GiB = %d "
                    "blocks, of %.1f GiB x gpu_memory_utilization %.2f", time.perf_counter() - t0,
                    (total - free) / gib, peak / gib, self.max_num_batched_tokens, graph_peak / gib,
                    blocks * per_block / gib, blocks, total / gib, self.config.cache_config.gpu_memory_utilization)
        self.memory_profile = {"activation_bytes": peak, "graph_reserve_bytes": graph_peak,
                               "kv_cache_bytes": blocks * per_block, "num_kv_blocks": blocks}
        return blocks

    def cache_stats(self) -> dict[str, float]:
        """KV cache and prefix cache figures: blocks in use, prompt tokens looked up and found in the cache
        (cumulative), cached blocks, evictions of cached blocks (cumulative); the vision encoder cache's
        lookups and hits (vision-language models); with enable_lora_merging, the merges and restores
        (cumulative) and whether an adapter is merged now."""
        a = self.allocator
        return {"kv_cache_usage": a.usage, "prefix_cache_queried_tokens": a.queried_tokens,
                "prefix_cache_hit_tokens": a.hit_tokens,
                "prefix_cache_hit_rate": a.hit_tokens / a.queried_tokens if a.queried_tokens else 0.0,
                "prefix_cache_blocks": a.num_cached, "prefix_cache_evictions": a.evictions,
                **self._encoder_cache_stats(), **self._merge_stats()}

    def _merge_stats(self) -> dict[str, float]:
        m = self.merger
        if m is None:
            return {}
        return {"lora_merges": m.num_merges, "lora_merge_restores": m.num_restores,
                "lora_merged": float(m.merged is not None)}

    def _encoder_cache_stats(self) -> dict[str, float]:
        cache = getattr(self.model, "encoder_cache", None)
        if cache is None:
            return {}
        return {"encoder_cache_queries": cache.queries, "encoder_cache_hits": cache.hits,
                "encoder_cache_entries": len(cache)}

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, if any (also done at interpreter exit). The CUDA graphs go
        first: NCCL does not destroy a communicator while graphs that captured its collectives exist."""
        if getattr(self, "_trace", None) is not None:
            self._trace.close()
            self._trace = None
        if self._tp is not None and not self._tp.closed:
            runner = getattr(self, "runner", None)
            if runner is not None:
                runner.release_graphs()
            self._tp.close()

    # ---- adapters -------------------------------------------------------------------------
    def _require_pool(self) -> LoRAPool:
        if self.pool is None:
            raise AdapterError("LoRA is disabled (enable_lora=False)")
        return self.pool

    def add_lora(self, req: LoRARequest, reload: bool = False, root: Optional[str] = None) -> None:
        """Register ``req`` (see :meth:`LoRAPool.register`); with ``root``, every file read for it, now and
        on any later re-read, must resolve inside that folder."""
        self._require_pool().register(req, reload=reload, root=root)

    def remove_lora(self, name: str) -> None:
        self._require_pool().unregister(name)

    def pin_lora(self, name: str) -> None:
        """Keep adapter ``name`` in a device slot (and host memory) until :meth:`unpin_lora`."""
        pool = self._require_pool()
        if not pool.is_registered(name):
            raise AdapterError(f"adapter {name!r} is not registered; registered: {self.list_loras()}")
        pool.pin(name)

    def unpin_lora(self, name: str) -> None:
        if not self._require_pool().unpin(name):
            raise AdapterError(f"adapter {name!r} is not pinned")

    def list_loras(self) -> list[str]:
        return sorted(self.pool.registered) if self.pool else []

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: Union[str, dict, list], tokenizer: Any = None) -> tuple[Optional[str], list[int]]:
        """(text, token ids) of a prompt, with ``tokenizer`` (default: the model's; an adapter that adds tokens
        has its own)."""
        tokenizer = tokenizer or self.tokenizer
        if isinstance(prompt, str):
            return prompt, list(tokenizer(prompt)["input_ids"])
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize(prompt["prompt"], tokenizer)
            raise InvalidRequestError(f"prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise InvalidRequestError(f"prompt must be a string, a dict or a list of token ids, got {type(prompt).__name__}")

    def tokenizer_for(self, lora_name: Optional[str]) -> Any:
        """The tokenizer of requests for ``lora_name`` (``name`` or ``name@version``, registered): the adapter's
        own when it adds tokens to the vocabulary, else the model's."""
        if lora_name is None or self.pool is None:
            return self.tokenizer
        name, _, version = lora_name.partition("@")
        adapter = self.pool.get_version(name, version) if version else self.pool.get(name)
        return adapter.tokenizer if adapter.tokenizer is not None else self.tokenizer

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    chat_template: Optional[str] = None, tokenizer: Any = None) -> tuple[list[int], list[Any]]:
        """A conversation (OpenAI-style message dicts) rendered by ``chat_template`` (template text) or the
        chat template of ``tokenizer`` (default: the model's; an adapter that adds tokens brings its own): its
        token ids, and the images its content parts hold, in order (each part becomes the model's image
        placeholder text; text-only models get none, and their image parts are refused later). See
        :func:`loraplex.multimodal.chat.render_chat`."""
        from loraplex.multimodal.chat import render_chat

        tok = tokenizer or self.tokenizer
        placeholder = self.mm_processor.image_placeholder(tok) if self.mm_processor is not None else ""
        return render_chat(tok, messages, add_generation_prompt, chat_template, placeholder)

    def add_request(self, prompt: Union[str, dict, list], params: SamplingParams,
                    lora_name: Optional[str] = None, request_id: Optional[str] = None) -> str:
        adapter = None
        if lora_name is not None:  # "name", or "name@version" for one version of it
            name, _, version = lora_name.partition("@")
            if self.pool is not None and not self.pool.is_registered(name) and self.pool.resolvers:
                self.pool.register(self.pool.resolve(name))  # offline use; the server resolves off the loop first
            if self.pool is None or not self.pool.is_registered(name):
                raise InvalidRequestError(f"unknown adapter {name!r}; registered adapters: {self.list_loras()}")
            # held for the request's lifetime; may raise AdapterError
            adapter = self.pool.get_version(name, version) if version else self.pool.get(name)
            lora_name = name
        # an adapter that adds tokens brings its tokenizer and vocabulary
        tokenizer = adapter.tokenizer if adapter is not None and adapter.tokenizer is not None else self.tokenizer
        vocab = adapter.vocab_size if adapter is not None and adapter.vocab_size else self.vocab_size
        text, ids = self.tokenize(prompt, tokenizer)
        if not ids:
            raise InvalidRequestError("the prompt is empty (no tokens)")
        mm_data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        mm = None
        if self.mm_processor is not None:  # expands image tokens into placeholder positions
            ids, mm = self.mm_processor.process(ids, mm_data)
        elif mm_data:
            raise InvalidRequestError(f"model architecture {type(self.model).__name__} is text-only; it does not "
                                      "accept images (multi_modal_data)")
        image_pos = mm.image_positions() if mm is not None else ()  # the only positions outside the vocabulary
        bad = [t for i, t in enumerate(ids) if i not in image_pos and (
            not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab)]
        if bad:
            whose = f"adapter {lora_name!r}'s vocabulary" if vocab != self.vocab_size else "the vocabulary"
            raise InvalidRequestError(f"prompt token id(s) {bad[:5]} outside {whose} [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                                      "and at least one token must be generated")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        req = Request(request_id, text, ids, params, adapter, tokenizer, self.eos_token_ids, max_tokens, mm=mm,
                      vocab_size=vocab)
        if params.seed is not None:
            req.generator = make_generator(params.seed)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None or req.finished:
            return
        self.scheduler.abort(req)
        req.num_pending = 0
        req.status = Status.FINISHED
        self._forget_on_ranks(req)
        req.finish_reason = "abort"

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        waited = self.sampler.wait_seconds
        if self._trace is not None:
            self._launched_kind, self._traced_seqs = "", []
        outputs = self._step()
        # Host time: the step's wall time but the wait for the device's results (on CPU, everything).
        t1 = time.perf_counter()
        self.last_step_host_seconds = t1 - t0 - (self.sampler.wait_seconds - waited)
        if self._trace is not None:
            self._trace_step(t0, t1, outputs)
        return outputs

    def _trace_step(self, t0: float, t1: float, outputs: list) -> None:
        """One line of LORAPLEX_STEP_TRACE: the call's start (s since the engine started, and as Unix time, to line
        up with a client's clock), wall and host time (ms), and what it launched: sequences, tokens, prompt
        chunks (sequences of more than one new token), the forward (``decode-N`` / ``mixed-N``: the CUDA graph of
        that size, ``eager``, or empty when it launched nothing), and the requests it finished. With async
        scheduling a call launches one step and applies the previous one's results, so its wall time includes
        the wait for them."""
        import json

        seqs = self._traced_seqs
        row = {"t_s": round(t0 - self._trace_t0, 6), "unix_s": round(self._trace_unix0 + t0 - self._trace_t0, 6),
               "wall_ms": round(1e3 * (t1 - t0), 3),
               "host_ms": round(1e3 * self.last_step_host_seconds, 3), "seqs": len(seqs),
               "tokens": sum(s.num_new_tokens for s in seqs), "prompt_chunks": sum(s.num_new_tokens > 1 for s in seqs),
               "forward": self._launched_kind,
               "finished": sum(1 for o in outputs if getattr(o, "finished", False))}
        self._trace.write(json.dumps(row) + "\n")

    def _step(self) -> list[RequestOutput]:
        """Schedule and launch this step; then read back and apply the previous step's results (async
        scheduling: the host does that, and the next step's scheduling, while the device runs this one) or
        this step's own (synchronous)."""
        if get_tp_size() != self._tp_size:  # another engine of this process started or stopped a group
            raise RuntimeError(_SHARED_GROUP.format(size=get_tp_size()))
        progress = self.pool.load_progress if self.pool is not None else 0
        sched = self.scheduler.schedule()
        prev, self._in_flight = self._in_flight, None
        if not sched.seqs:
            # nothing runs: wait for the adapter copies the waiting requests need, and admit them next step; also
            # when the copies they were passed over for completed since (the check below would see none left)
            if prev is None and self.pool is not None and (self.pool.loading or self.pool.load_progress != progress):
                self.pool.wait_for_loads()
                return []
            if prev is None and self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("scheduler made no progress: waiting requests cannot be admitted")
            return self._finish(prev) if prev is not None else []
        launched = self._launch(sched.seqs, prev)
        outputs = self._finish(prev) if prev is not None else []
        if self.async_scheduling and not launched.sync:
            self._in_flight = launched
        else:
            outputs += self._finish(launched)
        return outputs

    def _launch(self, seqs: list[ScheduledSeq], prev: Optional[_Launched]) -> _Launched:
        """Queue the forward and the sampling of ``seqs`` on the device. Inputs that are tokens ``prev``
        sampled (at most one per request: its last) are taken from ``prev``'s device tensor."""
        if self.merger is not None:  # enable_lora_merging: the merger's policy (lora/merge.py)
            slot = seqs[0].req.slot
            if any(s.req.slot != slot for s in seqs):
                slot = -1
            if self.merger.before_step(slot, slot >= 0 and self.pool.load_event(slot) is not None):
                for s in seqs:
                    s.merged = True  # the forward reads no adapter
        fix = None
        if prev is not None:
            rows, src = [], []
            end = 0  # input rows are the sequences' new tokens, concatenated
            for s in seqs:
                end += s.num_new_tokens
                r = s.req
                if r.num_pending and s.start + s.num_new_tokens == r.num_tokens:  # covers its pending token
                    assert r.num_pending == 1, f"request {r.request_id}: {r.num_pending} tokens pending at launch"
                    rows.append(end - 1)
                    src.append(prev.row_of[r.request_id])
            if rows:
                fix = (rows, src, prev.sample.token_ids)
        # Only a sequence whose step reaches its last token samples: a prompt chunk that ends inside the
        # prompt yields nothing (its generator is not advanced, so seeded sampling matches unchunked runs).
        sampling = [i for i, s in enumerate(seqs) if s.samples]
        if self._tp is not None:  # every other rank runs the same forward on its shard
            shared = len(sampling) if self.async_scheduling else 0  # tokens the next plan may read on the device
            merged = self.merger.merged_slot if self.merger is not None else -1
            self._tp.broadcast(self._tp.plan(seqs, self._tp_finished, None if fix is None else fix[:2], shared,
                                             merged))
            self._tp_finished = []
        batch = self.runner.prepare(seqs)
        if self._trace is not None:
            self._traced_seqs = seqs
            planned = batch.graph_plan
            self._launched_kind = f"{'decode' if planned[0] else 'mixed'}-{planned[1]}" if planned else "eager"
        if self.pool is not None and self.pool.waits_on_device:  # slots still being copied: wait on the device
            for slot in {s.req.slot for s in seqs if s.req.slot >= 0}:
                done = self.pool.load_event(slot)
                if done is not None:
                    torch.cuda.current_stream(self.device).wait_event(done)
        try:
            logits = self.runner.execute(batch, fix)  # (R, padded vocab) float32
        except Exception as e:
            if self._tp is None:
                raise
            raise self._tp.failure(e) from e  # a collective of the forward failed: a rank is gone

        prompt_lp = [s.prompt_logprobs for s in seqs]  # before this step's logprobs are stored
        reqs = [seqs[i].req for i in sampling]
        sample = None
        if sampling:
            rows = [batch.logits_spans[i][0] + batch.logits_spans[i][1] - 1 for i in sampling]
            if len(rows) == logits.shape[0]:  # every logits row samples (decode steps): no gather, no copy
                raw = logits
            else:  # logprobs are reported from the raw logits, before min_tokens masking
                raw = logits[to_device(torch.tensor(rows), logits.device)]
            held = [i for i, r in enumerate(reqs) if len(r.output_token_ids) + r.num_pending < r.params.min_tokens]
            sample_logits = raw.clone() if held else raw
            for i in held:
                apply_min_tokens(sample_logits[i], sorted(reqs[i].eos_token_ids | set(reqs[i].params.stop_token_ids)))
            # one device-to-host copy brings the tokens and the logprobs of the rows that asked
            vocab = [r.vocab_size for r in reqs]  # the model's, unless a request's adapter adds tokens
            sample = self.sampler.launch_step(sample_logits, [r.params for r in reqs], [r.generator for r in reqs],
                                              raw_logits=raw,
                                              vocab_sizes=vocab if max(vocab) != self.vocab_size else None)
            if self._tp is not None and self.async_scheduling:  # the other ranks' next step may read them
                try:
                    broadcast_from_first(sample.token_ids)
                except Exception as e:
                    raise self._tp.failure(e) from e
        if self.pool is not None and self.device.type == "cuda":  # slot uploads wait for the last step reading them
            used = {s.req.slot for s in seqs if s.req.slot >= 0}
            if used:
                step_done = torch.cuda.Event()
                step_done.record()
                self.pool.mark_used(used, step_done)
        for s in seqs:
            s.req.num_computed_tokens += s.num_new_tokens
        for r in reqs:
            r.num_pending += 1
        return _Launched(seqs, reqs, {r.request_id: i for i, r in enumerate(reqs)}, batch.logits_spans, logits,
                         prompt_lp, sample, sync=any(prompt_lp))

    def _result(self, sample: Any) -> tuple[list[int], list]:
        """``sample``'s tokens and logprobs; under tensor parallelism a step that does not finish within
        ``distributed_timeout`` (a rank died inside a graph replay, whose collectives nothing watches) fails the
        engine with TensorParallelError."""
        if self._tp is None:
            return sample.result()
        try:
            return sample.result(timeout=self._tp.timeout)
        except TimeoutError as e:
            raise self._tp.failure(e) from e

    def _finish(self, step: _Launched) -> list[RequestOutput]:
        """Read back ``step``'s results and apply them: prompt logprobs, tokens, stop conditions, outputs.
        Results of requests that finished or were aborted meanwhile are dropped."""
        outputs: list[RequestOutput] = []
        tokens, lps = self._result(step.sample) if step.sample is not None else ([], [])
        for s, (a, n), wants in zip(step.seqs, step.logits_spans, step.prompt_lp):
            if wants and not s.req.finished:  # a chunk (or all) of the prompt of a request that asked for them
                self._add_prompt_logprobs(s.req, s.start, step.logits[a:a + n])
        for req, tok, lp in zip(step.reqs, tokens, lps):
            if req.finished:
                continue
            req.num_pending -= 1
            self._append_token(req, tok, lp)
            if req.finished:
                self.requests.pop(req.request_id, None)
            if self.output_kind == "delta":
                outputs.append(req.to_delta())
            elif req.finished or self.output_kind == "snapshot":
                outputs.append(req.to_output())
        return outputs

    def _add_prompt_logprobs(self, req: Request, start: int, rows: torch.Tensor) -> None:
        """Prompt logprobs from the logits ``rows`` (n, V) of the prompt chunk at ``start`` (row i predicts
        prompt token start + i + 1), gathered until the prompt is done and then published whole."""
        prompt = req.visible_prompt_token_ids
        if start == 0 and rows.shape[0] >= len(prompt):  # the whole prompt in one step
            req.prompt_logprobs = prompt_logprobs(rows, prompt, req.params.prompt_logprobs, req.vocab_size)
            return
        done = req.partial_prompt_logprobs
        del done[start + 1:]  # entries 0..start stay (a chunk recomputed after preemption replaces the rest)
        end = min(start + rows.shape[0], len(prompt) - 1)  # the last prompt entry this chunk gives
        done.extend(compute_logprobs(rows[:end - start], prompt[start + 1:end + 1],
                                     [req.params.prompt_logprobs] * (end - start), req.vocab_size))
        if end == len(prompt) - 1:
            req.prompt_logprobs, req.partial_prompt_logprobs = done, [None]

    def _append_token(self, req: Request, tok: int, lp: Optional[dict]) -> None:
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.output_token_ids.append(tok)
        if req.output_logprobs is not None:
            req.output_logprobs.append(lp)
        p = req.params
        if req.detok is not None:
            req.text_delta += req.detok.append(tok)
        n_out = len(req.output_token_ids)
        reason = stop = None
        if not p.ignore_eos and tok in req.eos_token_ids and n_out > p.min_tokens:
            reason = "stop"
        elif tok in p.stop_token_ids and n_out > p.min_tokens:
            reason, stop = "stop", tok
        elif req.detok is not None and req.detok.stop_reason is not None:
            reason, stop = "stop", req.detok.stop_reason
        elif n_out >= req.max_tokens or len(req.prompt_token_ids) + n_out >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if req.detok is not None and not isinstance(stop, str):
                req.text_delta += req.detok.finish()
            req.finish_reason, req.stop_reason = reason, stop
            req.num_pending = 0  # a token of a step still in flight is dropped when read back
            self.scheduler.finish(req)
            self._forget_on_ranks(req)

    def _forget_on_ranks(self, req: Request) -> None:
        """The other tensor-parallel ranks may drop this ended request's multimodal inputs (next step's plan)."""
        if self._tp is not None and req.mm is not None:
            self._tp_finished.append(req.request_id)
