"""The torch engine against independent sources: transformers' reference outputs, full recomputation,
a hand-written sampling loop, closed-form AdamW, and one layout against the other.

The fixture weights are read straight from ``hf_tiny/model.safetensors`` (not through mapper's loader)
so these tests do not depend on the checkpoint code.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import numpy_gpt2
from mapper import GPT2Config, init_params, param_shapes
from mapper.layouts import ATTENTION_LAYOUTS
from mapper.parity import scaled_error
from mapper.sampling import TokenSelector
from parity_tests.conftest import FIXTURES
from tasks.schedule import lr_at
from torch_gpt2 import GPT2, configure_adamw, generate, generate_stream, onednn, train_step

EOS = 96  # the fixture's eos_token_id (= V - 1)


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURES / "hf_tiny_reference.npz", allow_pickle=False)


@pytest.fixture(scope="module")
def tiny():
    """(config, float32 params, float64 params) of the fixture model, HF's ``transformer.`` prefix stripped."""
    config = GPT2Config.from_hf_dict(json.loads((FIXTURES / "hf_tiny" / "config.json").read_text()))
    raw = load_file(FIXTURES / "hf_tiny" / "model.safetensors")
    params32 = {name.removeprefix("transformer."): value for name, value in raw.items()}
    return config, params32, {k: v.astype(np.float64) for k, v in params32.items()}


@pytest.fixture(scope="module")
def tiny64_models(tiny):
    config, _, params64 = tiny
    return {a: GPT2.from_params(params64, config, a, device="cpu") for a in ATTENTION_LAYOUTS}


def shifted_targets(tokens: np.ndarray) -> torch.Tensor:
    """labels=input_ids convention: position t predicts token t+1; the last position predicts nothing (-100)."""
    targets = np.full_like(tokens, -100)
    targets[:, :-1] = tokens[:, 1:]
    return torch.from_numpy(targets).long()


