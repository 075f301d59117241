"""Asset checks: the SAE's weights are finite, and its held-out FVU and dead fraction stay within bounds.

Bounds default to the targets of the embedded demo and can be changed per run in the checks' config.
"""

import json

import dagster as dg
from pydantic import Field

from .assets.sae import EVALUATION_FILE, sae_weights
from .resources import Storage

FVU_BOUND = 0.2
DEAD_FRACTION_BOUND = 0.10


class FvuBound(dg.Config):
    max_fvu: float = Field(default=FVU_BOUND,
                           description="Largest acceptable held-out fraction of variance unexplained.")


class DeadFractionBound(dg.Config):
    max_dead_fraction: float = Field(default=DEAD_FRACTION_BOUND,
                                     description="Largest acceptable share of latents that never fire on "
                                                 "held-out tokens.")


def _evaluation(storage: Storage) -> dict:
    """The held-out figures that `sae_weights` wrote, if they belong to the weights now in place."""
    folder = storage.path("sae")
    evaluation = json.loads((folder / EVALUATION_FILE).read_text())
    if evaluation["weights_sha256"] != json.loads((folder / "sae.json").read_text())["weights_sha256"]:
        raise ValueError(f"{folder / EVALUATION_FILE} belongs to other weights than {folder / 'sae.safetensors'}")
    return evaluation


@dg.asset_check(asset=sae_weights, blocking=True, description="Every weight and bias of the SAE is finite.")
def sae_weights_finite(storage: Storage) -> dg.AssetCheckResult:
    import torch
    from safetensors.torch import load_file

    path = storage.path("sae", "sae.safetensors")
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in load_file(str(path)).items()}
    bad = {name: n for name, n in bad.items() if n}
    return dg.AssetCheckResult(passed=not bad, metadata={"non_finite": json.dumps(bad) if bad else "none",
                                                         "path": dg.MetadataValue.path(str(path))})


@dg.asset_check(asset=sae_weights, description="Held-out FVU (validation cache) is at most the bound.")
def sae_fvu_within_bound(config: FvuBound, storage: Storage) -> dg.AssetCheckResult:
    fvu = float(_evaluation(storage)["fvu"])
    return dg.AssetCheckResult(passed=fvu <= config.max_fvu, metadata={"fvu": fvu, "bound": config.max_fvu})


@dg.asset_check(asset=sae_weights,
                description="Share of latents that never fire on held-out tokens is at most the bound.")
def sae_dead_fraction_within_bound(config: DeadFractionBound, storage: Storage) -> dg.AssetCheckResult:
    dead = float(_evaluation(storage)["dead_fraction"])
    return dg.AssetCheckResult(passed=dead <= config.max_dead_fraction,
                               metadata={"dead_fraction": dead, "bound": config.max_dead_fraction})


sae_checks = [sae_weights_finite, sae_fvu_within_bound, sae_dead_fraction_within_bound]
