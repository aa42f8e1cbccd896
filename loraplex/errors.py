"""Error types raised by loraplex.

Both user-facing errors subclass ``ValueError`` so that callers who only know
the standard library can still catch them; each message names the thing that
is wrong (adapter, file, tensor key, expected vs actual shape).
"""


class LoraplexError(Exception):
    """Base class of every error loraplex raises on purpose."""


class AdapterError(LoraplexError, ValueError):
    """A LoRA adapter cannot be used: missing files, bad config, shapes that do
    not fit the base model, unsupported PEFT features, non-finite weights."""


class InvalidRequestError(LoraplexError, ValueError):
    """A request cannot be served as given: bad prompt, bad sampling parameters,
    unknown adapter name, prompt longer than ``max_model_len``."""


class ModelLoadError(LoraplexError, ValueError):
    """The base model folder cannot be loaded (missing files, unsupported
    architecture, weights that do not match the config)."""


class TensorParallelError(LoraplexError, RuntimeError):
    """A tensor-parallel rank exited or stopped answering: the engine cannot continue (the message names the
    ranks that exited and their exit codes)."""
