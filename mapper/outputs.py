"""What a command writes, checked before it does any work: the one rule every writing command applies.

1. **Inputs are never written.** No output may be an input, contain one, or lie inside one, after symlinks and
   ``..`` are resolved (``--out D.jsonl --data D.jsonl``, ``--init-from P --out P``, ``convert IN IN/sub``).
2. **Nothing is replaced unasked.** An existing file the command would write is replaced only with ``--force``
   (a file output itself; for a folder output, the files it would write into the folder).
3. **The outputs can be written.** A probe file is created and removed where each output goes, so a read-only
   or missing folder, or a file where a folder is needed, fails in one line before hours of work, not after.

Each failure is a ``ValueError`` naming the flag and the path. Nothing is created except the probe.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Output:
    """One output of a command: a file (``names`` None) or a folder and the ``names`` it writes into it."""

    flag: str  # as the user knows it: "--out", "--json", "OUT"
    path: Path
    names: tuple[str, ...] | None = None

    @property
    def is_folder(self) -> bool:
        return self.names is not None


def check_outputs(outputs: Sequence[Output], inputs: Mapping[str, str | os.PathLike[str] | Iterable | None],
                  force: bool = False) -> None:
    """Apply the module's three rules to ``outputs`` given the command's ``inputs`` (flag -> a path, several
    paths, or None when the flag was not given). ``force``: the command's ``--force`` was given."""
    given = [(flag, Path(p)) for flag, value in inputs.items() for p in _paths(value)]
    for i, out in enumerate(outputs):
        for flag, path in given:
            _check_apart(out, flag, path)
        for other in outputs[:i]:
            if _resolved(other.path) == _resolved(out.path):
                raise ValueError(f"{other.flag} and {out.flag} name the same path {out.path}; give each its own")
        if out.is_folder:
            _check_folder(out, force)
        else:
            _check_file(out, force)


def _paths(value) -> list[str | os.PathLike[str]]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _check_apart(out: Output, flag: str, path: Path) -> None:
    if not path.exists():  # a name (``--init-from gpt2``) or a missing file, which its reader will report
        return
    o, i = _resolved(out.path), _resolved(path)
    if o == i:
        relation = "is"
    elif i in o.parents:
        relation = "lies inside"
    elif o in i.parents:
        relation = "contains"
    else:
        return
    raise ValueError(f"{out.flag} {out.path} {relation} the input {flag} {path}; an input is never written: choose "
                     f"another {out.flag}")


def _check_file(out: Output, force: bool) -> None:
    path = out.path
    if path.is_dir():
        raise ValueError(f"{out.flag} {path} is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{out.flag} {path}: the folder {folder} does not exist" if not folder.exists() else
                         f"{out.flag} {path}: {folder} is not a folder")
    if path.exists() and not force:
        raise ValueError(f"{out.flag} {path} already exists; pass --force to replace it")
    _probe(out, folder)


def _check_folder(out: Output, force: bool) -> None:
    path = out.path
    if path.exists() and not path.is_dir():
        raise ValueError(f"{out.flag} {path} exists and is not a folder")
    present = [name for name in out.names or () if (path / name).exists()]
    if present and not force:
        raise ValueError(f"{out.flag} {path} already holds {', '.join(present)}, which this command would replace; "
                         "pass --force to replace, or choose another folder")
    existing = path
    while not existing.exists():  # a folder still to be made: probe the nearest one that is there
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{out.flag} {path}: {existing} is not a folder")
    _probe(out, existing)


def _probe(out: Output, folder: Path) -> None:
    """Create and remove a file in ``folder``: the one sure test that the output can be written there."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".gpt2-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{out.flag} {out.path}: cannot write in {folder} ({e.strerror})") from None
