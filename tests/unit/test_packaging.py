"""models/, kernels/, apps/ install inside the streamrt namespace, editable or not."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = (
    "import streamrt.models, streamrt.kernels, streamrt.apps.cli, streamrt.cache.policies, sys; "
    "import importlib.util as u; "
    "print(streamrt.kernels.__file__); "
    "sys.exit(0 if u.find_spec('models') is None and u.find_spec('kernels') is None else 3)"
)


def test_current_install_imports_namespaced_packages():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr


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
    assert not (target / "kernels").exists() and not (target / "models").exists()
    proc = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout
