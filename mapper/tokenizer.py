"""GPT-2's byte-level BPE tokenizer (tiktoken's ``gpt2`` encoding, 50,257 ids, ``<|endoftext|>`` = 50256).

Where the BPE ranks come from, first match wins:

1. the ``path`` argument, else the ``GPT2_TOKENIZER_PATH`` environment variable: a ``gpt2.tiktoken`` file,
   OpenAI's original ``vocab.bpe`` or ``encoder.json`` (with its partner beside it), or a directory holding
   ``gpt2.tiktoken`` or ``vocab.bpe`` + ``encoder.json``;
2. the copy of OpenAI's ranks shipped inside this package (``mapper/assets/gpt2.tiktoken``, 835 KB, the file
   tiktoken downloads, MIT-licensed by OpenAI), so the tokenizer works offline out of the box;
3. ``tiktoken.get_encoding("gpt2")``, which downloads the files once and caches them (``TIKTOKEN_CACHE_DIR``),
   for an installation whose packaged copy was removed.

Every file is checked against the sha256 hash tiktoken itself expects, so each route gives the same ids.

The other way round, ``openai_bpe_files()`` writes the ranks out as OpenAI's ``encoder.json`` and ``vocab.bpe``, byte
for byte (the sha256 hashes above): Hugging Face calls the same files ``vocab.json`` and ``merges.txt``, which is
what an exported model folder needs for ``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from pathlib import Path

import tiktoken

from mapper.errors import TokenizerError

TOKENIZER_PATH_ENV = "GPT2_TOKENIZER_PATH"
PACKAGED_RANKS = Path(__file__).parent / "assets" / "gpt2.tiktoken"

# sha256 of the published files (the hashes tiktoken_ext/openai_public.py checks downloads against).
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

_ENDOFTEXT = "<|endoftext|>"
_N_VOCAB = 50257


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> tiktoken.Encoding:
    """GPT-2's tokenizer as a ``tiktoken.Encoding`` named "gpt2": ``encode(str) -> list[int]`` ids in [0, 50257).

    ``path`` (else ``$GPT2_TOKENIZER_PATH``): a ``gpt2.tiktoken``, ``vocab.bpe`` or ``encoder.json`` file, or
    a directory holding ``gpt2.tiktoken`` or ``vocab.bpe`` + ``encoder.json``. Without either, the packaged
    copy; without that, tiktoken's own download/cache. Raises ``TokenizerError`` (a ``ValueError``) when
    nothing serves or a file's hash is wrong.
    """
    if path is None:
        path = os.environ.get(TOKENIZER_PATH_ENV) or None
    if path is not None:
        return _encoding(_ranks_from_path(Path(path)))
    if PACKAGED_RANKS.is_file():
        return _encoding(_ranks_from_tiktoken_file(PACKAGED_RANKS))
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline shows up as requests, OSError or ValueError alike
        raise TokenizerError(
            f"no GPT-2 tokenizer: the packaged {PACKAGED_RANKS.name} is missing and tiktoken's download failed "
            f"({type(e).__name__}). Pass a 'gpt2.tiktoken' file, or a folder holding it or 'vocab.bpe' + "
            f"'encoder.json' (load_tokenizer(path) or ${TOKENIZER_PATH_ENV})"
        ) from None


def _encoding(mergeable_ranks: dict[bytes, int]) -> tiktoken.Encoding:
    # Imported here: tiktoken_ext is a namespace package whose plugins tiktoken discovers lazily.
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={_ENDOFTEXT: _N_VOCAB - 1},
        explicit_n_vocab=_N_VOCAB,
    )


def _ranks_from_path(path: Path) -> dict[bytes, int]:
    if path.is_file() and path.name in ("vocab.bpe", "encoder.json"):
        path = path.parent  # OpenAI's two files are one tokenizer: read both from their folder
    if path.is_file():
        return _ranks_from_tiktoken_file(path)
    if path.is_dir():
        if (path / "gpt2.tiktoken").is_file():
            return _ranks_from_tiktoken_file(path / "gpt2.tiktoken")
        if (path / "vocab.bpe").is_file() and (path / "encoder.json").is_file():
            return _ranks_from_openai_files(path / "vocab.bpe", path / "encoder.json")
        raise TokenizerError(
            f"tokenizer folder {path} holds neither 'gpt2.tiktoken' nor both 'vocab.bpe' and 'encoder.json'"
        )
    raise TokenizerError(
        f"tokenizer path {path} does not exist; give a 'gpt2.tiktoken' file, or a folder holding it or "
        "'vocab.bpe' + 'encoder.json'"
    )


def _read_verified(path: Path, expected_sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e.strerror}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise TokenizerError(
            f"{path} is not GPT-2's {path.name if path.name in ('vocab.bpe', 'encoder.json') else 'gpt2.tiktoken'}: "
            f"its sha256 is {actual[:12]}..., expected {expected_sha256[:12]}... (a different or corrupted file "
            "would silently give different token ids)"
        )
    return data


def _ranks_from_tiktoken_file(path: Path) -> dict[bytes, int]:
    # Format: one "<base64 token bytes> <rank>" per line.
    ranks: dict[bytes, int] = {}
    for line in _read_verified(path, GPT2_TIKTOKEN_SHA256).splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _gpt2_byte_decoder() -> dict[str, int]:
    """OpenAI's printable stand-in character for each byte -> the byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F-0xA0, 0xAD)
    are mapped, in byte order, to U+0100, U+0101, ...
    """
    printable = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    decoder = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in decoder.values()]
    decoder.update({chr(256 + i): b for i, b in enumerate(others)})
    return decoder


def _ranks_from_openai_files(vocab_bpe: Path, encoder_json: Path) -> dict[bytes, int]:
    byte_of = _gpt2_byte_decoder()

    def to_bytes(token: str) -> bytes:
        return bytes(byte_of[ch] for ch in token)

    encoder = json.loads(_read_verified(encoder_json, ENCODER_JSON_SHA256))
    ranks = {to_bytes(tok): rank for tok, rank in encoder.items() if tok != _ENDOFTEXT}
    # tiktoken merges by rank, so rank order must equal merge priority: merge i (vocab.bpe line i+1,
    # after the version line) creates token 256 + i. The hashes make this hold; check it anyway, it is cheap.
    merges = _read_verified(vocab_bpe, VOCAB_BPE_SHA256).decode("utf-8").split("\n")[1:-1]
    for i, merge in enumerate(merges):
        left, right = merge.split()
        if ranks.get(to_bytes(left) + to_bytes(right)) != 256 + i:
            raise TokenizerError(f"{vocab_bpe} and {encoder_json} disagree at merge {i} ({merge!r})")
    return ranks


@functools.cache
def openai_bpe_files() -> tuple[bytes, bytes]:
    """GPT-2's tokenizer as OpenAI published it: (``encoder.json``, ``vocab.bpe``), rebuilt from the ranks that
    ``load_tokenizer()`` uses and checked against the published files' sha256.

    ``encoder.json`` maps each token, its bytes written in OpenAI's printable stand-in characters, to its id;
    ``vocab.bpe`` lists the merges in priority order, merge i being the two tokens whose concatenation is token
    256 + i. Hugging Face names them ``vocab.json`` and ``merges.txt``.
    """
    ranks = load_tokenizer()._mergeable_ranks
    char_of = {b: ch for ch, b in _gpt2_byte_decoder().items()}
    by_rank = sorted(ranks, key=ranks.__getitem__)

    def text(token: bytes) -> str:
        return "".join(char_of[b] for b in token)

    encoder = {text(token): ranks[token] for token in by_rank} | {_ENDOFTEXT: _N_VOCAB - 1}
    merges = ["#version: 0.2"] + [" ".join(text(part) for part in _last_merge(token, ranks)) for token in by_rank[256:]]
    encoder_json, vocab_bpe = json.dumps(encoder).encode(), ("\n".join(merges) + "\n").encode()
    for name, data, expected in (("encoder.json", encoder_json, ENCODER_JSON_SHA256),
                                 ("vocab.bpe", vocab_bpe, VOCAB_BPE_SHA256)):
        if hashlib.sha256(data).hexdigest() != expected:
            raise TokenizerError(f"the {name} rebuilt from the tokenizer's ranks is not OpenAI's (sha256 differs)")
    return encoder_json, vocab_bpe


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE merged last to make ``token``: its bytes, merged by every rule ranked below the token's own
    (lowest rank first), end as exactly two parts."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while len(parts) > 2:
        rank, i = min((ranks.get(parts[j] + parts[j + 1], limit), j) for j in range(len(parts) - 1))
        if rank >= limit:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise TokenizerError(f"token {token!r} (rank {limit}) is not one merge of two lower-ranked tokens")
    return parts[0], parts[1]
