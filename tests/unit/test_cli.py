"""The `streamrt` entry point."""

import json
import subprocess
import sys

from streamrt.apps.cli import main


def test_generate_without_default_model_says_so(tmp_path, capsys):
    rc = main(
        [
            "generate",
            "--prompt",
            "a red circle",
            "--model",
            str(tmp_path),
            "-o",
            str(tmp_path / "o.mp4"),
        ]
    )
    assert rc == 2
    assert "no default model yet" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_config_prints_effective_values(capsys):
    assert main(["config"]) == 0
    assert "device_bytes: 1073741824" in capsys.readouterr().out


def test_bench_cache_writes_json(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamrt.apps.cli",
            "bench",
            "cache",
            "--ops",
            "2000",
            "--blocks",
            "4",
            "--block-mib",
            "0.25",
            "--repeats",
            "1",
            "--disk-dir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {r["measure"] for r in data["allocation"]} == {
        "block pool take+release",
        "manager append+free",
    }
    assert all(r["bit-exact"] for r in data["moves"]) and len(data["moves"]) == 4
    assert all(r["GB/s"] > 0 and r["ratio"] > 0 for r in data["moves"])
    assert "block allocation" in proc.stdout
