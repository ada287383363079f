"""Model names -> checkpoint files on disk: the Hugging Face Hub, and OpenAI's original files from its bucket.

Every place that reads a checkpoint (``load_checkpoint``, ``--weights``, ``--init-from``, ``gpt2 convert IN``)
takes a path or one of these names; :func:`locate_checkpoint` turns either into a path:

* **a local path always wins.** When it also spells a model name, a note on stderr says which one was used;
* ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (``openai-community/...`` on the Hub) and any Hub repo id
  ``owner/name[@revision]``: through ``huggingface_hub`` (its cache, ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_ENDPOINT``
  for mirrors, ``HF_HUB_OFFLINE``, its progress bars). Only what the mapper reads is fetched: ``config.json`` and
  ``model.safetensors`` (or the sharded index and its shards, or ``pytorch_model.bin`` when that is all there
  is); no repository code is ever run;
* ``openai:124M|355M|774M|1558M``: OpenAI's TensorFlow checkpoint, from its public bucket (the route of
  openai/gpt-2's own script, picoGPT, the course and llm.c), falling back to the course's backup mirror, into
  ``$GPT2_CACHE/openai/<size>`` (default: the platform's user cache folder, ``~/.cache/gpt2-from-scratch`` on
  Linux). ``$GPT2_OPENAI_BASE_URL`` replaces both (files at ``<base>/models/<size>/<file>``). Each file is
  fetched into ``<dest>/.partial/`` with a progress bar, a cut transfer resumes with an HTTP ``Range`` request
  (also in a later run), each file is checked (its size; the tokenizer files' sha256; ``hparams.json``; the
  index parsed and every tensor's crc32c against it), and the seven files move into ``<dest>`` only when all
  are complete: a folder that holds them is a whole checkpoint.

Every failure is one ``DownloadError`` line (a ``CheckpointError``, so a ``ValueError``) naming the model, where
it was looked for and what to do.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mapper.atomic import fsync_dir
from mapper.config import ConfigError, GPT2Config
from mapper.errors import CheckpointError
from mapper.formats import openai_tf
from mapper.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256

HUB_ALIASES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
OPENAI_SIZES = ("124M", "355M", "774M", "1558M")
# OpenAI's public bucket, as openai/gpt-2's download_model.py, picoGPT and llm.c fetch it: <base>/models/<size>/<file>
OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2"
# The course's backup mirror of the same files (rasbt/LLMs-from-scratch, ch05 gpt_download.py): <mirror>/<size>/<file>
BOOK_MIRROR_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2"
# In download order: the data last, so the index it is checked against is already there.
OPENAI_FILES = ("checkpoint", "hparams.json", "encoder.json", "vocab.bpe", "model.ckpt.index", "model.ckpt.meta",
                "model.ckpt.data-00000-of-00001")
BASE_URL_ENV = "GPT2_OPENAI_BASE_URL"
CACHE_ENV = "GPT2_CACHE"
TIMEOUT_S = 60  # per network read: a stalled server fails the attempt instead of hanging
ATTEMPTS = 3  # per URL: a transfer cut mid-file resumes where it stopped, this many times
_CHUNK = 1 << 20
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".index", ".ckpt", ".npz", ".tiktoken")
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
_ALIAS = re.compile(r"(?P<alias>[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


class DownloadError(CheckpointError):
    """A model name that could not be turned into files on disk; the message says where it looked and what to do."""


@dataclass(frozen=True)
class ModelName:
    """A model by name: a Hub repo (``hub_repo`` at ``revision``) or OpenAI's files of one size (``openai_size``)."""

    text: str  # as the user wrote it
    hub_repo: str | None = None
    revision: str | None = None
    openai_size: str | None = None

    def describe(self) -> str:
        if self.openai_size:
            return f"{self.text} (OpenAI's original {self.openai_size} TensorFlow checkpoint)"
        at = f" at revision {self.revision}" if self.revision else ""
        return f"{self.text} ({self.hub_repo}{at} on the Hugging Face Hub)"


