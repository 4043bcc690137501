"""``python -m mplus_kernels.info``: versions, which backends are built and usable here, and the CPU features."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil

import torch

from . import _backend, _config


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    caps = torch.backends.cpu.get_cpu_capability()
    features = {
        "avx512": torch.cpu._is_avx512_supported(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx_tile": torch.cpu._is_amx_tile_supported(),
        "vnni": torch.cpu._is_vnni_supported(),
    }
    cuda = torch.cuda.is_available()
    triton_cpu = _backend.triton_unavailable_reason(torch.device("cpu"))
    triton_cuda = _backend.triton_unavailable_reason(torch.device("cuda")) if cuda else "no CUDA device"
    lines = [
        f"mplus {_version('mplus')}  python {platform.python_version()}  {platform.machine()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})  triton {_version('triton')}  "
        f"transformers {_version('transformers')}",
        f"threads {torch.get_num_threads()}  ATen CPU capability {caps}  "
        + "  ".join(f"{k}={'yes' if v else 'no'}" for k, v in features.items()),
        f"nvcc: {shutil.which('nvcc') or 'not found'}",
        "backends:",
        "  cpp (CPU kernels, mplus_kernels._C): "
        + ("built" if _backend.cpp_available() else f"NOT AVAILABLE: {_backend.cpp_import_error()}"),
        "  cpp ISA level: "
        + (
            f"{_backend.cpu_isa()} (MPLUS_CPU_ISA={_config.cpu_isa()}; built: "
            + ", ".join(
                name if ok else f"{name} [not run here: {_backend.cpu_isa_missing(name)}]"
                for name, ok in _backend.cpu_isa_levels()
            )
            + ")"
            if _backend.cpp_available()
            else "-"
        ),
        f"  triton on cuda: {'available' if triton_cuda is None else triton_cuda}",
        f"  triton on cpu (interpreter): {'available' if triton_cpu is None else triton_cpu}",
        "  reference: available",
        f"MPLUS_BACKEND={_config.backend_override()}  TRITON_INTERPRET={'1' if _config.triton_interpret() else '0'}",
    ]
    if _backend.cpp_available():
        ops = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mplus::"))
        lines.append(f"ops under torch.ops.mplus: {', '.join(ops)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
