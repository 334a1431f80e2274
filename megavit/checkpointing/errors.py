"""The error of a checkpoint that does not fit what it is loaded into."""

from megavit.errors import UserError


class CheckpointLoadError(UserError, RuntimeError):
    """A checkpoint that does not fit the model; nothing was loaded."""
