"""The proof: the NumPy spec and the torch engine (both attention layouts) compute the same model.

Hypothesis draws the config (layers, heads, head size, vocabulary, context, tied or untied head), the
weights and the token batches. Compared: logits, loss, every gradient, losses and parameters over
several AdamW steps, and the tokens sampled for a seed; with dropout on, the same again with both backends given
the same keep-masks (drawn from a seeded NumPy generator), and torch's own random dropout against the spec's in
expectation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import numpy_gpt2
from mapper import GPT2Config, init_params
from mapper.dropout import DropoutMasks, draw_dropout_masks
from mapper.parity import DRAWN_MODEL_TOLERANCES, ModelOutputs, compare_outputs
from mapper.training import Batch
from numpy_gpt2.backend import NumpyBackend
from numpy_gpt2.model import lm_forward
from torch_gpt2 import GPT2, KVCache, configure_adamw, generate, train_step
from torch_gpt2.backend import TorchBackend

LAYOUTS = ("custom", "fused")


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
        qkv_bias=draw(st.booleans()),  # False: the course's model, no q/k/v bias in either backend
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


def assert_agree(engine: GPT2, params, config, tokens, targets, dtype: str, masks: DropoutMasks | None = None) -> None:
    """The engine's logits, loss and every gradient against the spec's, within mapper.parity's limits (both given
    the keep-masks ``masks``, if any)."""
    ref = ModelOutputs(numpy_gpt2.forward(params, config, tokens, dropout_masks=masks),
                       *numpy_gpt2.loss_and_grads(params, config, tokens, targets, dropout_masks=masks))
    with torch.no_grad():
        logits = engine(torch.from_numpy(tokens), dropout_masks=masks).numpy()
    got = ModelOutputs(logits, *engine.loss_and_grads(tokens, targets, masks))
    failed = [c for c in compare_outputs(got, ref, DRAWN_MODEL_TOLERANCES[dtype]) if not c.ok]
    assert not failed, f"{engine.attention}: " + "; ".join(f"{c.name} {c.max_abs:.2e} ({c.relative:.1e})"
                                                            for c in failed)


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
@given(models())
def test_float64_logits_loss_and_every_gradient_agree(attn_impl, model):
    config, B, T, seed = model
    params = make_params(config, seed)
    tokens, targets = make_batch(config, B, T, seed)
    for layout in LAYOUTS:
        engine = GPT2.from_params(params, config, layout, device="cpu", attn_impl=attn_impl)
        assert engine.dtype == torch.float64
        assert_agree(engine, params, config, tokens, targets, "float64")


# n_embd >= 4: over two channels LayerNorm maps x to +-1 whatever x is, so its input gradient is a pure
# cancellation, ill-conditioned in float32 (seen: 3e-3 relative between two correct implementations).
@given(models(min_embd=4))
def test_float32_agrees_within_measured_tolerance(model):
    config, B, T, seed = model
    params = make_params(config, seed, np.float32)
    tokens, targets = make_batch(config, B, T, seed)
    for layout in LAYOUTS:
        engine = GPT2.from_params(params, config, layout, device="cpu")
        assert engine.dtype == torch.float32
        assert_agree(engine, params, config, tokens, targets, "float32")


dropout_rates = st.tuples(*[st.sampled_from([0.0, 0.1, 0.5])] * 3).filter(any)  # at least one place drops


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
@given(models(), dropout_rates)
def test_float64_with_shared_dropout_masks_logits_loss_and_every_gradient_agree(attn_impl, model, rates):
    """Dropout on: both backends given the same masks compute the same logits, loss and gradients (SDPA cannot take
    a mask, so with masks the engine writes the attention out whatever attn_impl says)."""
    config, B, T, seed = model
    config = config.replace(embd_pdrop=rates[0], attn_pdrop=rates[1], resid_pdrop=rates[2])
    params = make_params(config, seed)
    tokens, targets = make_batch(config, B, T, seed)
    masks = draw_dropout_masks(config, B, T, np.random.default_rng(seed))
    for layout in LAYOUTS:
        engine = GPT2.from_params(params, config, layout, device="cpu", attn_impl=attn_impl)
        assert not engine.training  # masks apply in eval mode too: they are an explicit request
        assert_agree(engine, params, config, tokens, targets, "float64", masks)


@given(models(), st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_chunked_prefill_equals_the_full_pass_on_both_backends(model, chunk_sizes):
    """Feeding a sequence through the KV cache in chunks (3 tokens, then 2, ...) gives the full pass's logits:
    the queries of a chunk after a past must see the past and their own causal prefix, no more, no less."""
    config, B, T, seed = model
    params = make_params(config, seed)
    tokens, _ = make_batch(config, B, T, seed)
    full = numpy_gpt2.forward(params, config, tokens)
    bounds = np.cumsum([0, *chunk_sizes])
    bounds = [int(b) for b in bounds if b < T] + [T]
    assume(len(bounds) > 2)  # at least one chunk after a past
    cache = np.zeros((config.n_layer, 2, B, config.n_head, T, config.head_dim))
    kv = [(cache[i, 0], cache[i, 1]) for i in range(config.n_layer)]
    numpy_chunks = [lm_forward(params, config, tokens[:, s:e], kv_caches=kv, pos0=s)[0]
                    for s, e in zip(bounds, bounds[1:], strict=False)]
    np.testing.assert_allclose(np.concatenate(numpy_chunks, axis=1), full, rtol=0, atol=1e-12)
    for layout in LAYOUTS:
        for attn_impl in ("sdpa", "math"):
            engine = GPT2.from_params(params, config, layout, device="cpu", attn_impl=attn_impl)
            torch_cache = KVCache(config, B, T, torch.float64, torch.device("cpu"))
            with torch.no_grad():
                chunks = [engine.lm_logits(engine.hidden_states(torch.from_numpy(tokens[:, s:e]), cache=torch_cache,
                                                                start=s)) for s, e in zip(bounds, bounds[1:],
                                                                                          strict=False)]
            np.testing.assert_allclose(torch.cat(chunks, dim=1).numpy(), full, rtol=0, atol=1e-12,
                                       err_msg=f"{layout} {attn_impl}")


@given(models(), st.floats(1e-3, 3e-2), st.floats(0.0, 0.2), st.sampled_from([None, 0.5, 1.0]))
def test_adamw_steps_agree(model, lr, weight_decay, max_grad_norm):
    """Several AdamW steps (with a schedule and optional clipping): same losses, same parameters."""
    config, B, T, seed = model
    params = make_params(config, seed)
    engine = GPT2.from_params(params, config, "fused" if seed % 2 else "custom", device="cpu")
    optimizer = configure_adamw(engine, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    spec = NumpyBackend(config, params, weight_decay, "matrices", betas=(0.9, 0.95), fast=False)
    total_lr = 0.0
    for step in range(4):
        tokens, targets = make_batch(config, B, T, seed + step)
        step_lr = lr * (step + 1) / 4
        total_lr += step_lr
        ref_loss, _ = spec.step([Batch(tokens, targets)], lr=step_lr, grad_clip=max_grad_norm)
        out = train_step(engine, optimizer, [(torch.from_numpy(tokens), torch.from_numpy(targets))],
                         lr=step_lr, grad_clip=max_grad_norm)
        assert abs(out["loss"] - ref_loss) <= 1e-10 * max(1.0, abs(ref_loss))
    # Adam divides by sqrt(v) + eps, so a gradient entry near 0 turns a rounding difference d (~1e-16 of the
    # O(1) terms it sums) into an update difference of up to lr * d / eps = lr * 1e-8: parameters are compared
    # on the scale of how far the steps can move them, sum(lr), with a 100x margin on that bound.
    final = engine.to_params()
    for name, p in spec.params().items():
        np.testing.assert_allclose(final[name], p, rtol=0, atol=1e-6 * total_lr, err_msg=name)


@given(models(), dropout_rates, st.floats(1e-3, 3e-2), st.sampled_from([None, 0.5]))
def test_adamw_steps_with_shared_dropout_masks_agree(model, rates, lr, max_grad_norm):
    """Several AdamW steps with dropout, fresh masks each step given to both: same losses, same parameters, for
    both layouts."""
    config, B, T, seed = model
    config = config.replace(embd_pdrop=rates[0], attn_pdrop=rates[1], resid_pdrop=rates[2])
    params = make_params(config, seed)
    spec_params = {k: v.copy() for k, v in params.items()}
    spec = numpy_gpt2.AdamW(spec_params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    engines = {layout: GPT2.from_params(params, config, layout, device="cpu") for layout in LAYOUTS}
    optimizers = {layout: configure_adamw(e, lr=lr, weight_decay=0.1, betas=(0.9, 0.95)) for layout, e in
                  engines.items()}
    rng = np.random.default_rng(seed)
    for step in range(4):
        tokens, targets = make_batch(config, B, T, seed + step)
        masks = draw_dropout_masks(config, B, T, rng)
        ref_loss, grads = numpy_gpt2.loss_and_grads(spec_params, config, tokens, targets, dropout_masks=masks)
        numpy_gpt2.clip_grad_norm(grads, max_grad_norm)
        spec.step(spec_params, grads, lr=lr)
        for layout, engine in engines.items():
            optimizers[layout].zero_grad(set_to_none=True)
            _, loss = engine(torch.from_numpy(tokens), torch.from_numpy(targets), dropout_masks=masks)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(engine.parameters(), max_grad_norm)
            optimizers[layout].step()
            assert abs(float(loss.detach()) - ref_loss) <= 1e-10 * max(1.0, abs(ref_loss)), (layout, step)
    for layout, engine in engines.items():  # compared on the scale of the steps, as in test_adamw_steps_agree
        final = engine.to_params()
        for name, p in spec_params.items():
            np.testing.assert_allclose(final[name], p, rtol=0, atol=1e-6 * 4 * lr, err_msg=f"{layout} {name}")


@pytest.mark.parametrize("place", ["embd_pdrop", "attn_pdrop", "resid_pdrop"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_torch_native_dropout_equals_the_spec_in_expectation(place, attn_impl):
    """Normal runs drop with torch's own random masks (SDPA's on the attention weights), which cannot be shared; they
    must be the same random function as the spec's. Each row of a large batch of one repeated sequence draws its own
    masks, so the mean loss over rows estimates E_masks[loss]: torch's (training mode) and the spec's (masks from
    mapper.dropout) must agree within 5 standard errors, while both differ from the loss without dropout by far
    more, so a dropout at the wrong place or with the wrong scale would show."""
    config = GPT2Config(vocab_size=13, n_positions=6, n_embd=8, n_layer=2, n_head=2).replace(**{place: 0.5})
    params = make_params(config, 7, scale=1.0)
    rows = 4096
    tokens = np.tile(np.array([[3, 1, 4, 1, 5, 9]]), (rows, 1))
    targets = np.tile(np.array([[1, 4, 1, 5, 9, 2]]), (rows, 1))

    def row_losses(logits: np.ndarray) -> np.ndarray:  # [rows, T, V] -> each row's mean cross-entropy
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -np.take_along_axis(logp, targets[..., None], -1)[..., 0].mean(-1)

    masks = draw_dropout_masks(config, rows, tokens.shape[1], np.random.default_rng(1))
    spec = row_losses(numpy_gpt2.forward(params, config, tokens, dropout_masks=masks))
    engine = GPT2.from_params(params, config, "fused", device="cpu", attn_impl=attn_impl)
    engine.train()
    torch.manual_seed(2)
    with torch.no_grad():
        native = row_losses(engine(torch.from_numpy(tokens)).numpy())
        engine.eval()
        no_dropout = row_losses(engine(torch.from_numpy(tokens)).numpy())[0]
    se = np.sqrt((spec.var() + native.var()) / rows)
    assert abs(native.mean() - spec.mean()) < 5 * se, (native.mean(), spec.mean(), se)
    assert abs(spec.mean() - no_dropout) > 20 * se and native.std() > 0.05  # the test can tell dropout from none
    np.testing.assert_allclose(no_dropout, numpy_gpt2.loss(params, config, tokens[:1], targets[:1]), rtol=1e-12)


@given(models(max_layers=1), st.floats(0.5, 2.0), st.one_of(st.none(), st.integers(1, 10)),
       st.one_of(st.none(), st.floats(0.3, 1.0)), st.integers(0, 2**31))
def test_sampled_tokens_agree(model, temperature, top_k, top_p, seed):
    config, B, T, model_seed = model
    n_new = config.n_positions - T
    assume(n_new > 0)  # a prompt that fills the context leaves nothing to sample
    params = make_params(config, model_seed, scale=1.0)
    prompt = np.random.default_rng(model_seed).integers(0, config.vocab_size, (B, T))
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    ref = numpy_gpt2.generate(params, config, prompt, n_new, **sampling)
    for layout in LAYOUTS:
        engine = GPT2.from_params(params, config, layout, device="cpu")
        out = generate(engine, torch.from_numpy(prompt), n_new, **sampling)
        np.testing.assert_array_equal(np.asarray(out), ref)


def test_greedy_tokens_and_eos_agree():
    config = GPT2Config(vocab_size=30, n_positions=24, n_embd=12, n_layer=2, n_head=3)
    params = make_params(config, 5, scale=1.0)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    ref = numpy_gpt2.generate(params, config, prompt, 15, eos_token_id=7)
    for layout in LAYOUTS:
        engine = GPT2.from_params(params, config, layout, device="cpu")
        np.testing.assert_array_equal(np.asarray(generate(engine, torch.from_numpy(prompt), 15, eos_token_id=7)), ref)


def test_dropout_is_off_in_evaluation_on_both_backends():
    """A model with dropout 0.5 everywhere: a training-mode forward is random, while evaluation (the module's eval
    mode, the backends' loss, class logits and greedy samples) is the model without dropout, on both backends."""
    config = GPT2Config(vocab_size=29, n_positions=10, n_embd=12, n_layer=2, n_head=3).with_dropout(0.5)
    plain = config.with_dropout(0.0)
    params = make_params(config, 3)
    tokens, targets = make_batch(config, 2, 8, 3)
    reference = numpy_gpt2.loss(params, plain, tokens, targets)
    engine = GPT2.from_params(params, config, "fused", device="cpu")
    with torch.no_grad():
        assert not engine.training
        np.testing.assert_allclose(engine(torch.from_numpy(tokens)).numpy(),
                                   numpy_gpt2.forward(params, plain, tokens), rtol=0, atol=1e-12)
        engine.train()
        first, second = (engine(torch.from_numpy(tokens)).numpy() for _ in range(2))
        assert not np.allclose(first, second)
    batch = Batch(tokens, targets)
    for backend in (NumpyBackend(config, params, 0.0, "matrices"), TorchBackend(config, params, 0.0, "matrices",
                                                                                 device="cpu", dtype="float64")):
        assert backend.loss(batch) == pytest.approx(reference, rel=1e-12)
        train_loss, _ = backend.step([batch], lr=0.0, grad_clip=None)  # lr 0: the parameters stay put
        assert abs(train_loss - reference) > 1e-3, backend.name  # the step dropped
        assert backend.loss(batch) == pytest.approx(reference, rel=1e-12), backend.name
        assert backend.greedy([1, 2, 3], 5, None) == numpy_gpt2.generate(params, plain, np.array([[1, 2, 3]]),
                                                                          5)[0, 3:].tolist()
