"""The GPT-2 tokenizer: every way of finding its files gives tiktoken's real ``gpt2`` ids.

OpenAI's original ``vocab.bpe`` + ``encoder.json`` are not shipped: the fixture below rebuilds them from the
packaged ``gpt2.tiktoken`` with an independent implementation of OpenAI's byte-to-character table, and their
sha256 must equal the hashes tiktoken checks OpenAI's published files against, so they are those files, byte
for byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

from gpt2_cli import main
from mapper import tokenizer
from mapper.tokenizer import PACKAGED_RANKS, TOKENIZER_PATH_ENV, TokenizerError, load_tokenizer
from parity_tests.conftest import DATA

VERDICT = DATA / "the-verdict.txt"
HELLO = "Hello, world! <|endoftext|>"
HELLO_IDS = [15496, 11, 995, 0, 220, 50256]  # tiktoken's gpt2 encoding of HELLO, as published
VERDICT_TOKENS = 5145


def byte_to_char() -> dict[int, str]:
    """OpenAI's table: printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') are their own character; the
    other 68 bytes, in increasing order, become chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def rebuild_openai_files(directory: Path) -> None:
    """Write vocab.bpe and encoder.json as OpenAI published them, from the packaged ranks."""
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in
             (line.split() for line in PACKAGED_RANKS.read_bytes().splitlines() if line)}
    table = byte_to_char()
    text = {tok: "".join(table[b] for b in tok) for tok in ranks}
    by_rank = sorted(ranks, key=ranks.get)
    encoder = {text[tok]: ranks[tok] for tok in by_rank} | {"<|endoftext|>": 50256}
    (directory / "encoder.json").write_text(json.dumps(encoder))
    merges = ["#version: 0.2"]
    for tok in by_rank[256:]:  # the pair a BPE restricted to lower ranks leaves is the merge that made tok
        parts = [bytes([b]) for b in tok]
        while len(parts) > 2:
            i = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], len(ranks)))
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{text[parts[0]]} {text[parts[1]]}")
    (directory / "vocab.bpe").write_text("\n".join(merges) + "\n")

VOCAB_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
ENCODER_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"


@pytest.fixture(autouse=True)
def _no_env_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKENIZER_PATH_ENV, raising=False)


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("openai-bpe")
    rebuild_openai_files(d)
    assert hashlib.sha256((d / "vocab.bpe").read_bytes()).hexdigest() == tokenizer.VOCAB_BPE_SHA256
    assert hashlib.sha256((d / "encoder.json").read_bytes()).hexdigest() == tokenizer.ENCODER_JSON_SHA256
    return d


@pytest.fixture
def openai_files_dir(openai_files: Path, tmp_path: Path) -> Path:
    """A folder with only OpenAI's vocab.bpe + encoder.json (no gpt2.tiktoken), the test's own copy."""
    d = tmp_path / "openai"
    shutil.copytree(openai_files, d)
    return d


def _check_known_ids(enc: tiktoken.Encoding) -> None:
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.encode(HELLO, allowed_special="all") == HELLO_IDS
    ids = enc.encode(VERDICT.read_text(encoding="utf-8"))
    assert len(ids) == VERDICT_TOKENS
    assert enc.decode(ids) == VERDICT.read_text(encoding="utf-8")


def test_packaged_copy_serves_offline_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(name: str) -> tiktoken.Encoding:
        raise AssertionError("the packaged copy must be used before tiktoken's download")

    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    enc = load_tokenizer()
    assert enc.name == "gpt2"
    _check_known_ids(enc)


def test_gpt2_tiktoken_file() -> None:
    _check_known_ids(load_tokenizer(PACKAGED_RANKS))


def test_directory_with_gpt2_tiktoken(tmp_path: Path) -> None:
    shutil.copy(PACKAGED_RANKS, tmp_path / "gpt2.tiktoken")
    _check_known_ids(load_tokenizer(str(tmp_path)))


def test_directory_with_vocab_bpe_and_encoder_json(openai_files_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = load_tokenizer(openai_files_dir)
    _check_known_ids(enc)
    # Independent source: tiktoken's own converter of the same two files (cache disabled by "").
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    expected = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(openai_files_dir / "vocab.bpe"), str(openai_files_dir / "encoder.json")
    )
    assert enc._mergeable_ranks == expected


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_either_openai_file_names_the_pair(openai_files_dir: Path, name: str) -> None:
    assert load_tokenizer(openai_files_dir / name).encode(HELLO, allowed_special="all") == HELLO_IDS


