"""Token sampling and logprobs for one engine step.

The sampler sees one logits row per sequence that samples this step. Rows may
mix greedy and random requests, different temperatures / top-k / top-p / min-p,
and requests with and without their own seed. Sampling math runs in float32 on
the logits' device; the random numbers always come from CPU generators (one
uniform per random row, inverse-CDF), so a seeded request draws the same tokens
on CPU and on CUDA and regardless of the other requests in its batch.

:meth:`Sampler.sample_step` is the engine's path: per-row parameters go to the
device in pinned, non-blocking copies, tokens and the logprobs of the rows that
asked are computed there and packed into one tensor, and one device-to-host
copy (the step's only synchronisation) brings them back.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import torch

from loraplex.transfer import to_device
from loraplex.types import PositionLogprobs, SamplingParams

TokenIds = Union[torch.Tensor, Sequence[int]]


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (one per seeded request)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def apply_min_tokens(logits_row: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """Forbid ``stop_ids`` (EOS and stop tokens) in place while a request is
    below ``min_tokens``: ``logits_row[..., stop_ids] = -inf``. Returns the row."""
    if len(stop_ids) > 0:
        idx = torch.as_tensor(list(stop_ids), dtype=torch.long, device=logits_row.device)
        logits_row[..., idx] = float("-inf")
    return logits_row


class Sampler:
    """Samples one token per logits row.

    ``vocab_size`` is the real vocabulary size: columns at and beyond it are
    padding of the lm_head and are never sampled. ``seed`` seeds the engine-wide
    CPU generator used by requests without a ``seed`` of their own.
    """

    def __init__(self, vocab_size: int, seed: int) -> None:
        if vocab_size < 1:
            raise ValueError(f"Sampler: vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.generator = make_generator(seed)
        self.wait_seconds = 0.0  # host time spent waiting for the device's results (sample_step), cumulative

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[Optional[torch.Generator]],
    ) -> torch.Tensor:
        """``logits`` (n, V_padded) -> (n,) int64 token ids on CPU.

        ``generators[i]`` is row i's own generator (seeded request) or None (use
        the engine generator).
        """
        return self._token_ids(logits, params, generators).cpu()

    def sample_step(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[Optional[torch.Generator]],
        raw_logits: Optional[torch.Tensor] = None,
        vocab_sizes: Optional[list[int]] = None,
    ) -> tuple[list[int], list[Optional[PositionLogprobs]]]:
        """One step's tokens and logprobs with one device-to-host copy.

        ``logits`` (n, V_padded) are what is sampled from (min_tokens masking applied); logprobs of
        the rows whose params ask for them come from ``raw_logits`` (default: ``logits``), before
        temperature, as :func:`compute_logprobs` defines them. ``vocab_sizes``: each row's vocabulary (rows of
        adapters that add tokens have more columns; default: ``vocab_size`` for every row).
        """
        return self.launch_step(logits, params, generators, raw_logits, vocab_sizes).result()

    def launch_step(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[Optional[torch.Generator]],
        raw_logits: Optional[torch.Tensor] = None,
        vocab_sizes: Optional[list[int]] = None,
    ) -> "PendingSample":
        """:meth:`sample_step` without waiting: the device work and the copy of its results to pinned host
        memory are queued; :meth:`PendingSample.result` waits for that copy alone (an event, not a device
        synchronisation). ``PendingSample.token_ids`` (n,) int64 stay on the device for the next step."""
        packed, layout = self.sample_device(logits, params, generators, raw_logits, vocab_sizes)
        device_packed = packed
        done = None
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            packed = host
        return PendingSample(self, packed, layout, device_packed, done)

    def sample_device(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[Optional[torch.Generator]],
        raw_logits: Optional[torch.Tensor] = None,
        vocab_sizes: Optional[list[int]] = None,
    ) -> tuple[torch.Tensor, tuple]:
        """The work of :meth:`sample_step` without synchronising: a packed float64 tensor on the
        logits' device ([tokens | chosen logprobs | top logprobs | top ids]) and its host layout."""
        device = logits.device
        ids = self._token_ids(logits, params, generators, vocab_sizes)
        parts = [ids.double()]
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        k = 0
        if wanted:
            raw = self._columns(raw_logits if raw_logits is not None else logits, vocab_sizes)
            rows = to_device(torch.tensor(wanted, dtype=torch.long), device)
            logp = torch.log_softmax(raw.index_select(0, rows).float(), dim=-1)  # (w, V)
            parts.append(logp.gather(1, ids.index_select(0, rows)[:, None]).squeeze(1).double())
            k = min(max(params[i].logprobs for i in wanted), logp.shape[1])  # type: ignore[type-var]
            if k > 0:
                top_vals, top_ids = logp.topk(k, dim=-1)  # (w, k)
                parts += [top_vals.double().flatten(), top_ids.double().flatten()]
        layout = (len(params), wanted, [params[i].logprobs for i in wanted], k)
        return torch.cat(parts), layout

    def _token_ids(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[Optional[torch.Generator]],
        vocab_sizes: Optional[list[int]] = None,
    ) -> torch.Tensor:
        """(n,) int64 token ids on the logits' device: the argmax for greedy rows, one draw for the others."""
        n = logits.shape[0]
        if len(params) != n or len(generators) != n:
            raise ValueError(f"Sampler: got {n} logits rows but {len(params)} sampling params "
                             f"and {len(generators)} generators")
        x = self._columns(logits, vocab_sizes)  # (n, V): vocabulary padding dropped or masked
        ids = x.argmax(dim=-1)  # greedy rows keep these
        rand = [i for i, p in enumerate(params) if p.temperature != 0.0]
        if rand:
            rows = to_device(torch.tensor(rand, dtype=torch.long), logits.device)
            sampled = self._sample_random(x.index_select(0, rows), [params[i] for i in rand],
                                          [generators[i] for i in rand])
            ids = ids.index_copy(0, rows, sampled)
        return ids

    def _columns(self, logits: torch.Tensor, vocab_sizes: Optional[list[int]]) -> torch.Tensor:
        """The columns rows may sample: the first ``vocab_size`` (no per-row sizes), else the first
        ``max(vocab_sizes)`` with each row's columns past its own vocabulary at -inf."""
        width = self.vocab_size if vocab_sizes is None else max(vocab_sizes)
        if logits.shape[1] < width:
            raise ValueError(f"Sampler: logits have {logits.shape[1]} columns, fewer than the vocabulary ({width})")
        x = logits[:, :width]
        if vocab_sizes is None or min(vocab_sizes) == width:
            return x
        limits = to_device(torch.tensor(vocab_sizes, dtype=torch.long), logits.device)
        cols = torch.arange(width, device=logits.device)
        return x.masked_fill(cols[None, :] >= limits[:, None], float("-inf"))

    def _sample_random(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[Optional[torch.Generator]],
    ) -> torch.Tensor:
        """Temperature, top-k, top-p, then one inverse-CDF draw per row."""
        device = logits.device
        m, vocab = logits.shape
        x = logits.float()
        temps = to_device(torch.tensor([p.temperature for p in params], dtype=torch.float32), device)
        # Subtract the row max before dividing so tiny temperatures cannot overflow to +inf.
        x = (x - x.max(dim=-1, keepdim=True).values) / temps[:, None]  # (m, V)

        if any(p.min_p > 0.0 for p in params):
            # Drop tokens less likely than min_p x the most likely one: x is 0 at the row max, so
            # probability ratios are exp(x) and the test is x < log(min_p). No sort needed.
            min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
            x = x.masked_fill(x < to_device(min_p, device).log()[:, None], float("-inf"))

        need_k = any(p.top_k != -1 and p.top_k < vocab for p in params)
        need_p = any(p.top_p < 1.0 for p in params)
        if need_k or need_p:
            # Stable sort: among equal logits the lower token id ranks first.
            sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)  # (m, V)
            drop = torch.zeros_like(sorted_x, dtype=torch.bool)
            if need_k:
                ks = to_device(torch.tensor([vocab if p.top_k == -1 else min(p.top_k, vocab) for p in params]),
                                device)
                rank = torch.arange(vocab, device=device)
                drop |= rank[None, :] >= ks[:, None]
                sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            if need_p:
                top_p = to_device(torch.tensor([p.top_p for p in params], dtype=torch.float32), device)
                probs = torch.softmax(sorted_x, dim=-1)
                # Mass strictly before each token; keep while it is < top_p, which is the
                # smallest prefix whose cumulative mass reaches top_p (always >= 1 token).
                before = torch.cumsum(probs, dim=-1) - probs
                drop_p = before >= top_p[:, None]
                drop_p[:, 0] = False
                drop |= drop_p
            # Back from sorted to token order: order is a permutation, so every slot is written.
            x = x.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))

        probs = torch.softmax(x, dim=-1)  # (m, V)
        cdf = torch.cumsum(probs, dim=-1)  # (m, V)
        u = to_device(torch.cat(
            [torch.rand(1, generator=g if g is not None else self.generator) for g in generators]), device)  # (m,)
        target = u * cdf[:, -1]  # (m,), in [0, total)
        # First token whose cumulative mass exceeds the target; zero-probability tokens
        # never qualify because their cdf equals their predecessor's.
        ids = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)  # (m,)
        # Rounding may put target at the very top: fall back to the last token with mass.
        last_pos = vocab - 1 - torch.argmax((probs > 0).flip(-1).to(torch.uint8), dim=-1)
        return torch.minimum(ids, last_pos)  # (m,) on the logits' device


