"""What the Docker image and a plain `pip install .` get: every package the code imports."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package supports 3.10

ROOT = Path(__file__).resolve().parent.parent
NOT_SHIPPED = {"tests", "mutations", "bench"}


def test_every_python_package_in_the_tree_is_listed_for_the_wheel():
    # The image installs a wheel, not the work tree: a package missing from this list (as
    # collector.cloud was) is missing there, and only the profiles that import it fail.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for init in ROOT.glob("**/__init__.py")
             if not {".venv", ".venv-ha", "build"} & set(init.parts)}
    found = {name for name in found if name.split(".")[0] not in NOT_SHIPPED}
    assert found - listed == set()
    assert {name for name in listed - found if not (ROOT / name.replace(".", "/")).is_dir()} \
        == set()
