"""The ``gpt2`` command (floor 3): one module per command, each a thin layer over the library.

Run ``gpt2 --help``; ``python -m gpt2_cli`` is the same command.
"""

from gpt2_cli.main import main

__all__ = ["main"]
