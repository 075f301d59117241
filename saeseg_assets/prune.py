"""`python -m saeseg_assets.prune [--dry-run]`: deletes the store's folders that no latest materialization in the
Dagster instance ($DAGSTER_HOME) points to, and leftover unfinished writes. Run it while nothing else runs."""

from __future__ import annotations

import argparse

import dagster as dg

from .recipe import KEY


def kept_keys(instance: dg.DagsterInstance, specs: list[dg.AssetSpec]) -> dict[str, set[str]]:
    """Per asset, the keys its latest materializations point to (per class, for the partitioned ones)."""
    from .recipe import latest_keys

    kept: dict[str, set[str]] = {}
    for spec in specs:
        asset = spec.key.to_user_string()
        if spec.partitions_def is not None:
            kept[asset] = set(latest_keys(instance, asset).values())
            continue
        event = instance.get_latest_materialization_event(spec.key)
        metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
        kept[asset] = {str(metadata[KEY].value)} if KEY in metadata else set()
    return kept


def main(argv: list[str] | None = None) -> None:
    from . import defs
    from .resources import from_env

    parser = argparse.ArgumentParser(prog="python -m saeseg_assets.prune", description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    args = parser.parse_args(argv)
    storage = from_env()["storage"]
    with dg.DagsterInstance.get() as instance:
        kept = kept_keys(instance, list(defs.resolve_all_asset_specs()))
    removed = storage.store.prune(kept, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for path in removed:
        print(f"{verb} {path}")
    print(f"{verb} {len(removed)} folder(s); kept {sum(len(k) for k in kept.values())} under {storage.root}")


if __name__ == "__main__":
    main()
