"""`python -m saeseg_assets.answer`: the study's answer as the latest `suppression_summary` in the Dagster instance
($DAGSTER_HOME) states it: the headline, where the whole report is, and what data it comes from."""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg

from .assets.summary import LATEST_REPORT
from .core.report.summary_page import REPORT_HTML
from .environment import ENV


def answer(instance: dg.DagsterInstance, data_dir: Path, demo: bool) -> str:
    """The headline sentence and the report's paths; the data's caveat on the embedded default."""
    event = instance.get_latest_materialization_event(dg.AssetKey("suppression_summary"))
    if event is None or event.asset_materialization is None:
        return "No suppression_summary in this Dagster instance yet: materialize it (make demo runs everything)."
    metadata = event.asset_materialization.metadata
    report = (Path(str(metadata["path"].value)) / REPORT_HTML).resolve()
    lines = [str(metadata["result"].value), *([str(metadata["mechanisms"].value)] if "mechanisms" in metadata else []),
             "", f"The whole study, with its intervals and pictures: {report}",
             f"(the latest report is always at {data_dir / LATEST_REPORT})"]
    if demo:
        lines.append("The data are the embedded default: real photographs in ADE20K's format, not ADE20K "
                     "(README, \"The real experiment\").")
    return "\n".join(lines)


def main() -> int:
    with dg.DagsterInstance.get() as instance:
        print(answer(instance, Path(ENV.data_dir).resolve(), demo=not ENV.ade20k_root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
