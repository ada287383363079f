"""The engine's CUDA paths: what a careful reading found, tested on the CPU where the defect can be seen there, and
the tests that need a GPU (marked ``gpu``; ``scripts/gpu-check`` runs them, CI skips them).

On the CPU: targets and classification lengths checked on the host and copied once; the device and process-group
backend of each torchrun rank; compiled forwards that keep their own recompile budget and fail instead of running
eager; bf16 decoding on matrices cast once, not once per token; greedy decoding that picks on the device; a train
step that only measures the gradient norm when no clipping is asked for; the --tf32 and --deterministic switches;
``scripts/gpu-check``'s dry run.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

import torch_gpt2.model as engine_model
from benchmarks.gpu_check import nccl_command
from gpt2_cli import main
from mapper import GPT2Config, init_params, load_checkpoint
from mapper.parity import scaled_error
from mapper.sampling import TokenSelector
from mapper.training import Batch
from parity_tests.conftest import DATA, REPO
from torch_gpt2 import GPT2, configure_adamw, generate, generate_stream, train_step
from torch_gpt2.backend import TorchBackend, distributed_device

SMALL = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def params32():
    return init_params(SMALL, 0, np.float32)


# ---------------------------------------------------------------- values checked on the host


def test_targets_are_checked_on_the_host_before_they_move(params32, monkeypatch):
    """loss_and_grads sends its targets through to_device's host check (on CUDA the forward checks shapes only: an
    id outside the vocabulary would be a device-side assert there, not this ValueError)."""
    model = GPT2.from_params(params32, SMALL, device="cpu")
    moved = []
    real = model.to_device
    monkeypatch.setattr(model, "to_device", lambda array, name="tokens": moved.append(name) or real(array, name))
    tokens = np.zeros((2, 5), np.int64)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 300\)"):
        model.loss_and_grads(tokens, np.full((2, 5), 300))
    assert moved == ["tokens", "targets"]
    loss, _ = model.loss_and_grads(tokens, np.full((2, 5), -100) + np.eye(2, 5, dtype=np.int64) * 101)
    assert np.isfinite(loss)


def test_classification_lengths_cross_to_the_device_once(params32):
    """Host lengths are checked and copied; lengths already on an accelerator are checked for shape and dtype only
    (a "meta" tensor has no values, so any read of them raises); the backend hands host lengths over."""
    config = GPT2Config(**{**SMALL.to_dict(), "n_classes": 2})
    params = {**params32, "score.weight": np.zeros((SMALL.n_embd, 2), np.float32)}
    with torch.device("meta"):  # a model "on an accelerator" whose tensors hold no values
        on_accelerator = GPT2(config)
    lengths = torch.empty(4, dtype=torch.long, device="meta")
    assert on_accelerator._lengths_tensor(lengths, (4, 9)) is lengths
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \(3,\)"):
        on_accelerator._lengths_tensor(lengths, (3, 9))
    with pytest.raises(ValueError, match="lengths"):
        on_accelerator._lengths_tensor(np.array([1, 10, 2, 3]), (4, 9))  # 10 > T: caught on the host
    backend = TorchBackend(config, params, 0.1, "matrices", device="cpu")
    batch = Batch(np.ones((2, 6), np.int64), lengths=np.array([6, 3]), labels=np.array([0, 1]))
    assert isinstance(backend._device_batch(batch)["lengths"], np.ndarray)
    loss, _ = backend.step([batch], lr=1e-3, grad_clip=None)
    assert np.isfinite(loss)


# ---------------------------------------------------------------- several processes


@pytest.mark.parametrize(("device", "local_rank", "cuda", "expected"), [
    (None, 1, True, ("cuda:1", "nccl")),   # torchrun on a GPU machine: rank 1 drives GPU 1, not GPU 0
    ("cuda", 3, True, ("cuda:3", "nccl")),
    (None, 1, False, ("cpu", "gloo")),     # no GPU: gloo on the CPU
    ("cpu", 0, True, ("cpu", "gloo")),     # asked for the CPU on a GPU machine
])
def test_each_rank_gets_its_gpu_and_the_matching_backend(device, local_rank, cuda, expected):
    assert distributed_device(device, local_rank, cuda) == expected


def test_one_gpu_for_every_rank_is_refused():
    with pytest.raises(ValueError, match="names one GPU for every process"):
        distributed_device("cuda:0", 1, True)
    with pytest.raises(ValueError, match="cuda \\(nccl\\) or cpu \\(gloo\\)"):
        distributed_device("mps", 0, False)


# ---------------------------------------------------------------- torch.compile


def test_each_model_compiles_within_its_own_budget_and_fails_rather_than_runs_eager(params32, monkeypatch):
    """Dynamo keys its cache on the code object, so models compiling one shared method would share one budget.
    With a budget of 3: two models take 3 shapes each (6 graphs in all), a 4th shape raises instead of silently
    running eager, and under set_stance("fail_on_recompile") a cached shape runs while a new one raises."""
    monkeypatch.setattr(engine_model, "COMPILE_RECOMPILE_LIMIT", 3)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=False):
            models = [GPT2.from_params(params32, SMALL, device="cpu").enable_compile(backend="eager")
                      for _ in range(2)]
            eager = GPT2.from_params(params32, SMALL, device="cpu")
            with torch.no_grad():
                for T in (4, 5, 6):
                    tokens = torch.arange(T)[None] % SMALL.vocab_size
                    for model in models:
                        torch.testing.assert_close(model(tokens), eager(tokens), rtol=1e-5, atol=1e-5)
                assert torch._dynamo.config.fail_on_recompile_limit_hit
                with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
                    models[0](torch.zeros(1, 7, dtype=torch.long))
                with torch.compiler.set_stance("fail_on_recompile"):
                    models[1](torch.zeros(1, 5, dtype=torch.long))
                    with pytest.raises(RuntimeError):
                        models[1](torch.zeros(1, 8, dtype=torch.long))
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------- decoding


class MatrixCasts(TorchDispatchMode):
    """Counts dtype casts of 2-D tensors (weights; activations while decoding are [B, 1, C])."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default) and args[0].dim() == 2:
            self.count += 1
        return func(*args, **(kwargs or {}))


