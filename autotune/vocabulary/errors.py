"""Errors the user can act on.

Anything raised as an ``AutotuneError`` is printed by the CLI as one line on stderr with a non-zero
exit code; anything else is a bug and keeps its traceback (shown with ``--debug``).
"""


class AutotuneError(Exception):
    """Base class: the message is the whole story, written for the user."""

    exit_code = 2


class ModelError(AutotuneError):
    """The model file cannot be read as a GGUF model we understand."""


class EngineRefused(ModelError):
    """The engine refuses these settings for this model, with its own reason: an answer (e.g. it cannot
    allocate that context)."""


class EngineDied(ModelError):
    """The engine process died (crash, abort, kill, hang) before it answered: no answer at all, never to be read
    as "does not fit"."""

    exit_code = 3


class SettingsError(AutotuneError):
    """A combination of settings the engine would refuse or silently change."""


class FitError(AutotuneError):
    """The requested configuration does not fit this machine's memory."""


class StudyError(AutotuneError):
    """The study storage is unusable (unwritable, corrupt, foreign)."""


class ConfigError(AutotuneError):
    """An exported config file is invalid or from a newer schema."""


class FetchError(AutotuneError):
    """A catalog model could not be fetched or failed its checksum."""
