#!/usr/bin/env bash
# Runs Keras 2.2.5's own test suite (from its PyPI source distribution) against the installed
# keras three times: plainly, with keras_fastpredict.patch() for the whole session, and with
# patch(defer=True). Exits non-zero when a test that passes plainly does not pass patched,
# unless tests/upstream/known_differences.txt lists it with a reason.
#
# Environment: KFP_UPSTREAM_CACHE (where the sdist and its tests/ go; default
# ${XDG_CACHE_HOME:-$HOME/.cache}/keras_fastpredict/upstream), WORKERS (xdist workers, 2),
# MODES (runs, "plain patch defer"; the first is the reference), TESTS (paths under the
# sdist, default the engine, sequential-model and layers tests), TEST_TIMEOUT (seconds per
# test, 300), PYTEST_ARGS (extra).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
bash tools/bootstrap.sh
PY=$REPO/.venv/bin/python
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning}

VERSION=2.2.5
CACHE=${KFP_UPSTREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keras_fastpredict/upstream}
WORKERS=${WORKERS:-2}
MODES=${MODES:-plain patch defer}
TESTS=${TESTS:-tests/keras/engine tests/keras/test_sequential_model.py tests/keras/layers}
TEST_TIMEOUT=${TEST_TIMEOUT:-300}   # seconds per test (pytest-timeout): a hang fails its test
KNOWN=$REPO/tests/upstream/known_differences.txt

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd -P)
case "$CACHE/" in
    "$REPO"/*) echo "KFP_UPSTREAM_CACHE must be outside the repository: $CACHE" >&2; exit 2 ;;
esac

# The test suite's own requirements (the `test` extra of setup.cfg) when missing.
if ! "$PY" -c 'import pandas, flaky, xdist, pytest' 2>/dev/null; then
    "$PY" -m pip install -q -c constraints.txt -e ".[test]"
fi

# The sdist, once; only its tests/ folder is extracted, so its keras/ package cannot shadow
# the installed one.
SDIST=$CACHE/sdist/Keras-$VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
    "$PY" -m pip download -q --no-deps --no-binary :all: "keras==$VERSION" -d "$CACHE/sdist"
fi
ROOT=$CACHE/keras-$VERSION
if [ ! -f "$ROOT/tests/conftest.py" ]; then
    tmp=$(mktemp -d "$CACHE/extract.XXXXXX")
    tar -xzf "$SDIST" -C "$tmp" "Keras-$VERSION/tests"
    rm -rf "$ROOT"
    mv "$tmp/Keras-$VERSION" "$ROOT"
    rmdir "$tmp"
fi
if [ -e "$ROOT/keras" ]; then
    echo "$ROOT/keras exists: it would shadow the installed keras; remove it" >&2
    exit 2
fi

OUT=$CACHE/runs/$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$OUT"
echo "keras $VERSION tests: $ROOT; results: $OUT"
for mode in $MODES; do
    echo
    echo "== run: $mode (pytest -n $WORKERS $TESTS)"
    start=$(date +%s)
    set +e
    (cd "$ROOT" && PYTHONPATH="$REPO/tests/upstream${PYTHONPATH:+:$PYTHONPATH}" \
        KFP_UPSTREAM_MODE=$mode KFP_UPSTREAM_OUT="$OUT/$mode" \
        "$PY" -m pytest -n "$WORKERS" -p no:cacheprovider -p kfp_plugin --rootdir "$ROOT" \
        -W ignore::DeprecationWarning -W ignore::FutureWarning -W ignore::UserWarning \
        --timeout "$TEST_TIMEOUT" -r fE --tb=short ${PYTEST_ARGS:-} $TESTS) > "$OUT/$mode.log" 2>&1
    rc=$?
    set -e
    echo "exit status $rc, $(( $(date +%s) - start )) s; log: $OUT/$mode.log"
    grep -E '^(kfp_plugin:|FAILED|ERROR)' "$OUT/$mode.log" || true
    grep -E '[0-9]+ (passed|failed|skipped|errors?)\b|no tests ran' "$OUT/$mode.log" | tail -n 1 || true
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then
        echo "pytest did not complete the $mode run (exit status $rc)" >&2
        tail -n 30 "$OUT/$mode.log" >&2
        exit 2
    fi
done

"$PY" "$REPO/tests/upstream/compare.py" "$OUT" "$KNOWN" $MODES
