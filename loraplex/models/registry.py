"""Hugging Face architecture name -> loraplex model class, imported lazily."""

from __future__ import annotations

import importlib

from loraplex.errors import ModelLoadError

# architecture -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("loraplex.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("loraplex.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("loraplex.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("loraplex.models.llama", "Qwen3ForCausalLM"),
    "Qwen2VLForConditionalGeneration": ("loraplex.models.qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "LlavaForConditionalGeneration": ("loraplex.models.llava", "LlavaForConditionalGeneration"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_class(architectures: list[str] | None) -> type:
    for arch in architectures or []:
        if arch in _MODELS:
            module, name = _MODELS[arch]
            return getattr(importlib.import_module(module), name)
    raise ModelLoadError(f"unsupported model architecture {architectures}; supported: {supported_architectures()}")
