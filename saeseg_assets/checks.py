"""Asset checks: the SAE's weights are finite, its held-out FVU and dead fraction stay within bounds, and which
classes the suppression study evaluated (one result per class partition). Each description says what to do on failure.

Bounds default to the targets of the embedded demo and can be changed per run in the checks' config.
"""

import json
import warnings
from dataclasses import asdict

import dagster as dg

# Dagster has no public name for the materialization an evaluation is of, though the public AssetCheckEvaluation takes
# one: without it, a class's check would not count as current for its latest report. test_dagster_internals.py fails,
# naming what changed, if Dagster changes it.
from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationTargetMaterializationData
from pydantic import Field

from .assets.reports import suppression_report
from .assets.sae import sae_weights
from .partitions import class_partitions
from .recipe import latest_folder, readable
from .resources import Storage

# A partitioned check is a preview feature in Dagster 1.13; its notice would print at every definitions load.
warnings.filterwarnings("ignore", message="Specifying a partitions_def", category=dg.PreviewWarning)

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
    from .core.sae.evaluation import load_evaluation

    return asdict(load_evaluation(latest_folder(context.instance, storage, "sae_weights")))


@dg.asset_check(asset=sae_weights, blocking=True, description=(
    "Every weight and bias of the SAE is finite (no NaN or infinity); blocking: nothing downstream runs on broken "
    "weights. If it fails, training diverged or an imported file is corrupt: lower the learning rate (sae_weights "
    "config lr) or check the imported checkpoint, then materialize sae_weights again."))
def sae_weights_finite(context: dg.AssetCheckExecutionContext, storage: Storage) -> dg.AssetCheckResult:
    import torch
    from safetensors.torch import load_file

    path = latest_folder(context.instance, storage, "sae_weights") / "sae.safetensors"
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in load_file(str(path)).items()}
    bad = {name: n for name, n in bad.items() if n}
    return dg.AssetCheckResult(passed=not bad, metadata={"non_finite": json.dumps(bad) if bad else "none",
                                                         "path": dg.MetadataValue.path(str(path))},
                               description=f"non-finite values in {', '.join(bad)}" if bad else "all finite")


@dg.asset_check(asset=sae_weights, description=(
    "The SAE reconstructs held-out tokens well enough: its fraction of variance unexplained on the validation cache "
    f"(evaluation.json) is at most the bound (default {FVU_BOUND}). If it fails, the SAE underfits or overfits the "
    "training tokens: train longer or with a larger k or expansion (sae_weights config), or on more images; a looser "
    "bound can be set in this check's config for one run, but the suppression study then edits a poorer model."))
def sae_fvu_within_bound(context: dg.AssetCheckExecutionContext, config: FvuBound,
                         storage: Storage) -> dg.AssetCheckResult:
    fvu = float(_evaluation(context, storage)["fvu"])
    return dg.AssetCheckResult(passed=fvu <= config.max_fvu, metadata=readable({"fvu": fvu, "bound": config.max_fvu}),
                               description=f"held-out FVU {fvu:.4g} {'<=' if fvu <= config.max_fvu else '>'} "
                                           f"bound {config.max_fvu:g}")


@dg.asset_check(asset=sae_weights, description=(
    "Few latents are dead: the share of latents that never fire on the validation tokens is at most the bound "
    f"(default {DEAD_FRACTION_BOUND}). If it fails, train with the AuxK loss stronger or sooner (sae_weights config "
    "aux_coeff, dead_tokens), a smaller expansion, or on more tokens."))
def sae_dead_fraction_within_bound(context: dg.AssetCheckExecutionContext, config: DeadFractionBound,
                                   storage: Storage) -> dg.AssetCheckResult:
    dead = float(_evaluation(context, storage)["dead_fraction"])
    return dg.AssetCheckResult(passed=dead <= config.max_dead_fraction,
                               metadata=readable({"dead_fraction": dead, "bound": config.max_dead_fraction}),
                               description=f"dead fraction {dead:.4g} "
                                           f"{'<=' if dead <= config.max_dead_fraction else '>'} bound "
                                           f"{config.max_dead_fraction:g}")


sae_checks = [sae_weights_finite, sae_fvu_within_bound, sae_dead_fraction_within_bound]


@dg.asset_check(asset=suppression_report, partitions_def=class_partitions, description=(
    "Which classes the suppression study evaluated: passes, per class, where the report measured the suppression; "
    "classes absent from the validation images (or without latents) are marked skipped, since there is nothing to "
    "measure. In the Checks tab, Partitions lists them: filter on Passed to see the evaluated classes. Nothing to do "
    "for a skipped class unless you expected it in validation: then check the dataset's annotations."))
def suppression_report_evaluated(context: dg.AssetCheckExecutionContext) -> None:
    """One evaluation per evaluated class, pointing at that class's latest materialization; absent classes get none
    (their planned checks end as skipped). Logged per partition, since a check result knows no partition of its own
    in a run over a range of classes."""
    op_context = context.op_execution_context
    for key in op_context.partition_keys:
        records = context.instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=suppression_report.key, asset_partitions=[key]), limit=1).records
        if not records:
            continue
        metadata = records[0].asset_materialization.metadata
        if metadata.get("status") is None or metadata["status"].value != "evaluated":
            continue
        target = AssetCheckEvaluationTargetMaterializationData(storage_id=records[0].storage_id,
                                                               run_id=records[0].run_id, timestamp=records[0].timestamp)
        op_context.log_event(dg.AssetCheckEvaluation(
            asset_key=suppression_report.key, check_name="suppression_report_evaluated", passed=True, partition=key,
            target_materialization_data=target, description=metadata["result"].value,
            metadata={n: metadata[n] for n in ("status", "specific", "target_change_rate") if n in metadata}))


checks = [*sae_checks, suppression_report_evaluated]
