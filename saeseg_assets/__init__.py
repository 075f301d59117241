"""saeseg: SAE class-suppression experiments on ADE20K-format segmentation, as Dagster assets.

`saeseg_assets.defs` (the Dagster definitions) loads on first access, so `saeseg_assets.core` works without Dagster.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "defs":
        from .definitions import defs

        return defs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # Dagster finds `defs` by listing the module's attributes.
    return sorted([*globals(), "defs"])