def test_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(name: str) -> tiktoken.Encoding:
        raise AssertionError("the environment variable must be used before tiktoken's download")

    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    monkeypatch.setenv(TOKENIZER_PATH_ENV, str(PACKAGED_RANKS))
    monkeypatch.setattr(tokenizer, "PACKAGED_RANKS", Path("/nonexistent/gpt2.tiktoken"))
    _check_known_ids(load_tokenizer())


def test_argument_wins_over_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKENIZER_PATH_ENV, str(tmp_path / "nowhere"))
    assert load_tokenizer(PACKAGED_RANKS).encode(HELLO, allowed_special="all") == HELLO_IDS


def test_library_writes_openai_files_byte_for_byte(openai_files: Path) -> None:
    """What exports ship as vocab.json / merges.txt: the library's own rebuild equals this file's independent one."""
    encoder_json, vocab_bpe = tokenizer.openai_bpe_files()
    assert encoder_json == (openai_files / "encoder.json").read_bytes()
    assert vocab_bpe == (openai_files / "vocab.bpe").read_bytes()


def test_tiktoken_download_route_matches(
    openai_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the packaged copy, tiktoken.get_encoding('gpt2') serves; here from a pre-filled cache (offline)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for url, name in ((VOCAB_URL, "vocab.bpe"), (ENCODER_URL, "encoder.json")):
        shutil.copy(openai_files / name, cache / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget an encoding built earlier in-process
    monkeypatch.setattr(tokenizer, "PACKAGED_RANKS", tmp_path / "removed" / "gpt2.tiktoken")
    enc = load_tokenizer()
    _check_known_ids(enc)
    assert enc._mergeable_ranks == load_tokenizer(PACKAGED_RANKS)._mergeable_ranks


def test_no_packaged_copy_and_no_internet_names_the_remedies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(name: str) -> tiktoken.Encoding:
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setattr(tokenizer, "PACKAGED_RANKS", tmp_path / "removed" / "gpt2.tiktoken")
    with pytest.raises(TokenizerError) as info:
        load_tokenizer()
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    for needle in (TOKENIZER_PATH_ENV, "gpt2.tiktoken", "vocab.bpe", "encoder.json", "download failed"):
        assert needle in message


def test_wrong_hash_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "gpt2.tiktoken"
    data = PACKAGED_RANKS.read_bytes().replace(b" 50255\n", b" 50254\n")
    bad.write_bytes(data)
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(bad)
    message = str(info.value)
    assert str(bad) in message and "is not GPT-2's gpt2.tiktoken" in message
    assert hashlib.sha256(data).hexdigest()[:12] in message
    assert "306cd27f03c1" in message


def test_wrong_hash_of_encoder_json(openai_files_dir: Path) -> None:
    (openai_files_dir / "encoder.json").write_text('{"!": 0}')
    with pytest.raises(TokenizerError, match="encoder.json.*expected 196139668be6"):
        load_tokenizer(openai_files_dir)


def test_expected_hashes_are_tiktokens_own() -> None:
    import inspect

    from mapper import tokenizer

    source = inspect.getsource(openai_public)
    for digest in (tokenizer.VOCAB_BPE_SHA256, tokenizer.ENCODER_JSON_SHA256, tokenizer.GPT2_TIKTOKEN_SHA256):
        assert digest in source


@pytest.mark.parametrize("layout", ["missing", "empty_dir", "half_pair"])
def test_unusable_paths(tmp_path: Path, layout: str) -> None:
    target = tmp_path / "tok"
    if layout != "missing":
        target.mkdir()
    if layout == "half_pair":
        (target / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match=str(target)):
        load_tokenizer(target)


@pytest.mark.parametrize("path", ["/nope", "VOCAB_FILE"])
def test_cli_tokenizer_errors_are_one_line_naming_the_flag(tmp_path: Path, capsys, path: str) -> None:
    if path == "VOCAB_FILE":  # vocab.bpe without its partner encoder.json
        path = str(tmp_path / "vocab.bpe")
        Path(path).write_text("#version: 0.2\n")
    args = ["generate", "--config", "n_layer=1,n_embd=8,n_head=2,n_positions=16", "--prompt", "Hi", "--tokenizer", path]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--tokenizer {path}" in err
