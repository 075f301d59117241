"""Asset checks: the SAE's weights are finite, and its held-out FVU and dead fraction stay within bounds.

Bounds default to the targets of the embedded demo and can be changed per run in the checks' config.
"""

import json

import dagster as dg
from pydantic import Field

from .assets.sae import EVALUATION_FILE, sae_weights
from .artifacts import input_folder
from .resources import Storage

FVU_BOUND = 0.2
DEAD_FRACTION_BOUND = 0.10


class FvuBound(dg.Config):
    max_fvu: float = Field(default=FVU_BOUND,
                           description="Largest acceptable fraction of variance unexplained on the "
                                       f"validation tokens. Default: {FVU_BOUND}.")


class DeadFractionBound(dg.Config):
    max_dead_fraction: float = Field(default=DEAD_FRACTION_BOUND,
                                     description="Largest acceptable share of latents that never fire on "
                                                 f"the validation tokens. Default: {DEAD_FRACTION_BOUND}.")


def _evaluation(context, storage: Storage) -> dict:
    """The held-out figures of the latest `sae_weights` (written into its folder with the weights)."""
    return json.loads((input_folder(context, storage, "sae_weights")[1] / EVALUATION_FILE).read_text())


@dg.asset_check(asset=sae_weights, blocking=True, description="Every weight and bias of the SAE is finite.")
def sae_weights_finite(context: dg.AssetCheckExecutionContext, storage: Storage) -> dg.AssetCheckResult:
    import torch
    from safetensors.torch import load_file

    path = input_folder(context, storage, "sae_weights")[1] / "sae.safetensors"
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in load_file(str(path)).items()}
    bad = {name: n for name, n in bad.items() if n}
    return dg.AssetCheckResult(passed=not bad, metadata={"non_finite": json.dumps(bad) if bad else "none",
                                                         "path": dg.MetadataValue.path(str(path))})


@dg.asset_check(asset=sae_weights, description="Held-out FVU (validation cache) is at most the bound.")
def sae_fvu_within_bound(context: dg.AssetCheckExecutionContext, config: FvuBound,
                         storage: Storage) -> dg.AssetCheckResult:
    fvu = float(_evaluation(context, storage)["fvu"])
    return dg.AssetCheckResult(passed=fvu <= config.max_fvu, metadata={"fvu": fvu, "bound": config.max_fvu})


@dg.asset_check(asset=sae_weights,
                description="Share of latents that never fire on held-out tokens is at most the bound.")
def sae_dead_fraction_within_bound(context: dg.AssetCheckExecutionContext, config: DeadFractionBound,
                                   storage: Storage) -> dg.AssetCheckResult:
    dead = float(_evaluation(context, storage)["dead_fraction"])
    return dg.AssetCheckResult(passed=dead <= config.max_dead_fraction,
                               metadata={"dead_fraction": dead, "bound": config.max_dead_fraction})


sae_checks = [sae_weights_finite, sae_fvu_within_bound, sae_dead_fraction_within_bound]
