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


class CorruptDataError(StoreError):
    """Data in an HDF5 file attnscope wrote fails its checksum or cannot be read back."""


class OutputExistsError(AttnscopeError):
    """An output path is taken (an existing file without --overwrite, a batch store, a folder)."""


class NoSpaceError(AttnscopeError):
    """The filesystem has no room for an output (ENOSPC, or a disk quota)."""


class TextSourceError(AttnscopeError):
    """A text (shipped corpus name or user file) cannot be found or read."""


class ProbeBuildError(AttnscopeError):
    """A valid probe spec cannot be turned into a prompt of the requested length or depth."""


class FilterError(AttnscopeError):
    """A registry lookup filter names an unknown column or gives a value of the wrong kind."""


class OfflineError(AttnscopeError):
    """Data that must come from the Hub is unreachable (offline) and nothing is cached locally."""


class BackendError(AttnscopeError):
    """A backend (native, transformer_lens, nnsight) cannot run: its extra is not installed,
    or it cannot run this kind of model."""


class FeatureUnavailableError(AttnscopeError):
    """A requested feature is not available in this installation (missing optional part or not built yet)."""


class HubUnreachableError(OfflineError, ModelNotFoundError):
    """A model must come from the Hub, the Hub cannot be reached (or offline mode is on), and
    the checkpoint is not in the local cache."""