def casts_in_one_decoding_step(model: GPT2) -> int:
    steps = generate_stream(model, [[1, 2, 3]], 3)
    next(steps)  # the prefill
    with MatrixCasts() as casts:
        next(steps)
    return casts.count


def test_bf16_decoding_casts_the_matrices_once(params32, monkeypatch):
    """decoding_model computes exactly what autocast computes (bit for bit), shares the other tensors, and a decoding
    step through it casts no matrix; decoding the autocast model itself recasts every matrix each token."""
    model = GPT2.from_params(params32, SMALL, device="cpu", autocast_dtype=torch.bfloat16)
    decoder = model.decoding_model()
    tokens = torch.arange(20)[None] % SMALL.vocab_size
    with torch.no_grad():
        assert torch.equal(decoder(tokens), model(tokens))
    assert decoder.h[0].mlp.c_fc.weight.dtype == decoder.lm_head.weight.dtype == torch.bfloat16
    assert decoder.wte.weight.data_ptr() == model.wte.weight.data_ptr()  # the embedding is shared, float32
    assert GPT2.from_params(params32, SMALL, device="cpu").decoding_model().lm_head is None  # float32: itself
    assert casts_in_one_decoding_step(model) == 0
    monkeypatch.setattr(model, "decoding_model", lambda: model)
    assert casts_in_one_decoding_step(model) >= 4 * SMALL.n_layer + 1


def test_greedy_picks_on_the_device_as_the_host_rule_does(params32):
    """Greedy decoding without logits takes the argmax where the logits are; the tokens equal those the host
    selector picks from the float64 logits (the same rule: lowest id among equal maxima), EOS padding included."""
    model = GPT2.from_params(params32, SMALL, device="cpu")
    prompts = [[5, 6, 7], [9]]
    via_logits = [ids for ids, _ in generate_stream(model, prompts, 6, output_logits=True, eos_token_id=3)]
    assert [list(ids) for ids in generate_stream(model, prompts, 6, eos_token_id=3)] == [list(i) for i in via_logits]
    selector = TokenSelector(3, eos_token_id=7)
    np.testing.assert_array_equal(selector.take_greedy(np.array([7, 1, 2])), [7, 1, 2])
    np.testing.assert_array_equal(selector.take_greedy(np.array([4, 7, 2])), [7, 7, 2])  # row 0 is padded
    with pytest.raises(ValueError, match="non-finite logits"):
        selector.take_greedy(np.array([1, 1, 1]), finite=False)
    with pytest.raises(ValueError, match="greedy"):
        TokenSelector(1, temperature=0.7).take_greedy(np.array([1]))


# ---------------------------------------------------------------- training switches


