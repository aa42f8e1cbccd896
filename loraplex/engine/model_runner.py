"""Builds the model, sizes and binds the KV cache, and runs one batch.

``prepare`` turns the scheduled sequences into flat tensors: token ids, positions, the flat
attention layout (KV slot mapping, block tables, lengths), the LoRA slot of every token and of
every logits row, and which hidden rows need logits (the last new token of each sequence, plus
every prompt position of a prompt chunk whose request asked for prompt logprobs).

On CUDA, most steps instead replay a CUDA graph (:mod:`loraplex.engine.cuda_graph`) over persistent
input buffers; steps with prompt logprobs or image chunks, larger than every capture, or all steps with
``enforce_eager``, run eagerly.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from loraplex.config import EngineConfig
from loraplex.attention.metadata import AttentionMetadata
from loraplex.attention.registry import get_attention_backend
from loraplex.engine.context import ForwardContext, forward_context
from loraplex.engine.cuda_graph import ModelParts, StepGraphs, StepInputs, capture_sizes, mixed_sizes
from loraplex.engine.scheduler import ScheduledSeq
from loraplex.layers.attention import PagedAttention
from loraplex.lora.batch import LoRABatch
from loraplex.lora.layers import BaseLayerWithLoRA
from loraplex.multimodal.batch import gather_images, mrope_positions
from loraplex.transfer import to_device

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    d = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(d, str):
        d = _DTYPES.get(d, torch.float32)
    d = d if isinstance(d, torch.dtype) else torch.float32
    if device.type == "cpu" and d == torch.float16:
        return torch.float32  # float16 matmuls on CPU are slow and inexact
    return d


InputFix = tuple[list[int], list[int], torch.Tensor]


def _apply_fix(fix: InputFix, input_ids: torch.Tensor) -> None:
    """``input_ids[rows] = tokens[src]`` on the device (``fix`` = rows, src, tokens)."""
    rows, src, tokens = fix
    idx = to_device(torch.tensor([rows, src], dtype=torch.int64), input_ids.device)
    input_ids.index_copy_(0, idx[0], tokens.index_select(0, idx[1]))


@dataclass
class PreparedBatch:
    input_ids: Optional[torch.Tensor]  # (T,); None for a graph step
    ctx: Optional[ForwardContext]
    logits_indices: Optional[torch.Tensor]  # (R,) rows of the hidden states that need logits
    # Per sequence: (first logits row, number of logits rows); the sampled row is the last.
    logits_spans: list[tuple[int, int]]
    graph_seqs: Optional[Sequence[ScheduledSeq]] = None  # a step that replays a CUDA graph
    graph_plan: Optional[tuple[bool, int]] = None  # which one (StepGraphs.plan: decode family?, size)


class ModelRunner:
    def __init__(self, model: nn.Module, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                 num_blocks: int, max_model_len: int, max_num_batched_tokens: int) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.cache_config.block_size
        self.num_blocks = num_blocks
        self.attn_layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        self.uses_mrope = bool(getattr(model, "uses_mrope", False))  # (3, T) positions (Qwen2-VL)
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.graphs: Optional[StepGraphs] = None
        self.before_step: Optional[Callable[[], None]] = None  # run first in every execute (every rank's steps)
        self.bind_kv_cache(num_blocks)

    @staticmethod
    def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
        layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(2 * block_size * m.num_kv_heads * m.head_dim * elem for m in layers)

    def bind_kv_cache(self, num_blocks: int) -> None:
        """Give every attention layer a cache of ``num_blocks`` blocks (plus the scratch block), dropping any
        it had (the engine binds an empty one for its start-up profile, then the one the profile sized)."""
        backend = get_attention_backend(self.config.cache_config.attention_backend, self.device)
        self.attention_backend = backend.name
        self.num_blocks = num_blocks
        for m in self.attn_layers:
            m.k_cache = m.v_cache = None
        for m in self.attn_layers:
            m.backend = backend
            # One block more than the allocator hands out: the scratch block that padding rows of graph
            # steps write (block id num_blocks).
            shape = (self.num_blocks + 1, self.block_size, m.num_kv_heads, m.head_dim)
            m.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            m.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    # -- start-up: memory profile and kernel warm-up --------------------------------------------------------
    def _split(self, num_tokens: int) -> list[int]:
        """``num_tokens`` as whole sequences of at most ``max_model_len`` tokens."""
        n = self.max_model_len
        return [n] * (num_tokens // n) + ([num_tokens % n] if num_tokens % n else [])

    @torch.inference_mode()
    def dummy_step(self, query_lens: Sequence[int], lora: bool, all_logits: bool = False) -> None:
        """One eager step over dummy sequences (token 0; ``query_lens`` new tokens each, no cached context)
        whose every position is in the scratch block, so the cache's real blocks are never written; with
        ``lora``, every row on adapter slot 0 (the layers launch their kernels whatever that slot holds).
        ``all_logits``: logits and log-probabilities of every row, as a prompt-logprobs step computes."""
        bs, dev = self.block_size, self.device
        tables = [np.full(-(-n // bs), self.num_blocks, dtype=np.int32) for n in query_lens]
        attn = AttentionMetadata.build(query_lens, query_lens, tables, bs, dev)
        T = sum(query_lens)
        pos = torch.cat([torch.arange(n) for n in query_lens])
        if self.uses_mrope:
            pos = pos.expand(3, T)
        rows = list(range(T)) if all_logits else list(np.cumsum(query_lens) - 1)
        ctx = ForwardContext(
            positions=pos.to(dev), attn=attn,
            lora=LoRABatch.from_row_slots([0] * T, dev) if lora else None,
            lora_logits=LoRABatch.from_row_slots([0] * len(rows), dev) if lora else None)
        with forward_context(ctx), self._every_lora_layer_runs(lora):
            hidden = self.model(torch.zeros(T, dtype=torch.int64, device=dev), ctx.positions)
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=dev)]).float()
            if all_logits:
                torch.log_softmax(logits, dim=-1)

    @contextlib.contextmanager
    def _every_lora_layer_runs(self, lora: bool):
        """With ``lora``, every LoRA layer treats slot 0 as holding weights (whatever it holds: a start-up slot
        is empty, its ranks 0), so that each launches its kernels and allocates its work buffers."""
        layers = [m for m in self.model.modules() if isinstance(m, BaseLayerWithLoRA)] if lora else []
        saved = [m.active for m in layers]
        for m in layers:
            m.active = m.active | {0}
        try:
            yield
        finally:
            for m, a in zip(layers, saved):
                m.active = a

    def profile_peak(self, num_tokens: int, lora: bool) -> int:
        """Device bytes an eager step of ``num_tokens`` prompt tokens needs beyond what is allocated now:
        activations, every row's logits and log-probabilities, LoRA work buffers (CUDA)."""
        dev = self.device
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        self.dummy_step(self._split(num_tokens), lora, all_logits=True)
        torch.cuda.synchronize(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - before)

    def warm_up(self, lora: bool) -> None:
        """Compile the kernel variants eager steps use (CUDA), so that no step waits for Triton later: decode
        rows, short and long prompt chunks (the LoRA kernels' three tile heights), with and without adapters."""
        # (query lengths, logits of every row: the logits rows' LoRA tiles as prompt logprobs make them)
        shapes = [([1, 1, 1, 1], False), ([1, 1, 24], True), ([1, 200], True),
                  (self._split(self.max_num_batched_tokens), False)]
        for lens, all_logits in shapes:
            for with_lora in ((False, True) if lora else (False,)):
                self.dummy_step(lens, with_lora, all_logits)
        torch.cuda.synchronize(self.device)

    def capture_graphs(self, lora: bool, capture: bool = True) -> None:
        """Capture the step graphs (CUDA, Triton attention): decode batches up to ``max_cudagraph_capture_size``
        (default ``max_num_seqs``) and mixed steps up to 512 tokens; ``lora``: also the variants that run the
        Triton LoRA kernels. ``capture=False`` (tests on CPU): graph steps run the graphs' forward over their
        buffers, eagerly."""
        mc, sc = self.config.model_config, self.config.scheduler_config
        largest = min(mc.max_cudagraph_capture_size or sc.max_num_seqs, sc.max_num_seqs)
        max_blocks = -(-self.max_model_len // self.block_size)
        common = dict(max_blocks=max_blocks, mrope=self.uses_mrope, block_size=self.block_size,
                      scratch_block=self.num_blocks, device=self.device)
        decode = StepInputs(largest, largest, decode=True, **common)
        tokens = mixed_sizes(self.max_num_batched_tokens)
        # a mixed step of B sequences and T >= B tokens fills a graph of n >= T tokens with B + (n - T) <= n sequences
        mixed = StepInputs(tokens[-1], tokens[-1], decode=False, rows=sc.max_num_seqs, **common)
        parts = embeds = None
        if lora:  # adapter graphs hold the decoder layers; embedding and head run eagerly around them
            emb = self.model.get_input_embeddings()
            parts = ModelParts(embed=self._graph_embed, body=self._graph_body, head=self._graph_head)
            embeds = torch.zeros(max(decode.tokens, mixed.tokens), emb.embedding_dim, dtype=emb.weight.dtype,
                                 device=self.device)
        self.graphs = StepGraphs(decode, mixed, self._graph_forward, capture_sizes(largest), tokens, lora,
                                 self.max_model_len, parts, embeds)
        if capture:
            self.graphs.capture()

    def release_graphs(self) -> None:
        """Destroy the captured graphs (before the tensor-parallel group is torn down); steps run eagerly after."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def _graph_forward(self, input_ids: torch.Tensor, ctx: ForwardContext,
                       rows: Optional[torch.Tensor]) -> torch.Tensor:
        with forward_context(ctx):
            hidden = self.model(input_ids, ctx.positions)
            if rows is not None:
                hidden = hidden.index_select(0, rows)
            return self.model.compute_logits(hidden).float()

    def _graph_embed(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        with forward_context(ctx):
            return self.model.get_input_embeddings()(input_ids)

    def _graph_body(self, input_ids: torch.Tensor, embeds: torch.Tensor, ctx: ForwardContext,
                    rows: Optional[torch.Tensor]) -> torch.Tensor:
        with forward_context(ctx):
            hidden = self.model(input_ids, ctx.positions, inputs_embeds=embeds)
            return hidden if rows is None else hidden.index_select(0, rows)

    def _graph_head(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        with forward_context(ctx):
            return self.model.compute_logits(hidden).float()

    def prepare(self, seqs: list[ScheduledSeq]) -> PreparedBatch:
        planned = self.graphs.plan(seqs) if self.graphs is not None else None
        if planned is not None:
            return PreparedBatch(None, None, None, [(i, 1) for i in range(len(seqs))], graph_seqs=seqs,
                                 graph_plan=planned)
        ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        logits_rows: list[int] = []
        logits_row_slots: list[int] = []
        spans: list[tuple[int, int]] = []
        qlens: list[int] = []
        ctx_lens: list[int] = []
        for s in seqs:
            req = s.req
            toks = req.token_ids_at(s.start, s.num_new_tokens)
            base = len(ids)
            ids.extend(toks)
            pos = range(s.start, s.start + s.num_new_tokens)
            positions.extend(pos)
            token_slots.extend([s.slot] * s.num_new_tokens)
            qlens.append(s.num_new_tokens)
            ctx_lens.append(s.start + s.num_new_tokens)
            if s.prompt_logprobs:  # every prompt position of the chunk
                rows = list(range(base, base + s.num_new_tokens))
            else:
                rows = [base + s.num_new_tokens - 1]
            spans.append((len(logits_rows), len(rows)))
            logits_rows.extend(rows)
            logits_row_slots.extend([s.slot] * len(rows))

        dev = self.device
        attn = AttentionMetadata.build(qlens, ctx_lens, [x.req.block_table_array() for x in seqs], self.block_size,
                                       dev)
        has_lora = any(s.slot >= 0 for s in seqs)
        pos_t = mrope_positions(seqs) if self.uses_mrope else torch.tensor(positions, dtype=torch.int64)
        # every host tensor goes through pinned memory (to_device): a copy from pageable memory would wait for
        # the device's queued work, so the host would lose its lead over the GPU in every step that runs eagerly
        ctx = ForwardContext(
            positions=to_device(pos_t, dev),
            attn=attn,
            lora=LoRABatch.from_row_slots(token_slots, dev) if has_lora else None,
            lora_logits=LoRABatch.from_row_slots(logits_row_slots, dev) if has_lora else None,
            multimodal=gather_images(seqs),  # images whose placeholders are in this step (never split)
        )
        return PreparedBatch(
            input_ids=to_device(torch.tensor(ids, dtype=torch.int64), dev),
            ctx=ctx,
            logits_indices=to_device(torch.tensor(logits_rows, dtype=torch.int64), dev),
            logits_spans=spans,
        )

    @torch.inference_mode()
    def execute(self, batch: PreparedBatch, fix: Optional[InputFix] = None) -> torch.Tensor:
        """Run the model; returns float32 logits (R, padded vocab) for the logits rows. ``fix`` = (rows,
        src, tokens): input rows whose token is still on the device, at ``tokens[src]`` (async scheduling)."""
        if self.before_step is not None:
            self.before_step()
        if batch.graph_seqs is not None:
            return self.graphs.run(batch.graph_seqs, None if fix is None else functools.partial(_apply_fix, fix),
                                   batch.graph_plan)
        if fix is not None:
            _apply_fix(fix, batch.input_ids)
        with forward_context(batch.ctx):
            hidden = self.model(batch.input_ids, batch.ctx.positions)  # (T, hidden)
            logits = self.model.compute_logits(hidden[batch.logits_indices])
        return logits.float()
