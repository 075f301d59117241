"""Tests of the class partitions: 150 keys that agree with the core class table."""

from __future__ import annotations

import pytest

from saeseg_assets.core.data.ade20k import CLASSES
from saeseg_assets.partitions import (
    class_index_for_key,
    class_partitions,
    key_for_class_index,
)


def test_one_unique_key_per_class_in_index_order():
    keys = class_partitions.get_partition_keys()
    assert len(keys) == len(set(keys)) == 150
    assert keys[0] == "001_wall" and keys[-1] == "150_flag"
    assert keys == [c.key for c in CLASSES]
    assert not any("..." in k for k in keys)  # Dagster reserves "..." for partition ranges


def test_key_and_index_helpers_round_trip():
    assert class_index_for_key("029_rug") == 29
    assert key_for_class_index(10) == "010_grass"
    for index in range(1, 151):
        assert class_index_for_key(key_for_class_index(index)) == index


def test_helpers_refuse_unknown_classes():
    with pytest.raises(KeyError):
        class_index_for_key("029_field")
    with pytest.raises(ValueError):
        key_for_class_index(0)


def test_classes_per_run_gives_the_class_assets_their_backfill_policy():
    from dagster import BackfillPolicy

    from saeseg_assets.environment import Environment
    from saeseg_assets.partitions import class_backfill_policy

    def policy(value: str) -> BackfillPolicy:
        return class_backfill_policy(Environment.read({"SAESEG_CLASSES_PER_RUN": value}).classes_per_run)

    assert policy("") == BackfillPolicy.single_run()  # the default: all classes in one run
    assert policy("30") == BackfillPolicy.multi_run(max_partitions_per_run=30)
    assert policy("150") == BackfillPolicy.single_run()  # what --partition-range needs
    for bad in ("0", "-3", "thirty"):
        with pytest.raises(ValueError, match="SAESEG_CLASSES_PER_RUN"):
            policy(bad)


def test_the_environment_is_read_once_and_checked():
    from saeseg_assets.environment import Environment

    env = Environment.read({"SAESEG_DEVICE": "cuda", "SAESEG_SENSOR_INTERVAL_S": "2", "SAESEG_DATA": "/tmp/x"})
    assert (env.device, env.sensor_interval_s, env.data_dir, env.backbone) == ("cuda", 2, "/tmp/x", "embedded")
    with pytest.raises(ValueError, match="SAESEG_DEVICE='gpu'"):
        Environment.read({"SAESEG_DEVICE": "gpu"})
    with pytest.raises(ValueError, match="SAESEG_CHECKPOINT_QUIET_S"):
        Environment.read({"SAESEG_CHECKPOINT_QUIET_S": "soon"})


def test_the_torch_heavy_assets_share_the_gpu_pool():
    import saeseg_assets

    pools = {key.to_user_string(): a.op.pool for a in saeseg_assets.defs.assets for key in a.keys}
    heavy = {"train_activations", "val_activations", "sae_weights", "probe_checkpoint", "baseline_metrics",
             "latent_stats", "val_codes", "suppression_report"}
    assert all(pools[name] == "gpu" for name in heavy)
    assert pools["class_latents"] is None and pools["suppression_summary"] is None  # they run beside the GPU work
