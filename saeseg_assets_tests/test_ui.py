"""The Dagster UI in headless Chromium, the GraphQL API, and automatic re-runs, against a webserver and daemon started
here on a free localhost port over a fresh instance and tiny data; every process started is stopped by its id."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from saeseg_assets.automation import CHECKPOINT_TAG
from saeseg_assets.core.store.artifacts import Store
from saeseg_assets.core.store.checkpoint_watch import content_sha256, drop_folder
from saeseg_assets.recipe import latest_key, latest_keys
from saeseg_assets_tests.test_cli import tiny_env, write_checkpoints

BIN = Path(sys.executable).parent
CODE = ["-m", "saeseg_assets"]
CHROMIUM = "/usr/bin/chromium"
SCREENS = Path("/tmp/saeseg_screens")
CLASS = "010_grass"

# Each test here drives a webserver and a daemon (and a browser): minutes, not seconds.
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:Using variable_values:DeprecationWarning")]  # inside dagster-graphql


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (Linux /proc): the code servers the webserver and the daemon start."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def stop(process: subprocess.Popen) -> None:
    """SIGINT (Dagster's clean shutdown, which also stops its code servers), then SIGKILL for whatever is left."""
    spawned = descendants(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    deadline = time.time() + 10
    for pid in spawned:
        while Path(f"/proc/{pid}").exists() and time.time() < deadline:
            time.sleep(0.2)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # A shell that starts tests in the background ignores SIGINT, and children inherit that: restore it.
    with open(log, "w") as out:
        return subprocess.Popen(args, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def prepare_world(root: Path) -> dict[str, str]:
    """Tiny data with the SAE and probe in the drop folders, and everything above `suppression_report` for one class,
    and the probe's baseline (which the reports do not read), materialized in this process (faster than the CLI), so
    that the UI launches the class's report itself."""
    env = tiny_env(root, SAESEG_SENSOR_INTERVAL_S="2", SAESEG_CHECKPOINT_QUIET_S="2")
    data = Path(env["SAESEG_DATA"])
    write_checkpoints(drop_folder(data, "sae"), drop_folder(data, "probe"))
    # The definitions read their resources from the environment at import: materialize in a process that has it.
    code = (
        "import dagster as dg, saeseg_assets\n"
        "upstream = (dg.AssetSelection.assets('suppression_report').upstream() - "
        "dg.AssetSelection.assets('suppression_report')) | dg.AssetSelection.assets('baseline_metrics')\n"
        "with dg.DagsterInstance.get() as instance:\n"
        f"    assert dg.materialize(saeseg_assets.defs.assets, selection=upstream, partition_key={CLASS!r}, "
        "instance=instance, resources=saeseg_assets.defs.resources).success\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return env


class Servers:
    """A webserver and a daemon over one instance: what `dagster dev` starts, started here one by one."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env, self.port = root, env, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.processes = []
        try:
            self.processes.append(start([str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.port),
                                         *CODE], env, root / "webserver.log"))
            self.processes.append(start([str(BIN / "dagster-daemon"), "run", *CODE], env, root / "daemon.log"))
            wait_for(self._up, 120, f"{self.url}/server_info")
        except BaseException:
            self.close()
            raise

    def _up(self) -> bool:
        for process in self.processes:
            assert process.poll() is None, (self.root / "webserver.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{self.url}/server_info", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(self.env["DAGSTER_HOME"])

    def close(self) -> None:
        for process in reversed(self.processes):
            stop(process)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    servers = Servers(root, prepare_world(root))
    yield servers
    servers.close()


def latest(instance: dg.DagsterInstance, key: str, partition: str | None = None):
    records = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None), limit=1).records
    return records[0] if records else None


def browser_page(playwright):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(60_000)
    return browser, page


def dismiss_newsletter(page) -> None:
    """The first visit's newsletter dialog, if it comes."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.get_by_role("button", name="Skip").click(timeout=5_000)
    except PlaywrightTimeout:
        pass


def screenshot(page, screens: Path, name: str, keep: bool = False) -> None:
    screens.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screens / name), full_page=True)
    if keep:  # the two a person looks at
        SCREENS.mkdir(parents=True, exist_ok=True)
        shutil.copy(screens / name, SCREENS / name)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no browser at {CHROMIUM}: .ci/run installs Debian's chromium")
def test_ui_shows_the_graph_and_partitions_and_launches_a_class(servers, tmp_path):
    """What a user sees: the asset graph, 150 partitions, a one-class launch, the report's numbers and picture."""
    from playwright.sync_api import sync_playwright

    screens = tmp_path / "screens"
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        try:
            page.goto(f"{servers.url}/asset-groups")
            page.get_by_text("Global asset lineage").wait_for()
            dismiss_newsletter(page)
            page.mouse.click(1100, 900, button="right")  # the graph's own menu
            page.get_by_role("menuitem", name="Expand all groups").click()
            # The expanded graph is taller than the window, and the graph draws only the assets in view: zoom out.
            page.mouse.move(1100, 600)
            page.keyboard.down("Control")
            page.mouse.wheel(0, 120)
            page.wait_for_timeout(500)
            page.keyboard.up("Control")
            for name in ("train_activations", "sae_weights", "probe_checkpoint", "baseline_metrics", "latent_stats",
                         "class_latents", "val_codes", "suppression_report"):
                page.get_by_text(name, exact=True).first.wait_for()
            screenshot(page, screens, "asset_graph.png", keep=True)

            for asset in ("class_latents", "suppression_report"):
                page.goto(f"{servers.url}/assets/{asset}?view=partitions")
                page.get_by_text("150 Partitions Selected").wait_for()
            screenshot(page, screens, "partitions.png")

            page.goto(f"{servers.url}/assets/suppression_report")
            page.get_by_role("button", name="Materialize…").click()
            page.get_by_text("Select a partition or create one").click()
            page.keyboard.type(CLASS)
            page.get_by_text("Select all (1)").click()  # the search leaves only this class
            screenshot(page, screens, "launch_dialog.png")
            page.get_by_role("button", name="Launch 1 run").click()
            with servers.instance() as instance:
                record = wait_for(lambda: latest(instance, "suppression_report", CLASS), 240,
                                  f"suppression_report {CLASS} launched from the UI")
                run = wait_for(lambda: (r := instance.get_run_by_id(record.run_id)).is_finished and r, 120, "the run")
                assert run.is_success

            page.goto(f"{servers.url}/assets/suppression_report?view=partitions&partition={CLASS}")
            for label in ("target_change_rate", "other_change_rate", "target_iou_before", "specific"):
                page.get_by_text(label, exact=True).first.wait_for()
            row = page.get_by_text("target_change_rate", exact=True).first.locator("xpath=ancestor::tr")
            assert 0.0 <= float(row.inner_text().split()[-1]) <= 1.0
            screenshot(page, screens, "class_report.png", keep=True)
            # Pictures are markdown metadata, shown behind a link of their own.
            row = page.get_by_text("examples", exact=True).first.locator("xpath=ancestor::tr")
            row.get_by_text("[Show Markdown]").click()
            page.locator("img[src^='data:image/png']").first.wait_for()
            screenshot(page, screens, "class_report_examples.png", keep=True)
        finally:
            screenshot(page, screens, "last.png")  # where a failure left the page
            browser.close()


FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
CLASSWISE = ["class_latents", "suppression_report", "suppression_summary"]


def launch(servers: Servers, assets: list[str], partition: str, last: str | None = None) -> str:
    """Launches a run through the GraphQL API (dagster-graphql's client), of one class or of the classes from
    `partition` to `last` in one run, waits for it, returns its id."""
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient("127.0.0.1", port_number=servers.port)
    tags = ({"dagster/asset_partition_range_start": partition, "dagster/asset_partition_range_end": last} if last
            else {"dagster/partition": partition})
    run_id = client.submit_job_execution("__ASSET_JOB", repository_location_name="saeseg_assets",
                                         repository_name="__repository__", asset_selection=assets, tags=tags)
    status = wait_for(lambda: (s := client.get_run_status(run_id)) in FINISHED and s, 240, f"run {run_id}")
    assert status == dg.DagsterRunStatus.SUCCESS, (servers.root / "daemon.log").read_text()[-3000:]
    return run_id


def test_graphql_client_launches_a_run(servers):
    run_id = launch(servers, CLASSWISE, "003_sky")
    with servers.instance() as instance:
        assert latest(instance, "suppression_report", "003_sky").run_id == run_id
        assert latest(instance, "suppression_summary").run_id == run_id


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no browser at {CHROMIUM}: .ci/run installs Debian's chromium")
def test_the_answer_comes_first_absent_classes_are_marked_and_the_report_opens_offline(servers, tmp_path):
    """Classes 001..010 in one run (validation holds only building, sky and grass), then the summary: the class page
    opens with its sentence and legend, the check's partition list marks the absent classes skipped, the summary
    opens with its headline, and report.html opens with the network off, every picture loaded."""
    from playwright.sync_api import sync_playwright

    launch(servers, ["class_latents", "suppression_report"], "001_wall", "010_grass")
    launch(servers, ["suppression_summary"], CLASS)
    with servers.instance() as instance:
        # The folder as metadata shows it: relative to the servers' working directory, where the data folder lies.
        report_html = servers.root / latest(instance, "suppression_summary").asset_materialization.metadata[
            "path"].value / "report.html"
        headline = latest(instance, "suppression_summary").asset_materialization.metadata["result"].value
    screens = tmp_path / "screens"
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright)
        try:
            page.goto(f"{servers.url}/assets/suppression_report?view=partitions&partition={CLASS}")
            dismiss_newsletter(page)
            page.get_by_text("grass: at the original setting", exact=False).first.wait_for()
            page.get_by_text("colours: grass (target, outlined)", exact=False).first.wait_for()
            page.get_by_text("class-specific: at least", exact=False).first.wait_for()
            screenshot(page, screens, "class_page.png", keep=True)

            page.goto(f"{servers.url}/assets/suppression_report?view=checks")
            page.get_by_text("suppression_report_evaluated", exact=True).first.click()
            page.get_by_text("Partitions", exact=True).last.click()
            # 3 classes evaluated, 7 absent from validation: skipped, each listed with an orange dot; 140 never run.
            page.get_by_text("Passed (3)").wait_for()
            page.get_by_text("Skipped (7)").wait_for()
            page.get_by_text("006_ceiling", exact=True).first.wait_for()
            screenshot(page, screens, "evaluated_check_partitions.png", keep=True)

            page.goto(f"{servers.url}/assets/suppression_summary")
            page.get_by_text(headline[:60], exact=False).first.wait_for()
            screenshot(page, screens, "summary.png", keep=True)

            context = browser.new_context(offline=True, viewport={"width": 1400, "height": 1000})
            requested = []  # anything but the file itself and its inlined pictures is refused, and counted

            def local_only(route):
                if route.request.url.startswith(("file:", "data:")):
                    return route.continue_()
                requested.append(route.request.url)
                return route.abort()

            context.route("**/*", local_only)
            offline = context.new_page()
            offline.goto(Path(report_html).as_uri())
            offline.get_by_text(headline, exact=True).wait_for()
            broken = offline.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                                      ".length")
            n_images = offline.evaluate("document.images.length")
            assert n_images >= 4 + 3 * 3 and broken == 0 and not requested
            screenshot(offline, screens, "report_html.png", keep=True)
        finally:
            screenshot(page, screens, "last.png")
            browser.close()


