"""The fine-tuning math on both backends: the sequence classifier (Hugging Face's GPT2ForSequenceClassification:
score.weight without bias, read at each row's last real token) and LoRA adapters.

Each claim is checked against a source that does not share the code under test: fourth-order central finite
differences in float64 for every backward (the ops and the whole model), the other backend (NumPy spec vs torch,
float64, within ``mapper.parity.DRAWN_MODEL_TOLERANCES``), and Hugging Face transformers reading our checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy_gpt2
from mapper import (
    CheckpointError,
    GPT2Config,
    LoraConfig,
    init_lora_params,
    init_params,
    load_checkpoint,
    load_lora_adapters,
    lora_param_shapes,
    merge_lora,
    save_checkpoint,
    save_lora_adapters,
    validate_params,
)
from mapper.layouts import from_module_state, module_state_shapes, to_module_state
from mapper.parity import DRAWN_MODEL_TOLERANCES, FINITE_DIFFERENCES, ModelOutputs, compare_outputs, scaled_error
from numpy_gpt2 import ops
from numpy_gpt2.gradcheck import numeric_gradient
from torch_gpt2 import GPT2

transformers.logging.set_verbosity_error()

seeds = st.integers(0, 2**32 - 1)
TARGET_SETS = [("attn",), ("mlp",), ("attn", "mlp")]
loras = st.builds(LoraConfig, rank=st.integers(1, 3), alpha=st.floats(0.5, 8.0), targets=st.sampled_from(TARGET_SETS))
maybe_loras = st.one_of(st.none(), loras)


def assert_grad_matches(f, x: np.ndarray, analytic: np.ndarray) -> None:
    """Every entry of ``analytic`` (dL/dx) against central differences of the scalar ``f()`` (x perturbed in place)."""
    numeric = numeric_gradient(f, x, np.arange(x.size)).reshape(x.shape)
    err = scaled_error(analytic, numeric, FINITE_DIFFERENCES.floor)
    assert FINITE_DIFFERENCES.allows(analytic, numeric), f"relative error {err:.3e} > {FINITE_DIFFERENCES.rtol}"


# ---------------------------------------------------------------- the two new ops


@given(B=st.integers(1, 4), T=st.integers(1, 6), C=st.integers(1, 5), seed=seeds)
def test_pool_op(B, T, C, seed):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((B, T, C))
    index = rng.integers(0, T, B)
    up = rng.standard_normal((B, C))

    def f():
        return float(np.sum(ops.pool_forward(h, index)[0] * up))

    pooled, cache = ops.pool_forward(h, index)
    np.testing.assert_array_equal(pooled, np.stack([h[b, index[b]] for b in range(B)]))  # a loop, row by row
    dh, _ = ops.pool_backward(up, cache)
    assert dh.shape == h.shape
    for b in range(B):  # nothing but the read position of each row gets a gradient
        assert np.all(np.delete(dh[b], index[b], axis=0) == 0.0)
    assert_grad_matches(f, h, dh)


@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), Cin=st.integers(1, 6), Cout=st.integers(1, 6),
       r=st.integers(1, 4), scale=st.floats(0.1, 8.0), seed=seeds)
def test_lora_op(lead, Cin, Cout, r, scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, Cin))
    a, b = rng.standard_normal((Cin, r)), rng.standard_normal((r, Cout))
    up = rng.standard_normal((*lead, Cout))

    def f():
        return float(np.sum(ops.lora_forward(x, a, b, scale)[0] * up))

    y, cache = ops.lora_forward(x, a, b, scale)
    np.testing.assert_allclose(y, scale * np.einsum("...i,ir,ro->...o", x, a, b), rtol=1e-12, atol=1e-12)
    dx, (da, db) = ops.lora_backward(up, cache)
    assert (dx.shape, da.shape, db.shape) == (x.shape, a.shape, b.shape)
    for arr, grad in ((x, dx), (a, da), (b, db)):
        assert_grad_matches(f, arr, grad)


# ---------------------------------------------------------------- drawn fine-tuning models


@st.composite
def cases(draw, lora_strategy=maybe_loras, min_embd: int = 2):
    """(config with a classifier, lora or None, tokens [B, T], lengths [B], labels [B], LM targets [B, T], seed).

    n_embd >= ``min_embd`` >= 2 (one channel makes LayerNorm constant, as test_parity.py says); n_classes >= 2 (one
    class has a constant zero loss)."""
    n_head = draw(st.integers(1, 3))
    config = GPT2Config(
        vocab_size=draw(st.integers(2, 30)),
        n_positions=draw(st.integers(2, 10)),
        n_embd=n_head * draw(st.integers(-(-min_embd // n_head), 4)),
        n_layer=draw(st.integers(1, 2)),
        n_head=n_head,
        tie_word_embeddings=draw(st.booleans()),
        n_classes=draw(st.integers(2, 4)),
    )
    lora = draw(lora_strategy)
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, config.n_positions))
    seed = draw(seeds)
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, config.vocab_size, (B, T))
    lengths = rng.integers(1, T + 1, B)
    labels = rng.integers(0, config.n_classes, B)
    targets = rng.integers(0, config.vocab_size, (B, T))
    return config, lora, tokens, lengths, labels, targets, seed


def make_params(config: GPT2Config, lora: LoraConfig | None, seed: int, scale: float = 0.5) -> dict[str, np.ndarray]:
    """GPT-2's init (and fresh adapters) plus noise on everything, so that lora_B != 0 and A gets a gradient."""
    rng = np.random.default_rng(seed)
    params = init_params(config, seed, np.float64)
    if lora is not None:
        params.update(init_lora_params(config, lora, seed, np.float64))
    return {k: v + scale * rng.standard_normal(v.shape) for k, v in params.items()}