class PendingSample:
    """The results of one step's sampling, on their way to the host."""

    def __init__(self, sampler: Sampler, packed: torch.Tensor, layout: tuple, device_packed: torch.Tensor,
                 done: Optional[torch.cuda.Event]) -> None:
        self._sampler = sampler
        self._packed = packed  # pinned host memory (CUDA) or the CPU result itself
        self._layout = layout
        self._done = done
        self._device_packed = device_packed

    @property
    def token_ids(self) -> torch.Tensor:
        """(n,) int64 on the logits' device: inputs of the next step (async scheduling asks, only then)."""
        return self._device_packed[:self._layout[0]].long()

    def result(self, timeout: Optional[float] = None) -> tuple[list[int], list[Optional[PositionLogprobs]]]:
        """Wait for the copy (the time counts in ``Sampler.wait_seconds``) and unpack tokens and logprobs.
        ``timeout``: seconds after which a step still running raises TimeoutError (tensor parallelism: a
        replayed graph's collectives have no watchdog, so a rank that died mid-step would stall it for good);
        the wait then polls instead of blocking."""
        if self._done is not None:
            t0 = time.perf_counter()
            if timeout is None:
                self._done.synchronize()
            else:
                nap = 2e-5
                while not self._done.query():
                    if time.perf_counter() - t0 > timeout:
                        raise TimeoutError(f"a step did not finish within {timeout} s")
                    time.sleep(nap)
                    nap = min(2 * nap, 1e-3)  # a short step is read back at once, a stalled one costs no CPU
            self._sampler.wait_seconds += time.perf_counter() - t0
            self._done = None
        return unpack_step(self._packed.tolist(), self._layout)