def test_a_new_sae_checkpoint_reruns_the_downstream_without_a_click(servers):
    """Replace the SAE in the drop folder while the daemon runs: the import and every existing downstream result
    re-run on their own; what does not depend on the SAE (the probe's baseline) does not."""
    data = Path(servers.env["SAESEG_DATA"])
    folder = drop_folder(data, "sae")
    first = content_sha256((folder / "sae.safetensors", folder / "sae.json"))[0]
    with servers.instance() as instance:
        if not latest(instance, "suppression_summary"):  # run on its own: make something downstream to redo
            launch(servers, CLASSWISE, CLASS)
        # The daemon's first looks import the checkpoints already there (once; identical weights re-run nothing).
        wait_for(lambda: any(r.dagster_run.is_finished and r.dagster_run.tags.get(CHECKPOINT_TAG) == first
                             for r in instance.get_run_records()), 120, "the sensor's first import")
        wait_for(lambda: not instance.get_run_records(filters=dg.RunsFilter(statuses=[
            dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED])), 240,
            "runs in progress to finish")
        existing = {key: {p for p in instance.get_materialized_partitions(dg.AssetKey(key))}
                    for key in ("class_latents", "suppression_report")}
        before = {key: latest(instance, key).storage_id for key in
                  ("latent_stats", "val_codes", "baseline_metrics", "suppression_summary") if latest(instance, key)}
        assert existing["suppression_report"] and "suppression_summary" in before

        # A new checkpoint arrives the way a copy should: written beside, then renamed into place.
        write_checkpoints(servers.root / "next_sae", servers.root / "unused_probe", seed=1)
        for name in ("sae.safetensors", "sae.json"):
            os.replace(servers.root / "next_sae" / name, folder / name)
        replaced = time.time()

        def redone(key: str, partition: str | None = None) -> bool:
            record = latest(instance, key, partition)
            return record is not None and record.timestamp > replaced

        targets = [("sae_weights", None), ("latent_stats", None), ("val_codes", None), ("suppression_summary", None),
                   *[(key, p) for key, partitions in existing.items() for p in partitions]]
        wait_for(lambda: all(redone(*t) for t in targets), 420,
                 f"the downstream re-run: {[t for t in targets if not redone(*t)]}")
        assert latest(instance, "baseline_metrics").storage_id == before["baseline_metrics"]
        runs = [r.dagster_run for r in instance.get_run_records() if r.create_timestamp.timestamp() > replaced]
        assert all(r.is_success for r in runs if r.is_finished)
        # All launched by the sensors; classes as ranges (one run per contiguous block), never one run per class.
        assert all(r.tags.get("dagster/sensor_name") for r in runs)
        assert all(not r.tags.get("dagster/partition") for r in runs)
        # Every report now stands on the new SAE: its validation codes were made from the latest sae_weights.
        store, sae_key = Store(data), latest_key(instance, "sae_weights")
        assert store.manifest("sae_weights", sae_key)["settings"]["import_sha256"] != first
        for key, report_key in latest_keys(instance, "suppression_report").items():
            codes_key = store.inputs("suppression_report", report_key, key)["val_codes"]
            assert store.inputs("val_codes", codes_key)["sae_weights"] == sae_key, key
