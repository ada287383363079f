"""The proof: the NumPy spec and the torch engine (both attention layouts) compute the same model.

Hypothesis draws the config (layers, heads, head size, vocabulary, context, tied or untied head), the
weights and the token batches. Compared: logits, loss, every gradient, losses and parameters over
several AdamW steps, and the tokens sampled for a seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import numpy_gpt2
from mapper import GPT2Config, init_params
from torch_gpt2 import GPT2, configure_adamw, train_step

LAYOUTS = ("custom", "fused")
# float32 limits for the drawn models, from measurement: over 2 x 300 draws of models(min_embd=4) the worst
# gaps were logits 4.4e-6 beyond 1e-5 |logits|, loss 1.8e-6 relative, gradients 4.9e-5 of their tensor's scale
# (median 1e-6; tiny models with noisy weights are worse conditioned than GPT-2's init, where `gpt2 parity`
# measures 1.3e-6). The limits leave a 4-5x margin.
F32_LOGITS_ATOL, F32_LOGITS_RTOL, F32_GRAD_REL = 2e-5, 1e-5, 2e-4
F32_LOSS_ATOL, F32_LOSS_RTOL = 2e-5, 2e-6


@st.composite
def models(draw, max_layers: int = 2, min_embd: int = 2):
    """n_embd >= 2: with one channel LayerNorm's output is constant (x - mean = 0) and rstd = 1/sqrt(eps) ~ 316
    magnifies torch's fused LayerNorm rounding into gradients that are exactly zero in the spec."""
    n_head = draw(st.integers(1, 3))
    config = GPT2Config(
        vocab_size=draw(st.integers(2, 40)),
        n_positions=draw(st.integers(2, 12)),
        n_embd=n_head * draw(st.integers(-(-min_embd // n_head), 5)),
        n_layer=draw(st.integers(1, max_layers)),
        n_head=n_head,
        tie_word_embeddings=draw(st.booleans()),
    )
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, config.n_positions))
    seed = draw(st.integers(0, 2**32 - 1))
    return config, B, T, seed


def make_params(config: GPT2Config, seed: int, dtype=np.float64, scale: float = 0.5) -> dict[str, np.ndarray]:
    """GPT-2's init plus noise: every LN gain, bias and position row then matters."""
    rng = np.random.default_rng(seed)
    params = init_params(config, seed, np.float64)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(dtype) for k, v in params.items()}


def make_batch(config: GPT2Config, B: int, T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    targets[rng.random((B, T)) < 0.2] = -100
    targets[0, -1] = rng.integers(0, config.vocab_size)  # at least one counted target
    return tokens, targets


def torch_loss_and_grads(model: GPT2, tokens: np.ndarray, targets: np.ndarray):
    model.zero_grad(set_to_none=True)
    logits, loss = model(torch.from_numpy(tokens), torch.from_numpy(targets))
    loss.backward()
    grads = model.grads_to_params()
    return logits.detach().numpy(), float(loss.detach()), grads


def grad_rel(a: np.ndarray, b: np.ndarray, floor: float) -> float:
    """max|a - b| / max(max|b|, floor): relative to the tensor's gradient scale.

    The floor is there because rounding error follows the size of the terms a gradient sums, not the size of
    the sum: tiny drawn models (n_embd = 2: LayerNorm outputs +-1) can have whole tensors of gradients
    ~1e-9 made of O(1) terms that cancel. Below the floor the comparison is absolute, at floor * tolerance.
    """
    scale = max(float(np.abs(b).max(initial=0.0)), floor)
    return float(np.abs(a - b).max(initial=0.0)) / scale


F64_FLOOR, F32_FLOOR = 1e-6, 1e-3


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
@given(models())
def test_float64_logits_loss_and_every_gradient_agree(attn_impl, model):
    config, B, T, seed = model
    params = make_params(config, seed)
    tokens, targets = make_batch(config, B, T, seed)
    ref_logits = numpy_gpt2.forward(params, config, tokens)
    ref_loss, ref_grads = numpy_gpt2.loss_and_grads(params, config, tokens, targets)
    for layout in LAYOUTS:
        engine = GPT2.from_params(params, config, layout, device="cpu", attn_impl=attn_impl)
        assert engine.dtype == torch.float64
        logits, loss, grads = torch_loss_and_grads(engine, tokens, targets)
        np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-10)
        assert abs(loss - ref_loss) <= 1e-12
        assert set(grads) == set(ref_grads)
        for name, g in grads.items():
            assert grad_rel(g, ref_grads[name], F64_FLOOR) <= 1e-9, f"{layout}: {name}"


