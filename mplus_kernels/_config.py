"""Every environment variable mplus reads, in one place (STYLE.md habit 6).

| variable          | values                              | effect |
|-------------------|-------------------------------------|--------|
| MPLUS_BACKEND     | auto (default), triton, cpp, reference | force one backend for every op (see `_backend.py`) |
| TRITON_INTERPRET  | 0 (default) / 1                     | run Triton kernels on the CPU through the interpreter |
| MPLUS_CPU_ISA     | auto (default), one of CPU_ISA_LEVELS | ISA level of the C++ CPU kernels (unsupported: refused) |
| MPLUS_DEBUG_CHECKS | 0 (default) / 1                    | wrappers also check device tensors' values (a sync) |

The values are read when asked for, not cached, so tests can change them with `monkeypatch.setenv`.
"""

from __future__ import annotations

import os

BACKENDS = ("auto", "triton", "cpp", "reference")
CPU_ISA_LEVELS = ("baseline", "avx2", "avx512", "avx512_bf16", "amx")  # lowest first, as csrc/cpu/isa.h numbers them


def backend_override() -> str:
    """The backend named by ``MPLUS_BACKEND`` (``auto`` when unset)."""
    value = os.environ.get("MPLUS_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"MPLUS_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def triton_interpret() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0", "false", "False")


def debug_checks() -> bool:
    """True when wrappers also validate the values of device tensors (``MPLUS_DEBUG_CHECKS=1``): index ranges, token
    ids, victims. Off by default because on a GPU each such check is a device-to-host sync."""
    return os.environ.get("MPLUS_DEBUG_CHECKS", "0").strip() not in ("", "0", "false", "False")


def cpu_isa() -> str:
    """The CPU kernels' ISA level named by ``MPLUS_CPU_ISA``: ``auto`` (default: the best this CPU runs) or one of
    ``CPU_ISA_LEVELS``. Applied when the extension loads; ``mplus_kernels.set_cpu_isa`` changes it later."""
    value = os.environ.get("MPLUS_CPU_ISA", "auto").strip().lower() or "auto"
    if value != "auto" and value not in CPU_ISA_LEVELS:
        raise ValueError(f"MPLUS_CPU_ISA={value!r} is not one of auto, {', '.join(CPU_ISA_LEVELS)}")
    return value
