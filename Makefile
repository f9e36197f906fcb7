# Every target sets up .venv (Python 3.7, TF 1.15.5, Keras 2.2.5) first when it is missing.
PY := .venv/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONWARNINGS ?= ignore::FutureWarning,ignore::DeprecationWarning

.PHONY: venv demo test bench first-pass bench-full soak upstream-test cluster-demo clean

venv:
	@bash tools/bootstrap.sh

# The main job: a legacy loop on a built-in model, unpatched and patched.
demo: venv
	$(PY) examples/legacy_loop.py

# The test command (CI runs exactly this): Keras' and keras-rl's own suites plainly, patched
# and deferred, then ours (tests marked with one xdist_group share a worker: the Spark
# cluster's tests, one cluster).
test: venv
	bash tools/upstream_tests.sh
	$(PY) -m pytest -q -n 2 --dist loadgroup --timeout 600 tests

bench: venv
	$(PY) -m benchmarks

# Each legacy script run once in a fresh process, plain and under the runner.
first-pass: venv
	$(PY) -m benchmarks.first_pass

# The Spark scoring job on a standalone cluster started here (a master, two workers), plain
# and with the executors patched: times, ratios, the executors' reports; then it is stopped.
cluster-demo: venv
	$(PY) -m benchmarks.cluster_demo

soak: venv
	$(PY) benchmarks/soak.py

# Keras 2.2.5's and keras-rl 0.4.2's own test suites (from their sdists) plainly, patched and
# with defer=True; `make upstream-test SUITES=rl` (or keras) runs one.
upstream-test: venv
	bash tools/upstream_tests.sh $(SUITES)

clean:
	rm -rf .venv benchmarks/results
