"""Build mind-kernels: the C++ routing kernels always, the CUDA ones where torch has CUDA and nvcc is found.

Install after torch, without build isolation (the extension compiles against the torch you run)::

    pip install --no-build-isolation .        # or -e . for development

Environment:
    MIND_KERNELS_SKIP_CUDA=1        build the CPU kernels only, even where CUDA is available
    MIND_KERNELS_CUDA_ARCHS="8.0;9.0"   compute capabilities for the CUDA kernels (default 8.0 and 9.0)
    MAX_JOBS=N                      parallel compile jobs (honoured by torch's BuildExtension)
    CUDA_HOME                       the CUDA toolkit (default: torch's lookup, then /usr/local/cuda)
"""

import glob
import json
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    """A toolkit root with both nvcc and libcudart: $CUDA_HOME, torch's guess, then /usr/local/cuda.

    torch's guess follows `which nvcc`, which can be a wrapper script (e.g. /usr/local/bin/nvcc), giving a
    root without lib64/ and a link error; so each candidate must hold the runtime library too.
    """
    for home in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if (
            home
            and os.path.exists(os.path.join(home, "bin", "nvcc"))
            and glob.glob(os.path.join(home, "lib*", "libcudart.so*"))
        ):
            return home
    return None


def _want_cuda():
    """(build CUDA?, why not)."""
    if os.environ.get("MIND_KERNELS_SKIP_CUDA", "0") == "1":
        return False, "MIND_KERNELS_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, "the installed torch has no CUDA"
    if _cuda_home() is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if not glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")):
        return False, "no CUDA sources in csrc/cuda/"
    return True, None


def extensions():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fdiagnostics-color=always"]
    build_cuda, why_not = _want_cuda()
    info = {
        "torch": torch.__version__,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "cuda": torch.version.cuda if build_cuda else None,
        "built_cuda": build_cuda,
        "cuda_skipped_because": why_not,
    }
    if build_cuda:
        os.environ["CUDA_HOME"] = _cuda_home()
        cpp_extension.CUDA_HOME = _cuda_home()
        archs = os.environ.get("MIND_KERNELS_CUDA_ARCHS", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        info["cuda_archs"] = archs
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        ext = cpp_extension.CUDAExtension(
            "mind_kernels._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "mind_kernels._C",
            cpp_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    # Recorded beside the binary; mind_kernels.ops warns at import when the running versions differ.
    with open(os.path.join(HERE, "mind_kernels", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return [ext]


setup(
    name="mind-kernels",
    version="0.1.0",
    description="Fused MIND multi-interest (B2I dynamic routing) kernels for PyTorch, and the MIND recommender",
    packages=find_packages(include=["mind_kernels", "mind_kernels.*", "mind", "mind.*"]),
    package_data={"mind_kernels": ["_build_info.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "mind": ["faiss-cpu", "matplotlib", "pandas"],
        "test": ["pytest", "hypothesis", "expecttest"],
        "bench": ["pytest-benchmark", "matplotlib", "torch-rechub==0.9.0"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