def random_params(config: GPT2Config, seed: int) -> dict[str, np.ndarray]:
    """Float64 weights scaled like the fixture's (0.3 randn, LN gains 1 + 0.1 randn): logits far from uniform."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
        params[name] = (1.0 if gain else 0.0) + (0.1 if gain else 0.3) * rng.standard_normal(shape)
    return params


small_configs = st.builds(
    lambda n_head, hs, n_layer, V, P: GPT2Config(vocab_size=V, n_positions=P, n_embd=n_head * hs,
                                                 n_layer=n_layer, n_head=n_head),
    st.integers(1, 3), st.integers(2, 4), st.integers(1, 2), st.integers(5, 30), st.integers(2, 12),
)  # fmt: skip


# ---------------------------------------------------------------- against transformers' outputs


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
@pytest.mark.parametrize("attention", ATTENTION_LAYOUTS)
def test_logits_loss_and_activations_float64(tiny, reference, attention, attn_impl):
    config, _, params64 = tiny
    model = GPT2.from_params(params64, config, attention, device="cpu", attn_impl=attn_impl)
    assert model.dtype == torch.float64
    for i in range(3):
        tokens = reference[f"tokens_{i}"]
        with torch.no_grad():
            logits, loss = model(torch.from_numpy(tokens), shifted_targets(tokens))
            lnf = model.hidden_states(torch.from_numpy(tokens))
        np.testing.assert_allclose(logits.numpy(), reference[f"logits64_{i}"], rtol=0, atol=1e-10)
        np.testing.assert_allclose(lnf.numpy(), reference[f"lnf64_{i}"], rtol=0, atol=1e-10)
        assert abs(loss.item() - float(reference[f"loss64_{i}"])) <= 1e-12


@pytest.mark.parametrize("attention", ATTENTION_LAYOUTS)
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "F.linear"])
@pytest.mark.parametrize("grad_enabled", [False, True], ids=["no_grad", "autograd"])
def test_logits_and_loss_float32(tiny, reference, attention, onednn, grad_enabled):
    config, params32, _ = tiny
    model = GPT2.from_params(params32, config, attention, device="cpu", onednn_linear=onednn)
    assert model.dtype == torch.float32
    for i in range(3):
        tokens = reference[f"tokens_{i}"]
        with torch.set_grad_enabled(grad_enabled):
            logits, loss = model(torch.from_numpy(tokens), shifted_targets(tokens))
        np.testing.assert_allclose(logits.detach().numpy(), reference[f"logits32_{i}"], rtol=1e-5, atol=1e-5)
        assert abs(loss.item() - float(reference[f"loss64_{i}"])) <= 1e-5


def test_onednn_fast_path_is_taken_only_when_allowed_and_checked(tiny, reference, monkeypatch):
    """The flag decides; float32 on the CPU takes oneDNN's linear (inference and training), anything else (float64,
    the flag off, a failed one-time check) F.linear. Both paths give transformers' logits (test above)."""
    config, params32, params64 = tiny
    calls = []
    real_op = torch.ops.mkldnn._linear_pointwise

    def counting(*args):
        calls.append(args[0].shape)
        return real_op(*args)

    monkeypatch.setattr(onednn, "onednn_linear_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
    tokens, targets = torch.from_numpy(reference["tokens_1"]), shifted_targets(reference["tokens_1"])
    linears = 4 * config.n_layer + 1  # every block projection and the tied head
    fast = GPT2.from_params(params32, config, device="cpu", onednn_linear=True)
    plain = GPT2.from_params(params32, config, device="cpu", onednn_linear=False)
    with torch.no_grad():
        fast_logits = fast(tokens)
        assert len(calls) == linears
        plain_logits = plain(tokens)
    assert len(calls) == linears  # the flag off: none
    torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-6, atol=1e-6)
    calls.clear()
    _, fast_loss = fast(tokens, targets)
    assert len(calls) == linears  # autograd records: OneDNNLinear's forward
    fast_loss.backward()
    assert len(calls) == 3 * linears  # and its backward: dx and dW per layer
    _, plain_loss = plain(tokens, targets)
    plain_loss.backward()
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    calls.clear()
    GPT2.from_params(params64, config, device="cpu")(tokens)  # float64: F.linear
    fast.set_onednn_linear(False)
    with torch.no_grad():
        fast(tokens)
    monkeypatch.setattr(onednn, "onednn_linear_available", lambda: False)  # the one-time check failed
    fast.set_onednn_linear(True)
    with torch.no_grad():
        fast(tokens)
    assert calls == []


def test_onednn_check_compares_with_f_linear(monkeypatch):
    onednn.onednn_linear_available.cache_clear()
    try:
        with torch.inference_mode():  # the first call may come from decoding, where autograd is off
            assert onednn.onednn_linear_available() == torch.backends.mkldnn.is_available()
        onednn.onednn_linear_available.cache_clear()
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, w, b, *rest: F.linear(x, w, b) + 1e-3)
        assert not onednn.onednn_linear_available()  # an op that disagrees with F.linear is not used
    finally:
        onednn.onednn_linear_available.cache_clear()


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
@pytest.mark.parametrize("attention", ATTENTION_LAYOUTS)
def test_every_gradient_float64(tiny, reference, attention, attn_impl):
    """Gradients of loss64_2; the tied wte collects both the embedding and the LM-head contribution."""
    config, _, params64 = tiny
    model = GPT2.from_params(params64, config, attention, device="cpu", attn_impl=attn_impl)
    tokens = reference["tokens_2"]
    _, loss = model(torch.from_numpy(tokens), shifted_targets(tokens))
    loss.backward()
    grads = model.grads_to_params()  # back to canonical names and [in, out]
    assert len(grads) == 28
    for name, grad in grads.items():
        ref = reference[f"grad64_transformer.{name}"]
        assert np.abs(grad - ref).max() <= 1e-9 * np.abs(ref).max(), name