def finite_difference_errors(f, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], seed: int,
                             entries: int = 5) -> dict[str, float]:
    """Per tensor: ``entries`` random entries plus the largest analytic one, against central differences of f()."""
    rng = np.random.default_rng(seed)
    errors = {}
    for name, p in params.items():
        g = grads[name].reshape(-1)
        idx = np.unique(np.append(rng.choice(p.size, min(entries, p.size), replace=False), np.argmax(np.abs(g))))
        errors[name] = scaled_error(g[idx], numeric_gradient(f, p, idx), FINITE_DIFFERENCES.floor)
    return errors


# As in test_numpy_model.py: n_embd >= 4 (over 2 channels LayerNorm is so sharply curved that the differences, not
# the backward, lose accuracy) and noise 0.3. With larger noise (0.5) and alpha / r up to 8 the adapted layers get
# curved enough that h = 1e-4 leaves O(h^4) truncation of ~3e-6; at h = 1e-5 the same cases agree to 1e-10. Measured
# with these settings over 2 x 200 random draws: at most 1.5e-8.
@settings(max_examples=25)
@given(cases(min_embd=4))
def test_classifier_gradients_match_finite_differences(case):
    config, lora, tokens, lengths, labels, _, seed = case
    params = make_params(config, lora, seed, scale=0.3)
    loss, grads = numpy_gpt2.classify_loss_and_grads(params, config, tokens, lengths, labels, lora=lora)
    assert list(grads) == list(params)
    assert loss == pytest.approx(numpy_gpt2.classify_loss(params, config, tokens, lengths, labels, lora=lora),
                                 rel=1e-14, abs=0)
    if "lm_head.weight" in params:
        assert np.all(grads["lm_head.weight"] == 0.0)  # the LM head takes no part in the classifier's loss

    def f():
        return numpy_gpt2.classify_loss(params, config, tokens, lengths, labels, lora=lora)

    errors = finite_difference_errors(f, params, grads, seed)
    bad = {k: e for k, e in errors.items() if e > FINITE_DIFFERENCES.rtol}
    assert not bad, f"{bad}"


@settings(max_examples=25)
@given(cases(lora_strategy=loras, min_embd=4))
def test_lm_gradients_with_lora_match_finite_differences(case):
    config, lora, tokens, _, _, targets, seed = case
    params = make_params(config, lora, seed, scale=0.3)
    loss, grads = numpy_gpt2.loss_and_grads(params, config, tokens, targets, lora=lora)
    assert list(grads) == list(params)
    assert np.all(grads["score.weight"] == 0.0)  # the classifier takes no part in the LM loss

    def f():
        return numpy_gpt2.loss(params, config, tokens, targets, lora=lora)

    errors = finite_difference_errors(f, params, grads, seed)
    bad = {k: e for k, e in errors.items() if e > FINITE_DIFFERENCES.rtol}
    assert not bad, f"{bad}"


