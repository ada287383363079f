"""Model names: OpenAI's bucket and the Hugging Face Hub, each played by an in-process server on 127.0.0.1.

The server (``parity_tests/servers.py``) serves the repository's fixtures in each layout: OpenAI's seven files of
``openai_tiny`` under ``/openai/models/124M/``, and Hub repos with the Hub's own file layout. The OpenAI route is
read in-process (``GPT2_OPENAI_BASE_URL`` and ``GPT2_CACHE`` are read per call); the Hub route runs in a fresh
process, since ``huggingface_hub`` reads ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` / ``HF_HOME`` when it is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpt2_cli import main
from mapper import load_checkpoint
from mapper.download import (
    OPENAI_FILES,
    DownloadError,
    fetch,
    parse_model_name,
)
from mapper.errors import CheckpointError
from mapper.tokenizer import openai_bpe_files
from parity_tests.conftest import FIXTURES, REPO
from parity_tests.servers import FakeServer, HubRepo, closed_port_url

DATA_FILE = "model.ckpt.data-00000-of-00001"


def reference_params() -> dict[str, np.ndarray]:
    return {k.removeprefix("transformer."): v for k, v in load_file(FIXTURES / "hf_tiny" / "model.safetensors").items()}


def assert_reference(params: dict[str, np.ndarray]) -> None:
    ref = reference_params()
    assert sorted(params) == sorted(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(params[k], v, err_msg=k)


def openai_files() -> dict[str, bytes]:
    encoder_json, vocab_bpe = openai_bpe_files()
    files = {name: (FIXTURES / "openai_tiny" / name).read_bytes()
             for name in OPENAI_FILES if name not in ("encoder.json", "vocab.bpe")}
    return {**files, "encoder.json": encoder_json, "vocab.bpe": vocab_bpe}


def bucket(size: str = "124M") -> dict[str, bytes]:
    return {f"/openai/models/{size}/{name}": data for name, data in openai_files().items()}


@pytest.fixture
def openai_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A bucket server and a private cache; yields (server, cache folder of openai:124M)."""
    server = FakeServer(files=bucket())
    monkeypatch.setenv("GPT2_OPENAI_BASE_URL", f"{server.url}/openai")
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))
    try:
        yield server, tmp_path / "cache" / "openai" / "124M"
    finally:
        server.stop()


# ----- names -----


@pytest.mark.parametrize("text, repo, revision, size", [
    ("gpt2", "openai-community/gpt2", None, None),
    ("gpt2-xl", "openai-community/gpt2-xl", None, None),
    ("gpt2-medium@v1", "openai-community/gpt2-medium", "v1", None),
    ("someone/tiny-gpt2@0123abc", "someone/tiny-gpt2", "0123abc", None),
    ("openai:1558M", None, None, "1558M"),
])
def test_names(text: str, repo: str | None, revision: str | None, size: str | None) -> None:
    name = parse_model_name(text)
    assert (name.hub_repo, name.revision, name.openai_size) == (repo, revision, size)


@pytest.mark.parametrize("text", ["gpt3", "runs/model.safetensors", "../x/y", "./gpt2", "/abs/gpt2", "a/b/c"])
def test_paths_are_not_names(text: str) -> None:
    assert parse_model_name(text) is None