@pytest.mark.parametrize("attention", ATTENTION_LAYOUTS)
def test_greedy_generation_matches_transformers(tiny, reference, tiny64_models, attention):
    config, params32, _ = tiny
    model = tiny64_models[attention]
    prompt = reference["generate_greedy_prompt"]  # [[3, 14, 15]]
    steps = list(generate_stream(model, prompt, 20, output_logits=True))
    np.testing.assert_allclose(np.concatenate([logits for _, logits in steps]),
                               reference["generate_greedy_step_logits64"], rtol=0, atol=1e-10)
    out = generate(model, prompt, 20)  # numpy in -> numpy out
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, reference["generate_greedy_out"])
    out = generate(model, torch.from_numpy(prompt), 20, eos_token_id=EOS)  # tensor in -> tensor out
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), reference["generate_greedy_eos_out"])
    assert generate(model, prompt[0].tolist(), 20, eos_token_id=EOS) == reference["generate_greedy_eos_out"][0].tolist()
    model32 = GPT2.from_params(params32, config, attention, device="cpu")
    np.testing.assert_array_equal(generate(model32, prompt, 20), reference["generate_greedy_out"])


def test_untied_head_and_classifier(tiny, reference):
    """lm_head / score read the final hidden state transformers computed (lnf64): logits = lnf @ W.T; the
    classifier reads each row at its last real token (lengths - 1), with no bias."""
    config, _, params64 = tiny
    rng = np.random.default_rng(0)
    extra = {"lm_head.weight": rng.standard_normal((97, 16)), "score.weight": rng.standard_normal((16, 3))}
    model = GPT2.from_params({**params64, **extra}, config.replace(tie_word_embeddings=False, n_classes=3))
    tokens = reference["tokens_1"]
    lengths = np.array([tokens.shape[1], 5])  # row 1 read at position 4: the causal mask hides what follows
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens)).cpu().numpy()
        classes = model.classify(torch.from_numpy(tokens), lengths).cpu().numpy()
    lnf = reference["lnf64_1"]
    np.testing.assert_allclose(logits, lnf @ extra["lm_head.weight"].T, rtol=0, atol=1e-10)
    pooled = lnf[np.arange(2), lengths - 1]
    np.testing.assert_allclose(classes, pooled @ extra["score.weight"], rtol=0, atol=1e-10)


# ---------------------------------------------------------------- decoding against full recomputation


def reference_decode(model: GPT2, prompts: np.ndarray, n: int, **sampling) -> tuple[np.ndarray, list[np.ndarray]]:
    """No cache: every step re-runs the whole sequence and hands the last logits to TokenSelector."""
    selector = TokenSelector(prompts.shape[0], **sampling)
    seq, step_logits = prompts.astype(np.int64), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.from_numpy(seq))[:, -1].double().cpu().numpy()
        step_logits.append(logits)
        seq = np.concatenate([seq, selector.step(logits)[:, None]], axis=1)
        if selector.done:
            break
    return seq, step_logits


@settings(deadline=None)
@given(config=small_configs, data=st.data())
def test_kv_cache_decoding_equals_full_recomputation(config, data):
    """Greedy and seeded sampling: same logits each step (float64) and the same tokens, both layouts."""
    seed = data.draw(st.integers(0, 2**16), "seed")
    T = data.draw(st.integers(1, config.n_positions - 1), "T")
    n = data.draw(st.integers(1, config.n_positions - T), "n")
    B = data.draw(st.integers(1, 3), "B")
    sampling = dict(
        temperature=data.draw(st.sampled_from([0.0, 0.7, 1.5]), "temperature"),
        top_k=data.draw(st.none() | st.integers(1, config.vocab_size), "top_k"),
        top_p=data.draw(st.none() | st.floats(0.05, 1.0), "top_p"),
        eos_token_id=data.draw(st.none() | st.integers(0, config.vocab_size - 1), "eos"),
        seed=seed,
    )
    prompts = np.random.default_rng(seed).integers(0, config.vocab_size, (B, T))
    params = random_params(config, seed)
    for attention in ATTENTION_LAYOUTS:
        model = GPT2.from_params(params, config, attention, device="cpu")
        expected, expected_logits = reference_decode(model, prompts, n, **sampling)
        steps = list(generate_stream(model, torch.from_numpy(prompts), n, **sampling, output_logits=True))
        assert len(steps) == len(expected_logits)
        for (_, logits), want in zip(steps, expected_logits, strict=True):
            np.testing.assert_allclose(logits, want, rtol=0, atol=1e-10)
        out = generate(model, torch.from_numpy(prompts), n, **sampling)
        np.testing.assert_array_equal(out.numpy(), expected)