@settings(max_examples=15)
@given(cases())
def test_fast_path_equals_spec_for_classifier_and_lora(case):
    config, lora, tokens, lengths, labels, targets, seed = case
    params = make_params(config, lora, seed)
    for fn, args in ((numpy_gpt2.classify_loss_and_grads, (tokens, lengths, labels)),
                     (numpy_gpt2.loss_and_grads, (tokens, targets))):
        spec_loss, spec_grads = fn(params, config, *args, lora=lora)
        fast_loss, fast_grads = fn(params, config, *args, lora=lora, fast=True)
        assert abs(fast_loss - spec_loss) <= 1e-13  # test_fast.py's limits for the whole model
        for name, g in spec_grads.items():
            np.testing.assert_allclose(fast_grads[name], g, rtol=0, atol=1e-12, err_msg=name)


def test_padded_row_scores_as_it_would_alone():
    """Right padding does not reach a row's last real token (causal mask): row b padded = row b alone."""
    config = GPT2Config(vocab_size=30, n_positions=12, n_embd=8, n_layer=2, n_head=2, n_classes=3)
    lora = LoraConfig(2, 4.0, ("attn", "mlp"))
    params = make_params(config, lora, 3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 30, (3, 9))
    lengths = np.array([9, 4, 1])
    logits = numpy_gpt2.classify(params, config, tokens, lengths, lora=lora)
    for b in range(3):
        alone = numpy_gpt2.classify(params, config, tokens[b : b + 1, : lengths[b]], lengths[b : b + 1],
                                            lora=lora)
        np.testing.assert_allclose(logits[b], alone[0], rtol=0, atol=1e-13)


# ---------------------------------------------------------------- NumPy spec vs torch engine, float64


def layouts_for(lora: LoraConfig | None) -> tuple[str, ...]:
    return ("fused",) if lora is not None and "attn" in lora.targets else ("custom", "fused")


# n_embd >= 3 for the comparisons with torch: over two channels LayerNorm maps x to +-1 up to eps, so every gradient
# below ln_f is ~1e-5 of the O(1) terms that cancel into it, and two correct implementations differ in rounding
# noise on that scale. The classifier has no tied-head path into wte to dwarf it: with n_embd = 2 its gradients
# were seen 4.9e-10 apart (of the 1e-9 limit, on tensors ~1e-6). With n_embd >= 3, over 250 random draws of the
# strategy below (classifier and LM, with and without LoRA): gradients <= 7.4e-13 relative, logits <= 4.1e-14.
def assert_agree(got: ModelOutputs, ref: ModelOutputs, what: str) -> None:
    failed = [c for c in compare_outputs(got, ref, DRAWN_MODEL_TOLERANCES["float64"]) if not c.ok]
    assert not failed, f"{what}: " + "; ".join(f"{c.name} {c.max_abs:.2e} ({c.relative:.1e})" for c in failed)


@settings(max_examples=40)
@given(cases(min_embd=3), st.sampled_from(["sdpa", "math"]))
def test_classifier_agrees_with_torch_float64(case, attn_impl):
    config, lora, tokens, lengths, labels, _, seed = case
    params = make_params(config, lora, seed)
    ref = ModelOutputs(numpy_gpt2.classify(params, config, tokens, lengths, lora=lora),
                       *numpy_gpt2.classify_loss_and_grads(params, config, tokens, lengths, labels, lora=lora))
    for layout in layouts_for(lora):
        engine = GPT2.from_params(params, config, layout, device="cpu", attn_impl=attn_impl, lora=lora)
        with torch.no_grad():
            logits = engine.classify(torch.from_numpy(tokens), lengths).numpy()
        assert_agree(ModelOutputs(logits, *engine.classify_loss_and_grads(tokens, lengths, labels)), ref, layout)
        with torch.no_grad():
            np.testing.assert_array_equal(engine.classify(torch.from_numpy(tokens), lengths).numpy(),
                                          engine.classify(torch.from_numpy(tokens), torch.from_numpy(lengths)).numpy())


@settings(max_examples=40)
@given(cases(lora_strategy=loras, min_embd=3), st.sampled_from(["sdpa", "math"]))
def test_lm_with_lora_agrees_with_torch_float64(case, attn_impl):
    config, lora, tokens, _, _, targets, seed = case
    params = make_params(config, lora, seed)
    ref = ModelOutputs(numpy_gpt2.forward(params, config, tokens, lora=lora),
                       *numpy_gpt2.loss_and_grads(params, config, tokens, targets, lora=lora))
    for layout in layouts_for(lora):
        engine = GPT2.from_params(params, config, layout, device="cpu", attn_impl=attn_impl, lora=lora)
        with torch.no_grad():
            logits = engine(torch.from_numpy(tokens)).numpy()
        got = ModelOutputs(logits, *engine.loss_and_grads(tokens, targets))
        assert list(got.grads) == list(params)  # canonical names and order, adapters included
        assert_agree(got, ref, layout)
        back = engine.to_params()
        assert list(back) == list(params)
        for name, p in params.items():
            np.testing.assert_array_equal(back[name], p, err_msg=name)


