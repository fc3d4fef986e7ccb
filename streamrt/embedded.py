"""Where the embedded tiny models live, from any working directory and any install.

The models ship in the repository's `assets/` folder, which installs as the package data
`streamrt/assets/` (pyproject.toml), so a checkout, an editable install and a regular
`pip install .` all find them. Paths a user gives are taken as given when they exist.
"""

from __future__ import annotations

from pathlib import Path

GEN_MODEL = "assets/tiny-world"
"""The embedded text-to-video generator (`streamrt train gen` builds it)."""
VQA_MODEL = "assets/tiny-vqa"
"""The embedded Video-LLM (`streamrt train vqa` builds it)."""

_PACKAGE = Path(__file__).resolve().parent
ASSET_DIRS = (_PACKAGE.parent / "assets", _PACKAGE / "assets")
"""A checkout's (and an editable install's) `assets/`, then a regular install's."""


def resolve_model(path: str | Path) -> Path:
    """`path` itself if it exists or is absolute; else, for a path under `assets/` (the
    embedded models' names, e.g. `assets/tiny-world`), the shipped copy; else `path`
    unchanged, so the caller's own message names what the user typed."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    parts = given.parts
    if parts and parts[0] == "assets" and len(parts) > 1:
        for root in ASSET_DIRS:
            shipped = root.joinpath(*parts[1:])
            if shipped.exists():
                return shipped
    return given
