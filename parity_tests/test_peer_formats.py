"""Every peer's checkpoint, read through ``load_checkpoint``, gives transformers' reference outputs.

The fixtures (``book_tiny``, ``seed_tiny``, ``nanogpt_tiny``, ``llmc_tiny``) were written by ``make_fixtures.py`` in
each peer's own layout from the weights of ``hf_tiny``; ``hf_tiny_reference.npz`` holds transformers' logits for
them. The variants the fixtures do not cover (the course's model without q/k/v bias or with its own head, nanoGPT's
``bias=False``) are built here and checked against transformers running the same weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import numpy_gpt2
from gpt2_cli import main
from mapper import GPT2Config, detect_format, init_params, load_checkpoint, load_tokenizer, save_checkpoint, save_llmc
from mapper.errors import CheckpointError
from mapper.schema import param_shapes
from mapper.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256
from parity_tests.conftest import FIXTURES
from torch_gpt2 import GPT2

transformers.logging.set_verbosity_error()
TINY = GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=4)
REFERENCE = np.load(FIXTURES / "hf_tiny_reference.npz", allow_pickle=False)
LLMC = FIXTURES / "llmc_tiny" / "gpt2_tiny.bin"
LLMC_BF16 = FIXTURES / "llmc_tiny" / "gpt2_tiny_bf16.bin"

PEER_FIXTURES = {
    "book model.pth": "book_tiny",
    "book model_and_optimizer.pth": "book_tiny/model_and_optimizer.pth",
    "seed model.pth": "seed_tiny",
    "nanoGPT ckpt.pt": "nanogpt_tiny",
    "nanoGPT ckpt.pt file": "nanogpt_tiny/ckpt.pt",
    "llm.c float32": "llmc_tiny/gpt2_tiny.bin",
}


def reference_params() -> dict[str, np.ndarray]:
    return {k.removeprefix("transformer."): v for k, v in load_file(FIXTURES / "hf_tiny" / "model.safetensors").items()}


def hf_model(params: dict[str, np.ndarray] | None = None, **config: object) -> transformers.GPT2LMHeadModel:
    """transformers' float64 GPT-2 of the fixture's shape, holding ``params`` (canonical names; default hf_tiny's)."""
    model = transformers.GPT2LMHeadModel.from_pretrained(FIXTURES / "hf_tiny", dtype=torch.float64, **config).eval()
    if params is not None:
        state = model.state_dict()
        with torch.no_grad():
            for name, value in params.items():
                key = name if name == "lm_head.weight" else f"transformer.{name}"
                state[key].copy_(torch.from_numpy(value))
    return model


def hf_logits(model: transformers.GPT2LMHeadModel, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def spec_logits(params: dict[str, np.ndarray], config: GPT2Config, tokens: np.ndarray) -> np.ndarray:
    return numpy_gpt2.forward({k: v.astype(np.float64) for k, v in params.items()}, config, tokens)


@pytest.mark.parametrize("case", PEER_FIXTURES)
def test_peer_fixture_gives_the_reference_logits(case: str) -> None:
    path = FIXTURES / PEER_FIXTURES[case]
    assert detect_format(path) == ("llmc" if "llm.c" in case else "pytorch")
    config, params = load_checkpoint(path)
    # the course's config dict beside the book's and the seed's files names its init and drop_rate (0.1); a head equal
    # to tok_emb is tied
    assert config == (TINY.replace(init="course").with_dropout(0.1) if case.startswith(("book", "seed")) else TINY)
    ref = reference_params()
    assert list(params) == list(param_shapes(TINY))  # canonical order, and the tied head dropped
    for k, v in ref.items():
        np.testing.assert_array_equal(params[k], v, err_msg=k)
    for i in range(3):
        tokens = REFERENCE[f"tokens_{i}"]
        np.testing.assert_allclose(spec_logits(params, config, tokens), REFERENCE[f"logits64_{i}"], rtol=0, atol=1e-10)
    engine = GPT2.from_pretrained(str(path), attention="custom", device="cpu", dtype=torch.float64)
    with torch.no_grad():
        logits = engine(torch.from_numpy(REFERENCE["tokens_1"])).numpy()
    np.testing.assert_allclose(logits, REFERENCE["logits64_1"], rtol=0, atol=1e-10)


def test_llmc_bfloat16_file_holds_the_rounded_weights() -> None:
    """Version 5: every value is torch's bfloat16 rounding of the float32 weights; transformers running those
    rounded weights gives the same logits as the spec on what the reader returns."""
    config, params = load_checkpoint(LLMC_BF16)
    assert config == TINY
    rounded = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in reference_params().items()}
    for k, v in rounded.items():
        assert params[k].dtype == np.float32
        np.testing.assert_array_equal(params[k], v, err_msg=k)
    tokens = REFERENCE["tokens_1"]
    theirs = hf_logits(hf_model({k: v.astype(np.float64) for k, v in rounded.items()}), tokens)
    np.testing.assert_allclose(spec_logits(params, config, tokens), theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype, fixture", [("float32", LLMC), ("bfloat16", LLMC_BF16)])
def test_llmc_writer_equals_the_fixture_byte_for_byte(tmp_path: Path, dtype: str, fixture: Path) -> None:
    """make_fixtures.py writes llm.c's files as llm.c's own write_model does (with torch); ours must be identical."""
    config, params = load_checkpoint(FIXTURES / "hf_tiny")
    save_llmc(params, config, tmp_path / "out.bin", dtype=dtype)
    assert (tmp_path / "out.bin").read_bytes() == fixture.read_bytes()


def test_convert_to_llmc_and_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["convert", str(FIXTURES / "openai_tiny"), str(tmp_path / "gpt2_tiny.bin"), "--to", "llmc"]) == 0
    assert "llm.c model file, version 3" in capsys.readouterr().out
    assert (tmp_path / "gpt2_tiny.bin").read_bytes() == LLMC.read_bytes()
    assert main(["convert", str(FIXTURES / "hf_tiny"), str(tmp_path / "b.bin"), "--to", "llmc", "--dtype",
                 "bfloat16"]) == 0
    assert (tmp_path / "b.bin").read_bytes() == LLMC_BF16.read_bytes()
    assert main(["convert", str(tmp_path / "gpt2_tiny.bin"), str(tmp_path / "hf")]) == 0
    theirs = hf_logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval(),
                       REFERENCE["tokens_0"])
    np.testing.assert_allclose(theirs, REFERENCE["logits64_0"], rtol=0, atol=1e-10)
    for args, message in (
        (["--to", "llmc", str(tmp_path / "out")], "give the output as a .bin path"),
        (["--to", "llmc", "--dtype", "float64", str(tmp_path / "c.bin")], "not --dtype float64"),
        (["--dtype", "bfloat16", str(tmp_path / "d")], "--dtype bfloat16 is for --to llmc"),
    ):
        output = args.pop()
        assert main(["convert", str(FIXTURES / "hf_tiny"), output, *args]) == 2
        assert message in capsys.readouterr().err


