"""loraplex: serve one base LLM with many LoRA adapters in every batch.

``import loraplex`` is light: the engine, torch models and server load on first use.
"""

from loraplex.errors import AdapterError, InvalidRequestError, LoraplexError, ModelLoadError, TensorParallelError
from loraplex.types import CompletionOutput, LoRARequest, RequestOutput, SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "LoRARequest", "RequestOutput", "CompletionOutput",
           "AdapterError", "InvalidRequestError", "ModelLoadError", "TensorParallelError", "LoraplexError", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from loraplex.llm import LLM

        return LLM
    raise AttributeError(f"module 'loraplex' has no attribute {name!r}")
