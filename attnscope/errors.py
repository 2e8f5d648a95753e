"""Errors attnscope raises. Each message says what went wrong and what to do."""


class AttnscopeError(Exception):
    """Base class: catch this to handle any attnscope error."""


class ModelNotFoundError(AttnscopeError):
    """The model name is neither a known alias, a local path, nor a reachable Hub id."""


class RevisionNotFoundError(AttnscopeError):
    """The model exists but the requested revision (branch, tag, commit) does not."""


class RemoteCodeError(AttnscopeError):
    """The model needs custom code from its repository and the user did not opt in."""


class InputTooLongError(AttnscopeError):
    """The input has more tokens than the model's context allows."""


class MemoryGuardError(AttnscopeError):
    """A request (e.g. full attention maps) would not fit in memory."""


class UnsupportedModelError(AttnscopeError):
    """The model does not route attention through transformers' AttentionInterface."""


class SpecError(AttnscopeError):
    """A probe spec is invalid."""


class StoreError(AttnscopeError):
    """An HDF5 store is missing, corrupt, foreign or not writable."""


class FeatureUnavailableError(AttnscopeError):
    """A requested feature is not available in this installation (missing optional part or not built yet)."""
