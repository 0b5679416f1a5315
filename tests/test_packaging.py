"""Packaging: the extras name what the code imports, requirements/dev.txt is the extras flattened, and
setup.py stops with the documented message where torch cannot be imported (a plain ``pip install .``).

The install paths themselves (wheel in a fresh venv, the [mind] extra, plain ``pip install .``) are
checked end to end by ``.ci/check_install.sh``; these are the fast checks of the same promises.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest
import torch

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]

#: import name -> distribution name, for every third-party module the packages import. A new import
#: fails test_every_import_is_known until it is added here and to an extra.
DISTRIBUTION = {
    "torch": "torch",
    "numpy": "numpy",
    "pandas": "pandas",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "faiss": "faiss-cpu",
    "pyarrow": "pyarrow",  # mind.data.parquet, imported when a Parquet file is read
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnxscript": "onnxscript",
    "torch_rechub": "torch-rechub",
    "triton": "triton",  # ships with torch's CUDA builds; mind_kernels imports it only where present
    "starlette": "starlette",  # mind/service/ (python -m mind serve): the [serve] extra
    "uvicorn": "uvicorn",
    "prometheus_client": "prometheus-client",
    "torchrec": "torchrec",          # mind/sharded.py (--sharded-embeddings): [scale] + torchrec --no-deps
    "fbgemm_gpu": "fbgemm-gpu-cpu",
}
FIRST_PARTY = {"mind", "mind_kernels"}


def _name(req: str) -> str:
    """'torch-rechub==0.9.0' -> 'torch-rechub' (PEP 503 normalised)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0]).lower()


def _imports(package: str, skip: str | None = None) -> dict[str, set[str]]:
    """{'module level' | 'deferred': third-party top-level modules imported anywhere under ``package``}
    (``skip``: a subfolder left out)."""
    found = {"module level": set(), "deferred": set()}
    for path in (ROOT / package).rglob("*.py"):
        if skip is not None and (ROOT / package / skip) in path.parents:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in FIRST_PARTY or top == "__future__":
                    continue
                found["module level" if id(node) in top_level else "deferred"].add(top)
    return found


MIND = _imports("mind", skip="service")
SERVICE = _imports("mind/service")  # imported only by `python -m mind serve`
KERNELS = _imports("mind_kernels")


def test_every_import_is_known():
    unknown = (set().union(*MIND.values()) | set().union(*SERVICE.values()) | set().union(*KERNELS.values())) \
        - set(DISTRIBUTION)
    assert not unknown, f"imports with no distribution in tests/test_packaging.py nor an extra: {unknown}"


def test_mind_extra_covers_what_the_cli_imports():
    # Module-level imports of mind/ run on `python -m mind <verb>`: torch (a dependency) or [mind].
    have = {"torch"} | {_name(r) for r in EXTRAS["mind"]}
    missing = {DISTRIBUTION[m] for m in MIND["module level"]} - have
    assert not missing, f"mind imports {missing} at module level but [mind] does not list them"
    # Deferred imports serve one verb each (faiss: the ANN index; onnxruntime: --to onnx; torchrec:
    # --sharded-embeddings): [mind], [onnx] or [scale] (+ torchrec, installed --no-deps: requirements/scale.txt).
    have |= {_name(r) for r in EXTRAS["onnx"] + EXTRAS["scale"]} | {"torchrec"}
    missing = {DISTRIBUTION[m] for m in MIND["deferred"]} - have
    assert not missing, f"mind imports {missing} in functions but neither [mind], [onnx] nor [scale] lists them"


def test_scale_requirements_are_the_scale_extra_and_torchrec():
    lines = (ROOT / "requirements" / "scale.txt").read_text().splitlines()
    listed = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert listed == set(EXTRAS["scale"]) | {"torchrec==1.9.2"}, sorted(listed ^ (set(EXTRAS["scale"]) | {"torchrec==1.9.2"}))


def test_serve_extra_covers_what_the_service_imports():
    # mind/service/ runs only under `python -m mind serve`: torch, [mind] and [serve] (onnxruntime for onnx exports).
    have = {"torch"} | {_name(r) for r in EXTRAS["mind"] + EXTRAS["onnx"] + EXTRAS["serve"]}
    missing = {DISTRIBUTION[m] for m in set().union(*SERVICE.values())} - have
    assert not missing, f"mind/service imports {missing} but neither [mind] nor [serve] lists them"
    assert set(SERVICE["module level"]) >= {"starlette", "prometheus_client"}, SERVICE


def test_kernels_need_torch_only():
    # The kernels package installs with torch alone; anything else must be optional and guarded.
    assert KERNELS["module level"] - {"torch", "triton"} == set(), KERNELS
    assert {DISTRIBUTION[m] for m in KERNELS["deferred"]} <= {"torch", "triton", "torch-rechub"}
    assert "torch-rechub" in {_name(r) for r in EXTRAS["dev"]}


def test_dev_requirements_are_the_extras_flattened():
    lines = (ROOT / "requirements" / "dev.txt").read_text().splitlines()
    listed = {l.split("#")[0].strip() for l in lines} - {""}
    dev = [r for r in EXTRAS["dev"] if _name(r) != "mind-kernels"]
    assert "mind-kernels[mind,onnx,serve]" in EXTRAS["dev"], "[dev] must pull in [mind], [onnx] and [serve]"
    extras = EXTRAS["mind"] + EXTRAS["onnx"] + EXTRAS["serve"] + dev
    assert listed == set(extras), (
        f"only in requirements/dev.txt: {sorted(listed - set(extras))}; "
        f"only in pyproject's extras: {sorted(set(extras) - listed)}")


def test_torch_is_not_a_build_requirement():
    # The isolated build environment would get the newest torch, not the one that runs the kernels.
    assert not any(_name(r) == "torch" for r in PYPROJECT["build-system"]["requires"])
    assert "dependencies" in PYPROJECT["project"]["dynamic"]  # setup.py pins the torch built against


def test_setup_py_without_torch_says_what_to_type():
    # As under pip's build isolation: `import torch` fails in the process that runs setup.py.
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error: mind-kernels cannot import torch in this build environment" in proc.stderr
    assert 'pip install --no-build-isolation ".[mind]"' in proc.stderr
    assert "python -m build: add --no-isolation" in proc.stderr


def test_metadata_pins_the_torch_it_builds_against(tmp_path):
    # setup.py egg_info computes the metadata (no compile): torch==<major>.<minor>.* of the running torch,
    # and numpy (torch warns at import without it).
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    requires = (tmp_path / "mind_kernels.egg-info" / "requires.txt").read_text().split("\n[")[0].split()
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    assert requires == [f"torch=={major}.{minor}.*", "numpy"]


@pytest.mark.parametrize("spec,version,ok", [("torch==2.13.*", "2.13.0+cpu", True),
                                             ("torch==2.14.*", "2.14.1+cu130", True),
                                             ("torch==2.13.*", "2.14.1", False)])
def test_pin_matches_either_build_of_the_release(spec, version, ok):
    # The pin must accept the CPU and CUDA builds of the release it names (local labels ignored), no other.
    from pip._vendor.packaging.requirements import Requirement
    assert Requirement(spec).specifier.contains(version) is ok