def test_llmc_refuses_what_it_cannot_hold_and_reports_bad_files(tmp_path: Path) -> None:
    config, params = load_checkpoint(FIXTURES / "hf_tiny")
    untied = config.replace(tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match="ties the output head to wte"):
        save_llmc({**params, "lm_head.weight": params["wte.weight"] + 1}, untied, tmp_path / "x.bin")
    data = LLMC.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match=r"short\.bin is truncated: 37628 bytes, but llm\.c's header .* needs "
                                              r"37632"):
        load_checkpoint(tmp_path / "short.bin")
    old = bytearray(data)
    old[4:8] = (1).to_bytes(4, "little")
    (tmp_path / "v1.bin").write_bytes(bytes(old))
    with pytest.raises(CheckpointError, match="version 1; only versions 3 .float32. and 5 .bfloat16. are read"):
        load_checkpoint(tmp_path / "v1.bin")


@pytest.mark.parametrize("content", [b"\x01\x02garbage" * 100, np.arange(300, dtype="<i4").tobytes()])
def test_a_file_that_is_no_pickle_never_reaches_torch(tmp_path: Path, content: bytes) -> None:
    """An llm.c-like .bin (or any non-pickle) named like a torch file: our own message, never torch's advice."""
    for name in ("pytorch_model.bin", "model.pth", "ckpt.pt"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="is neither a torch.save file .* nor an llm.c model file") as info:
            load_checkpoint(tmp_path / name)
        assert "weights_only" not in str(info.value)


