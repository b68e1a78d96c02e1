# tvmpipe developer commands. Every target creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test lint demo bench soak chaos tune clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,dev]"
	touch $(STAMP)

venv: $(STAMP)

# Three test processes (pytest-xdist), each taking whole files, on two cores: many tests wait on
# workers, sleeps and deadlines rather than compute, and the third fills that idle CPU (5:49
# against 6:07 with two, on a fresh clone of the same commit; green beside two busy loops).
test: $(STAMP)
	$(PY) -m pytest -n 3 --dist loadfile $(PYTEST_ARGS)

# mypy cannot follow setuptools' package-dir mapping, so it checks a tree of links shaped like
# the installed namespace (build/typecheck/tvmpipe/{orchestrator,worker,proto}).
lint: $(STAMP)
	$(VENV)/bin/ruff check orchestrator worker proto deploy tests
	$(VENV)/bin/ruff format --check orchestrator worker proto deploy tests
	if command -v shellcheck >/dev/null; then shellcheck deploy/netns/*.sh; fi
	rm -rf build/typecheck && mkdir -p build/typecheck/tvmpipe
	for p in orchestrator worker proto; do ln -s ../../../$$p build/typecheck/tvmpipe/$$p; done
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p tvmpipe

demo: $(STAMP)
	$(PY) -m tvmpipe.orchestrator.demo

# Side-by-side figures (median of several repetitions); also written to build/bench.json.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"  # onnxruntime: comparison 7's reference
	$(VENV)/bin/tvmpipe bench --json build/bench.json

# The tuning database make demo and comparison 7 build from (orchestrator/tuning_db/): SqueezeNet
# and the 16 pieces the planner measures, measured on a loopback worker for this machine's CPU.
# Three passes: every workload to TUNE_TRIALS MetaSchedule trials, then the TUNE_TOP workloads
# that take the most time to TUNE_TOP_TRIALS, then the TUNE_HEAVIEST heaviest to
# TUNE_HEAVIEST_TRIALS, with XGBoost's cost model (the tune extra). Then TUNE_ALSO (comparison
# 7's second model, whole) to TUNE_TRIALS in one pass. Each pass resumes where an interrupted
# one stopped; a finished one does no trials.
TUNE_TRIALS ?= 32
TUNE_TOP ?= 8
TUNE_TOP_TRIALS ?= 128
TUNE_HEAVIEST ?= 1
TUNE_HEAVIEST_TRIALS ?= 1024
TUNE_ALSO ?= light_resnet50
TUNE_ARGS = light_squeezenet --target host --segments 16 --database orchestrator/tuning_db
tune: $(STAMP)
	$(PY) -m pip install --quiet -e ".[tune]"
	nice -n 5 $(VENV)/bin/tvmpipe tune $(TUNE_ARGS) --trials $(TUNE_TRIALS)
	nice -n 5 $(VENV)/bin/tvmpipe tune $(TUNE_ARGS) --trials $(TUNE_TOP_TRIALS) --top $(TUNE_TOP)
	nice -n 5 $(VENV)/bin/tvmpipe tune $(TUNE_ARGS) --trials $(TUNE_HEAVIEST_TRIALS) \
		--top $(TUNE_HEAVIEST)
	for model in $(TUNE_ALSO); do nice -n 5 $(VENV)/bin/tvmpipe tune $$model --target host \
		--database orchestrator/tuning_db --trials $(TUNE_TRIALS) || exit 1; done

# Not part of `make test`: streams 100,000 inputs and checks that fds and memory stay flat.
soak: $(STAMP)
	$(VENV)/bin/tvmpipe soak

# Restart under faults: 20 rounds of 1,000 inputs with random kills and freezes of workers and
# sessions; prints lost, duplicated, wrong and misordered results (all must be 0).
chaos: $(STAMP)
	TVMPIPE_CHAOS_ROUNDS=$${TVMPIPE_CHAOS_ROUNDS:-20} $(PY) -m pytest -s -p no:cacheprovider tests/integration/test_chaos.py

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
