"""Where the shipped data (policies/, templates/, schemas/) lives, installed or in a checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_path(name: str) -> Path:
    """Folder of shipped data ``name``.

    In a wheel the folders are copied into the package (``gatekeeper/_data/<name>``);
    in a source checkout they sit at the repository's top level.
    """
    installed = _PKG / "_data" / name
    if installed.is_dir():
        return installed
    return _PKG.parent / name
