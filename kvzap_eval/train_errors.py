"""Exception classes of surrogate training (teacher, corpus, collection); one-line messages that name the fix."""

from __future__ import annotations

from .errors import ConfigError, KVzapError


class TeacherError(KVzapError):
    """The model cannot produce KVzip+ teacher scores (no attention probabilities, unusable prompt)."""


class CorpusError(ConfigError):
    """The training corpus is missing, unreadable, or too short for the token window."""


class OutputDirError(KVzapError):
    """The output directory is not empty, or its collection was made with other settings than this run's."""
