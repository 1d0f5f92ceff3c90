"""Exceptions that carry a message meant for the user: what is wrong, where, and what to do."""


class CskdError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(CskdError, ValueError):
    """A configuration file or override is invalid (names the file, the key and the allowed values)."""


class CheckpointError(CskdError, RuntimeError):
    """A checkpoint cannot be read or does not fit the model it is loaded into."""


class DataError(CskdError, RuntimeError):
    """A dataset file is missing, unreadable or holds values the dataset does not define."""


class TrainingError(CskdError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class ExportError(CskdError, RuntimeError):
    """An export failed, or the exported model does not reproduce the PyTorch model (verification)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line error messages."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