@pytest.fixture(scope="module")
def ragged_model():
    config = GPT2Config(vocab_size=23, n_positions=16, n_embd=12, n_layer=2, n_head=3)
    return GPT2.from_params(random_params(config, 7), config, "custom", device="cpu")


@settings(deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 22), min_size=1, max_size=7), min_size=1, max_size=4),
    n=st.integers(1, 8),
    eos=st.none() | st.integers(0, 22),
)
def test_ragged_batch_equals_one_row_at_a_time(ragged_model, prompts, n, eos):
    """Left padding, masks and per-row positions: each row decodes as if it were alone."""
    batch = generate(ragged_model, prompts, n, eos_token_id=eos)
    batch_logits = [logits for _, logits in generate_stream(ragged_model, prompts, n, eos_token_id=eos,
                                                                         output_logits=True)]
    assert isinstance(batch, list) and len(batch) == len(prompts)
    for b, prompt in enumerate(prompts):
        alone = generate(ragged_model, prompt, n, eos_token_id=eos)  # list of ids in, list out
        assert batch[b][: len(alone)] == alone
        assert all(t == eos for t in batch[b][len(alone):])  # finished early alone: EOS padding in the batch
        alone_logits = [logits for _, logits in generate_stream(ragged_model, [prompt], n, eos_token_id=eos,
                                                                             output_logits=True)]
        for step, logits in enumerate(alone_logits):
            np.testing.assert_allclose(batch_logits[step][b], logits[0], rtol=0, atol=1e-10)


def test_streaming_callback_sees_every_step(tiny64_models):
    model = tiny64_models["fused"]
    seen: list[np.ndarray] = []
    out = generate(model, [[3, 14], [15, 92, 6]], 6, temperature=1.0, seed=3, on_token=seen.append)
    stream = list(generate_stream(model, [[3, 14], [15, 92, 6]], 6, temperature=1.0, seed=3))
    assert len(seen) == len(stream) == 6
    for a, b in zip(seen, stream, strict=True):
        np.testing.assert_array_equal(a, b)
    assert out == [[3, 14] + [int(s[0]) for s in seen], [15, 92, 6] + [int(s[1]) for s in seen]]


# ---------------------------------------------------------------- errors


def test_errors_name_the_numbers(tiny64_models):
    model = tiny64_models["fused"]
    with pytest.raises(ValueError, match=r"holds id 97, outside the vocabulary \[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="holds id -1"):
        model(torch.tensor([[-1, 5]]))
    with pytest.raises(ValueError, match="sequence of length 33 exceeds the model's context of n_positions=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="must be an integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"targets have shape \(1, 2\), tokens have shape \(1, 3\)"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets hold id 97, outside the vocabulary \[0, 97\)"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, 97, -100]]))
    with pytest.raises(ValueError, match=r"prompt length 30 \+ max_new_tokens 5 = 35 exceeds.*n_positions=32"):
        generate(model, [1] * 30, 5)
    with pytest.raises(ValueError, match=r"prompt length 31 \+ max_new_tokens 2"):
        generate(model, [[1], [2] * 31], 2)
    with pytest.raises(ValueError, match="the prompt is 40 tokens long, longer than the model's context of 32"):
        generate(model, [1] * 40, 0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 2)
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, [], 2)
    with pytest.raises(ValueError, match=r"prompt 0 holds id 200, outside the vocabulary \[0, 97\)"):
        generate(model, [[1, 200]], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1, 2], -1)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1, 2], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, [1, 2], 2, eos_token_id=97)
    with pytest.raises(ValueError, match="attn_impl"):
        GPT2(model.config, attn_impl="flash")
    with pytest.raises(ValueError, match="attention layout"):
        GPT2(model.config, attention="split")
    assert generate(model, [1, 2], 0) == [1, 2]


