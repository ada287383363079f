"""The gpt2 command, end to end, on small models (the main job at full size is `bash scripts/main`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import numpy_gpt2
from gpt2_cli import main
from mapper import GPT2Config, init_params, load_checkpoint, load_tokenizer, save_checkpoint
from parity_tests.conftest import FIXTURES, SHARED

TOKENIZER = SHARED / "assets" / "gpt2-bpe" / "gpt2.tiktoken"


def test_gradcheck_passes_and_prints_every_tensor(capsys):
    assert main(["gradcheck", "--config", "n_layer=1,n_embd=16,n_head=2", "--entries", "3"]) == 0
    out = capsys.readouterr().out
    assert "h.0.attn.c_attn.weight" in out and "wte.weight" in out
    assert "16/16 tensors within 1e-06" in out


def test_gradcheck_fails_loudly_when_the_tolerance_cannot_be_met(capsys):
    # finite differences themselves are only good to ~1e-11: a 1e-14 tolerance must fail with exit code 1
    assert main(["gradcheck", "--config", "n_layer=1,n_embd=8,n_head=2", "--entries", "2", "--tol", "1e-14"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bad_config_is_a_clear_error(capsys):
    assert main(["gradcheck", "--config", "n_head=5"]) == 2
    assert "must be divisible by n_head (5)" in capsys.readouterr().err
    assert main(["gradcheck", "--config", "n_heads=4"]) == 2
    assert "key=value pairs" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parity_agrees_on_a_small_model(capsys, dtype):
    args = ["parity", "--config", "n_layer=2,n_embd=32,n_head=4,vocab_size=300,n_positions=64",
            "--dtype", dtype, "--seq", "16", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "OK: NumPy spec, torch custom and torch fused agree on all 30 quantities" in out
    assert "grad h.1.mlp.c_proj.weight" in out


def test_parity_on_fixture_weights(capsys):
    assert main(["parity", "--weights", str(FIXTURES / "openai_tiny"), "--seq", "8", "--device", "cpu"]) == 0
    assert "weights" in capsys.readouterr().out


@pytest.fixture(scope="module")
def gpt2_vocab_checkpoint(tmp_path_factory):
    """A tiny model over GPT-2's real vocabulary, so the tokenizer's ids fit."""
    config = GPT2Config(n_positions=48, n_embd=16, n_layer=1, n_head=2)
    params = init_params(config, seed=3, dtype=np.float32)
    return save_checkpoint(params, config, tmp_path_factory.mktemp("tiny-gpt2-vocab")), config, params


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_generate_streams_what_the_library_generates(capsys, gpt2_vocab_checkpoint, backend):
    path, config, params = gpt2_vocab_checkpoint
    args = ["generate", "--weights", str(path), "--backend", backend, "--prompt", "Hello, world",
            "--max-new-tokens", "12", "--temperature", "0.9", "--top-k", "50", "--seed", "4",
            "--tokenizer", str(TOKENIZER), "--no-eos"]
    assert main(args) == 0
    captured = capsys.readouterr()
    enc = load_tokenizer(TOKENIZER)
    prompt = enc.encode("Hello, world")
    expected = numpy_gpt2.generate(params, config, np.array([prompt]), 12, temperature=0.9, top_k=50, seed=4)[0]
    assert captured.out == enc.decode(expected.tolist()) + "\n"
    assert "12 tokens" in captured.err


def test_generate_refuses_a_prompt_outside_the_vocabulary(capsys):
    args = ["generate", "--weights", str(FIXTURES / "hf_tiny"), "--prompt", "Hello", "--tokenizer", str(TOKENIZER)]
    assert main(args) == 2
    assert "outside this model's vocabulary of 97" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["hf", "custom", "fused"])
def test_convert_round_trips_every_layout(capsys, tmp_path, layout):
    out = tmp_path / layout
    assert main(["convert", str(FIXTURES / "openai_tiny"), str(out), "--to", layout]) == 0
    assert "read back identical" in capsys.readouterr().out
    config, params = load_checkpoint(out)
    ref_config, ref = load_checkpoint(FIXTURES / "hf_tiny")
    assert config == ref_config
    for name in ref:
        np.testing.assert_array_equal(params[name], ref[name], err_msg=name)
    written = json.loads((out / "config.json").read_text())
    assert written.get("gpt2_layout") == (None if layout == "hf" else layout)


def test_convert_missing_input_is_a_clear_error(capsys, tmp_path):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
