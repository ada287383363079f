"""The project's error types. Each is a ``ValueError``: bad input, explained in one line that says what to fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot describe a GPT-2 model."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message says which file, key and shapes."""


class TokenizerError(ValueError):
    """The GPT-2 tokenizer files could not be found, downloaded or verified."""
