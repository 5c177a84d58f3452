"""The wheel (what ``deploy/Dockerfile`` installs with ``pip install .``) holds every module
and data file of the source tree: before, it lacked ``streams.agents``, ``connectors.llm``
and ``connectors.delivery``, so the image's worker could not start."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("streams", "schemas", "processors", "connectors")


def _source_files() -> set[str]:
    """The packages' files under version control (all files, outside a git checkout)."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", *PACKAGES],
            capture_output=True,
            text=True,
            check=True,
        )
        return set(listed.stdout.split())
    return {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_the_wheel_holds_every_module_and_data_file(tmp_path: Path) -> None:
    tree = tmp_path / "src"  # a copy: setuptools would reuse a build/ left in the checkout
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    build = ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    built = subprocess.run(
        [sys.executable, "-m", "pip", *build, str(tree)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("switchboard-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())

    source = _source_files()
    assert {"streams/agents/conversation.py", "connectors/llm/openai_engine.py"} <= source
    assert "schemas/avro/LLMRequest.avsc" in source
    assert "streams/data/switchboard.yaml" in source
    assert source - packed == set()  # nothing left out
    assert not any(name.startswith("tests/") for name in packed)
