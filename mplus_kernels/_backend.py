"""Loading the compiled extension and choosing a backend per op call.

One table decides which implementation runs (STYLE.md habit 4):

| tensors on | ``auto`` picks | also allowed                                           |
|------------|----------------|--------------------------------------------------------|
| cuda       | triton         | reference                                              |
| cpu        | cpp            | reference; triton only under ``TRITON_INTERPRET=1``    |
| meta       | meta           | reference (the fake kernels: shapes only, no values)   |

Except for ``reference`` and ``triton`` on CPU tensors (the interpreter, for tests), every wrapper validates its
arguments and then calls ``torch.ops.mplus.<op>``, which the dispatcher sends by device key: CPU → the C++ kernel,
CUDA → the Triton kernel, Meta/Fake → the fake kernel (DESIGN.md §2.5). :func:`through_dispatcher` says which.

``MPLUS_BACKEND`` or a per-call ``backend=`` argument overrides ``auto``. A backend that is asked for and absent
raises :class:`BackendUnavailableError` saying what is missing; nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator

import torch

from . import _config

try:  # the compiled extension registers the C++ kernels of every mplus op on import
    from . import _C  # noqa: F401

    _C_IMPORT_ERROR: str | None = None
except ImportError as exc:  # kept, and reported when the cpp backend is asked for
    _C_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


class BackendUnavailableError(RuntimeError):
    """A backend was requested (explicitly or by ``auto``) that cannot run here."""


# --- ISA level of the C++ CPU kernels (csrc/cpu/isa.h) ------------------------------------------------------------


def _require_cpp(what: str) -> None:
    if _C_IMPORT_ERROR is not None:
        raise BackendUnavailableError(f"{what}: the C++ extension mplus_kernels._C did not load ({_C_IMPORT_ERROR})")


def cpu_isa_levels() -> list[tuple[str, bool]]:
    """Every ISA level the C++ CPU kernels are built for, lowest first, with whether this CPU can run it."""
    _require_cpp("cpu_isa_levels")
    return [(name, bool(ok)) for name, ok in _C.cpu_isa_levels()]


def cpu_isa_missing(level: str) -> str | None:
    """Why this CPU (or its OS, or this torch build) cannot run ``level``: the missing CPU feature, OS permission or
    library; None when it can. ``ValueError`` for an unknown level."""
    _require_cpp("cpu_isa_missing")
    if level not in _config.CPU_ISA_LEVELS:
        raise ValueError(f"cpu_isa_missing: level {level!r} is not one of {', '.join(_config.CPU_ISA_LEVELS)}")
    return _C.cpu_isa_missing(level) or None


def supported_cpu_isas() -> list[str]:
    """The levels this CPU runs, lowest first (``baseline`` always)."""
    return [name for name, ok in cpu_isa_levels() if ok]


def cpu_isa() -> str:
    """The ISA level the C++ CPU kernels use now."""
    _require_cpp("cpu_isa")
    return _C.cpu_isa()


def set_cpu_isa(level: str) -> None:
    """Make every C++ CPU kernel use ``level`` (``auto``: the best this CPU runs) from now on, in every thread.
    Raises ``ValueError`` for an unknown level or one this CPU lacks, and changes nothing then."""
    _require_cpp("set_cpu_isa")
    if not isinstance(level, str):
        raise TypeError(f"set_cpu_isa: level must be a str, got {type(level).__name__}")
    name = level.strip().lower()
    if name == "auto":
        name = supported_cpu_isas()[-1]
    elif name not in _config.CPU_ISA_LEVELS:
        raise ValueError(f"set_cpu_isa: level {level!r} is not one of auto, {', '.join(_config.CPU_ISA_LEVELS)}")
    _C.set_cpu_isa(name)


@contextlib.contextmanager
def use_cpu_isa(level: str) -> Iterator[None]:
    """``with use_cpu_isa("avx2"):`` runs the C++ CPU kernels at that level inside the block, then restores the
    previous one. The level is process-wide: do not switch it while other threads run mplus ops."""
    previous = cpu_isa()
    set_cpu_isa(level)
    try:
        yield
    finally:
        _C.set_cpu_isa(previous)


if _C_IMPORT_ERROR is None and _config.cpu_isa() != "auto":
    try:
        set_cpu_isa(_config.cpu_isa())
    except ValueError as exc:
        raise ValueError(
            f"MPLUS_CPU_ISA={_config.cpu_isa()}: {exc}; this CPU runs {', '.join(supported_cpu_isas())}"
        ) from None


def cpp_available() -> bool:
    return _C_IMPORT_ERROR is None


def cpp_import_error() -> str | None:
    return _C_IMPORT_ERROR


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    if not triton_installed():
        return "the `triton` package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _config.triton_interpret():
            return None
        return "Triton kernels run on CPU tensors only under the interpreter (set TRITON_INTERPRET=1 before import)"
    return f"Triton kernels do not run on device type {device.type!r}"


def resolve(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that will run ``op`` for tensors on ``device``.

    ``backend`` (a per-call override) wins over ``MPLUS_BACKEND``; ``auto`` maps cuda→triton and cpu→cpp.
    """
    requested = (backend or _config.backend_override()).lower()
    if requested not in _config.BACKENDS:
        raise ValueError(f"{op}: backend={requested!r} is not one of {', '.join(_config.BACKENDS)}")
    if requested == "auto":
        if device.type == "cuda":
            requested = "triton"
        elif device.type == "cpu":
            requested = "cpp"
        elif device.type == "meta":
            if not cpp_available():  # the fake kernels hang off the schemas, which the extension declares
                raise BackendUnavailableError(
                    f"{op}: tensors on meta reach the fake kernel through torch.ops.mplus, whose schemas come from "
                    f"the C++ extension mplus_kernels._C, which did not load ({_C_IMPORT_ERROR})"
                )
            return "meta"
        else:
            raise BackendUnavailableError(f"{op}: no backend for tensors on device type {device.type!r}")
    if requested == "cpp":
        if device.type != "cpu":
            raise BackendUnavailableError(
                f"{op}: the cpp backend has CPU kernels only; tensors are on {device}. Use backend='triton' or 'auto'."
            )
        if not cpp_available():
            raise BackendUnavailableError(
                f"{op}: the C++ extension mplus_kernels._C is not built or failed to load ({_C_IMPORT_ERROR}). "
                "Build it with `pip install -e . --no-build-isolation`, or pass backend='reference'."
            )
    elif requested == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: the triton backend cannot run: {reason}")
    return requested


def through_dispatcher(which: str, device: torch.device) -> bool:
    """Whether a call resolved to ``which`` goes through ``torch.ops.mplus`` (else: the reference, or the Triton
    launcher called directly: on CPU tensors under the interpreter, or on CUDA when the extension that declares the
    schemas is not built)."""
    if which == "reference":
        return False
    return not (which == "triton" and (device.type == "cpu" or not cpp_available()))


def import_triton_impl(module: str):
    """Import a ``triton_impl`` module lazily, so ``import mplus_kernels`` never needs triton."""
    return importlib.import_module(f"mplus_kernels.{module}.triton_impl")
