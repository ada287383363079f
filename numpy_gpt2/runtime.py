"""Process-wide settings that make the NumPy backend fast on Linux; applied by the commands, never on import.

Two of them: glibc's allocator (below) and OpenBLAS's kernel set (further down).

``keep_freed_memory()``: every large NumPy temporary (100+ MB at the GPT-2 124M shape) is otherwise a fresh
``mmap`` that the kernel page-faults on first touch and unmaps on free; measured here at 10-40% system time in a
NumPy training step. Telling glibc to keep freed memory (the effect of ``MALLOC_MMAP_MAX_=0``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` set before the process starts) makes the next step reuse it.
Library users can call it themselves; it affects the whole process.
"""

from __future__ import annotations

import ctypes
import os
import sys

from mapper.host import cpu_flags

# glibc mallopt parameter ids (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_memory() -> bool:
    """Keep glibc from handing freed memory back to the OS; False where glibc is not available (nothing done)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1 << 40) == 1
    ok &= libc.mallopt(_M_TOP_PAD, 256 << 20) == 1
    return bool(ok)


# ------------------------------------------------------------------------------------------------------
# OpenBLAS's kernels. NumPy's bundled OpenBLAS picks its kernel set from the CPU model at load time; on CPUs it
# does not know it falls back to an older set. On this project's AMD Zen 5 machines (AVX-512) it picked
# "Haswell" (AVX2): a 1024x768 @ 768x3072 float32 matmul ran at ~266 GFLOP/s, and at ~490 with
# OPENBLAS_CORETYPE=SkylakeX, the AVX-512 kernels. The variable is read only when OpenBLAS loads, so a process
# that wants it must have it set before NumPy is imported: the `gpt2` command restarts itself with it
# (``restart_with_best_openblas``); in your own program, start Python with OPENBLAS_CORETYPE=SkylakeX if
# ``openblas_kernels()`` reports an AVX-512 CPU on a non-AVX-512 kernel set. A user's own setting always wins.
# ------------------------------------------------------------------------------------------------------

CORETYPE_ENV = "OPENBLAS_CORETYPE"
SELECTED_ENV = "GPT2_OPENBLAS_SELECTED"  # set by the gpt2 command when it chose the kernels itself
AVX512_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})  # what SkylakeX's kernels use
AVX512_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})  # OpenBLAS kernel sets built on AVX-512
_CORENAME_SYMBOLS = ("openblas_get_corename", "openblas_get_corename64_", "scipy_openblas_get_corename64_",
                     "scipy_openblas_get_corename")


def openblas_core() -> str | None:
    """The kernel set NumPy's OpenBLAS runs ("Haswell", "SkylakeX", ...); loads NumPy. None if unknown."""
    import numpy  # noqa: F401  (the library must be loaded to be asked)

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.split()[-1].lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in _CORENAME_SYMBOLS:
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                name = fn()
                return name.decode() if name else None
    return None


def better_openblas_coretype(flags: frozenset[str], core: str | None, environ: dict[str, str]) -> str | None:
    """The OPENBLAS_CORETYPE worth setting, or None: "SkylakeX" when the CPU has every AVX-512 feature those
    kernels use, OpenBLAS picked a kernel set without AVX-512, and the user has not chosen one."""
    if CORETYPE_ENV in environ or core is None or not AVX512_FLAGS <= flags:
        return None
    return None if core.lower() in AVX512_CORES else "SkylakeX"


def openblas_kernels() -> dict[str, object]:
    """What NumPy's OpenBLAS runs here and who chose it.

    {"core": kernel set, "chosen_by": who, "cpu_avx512": whether the CPU has AVX-512, "slower_forced": True when
    the environment's own OPENBLAS_CORETYPE holds this AVX-512 CPU to kernels without AVX-512}.
    """
    core, avx512 = openblas_core(), AVX512_FLAGS <= cpu_flags()
    if os.environ.get(SELECTED_ENV):
        chosen_by = f"gpt2 (OpenBLAS picked {os.environ[SELECTED_ENV]}; {CORETYPE_ENV} set before NumPy loaded)"
    elif CORETYPE_ENV in os.environ:
        chosen_by = f"the environment's {CORETYPE_ENV}={os.environ[CORETYPE_ENV]}"
    else:
        chosen_by = "OpenBLAS"
    slower = (CORETYPE_ENV in os.environ and not os.environ.get(SELECTED_ENV) and avx512
              and core is not None and core.lower() not in AVX512_CORES)
    return {"core": core, "chosen_by": chosen_by, "cpu_avx512": avx512, "slower_forced": slower}


def restart_with_best_openblas(argv: list[str]) -> None:
    """If OpenBLAS under-detects this AVX-512 CPU, re-run this process (``argv``, e.g. ``sys.orig_argv``) with
    OPENBLAS_CORETYPE=SkylakeX; never returns then. Otherwise (or if the restart fails) does nothing."""
    if CORETYPE_ENV in os.environ or not AVX512_FLAGS <= cpu_flags():
        return  # the cheap checks first: no NumPy import on machines where nothing would change
    core = openblas_core()
    coretype = better_openblas_coretype(cpu_flags(), core, dict(os.environ))
    if coretype is None:
        return
    os.environ[CORETYPE_ENV] = coretype
    os.environ[SELECTED_ENV] = str(core)
    try:
        os.execv(sys.executable, [sys.executable, *argv[1:]])
    except OSError:
        del os.environ[CORETYPE_ENV], os.environ[SELECTED_ENV]
