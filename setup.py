"""Build mind-kernels: the C++ routing kernels always, the CUDA ones where torch has CUDA and nvcc is found.

Metadata and extras are in pyproject.toml. Install after torch, without build isolation (the extension
compiles against the torch you run; README "Install" says why a plain ``pip install .`` stops)::

    pip install --no-build-isolation ".[mind]"   # or "." (kernels only), or -e . for development
    python -m build --no-isolation               # sdist + a wheel for this torch (dist/)

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

from setuptools import setup

#: Printed (and the build stopped, exit status 1) when torch cannot be imported here: under pip's default
#: build isolation, or before torch is installed. tests/test_packaging.py checks this text.
NO_TORCH_MESSAGE = """
error: mind-kernels cannot import torch in this build environment ({exc}).

Its C++ (and CUDA) kernels are compiled against the torch that will run them, so torch must be
installed first and the build must see it. pip builds in an isolated environment by default, which
hides the torch you installed; an isolated build would fetch the newest torch from PyPI (several GB)
and compile kernels for a torch other than yours. Type:

    pip install torch                              # skip if torch is already installed
    pip install --no-build-isolation ".[mind]"     # "." for the kernels only, "-e ." to develop

(python -m build: add --no-isolation.)
"""

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as _exc:  # ModuleNotFoundError, or a torch that is installed but broken
    sys.exit(NO_TORCH_MESSAGE.format(exc=_exc))

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


def _build_plan():
    """(extension, build info): what to compile, and the versions to record beside the binary."""
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
    return ext, info


EXTENSION, BUILD_INFO = _build_plan()


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, which also writes ``mind_kernels/_build_info.json`` beside the binary.

    Written here, not at import, so that reading metadata or making an sdist leaves the source tree alone;
    next to ``_C*.so`` wherever it goes (the source tree for -e, the wheel's build folder otherwise).
    mind_kernels.ops warns at import when the running versions differ from these.
    """

    def run(self):
        print(
            "mind-kernels: building the C++ kernels"
            + (f" and the CUDA kernels for compute capabilities {BUILD_INFO['cuda_archs']}"
               if BUILD_INFO["built_cuda"] else f" only (no CUDA kernels: {BUILD_INFO['cuda_skipped_because']})")
            + f", against torch {BUILD_INFO['torch']}",
            flush=True,
        )
        super().run()
        package_dir = os.path.dirname(self.get_ext_fullpath(EXTENSION.name))
        os.makedirs(package_dir, exist_ok=True)
        with open(os.path.join(package_dir, "_build_info.json"), "w") as f:
            json.dump(BUILD_INFO, f, indent=2)


def _torch_requirement():
    """torch==<major>.<minor>.* of the torch compiled against: its C++ ABI is what the binary links to.

    Always satisfied by the torch installed for a source build (nothing more is installed); for a wheel it
    makes pip refuse, or swap in, a torch the binary was not built for instead of a failed load at import.
    A local label such as +cpu or +cu130 is ignored by pip when matching, so either build of that release
    satisfies it.
    """
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


setup(
    # numpy: torch warns at every import without it ("Failed to initialize NumPy"), seen in a venv with the
    # wheel alone; the kernels themselves need torch only.
    install_requires=[_torch_requirement(), "numpy"],
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
