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

import functools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from loraplex.config import EngineConfig
from loraplex.attention.metadata import AttentionMetadata
from loraplex.attention.registry import get_attention_backend
from loraplex.engine.context import ForwardContext, forward_context
from loraplex.engine.cuda_graph import StepGraphs, StepInputs, capture_sizes, mixed_sizes
from loraplex.engine.scheduler import ScheduledSeq
from loraplex.layers.attention import PagedAttention
from loraplex.lora.batch import LoRABatch
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
        self._bind_kv_cache()

    @staticmethod
    def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
        layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(2 * block_size * m.num_kv_heads * m.head_dim * elem for m in layers)

    def _bind_kv_cache(self) -> None:
        backend = get_attention_backend(self.config.cache_config.attention_backend, self.device)
        self.attention_backend = backend.name
        for m in self.attn_layers:
            m.backend = backend
            # One block more than the allocator hands out: the scratch block that padding rows of graph
            # steps write (block id num_blocks).
            shape = (self.num_blocks + 1, self.block_size, m.num_kv_heads, m.head_dim)
            m.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            m.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

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
        mixed = StepInputs(tokens[-1], sc.max_num_seqs + tokens[-1], decode=False, rows=sc.max_num_seqs, **common)
        self.graphs = StepGraphs(decode, mixed, self._graph_forward, capture_sizes(largest), tokens, lora,
                                 self.max_model_len)
        if capture:
            self.graphs.capture()

    def _graph_forward(self, input_ids: torch.Tensor, ctx: ForwardContext,
                       rows: Optional[torch.Tensor]) -> torch.Tensor:
        with forward_context(ctx):
            hidden = self.model(input_ids, ctx.positions)
            if rows is not None:
                hidden = hidden.index_select(0, rows)
            return self.model.compute_logits(hidden).float()

    def prepare(self, seqs: list[ScheduledSeq]) -> PreparedBatch:
        if self.graphs is not None and self.graphs.plan(seqs) is not None:
            return PreparedBatch(None, None, None, [(i, 1) for i in range(len(seqs))], graph_seqs=seqs)
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
            token_slots.extend([req.slot] * s.num_new_tokens)
            qlens.append(s.num_new_tokens)
            ctx_lens.append(s.start + s.num_new_tokens)
            if s.prompt_logprobs:  # every prompt position of the chunk
                rows = list(range(base, base + s.num_new_tokens))
            else:
                rows = [base + s.num_new_tokens - 1]
            spans.append((len(logits_rows), len(rows)))
            logits_rows.extend(rows)
            logits_row_slots.extend([req.slot] * len(rows))

        dev = self.device
        attn = AttentionMetadata.build(qlens, ctx_lens, [x.req.block_table_array() for x in seqs], self.block_size,
                                       dev)
        has_lora = any(s.req.slot >= 0 for s in seqs)
        pos_t = mrope_positions(seqs) if self.uses_mrope else torch.tensor(positions, dtype=torch.int64)
        ctx = ForwardContext(
            positions=pos_t.to(dev),
            attn=attn,
            lora=LoRABatch.from_row_slots(token_slots, dev) if has_lora else None,
            lora_logits=LoRABatch.from_row_slots(logits_row_slots, dev) if has_lora else None,
            multimodal=gather_images(seqs),  # images whose placeholders are in this step (never split)
        )
        return PreparedBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64).to(dev),
            ctx=ctx,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64).to(dev),
            logits_spans=spans,
        )

    @torch.inference_mode()
    def execute(self, batch: PreparedBatch, fix: Optional[InputFix] = None) -> torch.Tensor:
        """Run the model; returns float32 logits (R, padded vocab) for the logits rows. ``fix`` = (rows,
        src, tokens): input rows whose token is still on the device, at ``tokens[src]`` (async scheduling)."""
        if batch.graph_seqs is not None:
            return self.graphs.run(batch.graph_seqs, None if fix is None else functools.partial(_apply_fix, fix))
        if fix is not None:
            _apply_fix(fix, batch.input_ids)
        with forward_context(batch.ctx):
            hidden = self.model(batch.input_ids, batch.ctx.positions)  # (T, hidden)
            logits = self.model.compute_logits(hidden[batch.logits_indices])
        return logits.float()