def test_no_clipping_asked_means_the_norm_is_only_measured(params32, monkeypatch):
    """grad_clip=None: clip_grad_norm_ is never called (no clip at math.inf), the gradients stay as backward left
    them, and the reported norm is their global L2 norm computed here by hand."""
    model = GPT2.from_params(params32, SMALL, device="cpu")
    optimizer = configure_adamw(model, lr=0.0, weight_decay=0.0)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("clip_grad_norm_ was called"))
    tokens = torch.from_numpy(np.arange(24).reshape(2, 12) % SMALL.vocab_size)
    stats = train_step(model, optimizer, [(tokens, tokens.roll(-1, dims=1))], grad_clip=None)
    grads = [p.grad.double() for p in model.parameters()]
    by_hand = float(torch.sqrt(sum((g * g).sum() for g in grads)))
    assert abs(stats["grad_norm"] - by_hand) <= 1e-6 * by_hand
    model.zero_grad()
    model(tokens, tokens.roll(-1, dims=1))[1].backward()
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad.double(), g, rtol=0, atol=0)


def test_tf32_and_deterministic_switches(params32, monkeypatch):
    """The backend's switches set torch's process-wide modes (restored after this test)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        TorchBackend(SMALL, params32, 0.1, "matrices", device="cpu")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.are_deterministic_algorithms_enabled()
        TorchBackend(SMALL, params32, 0.1, "matrices", device="cpu", tf32=True, deterministic=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, deterministic,
         torch.backends.cudnn.benchmark) = previous
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize(("flags", "message"), [
    (["--tf32", "--device", "cpu"], "--tf32 needs a CUDA device"),
    (["--tf32", "--dtype", "float64"], "--tf32 is a mode of float32 matmuls"),
    (["--tf32", "--backend", "numpy"], "--tf32 is a torch option"),
    (["--deterministic", "--backend", "numpy"], "--deterministic is a torch option"),
])
def test_switches_are_refused_where_they_mean_nothing(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(DATA / "the-verdict.txt"), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_run_saved_before_the_switches_existed_resumes_with_them_off():
    """state.json written before --tf32/--deterministic: those arguments count as their defaults (off), so resuming
    without them is the same run, and resuming with one of them on is refused, by name."""
    from dataclasses import asdict, replace

    from tasks.run_folder import RunArgs, check_same_run

    args = RunArgs(backend="torch", dtype="float32", config={}, init="seed 1", data=["x"], data_sha256="0", context=8,
                   stride=8, batch_size=2, grad_accum=1, lr=1e-3, schedule="constant", min_lr=0.0, warmup_steps=0,
                   weight_decay=0.1, decay="matrices", grad_clip=0.0, epochs=1, max_steps=None, eval_every=5,
                   eval_batches=1, val_fraction=0.1, seed=1, sample_prompt="", sample_tokens=4)
    old = {k: v for k, v in asdict(args).items() if k not in ("tf32", "deterministic")}
    check_same_run(old, args)
    with pytest.raises(ValueError, match="deterministic False -> True"):
        check_same_run(old, replace(args, deterministic=True))


# ---------------------------------------------------------------- scripts/gpu-check without a GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu-check would run for real")
def test_gpu_check_dry_run_says_what_it_would_do(tmp_path):
    """CI's call: no GPU, so a dry run that names every stage, writes nothing, and exits 0."""
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if k != "GPT2_PYTHON"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check"), str(out), "--budget", "420"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "dry run" in text and "no CUDA GPU" in text
    for stage in ("CUDA tests", "GPU benchmark", "nccl"):
        assert stage in text, stage
    assert not out.exists() or not any(out.iterdir())


def fake_bench_row(backend: str, workload: str, B: int, T: int, seconds: float) -> dict:
    row = {"size": "gpt2", "workload": workload, "device": "cuda", "B": B, "T": T, "new_tokens": 16,
           "backend": backend, "seconds": {"median": seconds, "min": seconds, "max": seconds, "all": [seconds]},
           "peak_memory_mib": 100.0}
    if workload == "decode":
        return row | {"ms_per_token": 1e3 * seconds, "tokens_per_s": B / seconds, "read_gbs": 1.0,
                      "fraction_of_bandwidth": 0.5, "bytes_per_step": 1e9 * seconds}
    return row | {"gflops": 1.0, "limit_gflops": 2.0, "fraction_of_limit": 0.55 if "compile" in backend else 0.4}