def test_lora_module_state_is_transposed_and_round_trips():
    config = GPT2Config(vocab_size=11, n_positions=6, n_embd=6, n_layer=2, n_head=2)
    lora = LoraConfig(rank=3, alpha=6.0, targets=("attn", "mlp"))
    params = make_params(config, lora, 1)
    state = to_module_state(params, config, "fused", lora)
    assert {k: v.shape for k, v in state.items()} == module_state_shapes(config, "fused", lora)
    np.testing.assert_array_equal(state["h.1.mlp.c_proj.lora_A"], params["h.1.mlp.c_proj.lora_A"].T)  # [r, 4C]
    np.testing.assert_array_equal(state["h.0.attn.c_attn.lora_B"], params["h.0.attn.c_attn.lora_B"].T)  # [3C, r]
    back = from_module_state(state, config, "fused", lora)
    assert list(back) == list(params)
    for name, p in params.items():
        np.testing.assert_array_equal(back[name], p, err_msg=name)


def test_custom_layout_refuses_lora_on_attention_but_takes_mlp():
    config = GPT2Config(vocab_size=11, n_positions=6, n_embd=6, n_layer=1, n_head=2)
    attn = LoraConfig(rank=2, alpha=2.0, targets=("attn",))
    with pytest.raises(ValueError, match="LoRA on attention needs the fused layout"):
        GPT2.from_params(make_params(config, attn, 0), config, "custom", device="cpu", lora=attn)
    with pytest.raises(ValueError, match="LoRA on attention needs the fused layout"):
        GPT2(config, "custom", lora=attn)
    mlp = LoraConfig(rank=2, alpha=2.0, targets=("mlp",))
    model = GPT2.from_params(make_params(config, mlp, 0), config, "custom", device="cpu", lora=mlp)
    assert model.h[0].mlp.c_fc.lora_A.shape == (2, 6) and model.h[0].attn.q_proj.lora_A is None


def test_torch_loss_helpers_and_errors_match_the_spec():
    config = GPT2Config(vocab_size=13, n_positions=6, n_embd=6, n_layer=1, n_head=2, n_classes=3)
    params = make_params(config, None, 2)
    engine = GPT2.from_params(params, config, device="cpu")
    tokens = np.array([[1, 2, 3, 0], [4, 5, 0, 0]])
    logits, loss = engine.classify_loss(torch.from_numpy(tokens), np.array([3, 2]), np.array([2, 0]))
    assert logits.shape == (2, 3) and loss.requires_grad
    ref = numpy_gpt2.classify_loss(params, config, tokens, [3, 2], [2, 0])
    assert float(loss.detach()) == pytest.approx(ref, rel=0, abs=1e-12)
    for lengths, labels, message in (([0, 2], [0, 0], r"lengths hold 0; each row has 1 \.\. 4 real tokens"),
                                     ([3, 5], [0, 0], r"lengths hold 5"),
                                     ([3], [0, 0], r"lengths have shape \(1,\), expected \(2,\)"),
                                     ([3, 2], [0, 3], r"labels hold 3, outside the classes \[0, 3\)")):
        with pytest.raises(ValueError, match=message):
            numpy_gpt2.classify_loss(params, config, tokens, lengths, labels)
        with pytest.raises(ValueError, match=message):
            engine.classify_loss(torch.from_numpy(tokens), np.array(lengths), np.array(labels))
    lm_only = config.replace(n_classes=None)
    plain = {k: v for k, v in params.items() if k != "score.weight"}
    for call in (lambda: numpy_gpt2.classify(plain, lm_only, tokens, [3, 2]),
                 lambda: GPT2.from_params(plain, lm_only, device="cpu").classify(torch.from_numpy(tokens), [3, 2])):
        with pytest.raises(ValueError, match=r"no classification head \(config.n_classes is None\)"):
            call()