# n_embd >= 4: over two channels LayerNorm maps x to +-1 whatever x is, so its input gradient is a pure
# cancellation, ill-conditioned in float32 (seen: 3e-3 relative between two correct implementations).
@given(models(min_embd=4))
def test_float32_agrees_within_measured_tolerance(model):
    config, B, T, seed = model
    params = make_params(config, seed, np.float32)
    tokens, targets = make_batch(config, B, T, seed)
    ref_logits = numpy_gpt2.forward(params, config, tokens)
    ref_loss, ref_grads = numpy_gpt2.loss_and_grads(params, config, tokens, targets)
    assert ref_logits.dtype == np.float32
    for layout in LAYOUTS:
        engine = GPT2.from_params(params, config, layout, device="cpu")
        assert engine.dtype == torch.float32
        logits, loss, grads = torch_loss_and_grads(engine, tokens, targets)
        assert np.all(np.abs(logits - ref_logits) <= F32_LOGITS_ATOL + F32_LOGITS_RTOL * np.abs(ref_logits))
        assert abs(loss - ref_loss) <= F32_LOSS_ATOL + F32_LOSS_RTOL * abs(ref_loss)
        for name, g in grads.items():
            assert grad_rel(g, ref_grads[name], F32_FLOOR) <= F32_GRAD_REL, f"{layout}: {name}"


@given(models(), st.floats(1e-3, 3e-2), st.floats(0.0, 0.2), st.sampled_from([None, 0.5, 1.0]))
def test_adamw_steps_agree(model, lr, weight_decay, max_grad_norm):
    """Several AdamW steps (with a schedule and optional clipping): same losses, same parameters."""
    config, B, T, seed = model
    params = make_params(config, seed)
    engine = GPT2.from_params(params, config, "fused" if seed % 2 else "custom", device="cpu")
    optimizer = configure_adamw(engine, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    trainer = numpy_gpt2.Trainer(
        params, config, numpy_gpt2.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay),
        max_grad_norm=max_grad_norm,
    )
    total_lr = 0.0
    for step in range(4):
        tokens, targets = make_batch(config, B, T, seed + step)
        step_lr = lr * (step + 1) / 4
        total_lr += step_lr
        ref_loss = trainer.step(tokens, targets, lr=step_lr)
        out = train_step(engine, optimizer, [(torch.from_numpy(tokens), torch.from_numpy(targets))],
                         lr=step_lr, grad_clip=max_grad_norm)
        assert abs(out["loss"] - ref_loss) <= 1e-10 * max(1.0, abs(ref_loss))
    # Adam divides by sqrt(v) + eps, so a gradient entry near 0 turns a rounding difference d (~1e-16 of the
    # O(1) terms it sums) into an update difference of up to lr * d / eps = lr * 1e-8: parameters are compared
    # on the scale of how far the steps can move them, sum(lr), with a 100x margin on that bound.
    final = engine.to_params()
    for name, p in params.items():
        np.testing.assert_allclose(final[name], p, rtol=0, atol=1e-6 * total_lr, err_msg=name)


@given(models(max_layers=1), st.floats(0.5, 2.0), st.one_of(st.none(), st.integers(1, 10)),
       st.one_of(st.none(), st.floats(0.3, 1.0)), st.integers(0, 2**31))
def test_sampled_tokens_agree(model, temperature, top_k, top_p, seed):
    config, B, T, model_seed = model
    n_new = config.n_positions - T
    if n_new == 0:
        return
    params = make_params(config, model_seed, scale=1.0)
    prompt = np.random.default_rng(model_seed).integers(0, config.vocab_size, (B, T))
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    ref = numpy_gpt2.generate(params, config, prompt, n_new, **sampling)
    for layout in LAYOUTS:
        engine = GPT2.from_params(params, config, layout, device="cpu")
        out = engine.generate(torch.from_numpy(prompt), n_new, **sampling)
        np.testing.assert_array_equal(np.asarray(out), ref)


def test_greedy_tokens_and_eos_agree():
    config = GPT2Config(vocab_size=30, n_positions=24, n_embd=12, n_layer=2, n_head=3)
    params = make_params(config, 5, scale=1.0)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    ref = numpy_gpt2.generate(params, config, prompt, 15, eos_token_id=7)
    for layout in LAYOUTS:
        engine = GPT2.from_params(params, config, layout, device="cpu")
        np.testing.assert_array_equal(np.asarray(engine.generate(torch.from_numpy(prompt), 15, eos_token_id=7)), ref)
