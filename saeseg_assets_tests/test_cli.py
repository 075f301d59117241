"""The README's `dagster asset materialize` commands as subprocesses against a fresh instance on tiny data: one class
with everything upstream, the same class alone (reusing the upstream), then a range of classes in one run; and the
instance the Makefile sets up."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from saeseg_assets.recipe import latest_keys
from saeseg_assets.staleness import PARTITION_RANGE_TAGS
from saeseg_assets_tests.conftest import write_tiny_ade20k, write_tiny_dinov2

D_MODEL = 32  # the tiny Dinov2's hidden size
DAGSTER = Path(sys.executable).with_name("dagster")
ROOT = Path(__file__).resolve().parents[1]  # the project root, where pyproject.toml configures dg


def write_checkpoints(sae_folder: Path, probe_folder: Path, seed: int = 0) -> None:
    """An SAE that reconstructs exactly (latents +q_i.x and -q_i.x for a random rotation Q, so the quality checks
    pass and each seed gives other weights) and a random probe, for the tiny backbone: importing beats training."""
    import torch

    from saeseg_assets.core.probe.model import Probe, save_probe
    from saeseg_assets.core.sae.model import Sae, SaeSpec, save_sae

    generator = torch.Generator().manual_seed(seed)
    rotation_DD = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, generator=generator))[0]
    sae = Sae(SaeSpec("relu", D_MODEL, 2 * D_MODEL))
    with torch.no_grad():
        sae.W_enc_SD.copy_(torch.cat([rotation_DD, -rotation_DD]))
        sae.W_dec_SD.copy_(torch.cat([rotation_DD, -rotation_DD]))
    save_sae(sae, sae_folder, {"source": f"test SAE, seed {seed}"})
    probe = Probe(torch.randn(151, D_MODEL, generator=generator), torch.zeros(151), {"source": "test probe"})
    save_probe(probe_folder, probe)


def tiny_env(root: Path, **settings: str) -> dict[str, str]:
    """A fresh instance and data folder under `root`, tiny dataset and backbone; `settings` adds SAESEG_* values."""
    write_tiny_ade20k(root / "ade", n_train=4, n_val=2)
    backbone = write_tiny_dinov2(root / "tiny_dinov2")
    (root / "dagster_home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAESEG_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(root / "dagster_home"), SAESEG_DATA=str(root / "data"),
               SAESEG_ADE20K_ROOT=str(root / "ade"), SAESEG_BACKBONE=str(backbone), HF_HUB_OFFLINE="1",
               # Two cores shared by the steps' processes: one thread each keeps torch from oversubscribing them.
               OMP_NUM_THREADS="1", **settings)
    return env


def run(env: dict[str, str], command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def materialize(env: dict[str, str], *args: str) -> None:
    run(env, [str(DAGSTER), "asset", "materialize", "-m", "saeseg_assets", *args], Path(env["DAGSTER_HOME"]).parent)


def project_shell(env: dict[str, str]) -> dict[str, str]:
    """The environment `source .venv/bin/activate` gives (the Makefile adds the two DAGSTER_ variables)."""
    return {**env, "VIRTUAL_ENV": sys.prefix, "DAGSTER_MODULE_NAME": "saeseg_assets"}


def materializations(instance: dg.DagsterInstance, key: str, partition: str | None = None) -> int:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None),
        limit=100).records
    return len(records)


@pytest.mark.slow
def test_readme_cli_commands(tmp_path):
    write_checkpoints(tmp_path / "ckpt" / "sae", tmp_path / "ckpt" / "probe")
    env = tiny_env(tmp_path, SAESEG_SAE_CHECKPOINT=str(tmp_path / "ckpt" / "sae"),
                   SAESEG_PROBE_CHECKPOINT=str(tmp_path / "ckpt" / "probe"))
    data = tmp_path / "data"

    materialize(env, "--select", "*suppression_report", "--partition", "010_grass")
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        for key in ("train_activations", "val_activations", "sae_weights", "probe_checkpoint", "latent_stats",
                    "val_codes", "tuning_codes"):
            assert materializations(instance, key) == 1, key
        for key in ("class_latents", "suppression_report"):
            assert materializations(instance, key, "010_grass") == 1, key
        event = instance.get_latest_materialization_event(dg.AssetKey("suppression_report"))
        assert event.asset_materialization.partition == "010_grass"
        assert event.asset_materialization.metadata["status"].value == "evaluated"
        report_key = event.asset_materialization.metadata["key"].value
    assert (data / "suppression_report" / report_key / "010_grass" / "report.json").exists()

    # The design card's command as written (no -m: DAGSTER_MODULE_NAME), and dg's from the project root.
    shell = project_shell(env)
    out = run(shell, [str(DAGSTER), "asset", "materialize", "--select", "suppression_report", "--partition",
                      "010_grass"], Path(env["DAGSTER_HOME"]).parent)
    assert "Executing steps in process" in out  # one process for the selection unless a run asks for more
    run(shell, [str(DAGSTER.with_name("dg")), "launch", "--assets", "suppression_report", "--partition", "010_grass"],
        ROOT)
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert materializations(instance, "suppression_report", "010_grass") == 3
        assert materializations(instance, "sae_weights") == 1  # the upstream was reused, not redone
        assert materializations(instance, "class_latents", "010_grass") == 1

    materialize(env, "--select", "class_latents,suppression_report", "--partition-range", "001_wall...003_sky")
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        ranged = [r for r in instance.get_run_records() if r.dagster_run.tags.get(PARTITION_RANGE_TAGS[0]) == "001_wall"]
        assert len(ranged) == 1 and ranged[0].dagster_run.is_success  # three classes, one run
        for key in ("001_wall", "002_building", "003_sky"):
            assert materializations(instance, "suppression_report", key) == 1, key
            assert materializations(instance, "class_latents", key) == 1, key
        assert sorted(latest_keys(instance, "suppression_report")) == ["001_wall", "002_building", "003_sky",
                                                                        "010_grass"]
    assert sorted(p.name for p in (data / "suppression_report" / report_key).iterdir()) == [
        "001_wall", "002_building", "003_sky", "010_grass"]  # same settings and inputs: one key for all four


def test_the_makefile_instance_monitors_runs_without_telemetry_and_is_never_overwritten(tmp_path):
    home = tmp_path / "dagster_home"

    def make(*args: str) -> str:
        done = subprocess.run(["make", "-s", *args, f"DAGSTER_HOME={home}"], cwd=Path(__file__).parents[1],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    make("instance")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_monitoring_enabled and instance.run_monitoring_settings["poll_interval_seconds"] <= 30
        assert not instance.telemetry_enabled
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # the user's own settings
    make("instance")
    assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"
    # The read-only UI: a flag of the installed webserver, which turns every mutation off.
    assert "--read-only" in make("-n", "ui-readonly").splitlines()[-1]
    webserver = subprocess.run([str(DAGSTER.with_name("dagster-webserver")), "--help"], capture_output=True, text=True)
    assert "--read-only" in webserver.stdout
