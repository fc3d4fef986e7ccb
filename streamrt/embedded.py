"""Where the embedded tiny models and the presets live, from any directory and install.

The models ship in the repository's `assets/` folder and the presets in `configs/`; they
install as the package data `streamrt/assets/` and `streamrt/configs/` (pyproject.toml),
so a checkout, an editable install and a regular `pip install .` all find them. Paths a
user gives are taken as given when they exist.
"""

from __future__ import annotations

from pathlib import Path

GEN_MODEL = "assets/tiny-world"
"""The embedded text-to-video generator (`streamrt train gen` builds it)."""
VQA_MODEL = "assets/tiny-vqa"
"""The embedded Video-LLM (`streamrt train vqa` builds it)."""

_PACKAGE = Path(__file__).resolve().parent
SHIPPED = ("assets", "configs")
"""The repository folders that install as package data."""
ASSET_DIRS = (_PACKAGE.parent / "assets", _PACKAGE / "assets")
"""A checkout's (and an editable install's) `assets/`, then a regular install's."""


def resolve_shipped(path: str | Path) -> Path:
    """`path` itself if it exists or is absolute; else, for a path under `assets/` or
    `configs/` (e.g. `assets/tiny-world`, `configs/rolling-forcing.yaml`), the shipped
    copy; else `path` unchanged, so the caller's own message names what the user typed."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    parts = given.parts
    if len(parts) > 1 and parts[0] in SHIPPED:
        for root in (_PACKAGE.parent, _PACKAGE):  # a checkout's, then a regular install's
            shipped = root.joinpath(*parts)
            if shipped.exists():
                return shipped
    return given


resolve_model = resolve_shipped
