"""The artifact store: keys, atomic publication, concurrent writers, refusal of what is missing, pruning; and the
core's independence from Dagster."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import saeseg_assets.core
from saeseg_assets.core.store.artifacts import (
    MANIFEST,
    ArtifactMissing,
    OutputSpec,
    Store,
    WriterConflict,
)


def test_the_key_is_a_function_of_version_settings_and_inputs():
    spec = OutputSpec("latent_stats", 1, {"purity": 0.9}, {"sae_weights": "a1"})
    assert spec.key == OutputSpec("latent_stats", 1, {"purity": 0.9}, {"sae_weights": "a1"}).key
    assert len(spec.key) == 16 and int(spec.key, 16) >= 0
    others = [OutputSpec("latent_stats", 2, {"purity": 0.9}, {"sae_weights": "a1"}),
              OutputSpec("latent_stats", 1, {"purity": 0.8}, {"sae_weights": "a1"}),
              OutputSpec("latent_stats", 1, {"purity": 0.9}, {"sae_weights": "a2"}),
              OutputSpec("val_codes", 1, {"purity": 0.9}, {"sae_weights": "a1"})]
    assert len({spec.key, *(o.key for o in others)}) == 5


def test_a_folder_is_published_whole_with_its_manifest(tmp_path):
    store = Store(tmp_path)
    spec = OutputSpec("probe_checkpoint", 1, {"epochs": 3}, {"train_activations": "k0"})
    assert not store.exists("probe_checkpoint", spec.key)
    with pytest.raises(ArtifactMissing, match=f"probe_checkpoint/{spec.key}: no complete probe_checkpoint"):
        store.open("probe_checkpoint", spec.key)
    with store.write(spec) as work:
        (work / "probe.json").write_text("{}")
        assert not store.exists("probe_checkpoint", spec.key)  # nothing visible until the block ends
    folder = store.open("probe_checkpoint", spec.key)
    assert folder == tmp_path / "probe_checkpoint" / spec.key
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "probe.json"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert (manifest["key"], manifest["settings"], manifest["inputs"]) == (spec.key, {"epochs": 3},
                                                                         {"train_activations": "k0"})
    assert store.inputs("probe_checkpoint", spec.key) == {"train_activations": "k0"}


def test_a_failed_write_leaves_nothing_and_a_resumable_one_its_partial_folder(tmp_path):
    store = Store(tmp_path)
    spec = OutputSpec("sae_weights", 1, {"k": 8})
    with pytest.raises(RuntimeError):
        with store.write(spec) as work:
            (work / "half").write_text("x")
            raise RuntimeError("killed")
    assert not store.exists("sae_weights", spec.key) and not list((tmp_path / "sae_weights" / ".tmp").iterdir())
    with pytest.raises(RuntimeError):
        with store.write(spec, resumable=True) as work:
            (work / "state").write_text("step 10")
            raise RuntimeError("killed")
    with store.write(spec, resumable=True) as work:
        assert (work / "state").read_text() == "step 10"  # the second attempt resumes the first
    assert (store.open("sae_weights", spec.key) / "state").exists()


def test_a_second_writer_of_the_same_key_keeps_the_first_folder(tmp_path):
    store = Store(tmp_path)
    spec = OutputSpec("val_codes", 1, {})
    with store.write(spec) as slow:
        (slow / "codes").write_text("first")
        with store.write(spec) as fast:
            (fast / "codes").write_text("second")
    folder = store.open("val_codes", spec.key)
    assert (folder / "codes").read_text() == "second"  # published first; the other is dropped, never mixed in
    assert sorted(p.name for p in folder.iterdir()) == ["codes", MANIFEST]


def test_a_resumable_writer_waits_for_the_one_writing_the_same_key_and_never_enters_its_folder(tmp_path):
    spec = OutputSpec("train_activations", 1, {"split": "training"})
    partial = tmp_path / "train_activations" / ".partial" / spec.key
    first_in, first_may_finish = threading.Event(), threading.Event()

    def first_writer():
        with Store(tmp_path).write(spec, resumable=True) as work:
            (work / "chunks").write_text("0-7 of the first writer")
            first_in.set()
            first_may_finish.wait(10)

    thread = threading.Thread(target=first_writer)
    thread.start()
    first_in.wait(10)
    messages = []
    with pytest.raises(WriterConflict, match=f"{partial}: another run has been writing this train_activations"):
        with Store(tmp_path, lock_timeout_s=0.5).write(spec, resumable=True, log=messages.append):
            pytest.fail("the second writer entered the folder the first one writes")
    assert messages == [f"waiting for another run that writes {partial} (lock {partial}.lock)"]
    assert (partial / "chunks").read_text() == "0-7 of the first writer"  # untouched

    store = Store(tmp_path)
    waiting = threading.Timer(0.5, first_may_finish.set)
    waiting.start()
    with store.lock(spec, log=messages.append):  # waits for the first writer, then finds its result
        assert store.exists("train_activations", spec.key)
    thread.join()
    assert len(messages) == 2
    with pytest.raises(WriterConflict, match=f"{store.path('train_activations', spec.key)} is already published"):
        with store.write(spec, resumable=True):
            pass
    assert (store.open("train_activations", spec.key) / "chunks").read_text() == "0-7 of the first writer"
    other = OutputSpec("train_activations", 1, {"split": "validation"})
    with store.lock(other), store.write(other, resumable=True):  # the lock is reentrant: no wait on itself
        pass
    assert store.exists("train_activations", other.key) and len(messages) == 2


def test_partitioned_artifacts_have_one_folder_per_class(tmp_path):
    store = Store(tmp_path)
    spec = OutputSpec("class_latents", 1, {"k": 3}, {"latent_stats": "s1"})
    for part in ("001_wall", "010_grass"):
        with store.write(spec, part=part) as work:
            (work / "class_latents.json").write_text(part)
    assert (store.open("class_latents", spec.key, "010_grass") / "class_latents.json").read_text() == "010_grass"
    assert not store.exists("class_latents", spec.key, "003_sky")
    assert store.keys("class_latents") == [spec.key]


def test_prune_keeps_what_is_named_and_removes_the_rest(tmp_path):
    store = Store(tmp_path)
    old, new = OutputSpec("sae_weights", 1, {"k": 8}), OutputSpec("sae_weights", 1, {"k": 16})
    for spec in (old, new):
        with store.write(spec):
            pass
    with pytest.raises(RuntimeError), store.write(OutputSpec("sae_weights", 1, {"k": 4}), resumable=True):
        raise RuntimeError("killed")
    folder = tmp_path / "sae_weights"
    assert store.prune({"sae_weights": {new.key}}, dry_run=True) == [folder / old.key, folder / ".tmp",
                                                                      folder / ".partial"]
    assert store.keys("sae_weights") == sorted([old.key, new.key])
    store.prune({"sae_weights": {new.key}})
    assert store.keys("sae_weights") == [new.key] and sorted(p.name for p in folder.iterdir()) == [new.key]


def test_the_core_imports_without_dagster():
    """Every core module, imported in a fresh interpreter, leaves Dagster unloaded."""
    core = Path(saeseg_assets.core.__file__).parent
    modules = sorted("saeseg_assets." + ".".join(p.relative_to(core.parent).with_suffix("").parts)
                     for p in core.rglob("*.py") if p.stem != "__init__")
    assert "saeseg_assets.core.store.artifacts" in modules and len(modules) > 15
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
