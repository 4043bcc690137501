"""Build of mplus and its compiled extension ``mplus_kernels._C``.

C++ CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp, and csrc/cpu/isa/*.cpp: each kernel family once per ISA level) are
always compiled, without ``-march``: the extension runs on any x86-64 CPU and picks its kernels' ISA level at load
(csrc/cpu/isa.h; ``MPLUS_CPU_ISA`` overrides it at run time). There are no CUDA sources: the GPU kernels are Triton
(``mplus_kernels/<op>/triton_impl.py``), so the build needs no CUDA toolkit. A compiler error fails the install: there
is no pure-Python fallback.

Install (torch first, then): ``pip install -e . --no-build-isolation``.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp") + rel("csrc/cpu/isa/*.cpp")
    if os.environ.get("MPLUS_CPU_ARCH"):
        raise RuntimeError(
            "MPLUS_CPU_ARCH is gone: the CPU kernels are built for every ISA level and picked at run time "
            "(MPLUS_CPU_ISA=baseline|avx2|avx512|avx512_bf16|amx chooses one); unset MPLUS_CPU_ARCH"
        )
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
    return CppExtension("mplus_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    name="mplus",
    version="0.1.0",
    description="Fused kernels and a thin model for the M+ / MemoryLLM latent-memory LLM",
    packages=find_packages(include=["mplus", "mplus.*", "mplus_kernels", "mplus_kernels.*"]),
    python_requires=">=3.10",
    # gguf + accelerate: transformers reads GGUF checkpoints (from_base(..., gguf_file=...)) through them
    install_requires=[
        "torch>=2.4", "numpy", "safetensors", "transformers", "huggingface_hub", "tqdm", "gguf", "accelerate",
    ],  # fmt: skip
    # mplus.serve's Ray Serve application (pip install -e .[serve]); the store and the server need no Ray
    extras_require={"serve": ["ray[serve]>=2.40"]},
    entry_points={"console_scripts": ["mplus = mplus.cli:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