def test_unknown_names_are_one_line_with_the_known_ones(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(CheckpointError, match=r"gpt3 is neither a local path nor a model name; known names: gpt2, "
                                              r"gpt2-medium, gpt2-large, gpt2-xl .*openai:124M"):
        load_checkpoint("gpt3")
    with pytest.raises(DownloadError, match=r"OpenAI released the sizes 124M, 355M, 774M, 1558M, not '999M'"):
        load_checkpoint("openai:999M")
    assert main(["generate", "--weights", "gpt3", "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt2 generate: error: gpt3 is neither a local path")


def test_a_local_path_wins_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    """A folder called gpt2 is read, not the Hub's gpt2; nothing is downloaded (no server exists here at all)."""
    local = tmp_path / "gpt2"
    local.mkdir()
    for name in ("model.safetensors", "config.json"):
        (local / name).write_bytes((FIXTURES / "hf_tiny" / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    _, params = load_checkpoint("gpt2")
    assert_reference(params)
    note = capsys.readouterr().err
    assert f"note: gpt2 is the local folder {local}" in note and "openai-community/gpt2" in note
    assert "a local path always wins" in note


def test_a_missing_path_that_looks_like_a_repo_says_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``runs/typo`` is no local path, so it is tried as a Hub repo: the message says both (offline here)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DownloadError, match=r"^runs/typo is not a local path, nor a model to be had: runs/typo "
                                            r"\(runs/typo on the Hugging Face Hub\) is not in the Hugging Face cache"):
        load_checkpoint("runs/typo")


# ----- OpenAI's bucket -----


def test_openai_download_then_cache_with_the_server_stopped(openai_env) -> None:
    server, dest = openai_env
    _, params = load_checkpoint("openai:124M")
    assert_reference(params)
    assert sorted(p.name for p in dest.iterdir()) == sorted(OPENAI_FILES)  # complete; .partial is gone
    for name, data in openai_files().items():
        assert (dest / name).read_bytes() == data, name
    fetched = sorted(path.rsplit("/", 1)[1] for _, path, _ in server.requests("GET"))
    assert fetched == sorted(OPENAI_FILES)  # each file once
    server.stop()
    _, again = load_checkpoint("openai:124M")  # from the cache: the server is gone
    assert_reference(again)


def test_openai_transfer_cut_mid_file_resumes_with_range(openai_env) -> None:
    server, dest = openai_env
    server.cut_once.add(f"/openai/models/124M/{DATA_FILE}")
    assert fetch("openai:124M") == dest
    data = openai_files()[DATA_FILE]
    assert (dest / DATA_FILE).read_bytes() == data
    gets = [r for r in server.requests("GET") if r[1].endswith(DATA_FILE)]
    assert gets == [("GET", f"/openai/models/124M/{DATA_FILE}", None),
                    ("GET", f"/openai/models/124M/{DATA_FILE}", f"bytes={len(data) // 2}-")]


def test_openai_partial_file_of_an_earlier_run_resumes(openai_env) -> None:
    server, dest = openai_env
    data = openai_files()[DATA_FILE]
    partial = dest / ".partial"
    partial.mkdir(parents=True)
    (partial / f"{DATA_FILE}.part").write_bytes(data[:1000])  # a run killed after 1000 bytes
    assert not (dest / "checkpoint").exists()  # nothing there a reader would take for a checkpoint
    fetch("openai:124M")
    assert (dest / DATA_FILE).read_bytes() == data
    assert [r[2] for r in server.requests("GET") if r[1].endswith(DATA_FILE)] == ["bytes=1000-"]


@pytest.mark.parametrize("fault, message", [
    ("truncated", r"model\.ckpt\.data-00000-of-00001 is truncated"),
    ("corrupted", r"is corrupt: crc32c"),
    ("encoder", r"is not OpenAI's encoder\.json \(sha256 "),
])
def test_openai_bad_files_are_detected_removed_and_never_used(openai_env, fault: str, message: str) -> None:
    server, dest = openai_env
    name = "encoder.json" if fault == "encoder" else DATA_FILE
    good = openai_files()[name]
    bad = good[: len(good) // 3] if fault == "truncated" else good[:200] + bytes([good[200] ^ 0x10]) + good[201:]
    server.replace[f"/openai/models/124M/{name}"] = bad
    with pytest.raises(DownloadError, match=message) as info:
        fetch("openai:124M")
    assert "\n" not in str(info.value) and "the download was removed" in str(info.value)
    assert not (dest / "checkpoint").exists() and not (dest / ".partial" / name).exists()
    del server.replace[f"/openai/models/124M/{name}"]
    fetch("openai:124M")  # run again: fetched anew, the good files kept from the first run
    assert (dest / name).read_bytes() == good
    first_ckpt = [r for r in server.requests("GET") if r[1].endswith("/checkpoint")]
    assert len(first_ckpt) == 1


def test_openai_404_and_unreachable_are_one_line(openai_env, monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = openai_env
    with pytest.raises(DownloadError) as info:
        fetch("openai:355M")  # the server has only 124M
    message = str(info.value)
    assert "\n" not in message
    assert f"{server.url}/openai/models/355M/checkpoint: HTTP 404" in message
    assert "GPT2_OPENAI_BASE_URL" in message and str(Path(os.environ["GPT2_CACHE"]) / "openai" / "355M") in message
    monkeypatch.setenv("GPT2_OPENAI_BASE_URL", closed_port_url())
    with pytest.raises(DownloadError, match=r"checkpoint: unreachable \(.*refused"):
        fetch("openai:124M")


def test_openai_download_to_a_folder(openai_env, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["download", "openai:124M", "--to", str(tmp_path / "weights")]) == 0
    megabytes = sum(len(data) for data in openai_files().values()) / 1e6
    assert f"7 files, {megabytes:.1f} MB in {tmp_path / 'weights'}" in capsys.readouterr().out
    _, params = load_checkpoint(tmp_path / "weights")
    assert_reference(params)


# ----- the Hugging Face Hub, through huggingface_hub in a fresh process -----

HUB_LAYOUT = FIXTURES / "hf_tiny_hub_layout"


def hub_repos(scratch: Path) -> dict[str, HubRepo]:
    """openai-community/gpt2 in the Hub's layout (with files the mapper must not fetch), a .bin-only repo, a
    sharded one; the first with a tag v1 at an older commit."""
    real = {name: (HUB_LAYOUT / name).read_bytes() for name in ("config.json", "model.safetensors",
                                                              "pytorch_model.bin")}
    extras = {"README.md": b"# gpt2\n", "flax_model.msgpack": b"\0" * 64, "onnx/decoder_model.onnx": b"\0" * 64}
    tensors = load_file(HUB_LAYOUT / "model.safetensors")
    names = sorted(tensors)
    shards: dict[str, bytes] = {}
    weight_map = {}
    for i, part in enumerate((names[:10], names[10:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        path = scratch / shard
        save_file({k: tensors[k] for k in part}, path, metadata={"format": "pt"})
        shards[shard] = path.read_bytes()
        weight_map.update(dict.fromkeys(part, shard))
    index = json.dumps({"weight_map": weight_map}).encode()
    return {
        "openai-community/gpt2": HubRepo({**real, **extras}, revisions={"v1": "1" * 40}),
        "someone/tiny-bin": HubRepo({name: real[name] for name in ("config.json", "pytorch_model.bin")}),
        "someone/tiny-sharded": HubRepo({"config.json": real["config.json"], **shards,
                                         "model.safetensors.index.json": index}),
    }


@pytest.fixture
def hub(tmp_path: Path):
    server = FakeServer(repos=hub_repos(tmp_path))
    try:
        yield server
    finally:
        server.stop()


def run_fresh(args: list[str], endpoint: str, hf_home: Path, offline: bool = False) -> subprocess.CompletedProcess:
    """``python -m gpt2_cli ARGS`` (or ``python -c``) in a new process that knows only the local server."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5", PYTHONPATH=str(REPO))
    command = [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", "gpt2_cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=hf_home.parent)


LOAD = ("import sys, numpy as np; from mapper import load_checkpoint; from safetensors.numpy import load_file; "
        "c, p = load_checkpoint(sys.argv[1]); r = load_file(sys.argv[2]); "
        "assert all(np.array_equal(p[k], r[k]) for k in r if k in p) and set(p) <= set(r); print('same', c.n_layer)")


def test_hub_download_fetches_only_what_the_mapper_reads_then_serves_from_the_cache(hub, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    done = run_fresh(["download", "gpt2"], hub.url, home)
    assert done.returncode == 0, done.stderr
    assert "openai-community/gpt2 on the Hugging Face Hub" in done.stdout
    assert "models--openai-community--gpt2" in done.stdout
    asked = {path.rsplit("/", 1)[1] for _, path, _ in hub.requests()}
    assert asked == {"config.json", "model.safetensors"}  # not the .bin, the README, flax or onnx files
    reference = str(HUB_LAYOUT / "model.safetensors")
    hub.stop()
    again = run_fresh(["-c", LOAD, "gpt2", reference], hub.url, home)  # the Hub is gone: the cache serves
    assert again.returncode == 0 and "same 2" in again.stdout, again.stderr
    offline = run_fresh(["-c", LOAD, "gpt2", reference], hub.url, home, offline=True)
    assert offline.returncode == 0 and "same 2" in offline.stdout, offline.stderr


def test_hub_offline_without_the_files_is_one_line(hub, tmp_path: Path) -> None:
    done = run_fresh(["generate", "--weights", "gpt2", "--prompt", "Hi"], hub.url, tmp_path / "hf", offline=True)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1, done.stderr
    assert "gpt2 (openai-community/gpt2 on the Hugging Face Hub) is not in the Hugging Face cache" in err[0]
    assert str(tmp_path / "hf" / "hub") in err[0] and "HF_HUB_OFFLINE is set" in err[0]
    assert hub.requests() == []


def test_hub_bin_only_sharded_revisions_and_missing_repos(hub, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    for name in ("someone/tiny-bin", "someone/tiny-sharded"):
        done = run_fresh(["-c", LOAD, name, str(HUB_LAYOUT / "model.safetensors")], hub.url, home)
        assert done.returncode == 0 and "same 2" in done.stdout, done.stderr
    assert not any(p.endswith("flax_model.msgpack") for _, p, _ in hub.requests())
    pinned = run_fresh(["download", "gpt2@v1", "--to", str(tmp_path / "pinned")], hub.url, home)
    assert pinned.returncode == 0, pinned.stderr
    assert {r[1] for r in hub.requests()} >= {"/openai-community/gpt2/resolve/v1/model.safetensors"}
    assert (tmp_path / "pinned" / "model.safetensors").read_bytes() == (HUB_LAYOUT / "model.safetensors").read_bytes()
    for name, message in (("gpt2@nope", "the repo has no revision 'nope'"),
                          ("nobody/nothing", "the Hugging Face Hub (http://127.0.0.1:")):
        failed = run_fresh(["download", name], hub.url, home)
        assert failed.returncode == 2 and message in failed.stderr, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr


def test_hub_transfer_cut_mid_file_is_retried_by_huggingface_hub(hub, tmp_path: Path) -> None:
    """huggingface_hub retries a cut transfer itself (here it asks for the whole file again); the file that lands
    is complete."""
    hub.cut_once.add("/openai-community/gpt2/model.safetensors")
    done = run_fresh(["download", "gpt2", "--to", str(tmp_path / "w")], hub.url, tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    data = (HUB_LAYOUT / "model.safetensors").read_bytes()
    assert (tmp_path / "w" / "model.safetensors").read_bytes() == data
    assert len([r for r in hub.requests("GET") if r[1].endswith("/model.safetensors")]) == 2


def test_convert_and_download_take_names(openai_env, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", "openai:124M", str(tmp_path / "hf")]) == 0
    assert "converted openai:124M (openai-tf)" in capsys.readouterr().out
    _, params = load_checkpoint(tmp_path / "hf")
    assert_reference(params)
    assert main(["download", "gpt3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gpt3 is not a model name; known names: gpt2," in err[0]
