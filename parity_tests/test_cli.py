"""The gpt2 command, end to end, on small models (the main job at full size is `bash scripts/main`)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import numpy_gpt2
from gpt2_cli import main
from mapper import GPT2Config, init_params, load_checkpoint, load_tokenizer, save_checkpoint
from parity_tests.conftest import FIXTURES


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
            "--no-eos"]
    assert main(args) == 0
    captured = capsys.readouterr()
    enc = load_tokenizer()
    prompt = enc.encode("Hello, world")
    expected = numpy_gpt2.generate(params, config, np.array([prompt]), 12, temperature=0.9, top_k=50, seed=4)[0]
    assert captured.out == enc.decode(expected.tolist()) + "\n"
    assert "12 tokens" in captured.err


def test_generate_refuses_a_prompt_outside_the_vocabulary(capsys):
    args = ["generate", "--weights", str(FIXTURES / "hf_tiny"), "--prompt", "Hello"]
    assert main(args) == 2
    assert "outside this model's vocabulary of 97" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["hf", "custom", "fused"])
def test_convert_round_trips_every_layout(capsys, tmp_path, layout):
    out = tmp_path / layout
    assert main(["convert", str(FIXTURES / "openai_tiny"), str(out), "--to", layout]) == 0
    assert "read back identical" in capsys.readouterr().out
    config, params = load_checkpoint(out)
    ref_config, ref = load_checkpoint(FIXTURES / "hf_tiny")
    assert config == ref_config.with_dropout(0.0)  # OpenAI's hparams.json states no dropout, transformers' 0.1
    for name in ref:
        np.testing.assert_array_equal(params[name], ref[name], err_msg=name)
    written = json.loads((out / "config.json").read_text())
    assert written.get("gpt2_layout") == (None if layout == "hf" else layout)


def test_convert_missing_input_is_a_clear_error(capsys, tmp_path):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- a user's first hour


def test_version_and_every_option_documented(capsys):
    from gpt2_cli.main import build_parser

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("gpt2 ")
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subcommands) >= {"parity", "generate", "convert", "gradcheck"}
    pending = list(subcommands.items())
    while pending:  # nested commands too (gpt2 finetune classify, gpt2 eval gsm8k, gpt2 lora merge)
        name, sub = pending.pop()
        for action in sub._actions:
            assert action.help, f"gpt2 {name} {action.option_strings or action.dest} has no description"
            if isinstance(action, argparse._SubParsersAction):
                pending += [(f"{name} {k}", v) for k, v in action.choices.items()]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--temperature", "-1", "--temperature must be a finite number >= 0"),
    ("--top-k", "0", "--top-k must be an integer >= 1, got 0"),
])
def test_sampling_arguments_are_checked_before_any_model_is_built(capsys, monkeypatch, flag, value, message):
    def never(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr("gpt2_cli.generate.resolve_model", never)
    assert main(["generate", "--preset", "gpt2-xl", "--prompt", "Hi", flag, value]) == 2
    assert message in one_line_error(capsys)


def test_a_prompt_longer_than_the_context_says_so(capsys):
    args = ["generate", "--config", "n_layer=1,n_embd=8,n_head=2,n_positions=8", "--prompt", "one two three " * 4]
    assert main(args) == 2
    assert "the prompt is 13 tokens long; the model's context of 8 tokens leaves no room" in one_line_error(capsys)


def test_generate_needs_no_tokenizer_flag_offline(capsys, gpt2_vocab_checkpoint):
    path, _, _ = gpt2_vocab_checkpoint
    assert main(["generate", "--weights", str(path), "--prompt", "Hello", "--max-new-tokens", "3", "--no-eos"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_a_device_torch_cannot_use_fails_first(capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")

    def never(*args, **kwargs):
        raise AssertionError("work started before the device was checked")

    monkeypatch.setattr("gpt2_cli.parity.resolve_model", never)
    assert main(["parity", "--device", "cuda"]) == 2
    assert "device 'cuda'" in one_line_error(capsys)
    assert main(["parity", "--device", "tpu9"]) == 2
    assert "not a torch device" in one_line_error(capsys)


def test_a_sequence_longer_than_the_context_is_refused_not_cut(capsys):
    args = ["parity", "--config", "n_layer=1,n_embd=8,n_head=2,vocab_size=50,n_positions=8", "--seq", "64"]
    assert main(args) == 2
    assert "--seq 64 exceeds the model's context of 8 positions" in one_line_error(capsys)


def test_convert_never_overwrites_its_input_or_an_output_without_force(capsys, tmp_path):
    source = tmp_path / "model"
    assert main(["convert", str(FIXTURES / "hf_tiny"), str(source)]) == 0
    before = (source / "model.safetensors").read_bytes()
    assert main(["convert", str(source), str(source), "--to", "custom"]) == 2
    assert f"OUT {source} is the input IN {source}; an input is never written" in one_line_error(capsys)
    assert main(["convert", str(source / "model.safetensors"), str(source), "--force"]) == 2
    assert f"OUT {source} contains the input IN {source / 'model.safetensors'}" in one_line_error(capsys)
    assert (source / "model.safetensors").read_bytes() == before
    out = tmp_path / "out"
    assert main(["convert", str(source), str(out)]) == 0
    capsys.readouterr()
    assert main(["convert", str(source), str(out), "--to", "fused"]) == 2
    assert "already holds model.safetensors, config.json, generation_config.json, which this command would replace; " \
        "pass --force" in one_line_error(capsys)
    assert main(["convert", str(source), str(out), "--to", "fused", "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["gpt2_layout"] == "fused"


# ---------------------------------------------------------------- help, flags and notes


def help_of(capsys, *command: str) -> str:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare the words


@pytest.mark.parametrize("command", [("train",), ("finetune", "classify"), ("finetune", "instruct"),
                                     ("finetune", "reason"), ("generate",), ("parity",), ("eval", "gsm8k")])
def test_help_shows_each_default_once_and_true(capsys, command):
    text = help_of(capsys, *command)
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    assert "(default: (default" not in text and text.count("(default) (default") == 0
    if command[0] == "finetune" and command[1] != "classify":
        marked = "--mask-prompt" if command[1] == "reason" else "--no-mask-prompt"
        line = text.split(f"{marked} ")[-1].split(" --")[0]
        assert line.count("(default") == 1, line
        assert "head" not in text.split("--lora-rank")[1].split("--lora-alpha")[0]  # they have no classifier head
    if command == ("finetune", "classify"):
        assert "only the adapters and the classifier's head train" in text


def test_train_help_gives_the_real_defaults(capsys):
    text = help_of(capsys, "train")
    assert "peak learning rate (default: 0.0004)" in text and "seeds the init and the data order (default: 123)" in text
    assert "--out DIR the run's folder" in text and "--out DIR the run's folder (default" not in text


def test_generate_tokenizer_help_states_the_precedence_the_code_follows(capsys, monkeypatch, tmp_path):
    text = help_of(capsys, "generate")
    assert "(default: $GPT2_TOKENIZER_PATH when set, else the copy shipped with this package)" in text
    monkeypatch.setenv("GPT2_TOKENIZER_PATH", str(tmp_path / "missing"))  # the variable wins over the package
    assert main(["generate", "--config", "n_layer=1,n_embd=8,n_head=2", "--prompt", "Hi"]) == 2
    assert str(tmp_path / "missing") in one_line_error(capsys)


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--lr", "inf"], "argument --lr: must be a finite number >= 0, got inf"),
    (["train", "--lr", "nan"], "argument --lr: must be a finite number >= 0, got nan"),
    (["train", "--grad-clip", "inf"], "argument --grad-clip: must be a finite number >= 0, got inf"),
    (["train", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["train", "--epochs", "two"], "argument --epochs: invalid positive_int value: 'two'"),
    (["finetune", "classify", "--lora-alpha", "0"], "argument --lora-alpha: must be a finite number > 0, got 0"),
    (["generate", "--prompt", "Hi", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["gradcheck", "--tol", "-1"], "argument --tol: must be a finite number > 0, got -1"),
])
def test_every_numeric_flag_is_checked_up_front_with_its_name(capsys, tmp_path, argv, message):
    if argv[0] in ("train", "finetune"):
        argv = [*argv, "--out", str(tmp_path / "run"), "--data", str(tmp_path / "text.txt")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_sample_prompt_longer_than_the_context_is_refused_before_any_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("mapper.init_params", lambda *a, **k: pytest.fail("the model was built first"))
    text = tmp_path / "text.txt"
    text.write_text("word " * 400)
    prompt = "one two " * 20
    argv = ["train", "--data", str(text), "--out", str(tmp_path / "run"), "--backend", "numpy", "--config",
            "n_layer=1,n_embd=8,n_head=2,n_positions=32", "--context", "16", "--sample-prompt", prompt]
    assert main(argv) == 2
    n = len(load_tokenizer().encode(prompt))
    assert n >= 32 and f"--sample-prompt is {n} tokens long; the model's context of 32 positions leaves no room" in (
        one_line_error(capsys))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("argv", "estimate"), [
    (["generate", "--prompt", "Hi", "--config", "n_layer=1000000"], "7,087,911,385,344 parameters of float32"),
    (["generate", "--prompt", "Hi", "--config", "vocab_size=1000000000000"], "768,000,085,842,432 parameters"),
    (["train", "--data", "{text}", "--out", "{out}", "--config", "n_layer=1000000"], "x 4 for training"),
])
def test_a_model_too_big_for_memory_is_refused_naming_the_estimate(capsys, tmp_path, argv, estimate):
    text = tmp_path / "text.txt"
    text.write_text("Some text to train on. " * 100)
    argv = [a.format(text=text, out=tmp_path / "run") for a in argv]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "the model does not fit in memory" in err and estimate in err and "GB is available" in err, err
    assert not (tmp_path / "run").exists()


def test_check_fits_memory_counts_the_training_copies():
    from mapper.memory import TRAINING_COPIES, check_fits_memory

    config = GPT2Config.from_preset("gpt2")  # 124,439,808 parameters: 497.8 MB in float32
    check_fits_memory(config, "float32", available=498_000_000)
    with pytest.raises(ValueError, match=r"take 0.5 GB, x 4 for training .* = 2.0 GB, and 1.9 GB is available"):
        check_fits_memory(config, "float32", TRAINING_COPIES, available=1_900_000_000)
    with pytest.raises(ValueError, match="124,439,808 parameters of float64 take 1.0 GB, and 0.9 GB"):
        check_fits_memory(config, "float64", available=900_000_000)


def test_options_that_change_nothing_are_named(capsys, gpt2_vocab_checkpoint):
    path, _, _ = gpt2_vocab_checkpoint
    base = ["generate", "--weights", str(path), "--prompt", "Hello", "--max-new-tokens", "2", "--no-eos"]
    assert main([*base, "--top-k", "5"]) == 0
    assert "note: --top-k only shape sampling, and --temperature 0 decodes greedily: ignored" in (
        capsys.readouterr().err)
    assert main([*base, "--backend", "numpy", "--attention", "custom"]) == 0
    assert "note: --attention only shape the torch engine, and --backend numpy runs the spec: ignored" in (
        capsys.readouterr().err)
    assert main([*base, "--temperature", "0.5", "--top-k", "5", "--seed", "1"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_convert_refuses_non_finite_weights_unless_asked_and_compares_bit_for_bit(capsys, tmp_path):
    config = GPT2Config(vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    params = {k: np.full_like(v, np.nan) for k, v in init_params(config, seed=0).items()}
    source = save_checkpoint(params, config, tmp_path / "nan")
    out = tmp_path / "out"
    assert main(["convert", str(source), str(out)]) == 2
    assert "holds weights that are not finite (NaN or inf in wte.weight, wpe.weight, h.0.ln_1.weight and more)" in (
        one_line_error(capsys))
    assert not out.exists()
    assert main(["convert", str(source), str(out), "--allow-nonfinite"]) == 0
    assert "read back identical" in capsys.readouterr().out
    assert np.isnan(load_checkpoint(out)[1]["wte.weight"]).all()


def test_classify_says_when_it_cuts_a_text(capsys, tmp_path):
    config = GPT2Config(n_positions=8, n_embd=8, n_layer=1, n_head=2, n_classes=2)
    weights = save_checkpoint(init_params(config, seed=0), config, tmp_path / "clf")
    assert main(["classify", "--weights", str(weights), "--backend", "numpy", "short",
                 "a text of many more than eight tokens, cut to fit"]) == 0
    captured = capsys.readouterr()
    assert "note: text 2 is 12 tokens long; the classifier reads its first 8 (the model's context)" in captured.err
    assert "note: text 1" not in captured.err and len(captured.out.splitlines()) == 2
