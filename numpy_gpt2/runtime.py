"""Process-wide settings that make the NumPy backend fast on Linux; applied by the commands, never on import.

``keep_freed_memory()``: every large NumPy temporary (100+ MB at the GPT-2 124M shape) is otherwise a fresh
``mmap`` that the kernel page-faults on first touch and unmaps on free; measured here at 10-40% system time in a
NumPy training step. Telling glibc to keep freed memory (the effect of ``MALLOC_MMAP_MAX_=0``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` set before the process starts) makes the next step reuse it.
Library users can call it themselves; it affects the whole process.
"""

from __future__ import annotations

import ctypes

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
