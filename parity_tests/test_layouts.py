"""mapper.layouts: canonical parameters <-> the torch module's state, for the fused and custom layouts.

Every check compares values, not just shapes: ``attn.c_proj.weight`` is square, so a missing transpose
keeps every shape right.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mapper import GPT2Config, param_shapes
from mapper.layouts import ATTENTION_LAYOUTS, from_module_state, module_state_shapes, to_module_state
from torch_gpt2 import GPT2

configs = st.builds(
    lambda n_head, hs, n_layer, V, P, tied, n_classes: GPT2Config(
        vocab_size=V, n_positions=P, n_embd=n_head * hs, n_layer=n_layer, n_head=n_head,
        tie_word_embeddings=tied, n_classes=n_classes,
    ),
    st.integers(1, 3), st.integers(2, 4), st.integers(1, 2), st.integers(2, 12), st.integers(1, 6),
    st.booleans(), st.none() | st.integers(1, 3),
)  # fmt: skip
layouts = st.sampled_from(ATTENTION_LAYOUTS)


def random_params(config: GPT2Config, seed: int, dtype=np.float64) -> dict[str, np.ndarray]:
    """Every tensor (biases and LayerNorm too) random, so no value is accidentally symmetric or zero."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in param_shapes(config).items()}


@settings(deadline=None)
@given(config=configs, attention=layouts, seed=st.integers(0, 2**16))
def test_canonical_to_module_to_canonical_is_identity(config, attention, seed):
    params = random_params(config, seed)
    state = to_module_state(params, config, attention)
    assert {k: v.shape for k, v in state.items()} == module_state_shapes(config, attention)
    back = from_module_state(state, config, attention)
    assert list(back) == list(params)
    for name, value in params.items():
        assert back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value, err_msg=name)


@settings(deadline=None)
@given(config=configs, seed=st.integers(0, 2**16))
def test_module_values_follow_the_documented_layout(config, seed):
    """Element by element: nn.Linear holds W.T; custom q/k/v are the column blocks of c_attn."""
    params = random_params(config, seed)
    C = config.n_embd
    fused = to_module_state(params, config, "fused")
    custom = to_module_state(params, config, "custom")
    for i in range(config.n_layer):
        W, b = params[f"h.{i}.attn.c_attn.weight"], params[f"h.{i}.attn.c_attn.bias"]  # [C, 3C], [3C]
        for r in range(3 * C):
            for c in range(C):
                assert fused[f"h.{i}.attn.c_attn.weight"][r, c] == W[c, r]
        np.testing.assert_array_equal(fused[f"h.{i}.attn.c_attn.bias"], b)
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            for r in range(C):
                for c in range(C):
                    assert custom[f"h.{i}.attn.{proj}.weight"][r, c] == W[c, j * C + r]
            np.testing.assert_array_equal(custom[f"h.{i}.attn.{proj}.bias"], b[j * C : (j + 1) * C])
        for name in ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
            canonical = params[f"h.{i}.{name}"]
            for state in (fused, custom):
                np.testing.assert_array_equal(state[f"h.{i}.{name}"], canonical.T)
        # the square one: the transposed value really differs from the untransposed (random, not symmetric)
        assert not np.array_equal(fused[f"h.{i}.attn.c_proj.weight"], params[f"h.{i}.attn.c_proj.weight"])
    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"):
        if name in params:
            np.testing.assert_array_equal(fused[name], params[name])
    if config.n_classes is not None:
        np.testing.assert_array_equal(custom["score.weight"], params["score.weight"].T)


@settings(deadline=None)
@given(config=configs, seed=st.integers(0, 2**16))
def test_custom_and_fused_convert_into_each_other(config, seed):
    params = random_params(config, seed)
    custom = to_module_state(params, config, "custom")
    via_custom = to_module_state(from_module_state(custom, config, "custom"), config, "fused")
    fused = to_module_state(params, config, "fused")
    assert via_custom.keys() == fused.keys()
    for name in fused:
        np.testing.assert_array_equal(via_custom[name], fused[name], err_msg=name)


@pytest.mark.parametrize("attention", ATTENTION_LAYOUTS)
@pytest.mark.parametrize("untied", [False, True])
def test_state_names_and_shapes_are_the_modules(attention, untied):
    config = GPT2Config(vocab_size=11, n_positions=5, n_embd=8, n_layer=2, n_head=2,
                        tie_word_embeddings=not untied, n_classes=3 if untied else None)
    module_state = GPT2(config, attention).state_dict()
    assert {k: tuple(v.shape) for k, v in module_state.items()} == module_state_shapes(config, attention)


@settings(deadline=None, max_examples=8)
@given(config=configs, seed=st.integers(0, 2**16), dtype=st.sampled_from([np.float32, np.float64]))
def test_module_round_trip_and_layouts_compute_the_same_projection(config, seed, dtype):
    """GPT2.from_params(...).to_params() is the identity; both layouts project q|k|v as x @ c_attn + b."""
    params = random_params(config, seed, dtype)
    x = np.random.default_rng(seed + 1).standard_normal((2, 3, config.n_embd)).astype(dtype)
    expected = np.split(x @ params["h.0.attn.c_attn.weight"] + params["h.0.attn.c_attn.bias"], 3, axis=-1)
    for attention in ATTENTION_LAYOUTS:
        model = GPT2.from_params(params, config, attention, device="cpu")
        assert model.dtype == (torch.float64 if dtype == np.float64 else torch.float32)
        back = model.to_params()
        for name, value in params.items():
            assert back[name].dtype == value.dtype
            np.testing.assert_array_equal(back[name], value, err_msg=f"{attention} {name}")
        with torch.no_grad():
            qkv = model.h[0].attn.project_qkv(torch.from_numpy(x))
        for got, want in zip(qkv, expected, strict=True):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
    # the module owns copies: training it must not write into the caller's arrays
    model = GPT2.from_params(params, config, device="cpu")
    with torch.no_grad():
        model.wte.weight.add_(1.0)
    assert not np.array_equal(model.to_params()["wte.weight"], params["wte.weight"])


def test_errors_name_the_problem():
    config = GPT2Config(vocab_size=7, n_positions=4, n_embd=4, n_layer=1, n_head=2)
    params = random_params(config, 0)
    with pytest.raises(ValueError, match="attention layout"):
        to_module_state(params, config, "separate")
    with pytest.raises(ValueError, match="missing 1 key"):
        to_module_state({k: v for k, v in params.items() if k != "h.0.mlp.c_fc.bias"}, config, "fused")
    fused = to_module_state(params, config, "fused")
    with pytest.raises(ValueError, match=r"missing 6 key\(s\): h.0.attn.q_proj.weight"):
        from_module_state(fused, config, "custom")
    fused["h.0.attn.c_proj.weight"] = fused["h.0.attn.c_proj.weight"][:, :2]
    with pytest.raises(ValueError, match=r"h.0.attn.c_proj.weight.*\(4, 2\).*\(4, 4\)"):
        from_module_state(fused, config, "fused")