def known_names() -> str:
    """The names :func:`parse_model_name` knows, in words (for error messages and help)."""
    return (f"{', '.join(HUB_ALIASES)} or any owner/name[@revision] (Hugging Face Hub), "
            f"{', '.join(f'openai:{s}' for s in OPENAI_SIZES)} (OpenAI's original files)")


def parse_model_name(text: str) -> ModelName | None:
    """The model ``text`` names, or None when it is not a name (then it can only be a path). An ``openai:`` name of
    a size OpenAI never released is a ``DownloadError`` listing the four."""
    if text.startswith("openai:"):
        size = text[len("openai:") :]
        if size not in OPENAI_SIZES:
            raise DownloadError(f"{text}: OpenAI released the sizes {', '.join(OPENAI_SIZES)}, not {size!r}")
        return ModelName(text, openai_size=size)
    alias = _ALIAS.fullmatch(text)
    if alias and alias["alias"] in HUB_ALIASES:
        return ModelName(text, hub_repo=HUB_ALIASES[alias["alias"]], revision=alias["revision"])
    hub = _HUB_ID.fullmatch(text)
    if hub and ".." not in text and not hub["repo"].endswith(_FILE_SUFFIXES):
        return ModelName(text, hub_repo=hub["repo"], revision=hub["revision"])
    return None


def cache_root() -> Path:
    """Where this project keeps what it downloads: ``$GPT2_CACHE``, else the platform's user cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gpt2-from-scratch"


def is_local_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` exists here (a TensorFlow checkpoint prefix exists through its ``.index``)."""
    return Path(path).exists() or Path(f"{path}.index").is_file()


def locate_checkpoint(path_or_name: str | os.PathLike[str]) -> Path:
    """A checkpoint path for ``path_or_name``: an existing local path as it is (a note on stderr when it also
    spells a model name), else the folder a model name downloads to (:func:`fetch`). A ``Path`` is only a path."""
    path = Path(path_or_name)
    name = parse_model_name(path_or_name) if isinstance(path_or_name, str) else None
    if is_local_path(path):
        if name is not None:
            kind = "folder" if path.is_dir() else "file"
            print(f"note: {path_or_name} is the local {kind} {path.resolve()}, used instead of the model "
                  f"{name.describe()}: a local path always wins", file=sys.stderr)
        return path
    if name is None:
        if isinstance(path_or_name, str) and "/" not in path_or_name and not path_or_name.endswith(_FILE_SUFFIXES):
            raise CheckpointError(f"{path_or_name} is neither a local path nor a model name; known names: "
                                  f"{known_names()}")
        raise CheckpointError(f"checkpoint path {path} does not exist")
    try:
        return fetch(name)
    except DownloadError as e:
        if "/" not in name.text.split("@")[0]:  # gpt2, openai:124M: names only, never a path
            raise
        raise DownloadError(f"{path_or_name} is not a local path, nor a model to be had: {e}") from None


def fetch(name: ModelName | str, to: str | os.PathLike[str] | None = None) -> Path:
    """Download the model ``name`` (or find it in the cache) and return the folder holding its files; ``to`` puts
    them in that folder instead of the cache. Raises ``DownloadError``."""
    if isinstance(name, str):
        parsed = parse_model_name(name)
        if parsed is None:
            raise DownloadError(f"{name} is not a model name; known names: {known_names()}")
        name = parsed
    target = None if to is None else Path(to)
    if name.openai_size:
        return fetch_openai(name, target)
    return fetch_hub(name, target)


# ----- the Hugging Face Hub -----


