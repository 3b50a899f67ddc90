"""The install: CPU-friendly by default, the `assay` entry point, package data, one-way imports."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
CUDA_NAMES = ("torch", "nvidia-", "triton", "vllm", "faiss-gpu", "cupy", "jax")


def test_core_dependencies_name_no_cuda_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        assert not dep.lower().startswith(CUDA_NAMES), (
            f"{dep} would pull CUDA wheels into the default install"
        )
    extras = project["optional-dependencies"]
    assert any(d.startswith("vllm") for d in extras["gpu"])
    # kNN search works out of the box on the CPU; faiss-gpu installs the same `faiss` module, so no
    # extra may pull it in beside faiss-cpu (GPU users swap it in by hand, as pyproject says)
    assert any(d.startswith("faiss-cpu") for d in project["dependencies"])
    assert not any(d.startswith("faiss-gpu") for deps in extras.values() for d in deps)
    assert "dev" in extras


@pytest.mark.slow
def test_default_install_resolves_without_cuda_wheels(tmp_path):
    """Ask pip what a fresh default install would take (needs the package index)."""
    report = tmp_path / "report.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode != 0 and "Could not find a version" in res.stderr:
        pytest.skip("no package index reachable")
    assert res.returncode == 0, res.stderr
    names = [i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]]
    assert "ray" in names and "pyarrow" in names
    assert not [n for n in names if n.startswith(CUDA_NAMES)]


def test_assay_help_lists_every_curation_command():
    from pipelines.cli import cli

    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0
    for name in ("ingest", "validate", "dedup", "filter", "export", "stats", "eval"):
        assert name in res.output
        sub = CliRunner().invoke(cli, [name, "--help"])
        assert sub.exit_code == 0 and "Usage:" in sub.output, name


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "assay"
    res = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "assay" in res.stdout


def test_unknown_command_exits_non_zero():
    from pipelines.cli import cli

    res = CliRunner().invoke(cli, ["frobnicate"])
    assert res.exit_code == 2 and "No such command" in res.output


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("curation", {"mining", "training", "pipelines"}),
        ("training", {"mining", "pipelines"}),
        ("mining", {"pipelines"}),
    ],
)
def test_imports_point_one_way(package, forbidden):
    for path in (ROOT / package).rglob("*.py"):
        bad = _imports(path) & forbidden
        assert not bad, (
            f"{path.relative_to(ROOT)} imports {bad}: imports point pipelines -> mining -> training -> curation"
        )
