"""The project's error types, and the one wording of a key mismatch. Each error is a ``ValueError``: bad input,
explained in one line that says what to fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot describe a GPT-2 model."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message says which file, key and shapes."""


class TokenizerError(ValueError):
    """The GPT-2 tokenizer files could not be found, downloaded or verified."""


def describe_key_mismatch(missing: list[str], unexpected: list[str], shown: int = 6) -> str:
    """The one wording of a key mismatch: "missing 2 key(s): a, b; unexpected 1 key(s): c" (long lists cut)."""

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")

    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {first(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {first(unexpected)}")
    return "; ".join(parts)
