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


@pytest.mark.parametrize("config", [
    GPT2Config(vocab_size=10, n_positions=7, n_embd=6, n_layer=2, n_head=3),
    GPT2Config(vocab_size=11, n_positions=5, n_embd=8, n_layer=3, n_head=2, tie_word_embeddings=False),
    GPT2Config(vocab_size=9, n_positions=4, n_embd=4, n_layer=1, n_head=1, n_classes=3),
    GPT2Config(vocab_size=9, n_positions=4, n_embd=4, n_layer=2, n_head=2, qkv_bias=False),
])
def test_count_params_scaled_from_two_blocks_equals_the_whole_schema(config):
    assert count_params(config) == sum(int(np.prod(shape)) for shape in param_shapes(config).values())


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


def test_the_course_init_is_the_book_s_model():
    """--init course: the book's GPTModel of the 124M shape, 163,009,536 parameters as it prints them."""
    config = GPT2Config.from_preset("gpt2").with_init("course")
    assert (config.init, config.tie_word_embeddings, config.qkv_bias) == ("course", False, False)
    assert (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop) == (0.1, 0.1, 0.1)
    assert count_params(config) == 163_009_536
    assert GPT2Config.from_preset("gpt2").with_init("gpt2") == GPT2Config.from_preset("gpt2")
    with pytest.raises(ConfigError, match="init must be one of gpt2, course, got 'book'"):
        config.with_init("book")


def test_course_init_statistics_per_tensor():
    """PyTorch's defaults, tensor by tensor: nn.Embedding N(0, 1); nn.Linear weights and biases
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), whose mean is 0 and std bound/sqrt(3); LayerNorm 1 and 0."""
    C, L = 96, 3
    config = GPT2Config(vocab_size=2000, n_positions=300, n_embd=C, n_layer=L, n_head=4, n_classes=3).with_init(
        "course")
    params = init_params(config, seed=1, dtype=np.float64)
    assert set(params) == set(param_shapes(config)) and "h.0.attn.c_attn.bias" not in params
    for name in ("wte.weight", "wpe.weight"):
        x = params[name]
        assert abs(x.mean()) < 5 / np.sqrt(x.size) and x.std() == pytest.approx(1.0, rel=0.01), name
    fan_in = {"attn.c_attn.weight": C, "attn.c_proj.weight": C, "attn.c_proj.bias": C, "mlp.c_fc.weight": C,
              "mlp.c_fc.bias": C, "mlp.c_proj.weight": 4 * C, "mlp.c_proj.bias": 4 * C}
    uniform = {f"h.{i}.{k}": n for i in range(L) for k, n in fan_in.items()}
    uniform.update({"lm_head.weight": C, "score.weight": C})
    for name, n in uniform.items():
        x, bound = params[name], 1 / np.sqrt(n)
        assert np.all(np.abs(x) <= bound) and np.abs(x).max() > bound * (1 - 20 / x.size), name  # reaches the bound
        assert abs(x.mean()) < 5 * bound / np.sqrt(3 * x.size), name
        assert x.std() == pytest.approx(bound / np.sqrt(3), rel=max(0.02, 5 / np.sqrt(x.size))), name
    for i in range(L):
        for ln in ("ln_1", "ln_2"):
            assert np.all(params[f"h.{i}.{ln}.weight"] == 1.0) and np.all(params[f"h.{i}.{ln}.bias"] == 0.0)
    assert np.all(params["ln_f.weight"] == 1.0) and np.all(params["ln_f.bias"] == 0.0)
    assert len(params) == len(uniform) + 2 + 4 * L + 2  # nothing else: embeddings, 4 LayerNorm tensors a block, ln_f


def test_course_init_is_reproducible_and_dtype_independent_and_not_gpt2s():
    config = GPT2Config(vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=2).with_init("course")
    a, c = init_params(config, 5, np.float64), init_params(config, 5, np.float32)
    assert all(np.array_equal(c[k], a[k].astype(np.float32)) for k in a)
    gpt2 = init_params(config.replace(init="gpt2"), 5, np.float64)
    assert gpt2["wte.weight"].std() < 0.05 < 0.5 < a["wte.weight"].std()


def test_dropout_and_init_fields_round_trip_through_config_json():
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=4).with_init("course")
    config = config.replace(attn_pdrop=0.2)
    hf = config.to_hf_dict()
    assert (hf["embd_pdrop"], hf["attn_pdrop"], hf["resid_pdrop"], hf["gpt2_init"]) == (0.1, 0.2, 0.1, "course")
    assert GPT2Config.from_hf_dict(hf) == config
    plain = GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=4)
    assert "gpt2_init" not in plain.to_hf_dict() and plain.to_hf_dict()["attn_pdrop"] == 0.0
    assert GPT2Config.from_spec(None, "n_layer=1,resid_pdrop=0.3").resid_pdrop == 0.3
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ConfigError, match=r"attn_pdrop must be a number in \[0, 1\)"):
            plain.replace(attn_pdrop=bad)
