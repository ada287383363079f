"""Checkpoint loading and saving, checked against independent readers and Hugging Face transformers.

The reference for every fixture is ``hf_tiny/model.safetensors`` read by the safetensors library with the
``transformer.`` prefix stripped by hand, and transformers' own ``from_pretrained`` state dict.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import numpy_gpt2
from mapper import save
from mapper.checkpoint import CheckpointError, detect_format, load_checkpoint, save_checkpoint
from mapper.config import GPT2Config
from mapper.schema import param_shapes
from parity_tests.conftest import FIXTURES

TINY = GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=4)

transformers.logging.set_verbosity_error()


def reference_params() -> dict[str, np.ndarray]:
    """hf_tiny's weights read by the safetensors library; only the prefix is handled here."""
    return {k.removeprefix("transformer."): v for k, v in load_file(FIXTURES / "hf_tiny" / "model.safetensors").items()}


def hf_layout(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical -> the keys GPT2LMHeadModel.save_pretrained writes (tied: no lm_head)."""
    return {("" if k.startswith(("lm_head.", "score.")) else "transformer.") + k: v for k, v in params.items()}


def random_params(config: GPT2Config, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Every parameter random (no zero biases or unit gains that would hide a swapped key)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in param_shapes(config).items()}


def assert_params_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)  # the loader's order is checked where it matters (schema order)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def assert_fresh_arrays(params: dict[str, np.ndarray]) -> None:
    arrays = list(params.values())
    for a in arrays:
        assert a.flags.writeable and a.flags.c_contiguous
    for i, a in enumerate(arrays):
        for b in arrays[i + 1 :]:
            assert not np.shares_memory(a, b)


def write_dir(d: Path, tensors: dict[str, np.ndarray], config: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


# ----- every fixture format -----

FIXTURE_PATHS = {
    "hf_tiny": ("hf_tiny", "safetensors"),
    "hf_tiny_bin": ("hf_tiny_bin", "pytorch"),
    "hub_layout_dir": ("hf_tiny_hub_layout", "safetensors"),
    "hub_layout_safetensors": ("hf_tiny_hub_layout/model.safetensors", "safetensors"),
    "hub_layout_legacy_bin": ("hf_tiny_hub_layout/pytorch_model.bin", "pytorch"),
    "openai_tiny": ("openai_tiny", "openai-tf"),
    "openai_prefix": ("openai_tiny/model.ckpt", "openai-tf"),
}


@pytest.mark.parametrize("case", FIXTURE_PATHS)
def test_fixture_loads_bit_identical(case: str) -> None:
    rel, fmt = FIXTURE_PATHS[case]
    assert detect_format(FIXTURES / rel) == fmt
    config, params = load_checkpoint(FIXTURES / rel)
    # transformers' config.json states GPT-2's training dropout (0.1 at all three places); OpenAI's hparams.json
    # says nothing of it
    assert config == TINY.with_dropout(0.0 if fmt == "openai-tf" else 0.1)
    assert list(params) == list(param_shapes(TINY))
    assert_params_equal(params, reference_params())
    assert_fresh_arrays(params)


def test_matches_transformers_state_dict() -> None:
    model = transformers.GPT2LMHeadModel.from_pretrained(FIXTURES / "hf_tiny_bin")
    state = {k.removeprefix("transformer."): v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(state.pop("lm_head.weight"), state["wte.weight"])  # tied
    for fixture in ("hf_tiny_bin", "openai_tiny", "hf_tiny_hub_layout"):
        _, params = load_checkpoint(FIXTURES / fixture)
        assert_params_equal(params, {k: v for k, v in state.items() if k in params})
        assert set(state) - set(params) <= {f"h.{i}.attn.bias" for i in range(2)}


def test_sharded_safetensors(tmp_path: Path) -> None:
    ref = reference_params()
    tensors = hf_layout(ref)
    names = list(tensors)
    shards = {"model-00001-of-00003.safetensors": names[:5], "model-00002-of-00003.safetensors": names[5:17]}
    shards["model-00003-of-00003.safetensors"] = names[17:]
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(FIXTURES / "hf_tiny" / "config.json", tmp_path / "config.json")
    assert detect_format(tmp_path) == "safetensors-sharded"
    config, params = load_checkpoint(tmp_path)
    assert config == TINY.with_dropout(0.1)  # the fixture's config.json
    assert_params_equal(params, ref)
    assert_fresh_arrays(params)

    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard 'model-00002-of-00003.safetensors', which does not exist"):
        load_checkpoint(tmp_path)


def test_sharded_index_pointing_to_wrong_shard(tmp_path: Path) -> None:
    tensors = hf_layout(reference_params())
    save_file(tensors, tmp_path / "a.safetensors")
    save_file({"x": np.zeros(1, np.float32)}, tmp_path / "b.safetensors")
    weight_map = dict.fromkeys(tensors, "a.safetensors") | {"transformer.ln_f.bias": "b.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="puts 'transformer.ln_f.bias' in b.safetensors, but that shard lacks it"):
        load_checkpoint(tmp_path)


# ----- round trips and transformers on what we save -----


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip(tmp_path: Path, dtype: str, tied: bool) -> None:
    config = GPT2Config(vocab_size=23, n_positions=9, n_embd=12, n_layer=3, n_head=3, tie_word_embeddings=tied)
    params = random_params(config, dtype)
    save_checkpoint(params, config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
    ]  # no temp files left
    got_config, got = load_checkpoint(tmp_path)
    assert got_config == config
    assert_params_equal(got, params)
    # The file itself, read by the safetensors library: HF names, Conv1D [in, out] values, no transposes.
    stored = load_file(tmp_path / "model.safetensors")
    assert set(stored) == set(hf_layout(params))
    np.testing.assert_array_equal(stored["transformer.h.2.attn.c_proj.weight"], params["h.2.attn.c_proj.weight"])
    with safe_open(tmp_path / "model.safetensors", framework="np") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((tmp_path / "config.json").read_text()) == config.to_hf_dict()


@pytest.mark.parametrize("n_classes", [2, 12])  # 12 == n_embd: a square head a shape check cannot orient
def test_round_trip_classification_head(tmp_path: Path, n_classes: int) -> None:
    config = GPT2Config(vocab_size=23, n_positions=9, n_embd=12, n_layer=1, n_head=3, n_classes=n_classes)
    params = random_params(config, "float32")
    save_checkpoint(params, config, tmp_path)
    got_config, got = load_checkpoint(tmp_path)
    assert got_config == config
    assert_params_equal(got, params)
    stored = load_file(tmp_path / "model.safetensors")
    np.testing.assert_array_equal(stored["score.weight"], params["score.weight"].T)  # nn.Linear [n_classes, C]
    model = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path)
    np.testing.assert_array_equal(model.score.weight.detach().numpy(), params["score.weight"].T)


def test_hf_classifier_file_loads_without_bias(tmp_path: Path) -> None:
    """A file laid out as GPT2ForSequenceClassification.save_pretrained writes it: score.weight [n_classes, C]."""
    config = GPT2Config(vocab_size=23, n_positions=9, n_embd=12, n_layer=1, n_head=3, n_classes=3)
    params = random_params(config, "float32")
    tensors = hf_layout(params)
    tensors["score.weight"] = np.ascontiguousarray(params["score.weight"].T)
    write_dir(tmp_path, tensors, config.to_hf_dict())
    got_config, got = load_checkpoint(tmp_path)
    assert got_config == config and "score.bias" not in got
    np.testing.assert_array_equal(got["score.weight"], params["score.weight"])


@pytest.mark.parametrize("layout", ["hf", "fused"])
def test_older_files_with_score_bias_load_when_zero_and_are_refused_otherwise(tmp_path: Path, layout: str) -> None:
    """This project used to store a score.bias: a zero one changes nothing and is dropped; a nonzero one cannot be
    represented by a bias-free head and is refused, naming the key."""
    config = GPT2Config(vocab_size=23, n_positions=9, n_embd=12, n_layer=1, n_head=3, n_classes=3)
    params = random_params(config, "float32")
    save_checkpoint(params, config, tmp_path, fmt=layout)
    file = tmp_path / "model.safetensors"
    with safe_open(file, framework="np") as f:
        metadata = f.metadata()
    stored = load_file(file)
    save_file({**stored, "score.bias": np.zeros(3, np.float32)}, file, metadata=metadata)
    _, got = load_checkpoint(tmp_path)
    assert_params_equal(got, params)
    save_file({**stored, "score.bias": np.array([0.0, 0.5, 0.0], np.float32)}, file, metadata=metadata)
    with pytest.raises(CheckpointError, match=r"nonzero 'score.bias' \(max \|b\| = 0.5\)"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("layout", ["hf", "custom", "fused"])
def test_model_without_qkv_bias_round_trips_and_loads_in_transformers(tmp_path: Path, layout: str) -> None:
    """The course's model has no q/k/v bias: its parameters lack the key, the engine's layouts store none, and the
    Hugging Face layout (which has no switch for it) holds zeros, flagged in config.json, so transformers computes
    the same logits and our loader gives the bias-free parameters back."""
    config = GPT2Config(vocab_size=23, n_positions=9, n_embd=12, n_layer=2, n_head=3, qkv_bias=False)
    params = random_params(config, "float64")
    assert not any(k.endswith("c_attn.bias") for k in params)
    save_checkpoint(params, config, tmp_path, fmt=layout)
    got_config, got = load_checkpoint(tmp_path)
    assert got_config == config
    assert_params_equal(got, params)
    stored = load_file(tmp_path / "model.safetensors")
    biases = [k for k in stored if "c_attn.bias" in k or k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    if layout != "hf":
        assert biases == []
        return
    assert len(biases) == 2 and all(not stored[k].any() for k in biases)
    assert json.loads((tmp_path / "config.json").read_text())["gpt2_qkv_bias"] is False
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64).eval()
    tokens = np.array([[1, 5, 7, 22, 3]])
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, numpy_gpt2.forward(params, config, tokens), rtol=0, atol=1e-12)
    # a nonzero bias under a config that says there is none is refused, naming the key
    stored["transformer.h.1.attn.c_attn.bias"][4] = 0.25
    save_file(stored, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"no q/k/v bias .*'transformer\.h\.1\.attn\.c_attn\.bias' is not zero"):
        load_checkpoint(tmp_path)


def test_transformers_reproduces_reference_logits_from_our_save(tmp_path: Path) -> None:
    config, params = load_checkpoint(FIXTURES / "openai_tiny")
    save_checkpoint(params, config, tmp_path)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ref = np.load(FIXTURES / "hf_tiny_reference.npz", allow_pickle=False)
    for i in range(3):
        with torch.no_grad():
            logits = model(torch.from_numpy(ref[f"tokens_{i}"]).long()).logits.numpy()
        np.testing.assert_allclose(logits, ref[f"logits64_{i}"], rtol=0, atol=1e-10)


def test_transformers_loads_untied_head(tmp_path: Path) -> None:
    config = GPT2Config(vocab_size=23, n_positions=9, n_embd=12, n_layer=2, n_head=3, tie_word_embeddings=False)
    params = random_params(config, "float64")
    save_checkpoint(params, config, tmp_path)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64)
    state = {k.removeprefix("transformer."): v.numpy() for k, v in model.state_dict().items()}
    assert_params_equal({k: state[k] for k in params}, params)
    ids = torch.tensor([[1, 5, 7, 22]])
    with torch.no_grad():
        logits = model(ids).logits.numpy()
    hidden = model.transformer(ids).last_hidden_state.detach().numpy()
    np.testing.assert_allclose(logits, hidden @ params["lm_head.weight"].T, rtol=0, atol=1e-12)


# ----- lm_head, dtypes, config inference -----


def test_lm_head_equal_to_wte_is_tied_different_is_untied(tmp_path: Path) -> None:
    ref = reference_params()
    tensors = hf_layout(ref) | {"lm_head.weight": ref["wte.weight"].copy()}
    config, params = load_checkpoint(write_dir(tmp_path / "same", tensors, TINY.to_hf_dict()))
    assert config.tie_word_embeddings and "lm_head.weight" not in params

    head = ref["wte.weight"] + 1
    tensors["lm_head.weight"] = head
    config, params = load_checkpoint(write_dir(tmp_path / "diff", tensors, TINY.to_hf_dict()))
    assert not config.tie_word_embeddings
    np.testing.assert_array_equal(params["lm_head.weight"], head)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_is_upcast(tmp_path: Path, half: str) -> None:
    from safetensors.torch import save_file as save_torch

    ref = reference_params()
    tensors = {k: torch.from_numpy(v).to(getattr(torch, half)) for k, v in hf_layout(ref).items()}
    save_torch(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(FIXTURES / "hf_tiny" / "config.json", tmp_path / "config.json")
    torch.save(tensors, tmp_path / "weights.bin")
    for path in (tmp_path, tmp_path / "weights.bin"):
        _, params = load_checkpoint(path)
        for k, v in params.items():
            assert v.dtype == np.float32
            np.testing.assert_array_equal(v, tensors[("transformer." + k)].float().numpy())


def test_config_inferred_from_shapes(tmp_path: Path) -> None:
    config = GPT2Config(vocab_size=7, n_positions=3, n_embd=768, n_layer=1, n_head=12)
    params = random_params(config, "float32")
    got_config, got = load_checkpoint(write_dir(tmp_path / "gpt2_width", hf_layout(params)))
    assert got_config == config  # n_head 12: the preset of width 768
    assert_params_equal(got, params)

    config = GPT2Config(vocab_size=7, n_positions=3, n_embd=128, n_layer=2, n_head=2)
    params = random_params(config, "float64")
    got_config, _ = load_checkpoint(write_dir(tmp_path / "width_128", hf_layout(params)))
    assert got_config == config  # n_head = 128 // 64

    with pytest.raises(CheckpointError, match="cannot infer n_head for n_embd=16.*config.json"):
        load_checkpoint(write_dir(tmp_path / "tiny", hf_layout(reference_params())))


# ----- errors -----


def test_missing_key(tmp_path: Path) -> None:
    tensors = hf_layout(reference_params())
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): h\.1\.mlp\.c_fc\.bias"):
        load_checkpoint(write_dir(tmp_path, tensors, TINY.to_hf_dict()))


def test_unexpected_key(tmp_path: Path) -> None:
    tensors = hf_layout(reference_params()) | {"transformer.h.0.attn.q_proj.weight": np.zeros((16, 16), np.float32)}
    with pytest.raises(
        CheckpointError, match=r"unexpected 1 key\(s\): transformer\.h\.0\.attn\.q_proj\.weight"
    ):
        load_checkpoint(write_dir(tmp_path, tensors, TINY.to_hf_dict()))


def test_layer_count_disagreeing_with_config(tmp_path: Path) -> None:
    tensors = hf_layout(reference_params())
    config = TINY.replace(n_layer=3).to_hf_dict()
    with pytest.raises(CheckpointError, match=r"missing 12 key\(s\): h\.2\.ln_1\.weight.* and 6 more"):
        load_checkpoint(write_dir(tmp_path, tensors, config))


def test_wrong_shape_names_key_and_both_shapes(tmp_path: Path) -> None:
    tensors = hf_layout(reference_params())
    tensors["transformer.h.1.attn.c_proj.weight"] = np.zeros((16, 17), np.float32)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(write_dir(tmp_path, tensors, TINY.to_hf_dict()))
    message = str(info.value)
    assert "'transformer.h.1.attn.c_proj.weight'" in message
    assert "(16, 17)" in message and "(16, 16)" in message
    assert "model.safetensors" in message


@pytest.mark.parametrize("keep", [0, 5, 100, 30000, 37000])
def test_truncated_safetensors(tmp_path: Path, keep: int) -> None:
    shutil.copy(FIXTURES / "hf_tiny" / "config.json", tmp_path / "config.json")
    data = (FIXTURES / "hf_tiny" / "model.safetensors").read_bytes()
    assert keep < len(data)
    (tmp_path / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors (is truncated|is not a valid safetensors)"):
        load_checkpoint(tmp_path)


def _hand_written_safetensors(path: Path, header: bytes, data: bytes) -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


F32_PAIR = b'"dtype":"F32","shape":[2]'
BAD_HEADERS = {
    "nested a million deep": (b'{"a":' + b"[" * 10**6 + b"]" * 10**6 + b"}", 0, "recursion limit exceeded"),
    "string offsets": (b'{"a":{' + F32_PAIR + b',"data_offsets":["0","8"]}}', 8, 'invalid type: string "0"'),
    "float offsets": (b'{"a":{' + F32_PAIR + b',"data_offsets":[0.0,8.5]}}', 8, "invalid type: floating point"),
    "overlapping offsets": (b'{"a":{' + F32_PAIR + b',"data_offsets":[0,8]},"b":{' + F32_PAIR
                            + b',"data_offsets":[0,8]}}', 8, "byte ranges overlap or leave a gap, at tensor"),
    "bytes appended": (b'{"a":{' + F32_PAIR + b',"data_offsets":[0,8]}}', 12, "do not cover the file's data"),
    "shape against offsets": (b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', 8,
                              "invalid shape, data type, or offset"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_safetensors_headers_are_validated_by_the_safetensors_library_first(tmp_path: Path, case: str) -> None:
    header, n_data, reason = BAD_HEADERS[case]
    file = _hand_written_safetensors(tmp_path / "model.safetensors", header, bytes(n_data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(file)
    message = str(info.value)
    assert message.startswith(f"{file} is not a valid safetensors file: ") and reason in message, message
    assert "\n" not in message


def test_truncated_pytorch_bin(tmp_path: Path) -> None:
    data = (FIXTURES / "hf_tiny_bin" / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is not a loadable pytorch checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "weights.dat"])
def test_garbage_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)


def test_not_gpt2(tmp_path: Path) -> None:
    tensors = {
        "model.embed_tokens.weight": np.zeros((10, 8), np.float32),
        "model.layers.0.self_attn.q_proj.weight": np.zeros((8, 8), np.float32),
    }
    with pytest.raises(CheckpointError, match="is not a GPT-2 checkpoint: it has no 'wte.weight'.*embed_tokens"):
        load_checkpoint(write_dir(tmp_path / "llama", tensors))
    with pytest.raises(CheckpointError, match="config.json is not a usable GPT-2 config.json.*'llama'"):
        load_checkpoint(write_dir(tmp_path / "llama_cfg", tensors, {"model_type": "llama"}))


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds no GPT-2 checkpoint"):
        load_checkpoint(tmp_path)


def test_save_rejects_bad_input(tmp_path: Path) -> None:
    params = random_params(TINY, "float32")
    with pytest.raises(CheckpointError, match="cannot save .*missing 1 key"):
        save_checkpoint({k: v for k, v in params.items() if k != "ln_f.bias"}, TINY, tmp_path / "a")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout 'openai'"):
        save_checkpoint(params, TINY, tmp_path / "b", fmt="openai")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_checkpoint(params, TINY, tmp_path / "file")


def test_failed_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = random_params(TINY, "float32")
    save_checkpoint(params, TINY, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(f: BinaryIO, tensors: object, metadata: object) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(save, "write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(random_params(TINY, "float32", seed=1), TINY, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_large_tensors_are_read_in_parallel_blocks_bit_for_bit(monkeypatch, tmp_path):
    """With blocks of 256 bytes every tensor of the fixture larger than that is read as several preadv blocks on
    the reader's threads: the arrays equal the safetensors library's own reading of the file."""
    from safetensors.numpy import load_file

    from mapper.formats import safetensors_file

    monkeypatch.setattr(safetensors_file, "READ_BLOCK", 256)
    file = FIXTURES / "hf_tiny" / "model.safetensors"
    ours, _ = safetensors_file.load_tensors(file)
    theirs = load_file(file)
    assert any(a.nbytes > 4 * 256 for a in theirs.values())
    assert set(ours) == set(theirs)
    for key, array in theirs.items():
        np.testing.assert_array_equal(ours[key], array, err_msg=key)
