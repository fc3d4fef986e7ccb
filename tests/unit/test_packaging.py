"""models/, kernels/, apps/ install inside the streamrt namespace, editable or not; the
repository's kernels/ never shadows the PyPI package `kernels` that transformers imports;
the embedded models are found from any directory."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = (
    "import streamrt.models, streamrt.kernels, streamrt.apps.cli, streamrt.cache.policies, sys; "
    "import importlib.util as u; "
    "print(streamrt.kernels.__file__); "
    "from streamrt.embedded import GEN_MODEL, VQA_MODEL, resolve_model; "
    "print(resolve_model(GEN_MODEL)); print(resolve_model(VQA_MODEL)); "
    "from streamrt.config import load_config; "
    "assert load_config('configs/rolling-forcing.yaml').gen.sampler == 'rolling'; "
    "sys.exit(0 if u.find_spec('models') is None and u.find_spec('apps') is None else 3)"
)


def _check(cwd: Path, env: dict | None = None) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=str(cwd), env=env
    )
    assert proc.returncode == 0, proc.stderr
    kernels_file, gen, vqa = proc.stdout.split()
    assert (Path(gen) / "streamrt.json").is_file(), gen
    assert (Path(vqa) / "config.json").is_file(), vqa
    return [kernels_file, gen, vqa]


def test_current_install_imports_namespaced_packages(tmp_path):
    kernels_file, gen, _ = _check(tmp_path)
    assert Path(kernels_file) == ROOT / "kernels" / "__init__.py"
    assert Path(gen) == ROOT / "assets" / "tiny-world"


# What the repository root first on sys.path does: `python -m pytest`, `python -m
# streamrt.apps.cli` and `torchrun -m ...` from a checkout all put it there.
FROM_ROOT = """
import importlib.util, sys
from pathlib import Path
assert sys.path[0] in ("", ".", str(Path.cwd())), sys.path[:2]
pypi = importlib.util.find_spec("kernels") is not None
try:
    import kernels
except ModuleNotFoundError:
    assert not pypi or Path(importlib.util.find_spec("kernels").origin).parent == Path.cwd() / "kernels"
    print("absent")
else:
    assert Path(kernels.__file__).parent != Path.cwd() / "kernels", kernels.__file__
    print("pypi", kernels.__file__)
import streamrt.kernels
assert Path(streamrt.kernels.__file__).parent == Path.cwd() / "kernels"
from streamrt.kernels import attend  # the repository's folder, under its own name
import transformers.integrations.hub_kernels  # imports the PyPI kernels when installed
from transformers import AutoModelForCausalLM
print("ok")
"""


def test_repository_root_first_on_sys_path_does_not_shadow_pypi_kernels():
    proc = subprocess.run(
        [sys.executable, "-c", FROM_ROOT], capture_output=True, text=True, cwd=str(ROOT)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "ok"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "show", "kernels"], capture_output=True, text=True
    )
    if installed.returncode == 0:  # transformers >= 5.25 pulls it in: it must be the one
        assert proc.stdout.startswith("pypi"), proc.stdout


@pytest.mark.slow
def test_regular_install_imports_namespaced_packages(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "streamrt" / "kernels" / "__init__.py").exists()
    assert (target / "streamrt" / "runtime" / "runtime.py").exists()  # `streamrt serve` needs it
    assert (target / "streamrt" / "apps" / "serve.py").exists()
    assert not (target / "kernels").exists() and not (target / "models").exists()
    assert (target / "streamrt" / "assets" / "tiny-world" / "streamrt.json").is_file()
    assert (target / "streamrt" / "configs" / "rolling-forcing.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kernels_file, gen, vqa = _check(
        elsewhere, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    )
    assert kernels_file.startswith(str(target))
    assert gen.startswith(str(target)) and vqa.startswith(str(target))