def test_gpu_check_orchestration_on_a_pretend_gpu(tmp_path, monkeypatch, capsys):
    """The real run's bookkeeping, with the GPU and the stages' commands replaced by stand-ins: every stage runs
    within its share, a stage that overruns is stopped and reported, the benchmark's points (written by a child
    that is then stopped) are kept with their ratios and goals, the plots move up, results.md has the tables."""
    import json
    import sys
    from dataclasses import asdict

    from benchmarks import gpu_check
    from benchmarks.suite import Report, Settings

    monkeypatch.setattr(gpu_check, "preflight", lambda: {
        "python": sys.executable, "python_version": "3.x", "missing_modules": [], "gpu_hardware": ["GPU 0: Pretend"],
        "torch": torch.__version__, "torch_cuda": "12.8", "cuda_devices": ["Pretend GPU"]})
    junit = ('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0"><testcase classname="a" name="ok"/>'
             '<testcase classname="a" name="bad"><failure/></testcase><testcase classname="a" name="ok2"/>'
             '</testsuite></testsuites>')
    monkeypatch.setattr(gpu_check, "tests_command", lambda path: [
        sys.executable, "-c", f"open({str(path)!r}, 'w').write({junit!r}); raise SystemExit(1)"])
    rows = [fake_bench_row("torch-cuda-bf16-compile", "train", 16, 1024, 0.05),
            fake_bench_row("hf-cuda-bf16", "train", 16, 1024, 0.10),
            fake_bench_row("torch-cuda-bf16", "decode", 1, 128, 0.004),
            fake_bench_row("hf-cuda-bf16", "decode", 1, 128, 0.008)]
    report = asdict(Report(settings=asdict(Settings(backends=gpu_check.BENCH_BACKENDS)),
                           machine={"cpu": "pretend", "gpu": {"name": "Pretend GPU", "memory_gib": 1}},
                           results=rows))
    writer = ("import json, pathlib, sys, time; out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True); "
              f"(out / 'results.json').write_text(json.dumps({report!r})); "
              "(out / 'decode.png').write_bytes(b'png'); time.sleep(60)")  # then stopped: out of its time
    monkeypatch.setattr(gpu_check, "bench_command", lambda out, deadline: [sys.executable, "-c", writer, str(out)])
    monkeypatch.setattr(gpu_check, "nccl_command", lambda n: [sys.executable, "-c", "print('nccl ok')"])
    out = tmp_path / "gpu"
    assert gpu_check.run(out, budget=20, stages=gpu_check.STAGES) == 1  # a test failed, the bench overran
    result = json.loads((out / "results.json").read_text())
    tests, bench, nccl = (result["stages"][k] for k in ("tests", "bench", "nccl"))
    assert tests["failed"] == ["a::bad"] and tests["tests"] == 3 and not tests["passed"]
    assert bench["timed_out"] and not bench["passed"] and bench["seconds"] < 20
    assert nccl["passed"] and nccl["processes"] == 1 and result["elapsed_s"] < 25
    speedups = {(r["backend"], r["workload"]): r.get("speedup_vs_hf") for r in result["bench"]["results"]}
    assert speedups[("torch-cuda-bf16-compile", "train")] == pytest.approx(2.0)
    goals = {g["goal"]: g["met"] for g in result["bench"]["goals"]}
    assert goals["train step B=16 T=1024, torch-cuda-bf16-compile (MFU)"] is True
    assert goals["decode B=1 context 128, torch-cuda-bf16 vs HF"] is True
    assert (out / "decode.png").read_bytes() == b"png"
    markdown = (out / "results.md").read_text()
    assert "| tests | FAILED |" in markdown and "| bench | out of time |" in markdown and "**train**" in markdown
    assert sorted(p.name for p in out.iterdir()) == ["bench.log", "cuda-tests.log", "decode.png", "nccl.log",
                                                     "results.json", "results.md"]


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_cuda
def test_cuda_out_of_range_target_is_a_value_error(params32):
    backend = TorchBackend(SMALL, params32, 0.1, "matrices", device="cuda")
    tokens = np.zeros((2, 8), np.int64)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        backend.step([Batch(tokens, np.full((2, 8), SMALL.vocab_size))], lr=1e-3, grad_clip=None)
    loss, _ = backend.step([Batch(tokens, tokens + 1)], lr=1e-3, grad_clip=None)  # the device is still usable
    assert np.isfinite(loss)