def fetch_hub(name: ModelName, to: Path | None = None) -> Path:
    """``config.json`` and the weights of a Hub repo through ``huggingface_hub``: ``model.safetensors``, else the
    sharded index and its shards, else ``pytorch_model.bin``. Returns the folder (a cache snapshot, or ``to``)."""
    # Only a Hub download needs huggingface_hub. A file the Hub lacks is an EntryNotFoundError, one missing from the
    # cache while offline its LocalEntryNotFoundError subclass: every ``except`` below names the local one first.
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{to}" if to is not None else f"the Hugging Face cache {constants.HF_HUB_CACHE}"

    def get(filename: str) -> Path:
        try:
            return Path(huggingface_hub.hf_hub_download(name.hub_repo, filename, revision=name.revision,
                                                        local_dir=to))
        except EntryNotFoundError:
            raise
        except RevisionNotFoundError:
            raise DownloadError(f"{name.describe()}: the repo has no revision {name.revision!r}") from None
        except RepositoryNotFoundError:
            raise DownloadError(
                f"the Hugging Face Hub ({constants.ENDPOINT}) has no model {name.hub_repo} (or it is private or "
                "gated: log in with `hf auth login`)"
            ) from None
        except (HfHubHTTPError, OSError) as e:
            raise DownloadError(f"{name.describe()}: downloading {filename} failed ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no details'})") from None

    def unavailable() -> DownloadError:
        if constants.HF_HUB_OFFLINE:
            return DownloadError(
                f"{name.describe()} is not in {where} and HF_HUB_OFFLINE is set: unset it to download the model, or "
                f"fetch it where there is internet first (`gpt2 download {name.text}`)"
            )
        return DownloadError(
            f"{name.describe()}: the Hub ({constants.ENDPOINT}) cannot be reached and the files are not in {where}; "
            f"check the connection, set HF_ENDPOINT to a mirror, or set HF_HUB_OFFLINE=1 once they are cached"
        )

    try:
        config = get("config.json")
    except LocalEntryNotFoundError:
        raise unavailable() from None
    except EntryNotFoundError:
        raise DownloadError(f"{name.describe()} has no config.json: not a transformers GPT-2 model") from None
    offline = False
    for weights in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        try:
            path = get(weights)
        except LocalEntryNotFoundError:
            offline = True  # not in the cache; a later candidate may be
            continue
        except EntryNotFoundError:
            continue
        if weights.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise DownloadError(f"{name.describe()}: its {weights} has no usable 'weight_map' ({e})") from None
            try:
                for shard in shards:
                    get(shard)
            except LocalEntryNotFoundError:
                raise unavailable() from None
            except EntryNotFoundError:
                raise DownloadError(f"{name.describe()}: its {weights} names a shard the repo lacks") from None
        if path.parent != config.parent:
            raise DownloadError(f"{name.describe()}: config.json and {weights} came from different folders")
        return path.parent
    if offline:
        raise unavailable()
    raise DownloadError(f"{name.describe()} holds no model.safetensors, model.safetensors.index.json or "
                        "pytorch_model.bin: no GPT-2 weights this project reads")


# ----- OpenAI's bucket -----


def fetch_openai(name: ModelName, to: Path | None = None) -> Path:
    """OpenAI's seven files of one size into ``to`` (default ``cache_root()/openai/<size>``); see the module
    docstring for the route, the checks and the resume. Returns the folder."""
    size = name.openai_size
    dest = to if to is not None else cache_root() / "openai" / size
    if all((dest / f).is_file() for f in OPENAI_FILES):
        return dest  # files arrive only together and checked, so all seven there is a whole checkpoint
    base = os.environ.get(BASE_URL_ENV)
    routes = [f"{base.rstrip('/')}/models/{size}/"] if base else [f"{OPENAI_BASE_URL}/models/{size}/",
                                                                  f"{BOOK_MIRROR_URL}/{size}/"]
    staging = dest / ".partial"
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"{name.describe()}: cannot create {staging} ({e.strerror})") from None
    for filename in OPENAI_FILES:
        if (dest / filename).is_file() or (staging / filename).is_file():
            continue
        failures, url = [], None
        for route in routes:
            try:
                _download(route + filename, staging / f"{filename}.part", filename)
                url = route + filename
                break
            except _TransferError as e:
                failures.append(f"{route + filename}: {e}")
        if url is None:
            raise DownloadError(
                f"cannot download {name.describe()}: {'; '.join(failures)}. Nothing incomplete is used (what arrived "
                f"waits in {staging} and resumes next time); check the connection, set {BASE_URL_ENV} to a mirror "
                f"(files at <base>/models/{size}/<file>), or put OpenAI's {len(OPENAI_FILES)} files in {dest}"
            )
        os.replace(staging / f"{filename}.part", staging / filename)
        try:
            _check_openai_file(filename, staging)
        except (CheckpointError, ConfigError, ValueError) as e:
            (staging / filename).unlink()
            raise DownloadError(f"{url} is not OpenAI's {filename} ({e}); the download was removed, run again to "
                                f"fetch it anew{'' if base else ' (the mirror is tried when the bucket fails)'}"
                                ) from None
    for filename in reversed(OPENAI_FILES):  # the data first, the `checkpoint` file that names it last
        os.replace(staging / filename, dest / filename)
    fsync_dir(dest)
    shutil.rmtree(staging, ignore_errors=True)
    return dest