class _Exploit:
    def __reduce__(self):  # unpickling this would call shutil.rmtree on a folder the test watches
        return (shutil.rmtree, (str(_Exploit.target),))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    _Exploit.target = victim
    state = {"wte.weight": torch.zeros(2, 2), "payload": _Exploit()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"holds Python objects .*\(it names shutil\.rmtree\).* refused") as info:
        load_checkpoint(tmp_path / "pytorch_model.bin")
    assert victim.is_dir()  # nothing ran
    assert "weights_only" not in str(info.value) and "allowlist" not in str(info.value)
    data = (FIXTURES / "hf_tiny_hub_layout" / "pytorch_model.bin").read_bytes()  # legacy pickle, cut short
    (tmp_path / "cut.bin").write_bytes(data[:20000])
    with pytest.raises(CheckpointError, match="is not a loadable pytorch checkpoint") as info:
        load_checkpoint(tmp_path / "cut.bin")
    assert "weights_only" not in str(info.value)


# ----- variants built here: transformers on the same weights is the reference -----


def book_state(params: dict[str, np.ndarray], qkv_bias: bool, head: np.ndarray) -> dict[str, torch.Tensor]:
    """The course's GPTModel state dict for canonical ``params`` (written from the module tree in the course)."""
    C = TINY.n_embd

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    sd = {"tok_emb.weight": t(params["wte.weight"]), "pos_emb.weight": t(params["wpe.weight"])}
    for i in range(TINY.n_layer):
        p = {k.split(".", 2)[2]: v for k, v in params.items() if k.startswith(f"h.{i}.")}
        b = f"trf_blocks.{i}."
        sd[b + "att.mask"] = torch.triu(torch.ones(TINY.n_positions, TINY.n_positions), diagonal=1)
        for j, proj in enumerate(("W_query", "W_key", "W_value")):
            sd[b + f"att.{proj}.weight"] = t(p["attn.c_attn.weight"][:, j * C : (j + 1) * C].T)
            if qkv_bias:
                sd[b + f"att.{proj}.bias"] = t(p["attn.c_attn.bias"][j * C : (j + 1) * C])
        linears = (("att.out_proj", "attn.c_proj"), ("ff.layers.0", "mlp.c_fc"), ("ff.layers.2", "mlp.c_proj"))
        for theirs, ours in linears:
            sd[b + f"{theirs}.weight"], sd[b + f"{theirs}.bias"] = t(p[f"{ours}.weight"].T), t(p[f"{ours}.bias"])
        for n in ("1", "2"):
            sd[b + f"norm{n}.scale"], sd[b + f"norm{n}.shift"] = t(p[f"ln_{n}.weight"]), t(p[f"ln_{n}.bias"])
    sd["final_norm.scale"], sd["final_norm.shift"] = t(params["ln_f.weight"]), t(params["ln_f.bias"])
    sd["out_head.weight"] = t(head)
    return sd


