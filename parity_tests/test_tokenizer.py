"""The GPT-2 tokenizer: every way of finding its files gives tiktoken's real ``gpt2`` ids."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

from mapper.tokenizer import TOKENIZER_PATH_ENV, TokenizerError, load_tokenizer

# ../shared beside the checkout; GPT2_SHARED_DIR overrides it (as in conftest.py).
SHARED = Path(os.environ.get("GPT2_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
BPE = SHARED / "assets" / "gpt2-bpe"
VERDICT = SHARED / "data" / "the-verdict.txt"

HELLO = "Hello, world! <|endoftext|>"
HELLO_IDS = [15496, 11, 995, 0, 220, 50256]  # from ../shared/README.md
VERDICT_TOKENS = 5145

VOCAB_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
ENCODER_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"


@pytest.fixture(autouse=True)
def _no_env_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKENIZER_PATH_ENV, raising=False)


@pytest.fixture
def openai_files_dir(tmp_path: Path) -> Path:
    """A directory with only OpenAI's vocab.bpe + encoder.json (no gpt2.tiktoken)."""
    d = tmp_path / "openai"
    d.mkdir()
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(BPE / name, d / name)
    return d


def _check_known_ids(enc: tiktoken.Encoding) -> None:
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.encode(HELLO, allowed_special="all") == HELLO_IDS
    ids = enc.encode(VERDICT.read_text(encoding="utf-8"))
    assert len(ids) == VERDICT_TOKENS
    assert enc.decode(ids) == VERDICT.read_text(encoding="utf-8")


def test_gpt2_tiktoken_file() -> None:
    _check_known_ids(load_tokenizer(BPE / "gpt2.tiktoken"))


def test_directory_with_gpt2_tiktoken(tmp_path: Path) -> None:
    shutil.copy(BPE / "gpt2.tiktoken", tmp_path / "gpt2.tiktoken")
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


def test_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(name: str) -> tiktoken.Encoding:
        raise AssertionError("the environment variable must be used before tiktoken's download")

    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    monkeypatch.setenv(TOKENIZER_PATH_ENV, str(BPE / "gpt2.tiktoken"))
    _check_known_ids(load_tokenizer())


def test_argument_wins_over_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKENIZER_PATH_ENV, str(tmp_path / "nowhere"))
    assert load_tokenizer(BPE).encode(HELLO, allowed_special="all") == HELLO_IDS


def test_tiktoken_download_route_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a path, tiktoken.get_encoding('gpt2') serves; here from a pre-filled cache (no internet)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for url, name in ((VOCAB_URL, "vocab.bpe"), (ENCODER_URL, "encoder.json")):
        shutil.copy(BPE / name, cache / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget an encoding built earlier in-process
    enc = load_tokenizer()
    _check_known_ids(enc)
    assert enc._mergeable_ranks == load_tokenizer(BPE / "gpt2.tiktoken")._mergeable_ranks


def test_no_path_and_no_internet_names_both_remedies(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str) -> tiktoken.Encoding:
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError) as info:
        load_tokenizer()
    message = str(info.value)
    for needle in (
        TOKENIZER_PATH_ENV,
        "gpt2.tiktoken",
        "vocab.bpe",
        "encoder.json",
        "internet",
        "TIKTOKEN_CACHE_DIR",
    ):
        assert needle in message
    assert isinstance(info.value.__cause__, ConnectionError)


def test_wrong_hash_names_file_and_both_hashes(tmp_path: Path) -> None:
    bad = tmp_path / "gpt2.tiktoken"
    data = (BPE / "gpt2.tiktoken").read_bytes().replace(b" 50255\n", b" 50254\n")
    bad.write_bytes(data)
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(bad)
    message = str(info.value)
    assert str(bad) in message
    assert hashlib.sha256(data).hexdigest() in message
    assert "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930" in message


def test_wrong_hash_of_encoder_json(openai_files_dir: Path) -> None:
    (openai_files_dir / "encoder.json").write_text('{"!": 0}')
    with pytest.raises(
        TokenizerError, match="encoder.json.*196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    ):
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
        shutil.copy(BPE / "vocab.bpe", target / "vocab.bpe")
    with pytest.raises(TokenizerError, match=str(target)):
        load_tokenizer(target)