def unpack_step(flat: list[float], layout: tuple) -> tuple[list[int], list[Optional[PositionLogprobs]]]:
    """Tokens and per-row logprobs from :meth:`Sampler.sample_device`'s packed values."""
    n, wanted, nums, k = layout
    tokens = [int(t) for t in flat[:n]]
    logprobs: list[Optional[PositionLogprobs]] = [None] * n
    w = len(wanted)
    chosen = flat[n:n + w]
    vals = flat[n + w:n + w + w * k]
    tids = flat[n + w + w * k:]
    for j, i in enumerate(wanted):
        d: PositionLogprobs = {tokens[i]: chosen[j]}
        for c in range(min(nums[j], k)):
            d.setdefault(int(tids[j * k + c]), vals[j * k + c])
        logprobs[i] = d
    return tokens, logprobs


def compute_logprobs(
    logits: torch.Tensor,
    token_ids: TokenIds,
    num_top: list[Optional[int]],
    vocab_size: Optional[int] = None,
) -> list[Optional[PositionLogprobs]]:
    """Per row: None if ``num_top[i]`` is None, else {chosen token: logprob} plus
    the ``num_top[i]`` most likely tokens, from ``log_softmax`` of the raw logits
    (before temperature) over the first ``vocab_size`` columns (all if None).

    ``logits`` (n, V), ``token_ids`` (n,). The chosen token comes first in each dict.
    """
    n = logits.shape[0]
    if len(num_top) != n or len(token_ids) != n:
        raise ValueError(
            f"compute_logprobs: got {n} logits rows, {len(token_ids)} token ids and {len(num_top)} num_top"
        )
    result: list[Optional[PositionLogprobs]] = [None] * n
    wanted = [i for i, k in enumerate(num_top) if k is not None]
    if not wanted:
        return result
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    device = logits.device
    rows = torch.tensor(wanted, dtype=torch.long, device=device)
    chosen = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1).to(device)[rows]  # (w,)
    logp = torch.log_softmax(logits[rows].float(), dim=-1)  # (w, V)
    chosen_lp = logp.gather(1, chosen[:, None]).squeeze(1).cpu().tolist()
    k = min(max(num_top[i] for i in wanted), logp.shape[1])  # type: ignore[type-var]
    if k > 0:
        top_vals, top_ids = logp.topk(k, dim=-1)  # (w, k)
        top_vals_l, top_ids_l = top_vals.cpu().tolist(), top_ids.cpu().tolist()
    chosen_l = chosen.cpu().tolist()
    for j, i in enumerate(wanted):
        d: PositionLogprobs = {chosen_l[j]: chosen_lp[j]}
        kk = num_top[i]
        if k > 0 and kk:
            for tid, val in zip(top_ids_l[j][:kk], top_vals_l[j][:kk]):
                d.setdefault(tid, val)
        result[i] = d
    return result


def prompt_logprobs(
    logits: torch.Tensor,
    prompt_token_ids: list[int],
    num_top: int,
    vocab_size: Optional[int] = None,
) -> list[Optional[PositionLogprobs]]:
    """Prompt logprobs: ``logits`` (len(prompt), V), row i predicts prompt token i+1.

    Entry 0 is None; entry i >= 1 holds ``prompt_token_ids[i]`` and the top
    ``num_top`` tokens of row i-1. A trailing row beyond len(prompt)-1 is ignored.
    """
    num = len(prompt_token_ids)
    if num == 0:
        return []
    if logits.shape[0] < num - 1:
        raise ValueError(
            f"prompt_logprobs: need at least {num - 1} logits rows for a {num}-token prompt, "
            f"got {logits.shape[0]}"
        )
    rest = compute_logprobs(
        logits[: num - 1], prompt_token_ids[1:], [num_top] * (num - 1), vocab_size=vocab_size
    )
    return [None] + rest