class _TransferError(Exception):
    """One URL failed (unreachable, an HTTP error, or cut more often than ``ATTEMPTS``); the next route is tried."""


def _download(url: str, part: Path, label: str) -> None:
    """``url`` into ``part``, appending to what an earlier attempt left there (HTTP Range); the size the server
    announced is checked. Raises ``_TransferError``."""
    from tqdm import tqdm

    for _ in range(ATTEMPTS):
        have = part.stat().st_size if part.is_file() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                total = _expected_size(response, have)
                if response.status != 206:
                    have = 0  # the server sent the whole file: start over
                with open(part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                    file=sys.stderr,
                ) as bar:
                    while chunk := response.read(_CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
            got = part.stat().st_size
            if total is None or got == total:
                return
            if got > total:
                part.unlink()
                raise _TransferError(f"received {got} bytes, more than the {total} announced")
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing after what we hold: that part is not a prefix of this file
                part.unlink()
                continue
            raise _TransferError(f"HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise _TransferError(f"unreachable ({e.reason})") from None
        except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
            if (part.stat().st_size if part.is_file() else 0) <= have:  # no progress: give up on this URL
                raise _TransferError(f"the transfer failed ({type(e).__name__})") from None
    raise _TransferError(f"the transfer was cut {ATTEMPTS} times")


def _expected_size(response: http.client.HTTPResponse, have: int) -> int | None:
    """The file's whole size from ``Content-Range`` (a 206 answer, which must start where we are) or
    ``Content-Length`` (a 200 answer); None when the server does not say."""
    if response.status == 206:
        found = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", response.headers.get("Content-Range", ""))
        if found is None or int(found[1]) != have:
            raise _TransferError(f"a resumed transfer answered Content-Range {response.headers.get('Content-Range')!r}"
                                 f" for bytes {have}-")
        return int(found[2])
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _check_openai_file(filename: str, folder: Path) -> None:
    """The content checks of each of OpenAI's files (the data against the index already in ``folder``)."""
    path = folder / filename
    if filename in ("encoder.json", "vocab.bpe"):
        expected = ENCODER_JSON_SHA256 if filename == "encoder.json" else VOCAB_BPE_SHA256
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise ValueError(f"sha256 {actual[:12]}..., expected {expected[:12]}...")
    elif filename == "hparams.json":
        try:
            GPT2Config.from_openai_hparams(json.loads(path.read_bytes()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
            raise ValueError(f"not OpenAI's hparams JSON: {e}") from None
    elif filename == "checkpoint":
        if b"model_checkpoint_path:" not in path.read_bytes():
            raise ValueError("no model_checkpoint_path line")
    elif filename == "model.ckpt.index":
        openai_tf.read_index(folder / "model.ckpt")
    elif filename.startswith("model.ckpt.data-"):
        from tqdm import tqdm

        prefix = folder / "model.ckpt"
        num_shards, entries = openai_tf.read_index(prefix)
        total = sum(entry.size for entry in entries.values())
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="checking crc32c",
                  file=sys.stderr) as bar:
            for entry in entries.values():  # truncation, and each tensor's crc32c as the index records it
                openai_tf.read_tensor(prefix, num_shards, entry)
                bar.update(entry.size)
