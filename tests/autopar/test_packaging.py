"""One distribution, `autopar`, with passes/, runtime/ and models/ mapped inside it."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _source_packages() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {}
    for top, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found[".".join([top, *rel.parts])] = init.parent
    return found


def test_every_source_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(_source_packages()) == sorted(config["packages"])


def test_non_editable_install_holds_nothing_generic(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    top_level = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert top_level - {"bin"} == {"autopar"}
    for sub in ("passes/analyze.py", "runtime/__init__.py", "models/gpt.py", "cost/comm.py", "cli.py"):
        assert (target / "autopar" / sub).is_file(), sub
