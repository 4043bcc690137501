"""Build of mplus and its compiled extension ``mplus_kernels._C``.

C++ CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp, and csrc/cpu/isa/*.cpp: each kernel family once per ISA level) are
always compiled, without ``-march``: the extension runs on any x86-64 CPU and picks its kernels' ISA level at load
(csrc/cpu/isa.h; ``MPLUS_CPU_ISA`` overrides it at run time). CUDA sources (csrc/cuda/*.cu) are compiled only when a
CUDA toolkit and a CUDA build of torch are both present, or when ``MPLUS_BUILD_CUDA=1`` insists (then a missing
piece is an error); ``MPLUS_BUILD_CUDA=0`` turns them off. A compiler error fails the install: there is no
pure-Python fallback.

Install (torch first, then): ``pip install -e . --no-build-isolation``.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("MPLUS_BUILD_CUDA", "").strip()
    have = CUDA_HOME is not None and torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1":
        if not have:
            raise RuntimeError(
                f"MPLUS_BUILD_CUDA=1 but CUDA_HOME={CUDA_HOME!r} and torch.version.cuda={torch.version.cuda!r}: "
                "building csrc/cuda needs both a CUDA toolkit and a CUDA build of torch"
            )
        return True
    return have


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp") + rel("csrc/cpu/isa/*.cpp")
    if os.environ.get("MPLUS_CPU_ARCH"):
        raise RuntimeError(
            "MPLUS_CPU_ARCH is gone: the CPU kernels are built for every ISA level and picked at run time "
            "(MPLUS_CPU_ISA=baseline|avx2|avx512 chooses one); unset MPLUS_CPU_ARCH"
        )
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
    if _want_cuda():
        return CUDAExtension(
            "mplus_kernels._C",
            sources + rel("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": [*cxx, "-DMPLUS_WITH_CUDA"], "nvcc": ["-O3", "-DMPLUS_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("mplus_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    name="mplus",
    version="0.1.0",
    description="Fused kernels and a thin model for the M+ / MemoryLLM latent-memory LLM",
    packages=find_packages(include=["mplus", "mplus.*", "mplus_kernels", "mplus_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "transformers", "huggingface_hub", "tqdm"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