# ---------------------------------------------------------------- compile, autocast, devices


def test_compiled_forward_equals_eager(tiny, reference):
    """The forward traces as one graph (aot_eager backend: tracing without the slow C++ build)."""
    config, params32, _ = tiny
    model = GPT2.from_params(params32, config, device="cpu")
    tokens = torch.from_numpy(reference["tokens_1"])
    eager_logits, eager_loss = model(tokens, shifted_targets(reference["tokens_1"]))
    model.enable_compile(backend="aot_eager", fullgraph=True)
    logits, loss = model(tokens, shifted_targets(reference["tokens_1"]))
    torch.testing.assert_close(logits, eager_logits, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert model.wte.weight.grad is not None and abs(loss.item() - eager_loss.item()) < 1e-6


def sensitive_params(config: GPT2Config, seed: int) -> dict[str, np.ndarray]:
    """GPT-2's init, made sensitive to the details a low-precision path could get wrong without a loose check
    noticing: embeddings scaled so the first LayerNorm's input variance (~1e-5) is close to its eps, and MLP
    pre-activations pushed to ~-4, where the tanh GELU and the erf GELU differ by ~10%.

    Measured on this model (C=64, 2 layers, seeds 0-2, float64 spec as reference): bf16 autocast logits differ
    by <= 5.3e-3 relative; the same model in float32 with erf GELU by >= 6.7e-2, with LayerNorm eps 1e-6 by
    >= 1.1e-1, with eps 1e-4 by >= 2e-1. BF16_REL sits between them with a ~3x margin on each side.
    """
    params = init_params(config, seed, np.float64)
    params["wte.weight"] *= 0.15
    params["wpe.weight"] *= 0.15
    for i in range(config.n_layer):
        params[f"h.{i}.mlp.c_fc.bias"][:] = -4.0
        params[f"h.{i}.mlp.c_proj.weight"] *= 30.0
    return params


BF16_REL = 1.5e-2
SENSITIVE = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4)
# the bf16 checks run on the CPU too; their CUDA cases carry the gpu marker (scripts/gpu-check runs -m gpu)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention", ATTENTION_LAYOUTS)
def test_bf16_autocast_computes_the_same_model(device, attention):
    for seed in range(3):
        params = sensitive_params(SENSITIVE, seed)
        tokens = np.random.default_rng(seed).integers(0, SENSITIVE.vocab_size, (2, 64))
        reference = numpy_gpt2.forward(params, SENSITIVE, tokens)
        model = GPT2.from_params({k: v.astype(np.float32) for k, v in params.items()}, SENSITIVE, attention,
                                 device=device, autocast_dtype=torch.bfloat16)
        with torch.no_grad():
            logits = model(model.to_device(tokens))
        assert logits.dtype == torch.bfloat16
        err = scaled_error(logits.double().cpu().numpy(), reference)
        assert 1e-4 < err <= BF16_REL, f"seed {seed}: {err:.2e}"  # > 1e-4: it really ran in bf16


