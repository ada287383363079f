"""What this machine is, as the engines and the benchmarks need to know it: the CPU's model and feature flags, and
which low-precision types it multiplies natively. Linux reads ``/proc/cpuinfo``; elsewhere the flags are empty
and the model is ``platform``'s processor name."""

from __future__ import annotations

import platform

# What the CPU needs to multiply in a low precision natively; without it torch emulates the type in float32 code
LOW_PRECISION_FLAGS = {
    "bf16": frozenset({"avx512_bf16", "amx_bf16"}),
    "fp16": frozenset({"avx512_fp16", "amx_fp16"}),
}


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8488C", ...)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_identity(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name with its family, model and stepping: "AMD EPYC (family 25, model 17, stepping 1)".

    Virtual machines often report a bare "AMD EPYC" for parts as different as Zen 4 (family 25) and Zen 5
    (family 26), whose fastest kernels differ; the numbers tell them apart. Where they cannot be read (not Linux,
    not x86), the model name alone."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or cpu_model(cpuinfo)  # cpu_model's fallback where /proc/cpuinfo is not
    numbers = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"),
                                                           ("stepping", "stepping")) if key in fields]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def low_precision_support(flags: frozenset[str]) -> dict[str, str | None]:
    """For "bf16" and "fp16": None where ``flags`` hold an instruction set that multiplies it natively, else the
    reason (one line) why a measurement of it would only time an emulation."""
    out: dict[str, str | None] = {}
    for name, needed in LOW_PRECISION_FLAGS.items():
        out[name] = None if needed & flags else (
            f"this CPU has no {' or '.join(sorted(needed))} instructions (it would emulate {name} in float32 code)")
    return out