def test_course_model_without_qkv_bias_and_with_its_own_head(tmp_path: Path) -> None:
    """The course's from-scratch model: no q/k/v bias, an untied out_head; its config dict as config.json."""
    params = reference_params()
    head = np.random.default_rng(0).standard_normal(params["wte.weight"].shape).astype(np.float32)
    torch.save(book_state(params, qkv_bias=False, head=head), tmp_path / "model.pth")
    course = {"vocab_size": 97, "context_length": 32, "emb_dim": 16, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1,
              "qkv_bias": False}
    (tmp_path / "config.json").write_text(json.dumps(course))
    config, got = load_checkpoint(tmp_path / "model.pth")
    # the course's model (its init, untied head, no q/k/v bias) with the dict's drop_rate
    assert config == TINY.with_init("course") and config.attn_pdrop == 0.1 and not config.tie_word_embeddings
    assert GPT2Config.from_spec(None, str(tmp_path / "config.json")) == config  # the dict alone: a fresh course model
    assert "h.0.attn.c_attn.bias" not in got
    np.testing.assert_array_equal(got["lm_head.weight"], head)
    theirs_params = {k: v.astype(np.float64) for k, v in params.items()}
    for i in range(TINY.n_layer):
        theirs_params[f"h.{i}.attn.c_attn.bias"] = np.zeros(3 * TINY.n_embd)
    theirs_params["lm_head.weight"] = head.astype(np.float64)
    model = hf_model(theirs_params, tie_word_embeddings=False)
    tokens = REFERENCE["tokens_1"]
    np.testing.assert_allclose(spec_logits(got, config, tokens), hf_logits(model, tokens), rtol=0, atol=1e-10)
    # without config.json the shapes give the config (n_head from a preset's width needs a real width)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="cannot infer n_head for n_embd=16"):
        load_checkpoint(tmp_path / "model.pth")


def test_nanogpt_without_biases_reads_zeros_that_compute_the_same(tmp_path: Path) -> None:
    """nanoGPT's bias=False: no bias in any Linear or LayerNorm; transformers with those biases at zero agrees."""
    ckpt = torch.load(FIXTURES / "nanogpt_tiny" / "ckpt.pt", weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.endswith(".bias")}
    ckpt["model_args"]["bias"] = False
    torch.save(ckpt, tmp_path / "ckpt.pt")
    config, got = load_checkpoint(tmp_path)
    assert config == TINY.replace(qkv_bias=False)
    zeroed = {k: (np.zeros_like(v) if k.endswith(".bias") else v).astype(np.float64)
              for k, v in reference_params().items()}
    assert all(not got[k].any() for k in got if k.endswith(".bias"))
    tokens = REFERENCE["tokens_1"]
    np.testing.assert_allclose(spec_logits(got, config, tokens), hf_logits(hf_model(zeroed), tokens), rtol=0,
                               atol=1e-10)


def test_a_bare_nanogpt_state_dict_is_known_by_its_linear_orientation(tmp_path: Path) -> None:
    ckpt = torch.load(FIXTURES / "nanogpt_tiny" / "ckpt.pt", weights_only=True)
    torch.save(ckpt["model"], tmp_path / "pytorch_model.bin")
    shutil.copy(FIXTURES / "hf_tiny" / "config.json", tmp_path / "config.json")
    _, got = load_checkpoint(tmp_path)
    for k, v in reference_params().items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_convert_writes_what_transformers_pipeline_needs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--to hf adds GPT-2's tokenizer and generation files: transformers.pipeline runs offline on the folder and
    generates the spec's greedy tokens."""

    config = GPT2Config(n_positions=64, n_embd=16, n_layer=2, n_head=2)  # GPT-2's vocabulary
    params = init_params(config, seed=5, dtype=np.float32)
    save_checkpoint(params, config, tmp_path / "ours", fmt="fused")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert "vocab.json + merges.txt + tokenizer_config.json" in capsys.readouterr().out
    assert hashlib.sha256((tmp_path / "hf" / "vocab.json").read_bytes()).hexdigest() == ENCODER_JSON_SHA256
    assert hashlib.sha256((tmp_path / "hf" / "merges.txt").read_bytes()).hexdigest() == VOCAB_BPE_SHA256
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    prompt = load_tokenizer().encode("Every effort moves you")
    out = pipe("Every effort moves you", max_new_tokens=8, do_sample=False, return_tensors=True)
    ours = numpy_gpt2.generate(params, config, np.array([prompt]), 8, eos_token_id=config.eos_token_id)[0].tolist()
    theirs = list(out[0]["generated_token_ids"])
    assert theirs == ours[: len(theirs)] and len(theirs) > len(prompt)