def assert_greedy_runs_agree(got: list[tuple[int, np.ndarray]], want: list[tuple[int, np.ndarray]], rel: float,
                             what: str) -> int:
    """Two greedy runs (a (token, logits [V]) per step each) agree to within bf16 rounding: every step's logits
    within ``rel`` (scaled error), and the same token at every step until one where ``want``'s two best logits lie
    within 2 * rel * scale of each other. There either token is right at this precision, the runs may part, and
    nothing after is compared (their prompts differ from then on). Returns the number of steps compared."""
    for step, ((got_id, got_logits), (want_id, want_logits)) in enumerate(zip(got, want, strict=True)):
        err = scaled_error(got_logits, want_logits)
        assert err <= rel, f"{what}, step {step}: logits off by {err:.2e} (scaled) > {rel}"
        if got_id != want_id:
            second, first = np.sort(want_logits)[-2:]
            margin = (first - second) / np.abs(want_logits).max()
            assert margin <= 2 * rel, (f"{what}, step {step}: token {got_id} instead of {want_id}, though the "
                                       f"reference's margin is {margin:.3f} of its scale (> 2 x {rel})")
            return step + 1
    return len(want)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_greedy_decoding_follows_float32(tiny, reference, device):
    """Through the bf16 KV cache: transformers' greedy tokens and each step's logits within BF16_REL; a ragged
    batch as each row alone, to the same tolerance. Exact token equality would hold only for the kernels of one
    machine: a step whose two best logits are closer than bf16's error may go either way (the fixture's first
    step has a margin of 1.9% of its scale)."""
    config, params32, _ = tiny
    model = GPT2.from_params(params32, config, device=device, autocast_dtype=torch.bfloat16)
    steps = list(generate_stream(model, reference["generate_greedy_prompt"], 20, output_logits=True))
    prompt_length = reference["generate_greedy_prompt"].shape[1]
    want = list(zip(reference["generate_greedy_out"][0, prompt_length:], reference["generate_greedy_step_logits64"],
                    strict=True))
    assert_greedy_runs_agree([(int(ids[0]), logits[0]) for ids, logits in steps], want, BF16_REL, "vs transformers")
    prompts = [[3, 14, 15], [7]]
    ragged = list(generate_stream(model, prompts, 5, output_logits=True))
    for row, prompt in enumerate(prompts):
        alone = list(generate_stream(model, prompt, 5, output_logits=True))
        assert_greedy_runs_agree([(int(ids[row]), logits[row]) for ids, logits in ragged],
                                 [(int(ids[0]), logits[0]) for ids, logits in alone], BF16_REL, f"ragged row {row}")
    # the plain route (argmax on the device, no logits copied) picks what the logits route picked
    assert generate(model, prompts, 5) == [p + [int(ids[b]) for ids, _ in ragged] for b, p in enumerate(prompts)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ATTENTION_LAYOUTS)
def test_cuda_matches_transformers(tiny, reference, attention):
    """float32 and float64 on the GPU against transformers' outputs; gradients in float64."""
    config, params32, params64 = tiny
    model = GPT2.from_params(params32, config, attention)  # device auto -> cuda
    assert model.device.type == "cuda"
    for i in range(3):
        tokens = torch.from_numpy(reference[f"tokens_{i}"]).cuda()
        with torch.no_grad():
            logits = model(tokens).cpu().numpy()
        np.testing.assert_allclose(logits, reference[f"logits32_{i}"], rtol=1e-4, atol=1e-4)
    model64 = GPT2.from_params(params64, config, attention, attn_impl="math")
    np.testing.assert_array_equal(generate(model64, reference["generate_greedy_prompt"], 20),
                                  reference["generate_greedy_out"])
    tokens = reference["tokens_2"]
    with torch.no_grad():
        logits = model64(model64.to_device(tokens)).cpu().numpy()
    loss, grads = model64.loss_and_grads(tokens, shifted_targets(tokens).numpy())
    np.testing.assert_allclose(logits, reference["logits64_2"], rtol=0, atol=1e-10)
    assert abs(loss - float(reference["loss64_2"])) <= 1e-12
    for name, grad in grads.items():
        ref = reference[f"grad64_transformer.{name}"]
        assert np.abs(grad - ref).max() <= 1e-9 * np.abs(ref).max(), name


# ---------------------------------------------------------------- training utilities


def test_adamw_groups_and_first_step_closed_form(tiny, reference):
    """Step 1 of AdamW: m_hat = g, v_hat = g^2, so p <- p (1 - lr wd) - lr g / (|g| + eps) exactly."""
    config, _, params64 = tiny
    model = GPT2.from_params(params64, config, "custom", device="cpu")
    lr, wd, eps = 1e-2, 0.1, 1e-8
    opt = configure_adamw(model, lr=lr, weight_decay=wd, betas=(0.9, 0.95), eps=eps)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    named = dict(model.named_parameters())
    # custom layout: 16 tensors per block (q, k, v separately)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named) == 2 + 2 * 16 + 2
    assert decayed == {id(p) for p in named.values() if p.dim() >= 2}
    assert opt.defaults["fused"] is True  # torch's fused kernel, on the CPU too
    before = {n: p.detach().clone() for n, p in named.items()}
    tokens = reference["tokens_1"]
    stats = train_step(model, opt, [(torch.from_numpy(tokens), shifted_targets(tokens))], grad_clip=None)
    for name, p in named.items():
        g = p.grad
        decay = wd if p.dim() >= 2 else 0.0
        expected = before[name] * (1 - lr * decay) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-15)
    assert abs(stats["loss"] - float(reference["loss64_1"])) < 1e-12


