"""Exceptions raised by mlxgen. Every message says what was wrong and what to do."""


class MlxgenError(Exception):
    """Base class for all mlxgen errors."""


class ModelLoadError(MlxgenError):
    """A model source could not be loaded (missing, corrupt, truncated or mismatched files)."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture, tensor type or configuration is not supported."""


class OllamaModelNotFound(ModelLoadError):
    """An `ollama:NAME[:TAG]` source does not resolve in the local Ollama store."""


class ConfigError(MlxgenError, ValueError):
    """An invalid argument or MLXGEN_* environment value."""


class PromptTooLongError(MlxgenError, ValueError):
    """The prompt (plus requested tokens) does not fit in the model's context."""


class ChunkStoreError(MlxgenError, ValueError):
    """A stored chunk cannot be used here: another model's, another store's, or over the limit."""


class CorruptChunkError(ChunkStoreError):
    """A chunk file on disk is truncated, corrupt or of an unknown format version."""
