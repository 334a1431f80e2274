"""The error of a checkpoint that does not fit what it is loaded into."""


class CheckpointLoadError(RuntimeError):
    """A checkpoint that does not fit the model; nothing was loaded."""