# ---------------------------------------------------------------- LoraConfig, init, merge


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2.0), "rank must be an integer >= 1"),
    (dict(alpha=0.0), "alpha must be a finite number > 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
    (dict(targets=()), "targets must be a non-empty subset"),
    (dict(targets=("attn", "lm_head")), "targets must be a non-empty subset of \\['attn', 'mlp'\\]"),
])
def test_lora_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_lora_config_shapes_and_init():
    lora = LoraConfig(rank=4, alpha=8, targets=["mlp", "attn", "mlp"])
    assert lora.targets == ("attn", "mlp") and lora.scale == 2.0 and LoraConfig.from_dict(lora.to_dict()) == lora
    assert LoraConfig(targets="mlp").layers == ("mlp.c_fc", "mlp.c_proj")
    config = GPT2Config(vocab_size=11, n_positions=6, n_embd=8, n_layer=2, n_head=2)
    shapes = lora_param_shapes(config, lora)
    assert len(shapes) == 2 * 4 * 2
    assert shapes["h.1.attn.c_attn.lora_A"] == (8, 4) and shapes["h.1.attn.c_attn.lora_B"] == (4, 24)
    assert shapes["h.0.attn.c_proj.lora_B"] == (4, 8) and shapes["h.0.mlp.c_fc.lora_B"] == (4, 32)
    assert shapes["h.0.mlp.c_proj.lora_A"] == (32, 4)
    a32, a64 = init_lora_params(config, lora, 7), init_lora_params(config, lora, 7, np.float64)
    assert {k: v.shape for k, v in a64.items()} == shapes
    for name, v in a64.items():
        assert a32[name].dtype == np.float32 and v.dtype == np.float64
        np.testing.assert_allclose(a32[name], v, rtol=1e-7, atol=0)
        if name.endswith("lora_B"):
            assert np.all(v == 0.0)
        else:  # Kaiming-uniform bound 1/sqrt(fan_in), and the draw fills most of it
            bound = 1 / np.sqrt(v.shape[0])
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.5 * bound
    # B = 0: a freshly adapted model computes the base model exactly
    base = init_params(config, 1, np.float64)
    tokens = np.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(numpy_gpt2.forward({**base, **a64}, config, tokens, lora=lora),
                                  numpy_gpt2.forward(base, config, tokens))
    with torch.no_grad():
        fresh = GPT2.from_config(config, seed=1, lora=lora, device="cpu", dtype=torch.float64)
        plain = GPT2.from_config(config, seed=1, device="cpu", dtype=torch.float64)
        np.testing.assert_array_equal(fresh(torch.from_numpy(tokens)).numpy(), plain(torch.from_numpy(tokens)).numpy())


def test_adapters_need_their_lora_config():
    config = GPT2Config(vocab_size=11, n_positions=6, n_embd=4, n_layer=1, n_head=2)
    lora = LoraConfig(rank=2, targets=("attn",))
    params = make_params(config, lora, 0)
    with pytest.raises(ValueError, match="they hold LoRA adapters but no LoraConfig was given"):
        numpy_gpt2.forward(params, config, np.array([[1, 2]]))
    with pytest.raises(ValueError, match="they hold LoRA adapters but no LoraConfig was given"):
        GPT2.from_params(params, config, device="cpu")
    with pytest.raises(ValueError, match=r"missing 4 key\(s\): h.0.mlp.c_fc.lora_A"):  # mlp adapters expected
        validate_params(params, config, LoraConfig(rank=2, targets=("attn", "mlp")))
    with pytest.raises(ValueError, match=r"has shape \(4, 2\), the config expects \(4, 3\)"):
        validate_params(params, config, LoraConfig(rank=3, targets=("attn",)))


