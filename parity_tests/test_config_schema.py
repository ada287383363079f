"""Configs, the canonical schema and GPT-2's initialisation."""

from __future__ import annotations

import numpy as np
import pytest

from mapper import ConfigError, GPT2Config, count_params, init_params, param_shapes

# The four sizes OpenAI released, counted with the head tied to wte (as published).
PRESET_COUNTS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name,count", PRESET_COUNTS.items())
def test_preset_parameter_counts(name, count):
    config = GPT2Config.from_preset(name)
    assert (config.vocab_size, config.n_positions) == (50257, 1024)
    assert count_params(config) == count
    # an untied head adds exactly V*C
    assert count_params(config.replace(tie_word_embeddings=False)) == count + 50257 * config.n_embd


def test_schema_names_and_shapes():
    config = GPT2Config(vocab_size=10, n_positions=7, n_embd=6, n_layer=2, n_head=3, n_classes=4)
    shapes = param_shapes(config)
    assert len(shapes) == 2 + 12 * 2 + 2 + 1  # embeddings, blocks, ln_f, score.weight (no bias, as HF)
    assert shapes["wte.weight"] == (10, 6) and shapes["wpe.weight"] == (7, 6)
    assert shapes["h.1.attn.c_attn.weight"] == (6, 18) and shapes["h.1.attn.c_attn.bias"] == (18,)
    assert shapes["h.0.mlp.c_fc.weight"] == (6, 24) and shapes["h.0.mlp.c_proj.weight"] == (24, 6)
    assert shapes["score.weight"] == (6, 4) and "score.bias" not in shapes
    assert "lm_head.weight" not in shapes


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(n_embd=10, n_head=3), r"n_embd \(10\) must be divisible by n_head \(3\)"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon must be a positive number"),
        (dict(n_classes=0), "n_classes must be a positive integer"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GPT2Config(**kwargs)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        GPT2Config.from_preset("gpt3")


def test_hf_config_round_trip_and_activation_check():
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=4, tie_word_embeddings=False)
    assert GPT2Config.from_hf_dict(config.to_hf_dict()) == config
    with pytest.raises(ConfigError, match="tanh GELU"):
        GPT2Config.from_hf_dict({**config.to_hf_dict(), "activation_function": "gelu"})
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        GPT2Config.from_hf_dict({**config.to_hf_dict(), "model_type": "llama"})


def test_init_statistics_follow_gpt2():
    config = GPT2Config(vocab_size=3000, n_positions=256, n_embd=128, n_layer=8, n_head=4)
    params = init_params(config, seed=0, dtype=np.float64)
    assert np.std(params["wte.weight"]) == pytest.approx(0.02, rel=0.02)
    assert np.std(params["h.3.mlp.c_fc.weight"]) == pytest.approx(0.02, rel=0.02)
    residual = 0.02 / np.sqrt(2 * config.n_layer)  # c_proj layers add into the residual stream
    assert np.std(params["h.3.attn.c_proj.weight"]) == pytest.approx(residual, rel=0.03)
    assert np.std(params["h.3.mlp.c_proj.weight"]) == pytest.approx(residual, rel=0.03)
    assert np.all(params["h.0.ln_1.weight"] == 1.0) and np.all(params["ln_f.weight"] == 1.0)
    assert all(np.all(v == 0.0) for k, v in params.items() if k.endswith(".bias"))


def test_init_is_reproducible_and_dtype_independent():
    config = GPT2Config(vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    a, b = init_params(config, 5, np.float64), init_params(config, 5, np.float64)
    c = init_params(config, 5, np.float32)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(c[k].dtype == np.float32 and np.array_equal(c[k], a[k].astype(np.float32)) for k in a)
    assert not np.array_equal(init_params(config, 6)["wte.weight"], c["wte.weight"])
    with pytest.raises(ValueError, match="float32 or float64"):
        init_params(config, 0, np.float16)


def test_the_course_from_scratch_model_counts_the_book_s_parameters():
    """The book's GPT-2 small trained from scratch: untied head, no q/k/v bias -> 163,009,536 parameters (its
    printed figure): 124,439,808 + the head's 50,257 x 768 - 12 layers x 3 x 768 biases."""
    config = GPT2Config.from_spec("gpt2", "tie_word_embeddings=false,qkv_bias=false")
    assert config.qkv_bias is False and not config.tie_word_embeddings
    assert count_params(config) == 163_009_536
    assert "h.0.attn.c_attn.bias" not in param_shapes(config) and "h.0.attn.c_attn.weight" in param_shapes(config)
    assert GPT2Config.from_hf_dict(config.to_hf_dict()) == config
    with pytest.raises(ConfigError, match="qkv_bias must be true or false"):
        GPT2Config(qkv_bias=0)