def test_gradient_accumulation_and_clipping(tiny, reference):
    """Two micro-batches of one row each step exactly like one batch of both rows (equal target counts)."""
    config, _, params64 = tiny
    tokens, targets = torch.from_numpy(reference["tokens_1"]), shifted_targets(reference["tokens_1"])
    results = []
    for micro in ([(tokens, targets)], [(tokens[:1], targets[:1]), (tokens[1:], targets[1:])]):
        model = GPT2.from_params(params64, config, device="cpu")
        opt = configure_adamw(model, lr=1.0, weight_decay=0.1)
        stats = train_step(model, opt, micro, lr=3e-3, grad_clip=0.05)
        grad_norm_after = math.sqrt(sum(float((p.grad**2).sum()) for p in model.parameters()))
        results.append((stats, grad_norm_after, model.to_params()))
    (full, clipped_full, params_full), (accum, _, params_accum) = results
    assert abs(full["loss"] - float(reference["loss64_1"])) < 1e-12 and abs(accum["loss"] - full["loss"]) < 1e-12
    assert abs(accum["grad_norm"] - full["grad_norm"]) < 1e-12 * full["grad_norm"]
    assert full["grad_norm"] > 0.05 and abs(clipped_full - 0.05) < 1e-6 and full["lr"] == 3e-3
    for name in params_full:
        np.testing.assert_allclose(params_accum[name], params_full[name], rtol=0, atol=1e-13, err_msg=name)


def test_learning_rate_schedule():
    kw = dict(max_lr=1e-3, warmup_steps=10, total_steps=110, min_lr=1e-4)
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # (0 + 1) / 10 of max
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at the top
    assert lr_at(60, **kw) == pytest.approx(5.5e-4)  # halfway: the mean of max and min
    assert lr_at(85, **kw) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(0.75 * math.pi)) / 2)
    assert lr_at(110, **kw) == lr_at(5000, **kw) == 1e-4
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    with pytest.raises(ValueError):
        lr_at(-1, **kw)


def test_token_check_reads_no_device_values(tiny64_models):
    """On an accelerator the per-forward check must not read ids (a host sync per micro-batch): a "meta" tensor
    has shape and dtype but no values, so any read of them would raise. Ids are checked on the host instead."""
    model = tiny64_models["fused"]
    model.check_tokens(torch.empty((4, 32), dtype=torch.long, device="meta"))  # shape and dtype only
    with pytest.raises(ValueError, match="sequence of length 33 exceeds"):
        model.check_tokens(torch.empty((4, 33), dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="must be an integer tensor"):
        model.check_tokens(torch.empty((4, 3), device="meta"))
    with pytest.raises(ValueError, match=r"holds id 97, outside the vocabulary \[0, 97\)"):
        model.to_device(np.array([[1, 97]]))  # the host-side check that replaces it
    assert model.to_device(np.array([[1, 96]])).dtype == torch.long


def test_both_backends_word_bad_tokens_alike(tiny64_models, tiny):
    """One token check (mapper.tokens) behind both backends: the same input, the same message."""
    config, _, params64 = tiny
    model = tiny64_models["custom"]
    for bad in (np.array([[1, 97]]), np.array([[-3, 2]]), np.zeros((1, 33), np.int64), np.zeros((1, 3))):
        with pytest.raises(ValueError) as from_numpy:
            numpy_gpt2.forward(params64, config, bad)
        with pytest.raises(ValueError) as from_torch:
            model(torch.from_numpy(bad))
        assert str(from_numpy.value) == str(from_torch.value)