@settings(max_examples=15)
@given(cases(lora_strategy=loras))
def test_merge_lora_equals_the_adapted_model(case):
    config, lora, tokens, lengths, _, _, seed = case
    params = make_params(config, lora, seed)
    merged = merge_lora(params, lora)
    assert list(merged) == [k for k in params if ".lora_" not in k]
    validate_params(merged, config)  # a plain GPT-2
    for name in merged:  # fresh arrays: training the merged model cannot touch the adapted one
        assert not np.shares_memory(merged[name], params[name])
    np.testing.assert_allclose(numpy_gpt2.forward(merged, config, tokens),
                               numpy_gpt2.forward(params, config, tokens, lora=lora), rtol=0, atol=1e-12)
    np.testing.assert_allclose(numpy_gpt2.classify(merged, config, tokens, lengths),
                               numpy_gpt2.classify(params, config, tokens, lengths, lora=lora), rtol=0,
                               atol=1e-12)
    layout = layouts_for(lora)[0]
    with torch.no_grad():
        adapted = GPT2.from_params(params, config, layout, device="cpu", lora=lora)(torch.from_numpy(tokens))
        plain = GPT2.from_params(merged, config, layout, device="cpu")(torch.from_numpy(tokens))
    np.testing.assert_allclose(plain.numpy(), adapted.numpy(), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- checkpoints and transformers


def hf_logits(model_cls, directory: Path, tokens: np.ndarray) -> np.ndarray:
    model = model_cls.from_pretrained(directory, dtype=torch.float64).eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def test_merged_lora_checkpoint_loads_in_transformers(tmp_path: Path):
    config = GPT2Config(vocab_size=53, n_positions=16, n_embd=12, n_layer=2, n_head=3, tie_word_embeddings=False)
    lora = LoraConfig(rank=3, alpha=5.0, targets=("attn", "mlp"))
    params = make_params(config, lora, 4)
    tokens = np.random.default_rng(0).integers(0, 53, (2, 11))
    with pytest.raises(CheckpointError, match=r"hold 16 LoRA adapter tensor\(s\).*mapper.merge_lora"):
        save_checkpoint(params, config, tmp_path / "adapted")
    assert not (tmp_path / "adapted" / "model.safetensors").exists()
    save_checkpoint(merge_lora(params, lora), config, tmp_path / "merged")
    got = hf_logits(transformers.GPT2LMHeadModel, tmp_path / "merged", tokens)
    np.testing.assert_allclose(got, numpy_gpt2.forward(params, config, tokens, lora=lora), rtol=0, atol=1e-10)
    # and our own loader reads it back as the plain model it is
    loaded_config, loaded = load_checkpoint(tmp_path / "merged")
    assert loaded_config == config
    np.testing.assert_allclose(numpy_gpt2.forward(loaded, config, tokens),
                               numpy_gpt2.forward(params, config, tokens, lora=lora), rtol=0, atol=1e-12)


def test_lora_adapters_file_round_trips(tmp_path: Path):
    config = GPT2Config(vocab_size=11, n_positions=6, n_embd=6, n_layer=2, n_head=2, n_classes=2)
    lora = LoraConfig(rank=2, alpha=3.0, targets=("mlp",))
    params = make_params(config, lora, 5)
    path = save_lora_adapters(params, lora, tmp_path / "adapters.safetensors")
    got_lora, adapters = load_lora_adapters(path)
    assert got_lora == lora
    assert sorted(adapters) == sorted(lora_param_shapes(config, lora))
    for name, a in adapters.items():
        np.testing.assert_array_equal(a, params[name])
    base = {k: v for k, v in params.items() if ".lora_" not in k}
    validate_params({**base, **adapters}, config, got_lora)
    with pytest.raises(CheckpointError, match="do not match"):
        save_lora_adapters(base, lora, tmp_path / "none.safetensors")
    save_checkpoint(base, config, tmp_path / "base")
    with pytest.raises(CheckpointError, match="not a LoRA adapters file"):
        load_lora_adapters(tmp_path / "base" / "model.safetensors")


@pytest.mark.parametrize("vocab_size", [50257, 41])  # GPT-2's vocabulary (pad = 50256), and a tiny one (pad = V-1)
def test_classifier_checkpoint_loads_in_transformers(tmp_path: Path, vocab_size: int):
    """Right-padded rows of different lengths: transformers pools at the last token != pad_token_id, we at
    lengths - 1; the logits agree. And transformers' own save_pretrained of that model reads back equal."""
    config = GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=8, n_layer=2, n_head=2, n_classes=3)
    lora = LoraConfig(rank=2, alpha=4.0, targets=("attn", "mlp"))
    params = make_params(config, lora, 6, scale=0.3)
    pad = vocab_size - 1
    rng = np.random.default_rng(1)
    lengths = np.array([12, 5, 1, 9])
    tokens = np.full((4, 12), pad)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(0, pad, n)  # real tokens never equal the pad id
    ours = numpy_gpt2.classify(params, config, tokens, lengths, lora=lora)
    save_checkpoint(merge_lora(params, lora), config, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["pad_token_id"] == (50256 if vocab_size == 50257 else pad)
    assert saved["architectures"] == ["GPT2ForSequenceClassification"] and saved["num_labels"] == 3
    model = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "ours", dtype=torch.float64).eval()
    assert model.score.bias is None
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-10)
    # the other direction: a classifier transformers wrote is read by load_checkpoint with the same logits
    model.save_pretrained(tmp_path / "theirs")
    loaded_config, loaded = load_checkpoint(tmp_path / "theirs")
    assert loaded_config == config
    np.testing.assert_allclose(numpy_gpt2.classify(loaded, config, tokens, lengths), theirs, rtol=0,
                               atol=1e-10)