@pytest.mark.gpu
@needs_cuda
def test_cuda_compiled_forward_really_runs_compiled(params32):
    """Inductor on the GPU: the compiled model's logits and loss match eager within float32 rounding, and a second
    call runs under set_stance("fail_on_recompile"), i.e. on the graph compiled by the first."""
    eager = GPT2.from_params(params32, SMALL, device="cuda")
    compiled = GPT2.from_params(params32, SMALL, device="cuda", compile=True)
    tokens = torch.from_numpy(np.arange(64).reshape(2, 32) % SMALL.vocab_size).cuda()
    targets = tokens.roll(-1, dims=1)
    _, first = compiled(tokens, targets)
    with torch.compiler.set_stance("fail_on_recompile"):
        logits, loss = compiled(tokens, targets)
    want_logits, want_loss = eager(tokens, targets)
    assert scaled_error(logits.detach().cpu().numpy(), want_logits.detach().cpu().numpy()) <= 1e-5
    assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


@pytest.mark.gpu
@needs_cuda
def test_cuda_deterministic_training_repeats_bit_exactly(params32):
    """--deterministic: two runs of the same steps give identical parameters on the GPU."""
    previous = torch.are_deterministic_algorithms_enabled()
    rng = np.random.default_rng(0)
    batches = [Batch(t[:, :-1], t[:, 1:]) for t in rng.integers(0, SMALL.vocab_size, (4, 8, 33))]
    try:
        runs = []
        for _ in range(2):
            backend = TorchBackend(SMALL, params32, 0.1, "matrices", device="cuda", deterministic=True)
            for batch in batches:
                backend.step([batch], lr=1e-3, grad_clip=1.0)
            runs.append(backend.params())
        for name in runs[0]:
            np.testing.assert_array_equal(runs[0][name], runs[1][name], err_msg=name)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_decoding_agrees_with_float32_on_the_gpu(params32):
    """bf16 greedy decoding on the cast model within the bf16 tolerance of the float32 model's step logits."""
    from parity_tests.test_torch_engine import BF16_REL, assert_greedy_runs_agree

    fp32 = GPT2.from_params(params32, SMALL, device="cuda")
    bf16 = GPT2.from_params(params32, SMALL, device="cuda", autocast_dtype=torch.bfloat16)
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    want = [(int(i[0]), lg[0]) for i, lg in generate_stream(fp32, prompt, 16, output_logits=True)]
    got = [(int(i[0]), lg[0]) for i, lg in generate_stream(bf16, prompt, 16, output_logits=True)]
    assert assert_greedy_runs_agree(got, want, BF16_REL, "bf16 vs float32 on cuda") >= 1
    assert generate(bf16, prompt, 16)[0][: len(prompt[0]) + 1] == prompt[0] + [got[0][0]]


@pytest.mark.gpu
@needs_cuda
def test_nccl_process_group():
    """nccl on this machine, as scripts/gpu-check's stage runs it: torchrun with one process per GPU (2 when there
    are 2 or more, else 1), each setting its device, binding the group to it (device_id) and all-reducing a
    tensor whose sum is known."""
    n = min(2, torch.cuda.device_count())
    proc = subprocess.run(nccl_command(n), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("nccl ok") == n


@pytest.mark.gpu
@needs_cuda
def test_cuda_resume_is_bit_exact_with_deterministic(tmp_path, capsys):
    """gpt2 train on the GPU in bf16 with --deterministic: 6 steps straight and 3 + --resume 3 end bit-identical."""
    data = tmp_path / "head.txt"
    data.write_text((DATA / "the-verdict.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    run = ["--data", str(data), "--backend", "torch", "--device", "cuda", "--autocast", "bf16", "--deterministic",
           "--config", "n_layer=2,n_embd=64,n_head=4,n_positions=64", "--context", "32", "--stride", "32",
           "--batch-size", "4", "--max-steps", "6", "--eval-every", "3", "--sample-tokens", "4", "--quiet",
           "--grad-clip", "1.0", "--lr", "1e-3"]
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        assert main(["train", "--out", str(tmp_path / "straight"), *run]) == 0
        assert main(["train", "--out", str(tmp_path / "resumed"), *run, "--stop-after", "3"]) == 0
        assert main(["train", "--out", str(tmp_path / "resumed"), *run, "--resume"]) == 0
    finally:
        torch.use_deterministic_algorithms(previous)
    a, b = (load_checkpoint(tmp_path / name)[1] for name in ("straight", "resumed"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
