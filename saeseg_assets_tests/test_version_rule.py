"""The one version rule: an output's key holds the format version of every core module that writes its files, and
the keys of the inputs it reads, which are its Dagster deps."""

from __future__ import annotations

import graphlib
import importlib

import pytest

from saeseg_assets import defs
from saeseg_assets.recipe import STAGES, spec_of


def _deps() -> dict[str, set[str]]:
    """Each asset's deps as the Dagster definitions declare them."""
    return {spec.key.to_user_string(): {dep.asset_key.to_user_string() for dep in spec.deps}
            for spec in defs.resolve_all_asset_specs()}


def _keys() -> dict[str, str]:
    """Every asset's key at default settings, made from its inputs' keys in the order of the graph."""
    keys: dict[str, str] = {}
    for asset in graphlib.TopologicalSorter(_deps()).static_order():
        keys[asset] = spec_of(asset, {}, {dep: keys[dep] for dep in STAGES[asset].reads}).key
    return keys


def _descendants(assets: set[str]) -> set[str]:
    deps, found = _deps(), set(assets)
    while grown := {a for a, ds in deps.items() if ds & found} - found:
        found |= grown
    return found


def test_every_asset_declares_what_it_reads_as_its_deps_and_what_writes_its_files():
    deps = _deps()
    assert set(STAGES) == set(deps)
    for asset, stage in STAGES.items():
        assert set(stage.reads) == deps[asset], asset
        assert stage.writes, f"{asset}: no core module writes its files"
        for module in stage.writes:  # each a real module with one integer format version
            assert isinstance(importlib.import_module(f"saeseg_assets.core.{module}").FORMAT_VERSION, int)


WRITERS = sorted({module for stage in STAGES.values() for module in stage.writes})


@pytest.mark.parametrize("module", WRITERS)
def test_raising_one_format_version_changes_the_keys_of_its_assets_and_their_descendants_only(module, monkeypatch):
    before = _keys()
    target = importlib.import_module(f"saeseg_assets.core.{module}")
    monkeypatch.setattr(target, "FORMAT_VERSION", target.FORMAT_VERSION + 1)
    after = _keys()
    changed = {asset for asset in before if before[asset] != after[asset]}
    written = {asset for asset, stage in STAGES.items() if module in stage.writes}
    assert written and changed == _descendants(written)


def test_the_codes_format_reaches_the_reports_and_the_summary_but_not_the_sae():
    """The rule on one case checked by hand: val_codes and tuning_codes are written by core.study.codes."""
    written = {asset for asset, stage in STAGES.items() if "study.codes" in stage.writes}
    assert written == {"val_codes", "tuning_codes"}
    assert _descendants(written) == {"val_codes", "tuning_codes", "suppression_report", "propagated_report",
                                     "suppression_summary"}


def test_the_tails_format_reaches_the_propagated_reports_only():
    written = {asset for asset, stage in STAGES.items() if "data.tail" in stage.writes}
    assert written == {"propagated_report"}
    assert _descendants(written) == {"propagated_report", "suppression_summary"}
