"""Errors the engine raises. The CLI turns each into one line for the user."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(EngineError):
    """A setting has a value outside what is allowed; the message names the field and the allowed values."""


class DataError(EngineError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


class CheckpointError(EngineError):
    """A checkpoint or model file is missing, corrupt, unsafe or does not fit the model."""


class DivergedError(EngineError):
    """The training loss is no longer finite; the message names the step, iteration and rate to lower."""
