"""What a changed setting re-runs: the whole graph on tiny synthetic caches, then one SAE setting changed, then
changed back (reuse read from each materialization's `reused` and `key` metadata); then pruning."""

from __future__ import annotations

import dagster as dg
import pytest

from saeseg_assets import defs
from saeseg_assets.assets.codes import tuning_codes, val_codes
from saeseg_assets.assets.latents import class_latents, latent_stats
from saeseg_assets.assets.probe import baseline_metrics, probe_checkpoint
from saeseg_assets.assets.reports import suppression_report
from saeseg_assets.assets.sae import sae_weights
from saeseg_assets.assets.summary import suppression_summary
from saeseg_assets.prune import kept_keys
from saeseg_assets.recipe import latest_key
from saeseg_assets.resources import Checkpoints, Compute, Storage
from saeseg_assets_tests.conftest import asset_metadata, record_synthetic_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAE = {"expansion": 4, "k": 8, "batch_size": 128, "train_tokens": 128 * 40, "warmup_steps": 5, "buffer_images": 16}
PROBE = {"lrs": [3e-2], "weight_decays": [1e-5], "epochs": 2, "batch_size": 64}
CLASS = "001_wall"  # the synthetic caches' labels are 0..3
UPSTREAM_OF_SAE = ("probe_checkpoint", "baseline_metrics")
SAE_AND_BELOW = ("sae_weights", "latent_stats", "val_codes", "tuning_codes", "class_latents", "suppression_report",
                 "suppression_summary")


def materialize_all(instance, storage: Storage, k: int) -> dict[str, dict]:
    """Every asset below the caches, class 001_wall, in dependency order; each asset's metadata by name."""
    resources = {"storage": storage, "compute": Compute(), "checkpoints": Checkpoints()}
    run_config = {"ops": {"sae_weights": {"config": {**SAE, "k": k}}, "probe_checkpoint": {"config": PROBE}}}
    shared = dg.materialize([sae_weights, probe_checkpoint, baseline_metrics, latent_stats, val_codes, tuning_codes],
                            instance=instance, resources=resources, run_config=run_config)
    classwise = dg.materialize([class_latents, suppression_report], instance=instance, resources=resources,
                               partition_key=CLASS)
    summary = dg.materialize([suppression_summary], instance=instance, resources=resources)
    return {**{name: asset_metadata(shared, name) for name in ("sae_weights", "probe_checkpoint", "baseline_metrics",
                                                               "latent_stats", "val_codes", "tuning_codes")},
            **{name: asset_metadata(classwise, name, CLASS) for name in ("class_latents", "suppression_report")},
            "suppression_summary": asset_metadata(summary, "suppression_summary")}


def test_changing_sae_k_reruns_the_sae_and_its_descendants_only(tmp_path):
    with dg.instance_for_test() as instance:
        storage = Storage(data_dir=str(tmp_path / "data"))
        record_synthetic_cache(instance, storage, "train_activations", n_images=32, seed=0)
        record_synthetic_cache(instance, storage, "val_activations", n_images=8, seed=1, split="validation")

        first = materialize_all(instance, storage, k=8)
        assert not any(m["reused"] for m in first.values())
        changed = materialize_all(instance, storage, k=4)
        for name in UPSTREAM_OF_SAE:
            assert changed[name]["reused"] and changed[name]["key"] == first[name]["key"], name
        for name in SAE_AND_BELOW:
            assert not changed[name]["reused"] and changed[name]["key"] != first[name]["key"], name
        assert (changed["sae_weights"]["k"], first["sae_weights"]["k"]) == (4, 8)
        back = materialize_all(instance, storage, k=8)
        for name, meta in back.items():
            assert meta["reused"] and meta["key"] == first[name]["key"], name

        # Pruning keeps what the latest materializations point to (the k = 8 outputs) and drops the k = 4 ones.
        kept = kept_keys(instance, list(defs.resolve_all_asset_specs()))
        assert kept["sae_weights"] == {first["sae_weights"]["key"]}
        removed = storage.store.prune(kept)
        assert storage.root / "sae_weights" / changed["sae_weights"]["key"] in removed
        for name in SAE_AND_BELOW:
            assert storage.store.keys(name) == [first[name]["key"]], name
        assert storage.store.keys("train_activations") == [latest_key(instance, "train_activations")]
