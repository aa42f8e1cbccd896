"""Engine configuration: frozen dataclasses validated at construction.

``LLM(**kwargs)`` and the CLI flags are generated from the fields of these
classes (see :func:`EngineConfig.from_kwargs` and :func:`config_fields`), so a
new setting is added in exactly one place. Each field carries its one-line
documentation in ``metadata["help"]`` (and ``metadata["env"]`` where an
environment variable also sets it); ``--help`` prints that text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LORA_BACKENDS = ("torch", "triton", "auto")  # loraplex.lora.backends.base registers them
_ATTENTION_BACKENDS = ("torch", "triton", "auto")  # loraplex.attention.registry registers them


def _doc(default: Any, help: str, env: Optional[str] = None) -> Any:
    """A field with a default and its documentation (the CLI help of its flag)."""
    return field(default=default, metadata={"help": help, **({"env": env} if env else {})})


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """The base model: a Hugging Face folder and how to run it."""

    model: str = field(metadata={"help": "Hugging Face model folder (config.json, safetensors weights, tokenizer)"})
    tokenizer: Optional[str] = _doc(None, "tokenizer folder (None: the model folder)")
    dtype: str = _doc("auto", "weight and activation dtype: auto, float32, bfloat16 or float16 (auto: the "
                              "folder's torch_dtype, float32 on CPU where that is float16)")
    max_model_len: Optional[int] = _doc(None, "longest sequence, prompt plus output, in tokens (None: the "
                                              "model's max_position_embeddings)")
    seed: int = _doc(0, "seed of the dummy weights and of sampling for requests without a seed of their own")
    load_format: str = _doc("auto", "auto: read the folder's safetensors weights; dummy: random weights, no "
                                    "checkpoint read (benchmarks, profiling)")
    max_image_pixels: int = _doc(4096 * 4096, "vision-language models: largest image accepted, in pixels "
                                              "(width x height); larger ones are refused")
    enforce_eager: bool = _doc(False, "CUDA: run every step eagerly, without the CUDA graphs of decode steps "
                                      "captured at start-up")
    async_scheduling: Optional[bool] = _doc(None, "apply each step's results while the device runs the next "
                                                 "step, whose inputs it samples on the device (None: on for "
                                                 "CUDA, off for CPU, where nothing would overlap)")
    max_cudagraph_capture_size: Optional[int] = _doc(None, "CUDA: largest decode batch run as a CUDA graph; "
                                                           "larger ones run eagerly (None: max_num_seqs)")

    def __post_init__(self) -> None:
        _require(isinstance(self.model, str) and bool(self.model), "model must be a path to a model folder")
        _require(self.load_format in ("auto", "dummy"), f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        _require(self.max_image_pixels >= 1, f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        _require(self.dtype in _DTYPES, f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        _require(self.max_model_len is None or self.max_model_len >= 1,
                 f"max_model_len must be >= 1, got {self.max_model_len}")
        _require(self.max_cudagraph_capture_size is None or self.max_cudagraph_capture_size >= 1,
                 f"max_cudagraph_capture_size must be >= 1, got {self.max_cudagraph_capture_size}")


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs."""

    device: str = _doc("auto", "auto, cpu, cuda or cuda:N (auto: cuda when available, else cpu)")

    def __post_init__(self) -> None:
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism: the model sharded over processes (one per GPU; gloo ranks on CPU)."""

    tensor_parallel_size: int = _doc(1, "ranks the model is sharded over; the engine starts ranks 1.. as worker "
                                        "processes (torch.distributed: NCCL on CUDA, gloo on CPU)")
    distributed_timeout: float = _doc(120.0, "seconds a collective may wait for a rank before the engine fails "
                                             "with an error naming the ranks that exited")

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1, f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        _require(self.distributed_timeout > 0, f"distributed_timeout must be > 0, got {self.distributed_timeout}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. ``num_kv_blocks`` overrides the size computed from memory."""

    block_size: int = _doc(16, "tokens per KV-cache block")
    num_kv_blocks: Optional[int] = _doc(None, "KV-cache blocks to allocate (None: enough for max_num_seqs "
                                              "full-length sequences, within the memory budget)")
    gpu_memory_utilization: float = _doc(0.90, "CUDA: share of the GPU's total memory, in (0, 1], that "
                                               "weights, activations and the KV cache may fill")
    cpu_kv_cache_gib: float = _doc(4.0, "CPU: memory for the KV cache, in GiB")
    enable_prefix_caching: bool = _doc(True, "keep full KV blocks after their request ends, keyed by their "
                                             "tokens, all earlier tokens and the adapter's content, and start "
                                             "new requests from the longest cached prefix "
                                             "(--no-enable-prefix-caching: recompute every prompt)")
    encoder_cache_size: int = _doc(8192, "vision-language models: image feature rows kept after encoding, "
                                         "keyed by the image's pixels and the request's adapter, so repeated "
                                         "images and preempted requests skip the vision tower (0: off)")
    attention_backend: str = _doc("auto", "paged attention: torch (reference, any device), triton (kernels that "
                                          "read the paged cache in place, CUDA) or auto (triton on CUDA when it "
                                          "imports, else torch)")

    def __post_init__(self) -> None:
        _require(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 1,
                 f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        _require(0 < self.gpu_memory_utilization <= 1,
                 f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _require(self.cpu_kv_cache_gib > 0, f"cpu_kv_cache_gib must be > 0, got {self.cpu_kv_cache_gib}")
        _require(self.encoder_cache_size >= 0, f"encoder_cache_size must be >= 0, got {self.encoder_cache_size}")
        _require(self.attention_backend in _ATTENTION_BACKENDS,
                 f"attention_backend must be one of {_ATTENTION_BACKENDS}, got {self.attention_backend!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching: how many sequences and tokens one engine step may hold."""

    max_num_seqs: int = _doc(64, "most sequences running at once (the batch of a decode step)")
    max_num_batched_tokens: Optional[int] = _doc(None, "most tokens in one engine step, prompts and decodes "
                                                       "together (None: max(2048, max_num_seqs) with chunked "
                                                       "prefill, else max(max_model_len, 2048)); without "
                                                       "chunked prefill at least max_model_len")
    enable_chunked_prefill: bool = _doc(True, "split long prompts into chunks that share steps with running "
                                              "decodes, filling each step's token budget decodes first "
                                              "(--no-enable-chunked-prefill: every prompt in one step)")
    long_prefill_token_threshold: int = _doc(0, "with chunked prefill, the most prompt tokens one request "
                                                "prefills in a step (0: the step's budget): a smaller chunk "
                                                "keeps the steps it shares with running decodes short, at the "
                                                "cost of its own time to first token")

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _require(self.long_prefill_token_threshold >= 0,
                 f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        _require(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
                 f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        # Every running sequence decodes one token each step, within the step's token budget.
        _require(not self.enable_chunked_prefill or self.max_num_batched_tokens is None
                 or self.max_num_batched_tokens >= self.max_num_seqs,
                 f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                 f"({self.max_num_seqs}) with chunked prefill: each step decodes one token per running sequence")


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter residency: ``max_loras`` device slots, ``max_cpu_loras`` in host memory."""

    enable_lora: bool = _doc(True, "wrap the model's layers for LoRA adapters (--no-enable-lora: base model only)")
    max_loras: int = _doc(4, "adapter slots on the device: most distinct adapters in one batch")
    max_lora_rank: int = _doc(64, "largest adapter rank accepted; the slot buffers are sized for it")
    max_cpu_loras: Optional[int] = _doc(None, "loaded adapters kept in host memory, least recently used evicted "
                                              "and re-read when needed (None: max(max_loras, 16))")
    lora_backend: str = _doc("auto", "LoRA kernels: torch (reference), triton (segmented kernels, CUDA) or auto "
                                     "(triton on CUDA when it imports, else torch)")
    lora_resolvers: Optional[str] = _doc(None, "where a request's unregistered adapter is looked for, tried in "
                                               "order, comma-separated: a folder (<folder>/<name>), "
                                               "s3://bucket/prefix (any S3-compatible endpoint: AWS_ENDPOINT_URL), "
                                               "hf:// (the Hub repository <name>); found adapters are registered")
    lora_cache_dir: Optional[str] = _doc(None, "local disk cache for adapters fetched by resolvers (None: "
                                               "~/.cache/loraplex/adapters; the Hub's own cache for hf://)")
    enable_lora_merging: bool = _doc(False, "while every running request uses one adapter, run its steps on "
                                            "weights with that adapter merged in (as fast as the base model); "
                                            "keeps a copy of the linear layers' weights (each rank its shard; "
                                            "adapters with DoRA, LoRA bias or LoRA on the embedding or head are "
                                            "not merged)")

    def __post_init__(self) -> None:
        _require(self.max_loras >= 1, f"max_loras must be >= 1, got {self.max_loras}")
        _require(self.max_lora_rank >= 1, f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        _require(self.max_cpu_loras is None or self.max_cpu_loras >= self.max_loras,
                 f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        _require(self.lora_backend in _LORA_BACKENDS,
                 f"lora_backend must be one of {_LORA_BACKENDS}, got {self.lora_backend!r}")
        if self.lora_resolvers:
            from loraplex.lora.resolvers import make_resolvers

            try:
                make_resolvers(self.lora_resolvers, self.lora_cache_dir)
            except ValueError as e:
                raise ValueError(f"lora_resolvers: {e}") from None

    @property
    def cpu_capacity(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else max(self.max_loras, 16)


_SECTIONS = {
    "model_config": ModelConfig,
    "device_config": DeviceConfig,
    "cache_config": CacheConfig,
    "scheduler_config": SchedulerConfig,
    "lora_config": LoRAConfig,
    "parallel_config": ParallelConfig,
}


def config_fields() -> list[tuple[str, dataclasses.Field]]:
    """Every user-settable field of every section, as (section, field)."""
    return [(sec, f) for sec, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    device_config: DeviceConfig = field(default_factory=DeviceConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora_config: LoRAConfig = field(default_factory=LoRAConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        lc = self.lora_config
        if lc.enable_lora_merging:
            _require(lc.enable_lora, "enable_lora_merging merges adapters: it needs enable_lora")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat keyword arguments (``LLM(model=..., max_loras=...)``)."""
        per_section: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        names = {f.name: sec for sec, f in config_fields()}
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        for k, v in kwargs.items():
            per_section[names[k]][k] = v
        return cls(**{sec: _SECTIONS[sec](**vals) for sec, vals in per_section.items()})


@dataclass(frozen=True)
class ServerConfig:
    """HTTP server settings (``loraplex serve``); flags are generated from these fields."""

    host: str = _doc("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = _doc(8000, "TCP port to listen on (0: any free port)")
    api_key: Optional[str] = _doc(None, "key every route but /health requires as 'Authorization: Bearer KEY' "
                                        "(None: no key); the environment variable keeps it out of the process "
                                        "list", env="LORAPLEX_API_KEY")
    served_model_name: Optional[str] = _doc(None, "model name that clients send and /v1/models lists (None: the "
                                                  "model folder's name)")
    allow_runtime_lora_updates: bool = _doc(False, "accept POST /v1/load_lora_adapter and "
                                                   "/v1/unload_lora_adapter (needs --lora-root)")
    lora_root: Optional[str] = _doc(None, "folder that every file of a runtime adapter load must resolve inside "
                                          "(None: no runtime loads)")
    max_request_body_bytes: int = _doc(32 * 1024 * 1024, "largest request body, in bytes; larger ones get 413")
    allow_remote_images: bool = _doc(False, "fetch http(s) image URLs in chat messages (otherwise data: URLs "
                                            "only)")
    timeout_graceful_shutdown: float = _doc(30.0, "seconds that requests in flight may run after SIGTERM "
                                                  "before they are aborted (0: no limit)")
    log_level: str = _doc("info", "log level: debug, info, warning, error or critical")
    chat_template: Optional[str] = _doc(None, "chat template for chat requests: a file or an inline Jinja "
                                              "string (None: the model folder's)")
    max_adapter_metrics: int = _doc(32, "adapters with their own series in /metrics (the first that get "
                                        "traffic); the others share the label 'other'")
    max_seqs_per_request: Optional[int] = _doc(None, "most sequences one request may ask for, prompts x n "
                                                     "(None: the engine's max_num_seqs)")

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535 or self.port == 0, f"port must be in [0, 65535], got {self.port}")
        _require(self.api_key is None or len(self.api_key) > 0, "api_key must not be empty")
        _require(self.max_request_body_bytes >= 1024, "max_request_body_bytes must be at least 1024")
        _require(not self.allow_runtime_lora_updates or self.lora_root is not None,
                 "--allow-runtime-lora-updates needs --lora-root: runtime loads are only accepted from inside it")
        _require(self.timeout_graceful_shutdown >= 0, "timeout_graceful_shutdown must be >= 0")
        _require(self.chat_template is None or len(self.chat_template) > 0, "chat_template must not be empty")
        _require(self.max_seqs_per_request is None or self.max_seqs_per_request >= 1,
                 f"max_seqs_per_request must be >= 1, got {self.max_seqs_per_request}")
        _require(self.max_adapter_metrics >= 0, f"max_adapter_metrics must be >= 0, got {self.max_adapter_metrics}")
