#!/usr/bin/env bash
# Runs real test suites of Keras code, taken from their PyPI source distributions, against
# the installed keras three times: plainly, with keras_fastpredict.patch() for the whole
# session, and with patch(defer=True). Exits non-zero when a test that passes plainly does
# not pass patched, unless the suite's known-differences file lists it with a reason.
#
# Usage: tools/upstream_tests.sh [SUITE...]     (default: $SUITES, else "keras rl")
#   keras  Keras 2.2.5's own tests: tests/keras/engine, tests/keras/test_sequential_model.py,
#          tests/keras/layers. Known differences: tests/upstream/known_differences.txt.
#   rl     keras-rl 0.4.2's tests (tests/rl: DQN, NAF, DDPG and CEM agents, which call
#          predict_on_batch every step between train_on_batch and target-weight copies),
#          with tests/upstream/keras-rl/keras-rl-0.4.2.patch applied (two fixes for TF 1.15
#          made upstream after the release; see the patch's header). Known differences:
#          tests/upstream/keras-rl/known_differences.txt.
#
# Environment: KFP_UPSTREAM_CACHE (where the sdists and their extracted tests go; default
# ${XDG_CACHE_HOME:-$HOME/.cache}/keras_fastpredict/upstream), WORKERS (xdist workers, 2),
# MODES (runs, "plain patch defer"; the first is the reference; "auto", patch(auto_batch=
# True), is not run by default: it deferred no call in either suite, 0 regressions, on
# 2026-12-06; no test makes the calls at one line that a site's sample takes; "graph",
# patch(inference_graph=True), every recurrent or learning-phase model's inference graph
# at its first call, is not run by default: Keras' suite 384 passed, 0 regressions, on
# 2026-12-07), TESTS (paths under the suite's folder
# instead of its default; only with one suite), TEST_TIMEOUT (seconds per test, 300),
# PYTEST_ARGS (extra).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
bash tools/bootstrap.sh
PY=$REPO/.venv/bin/python
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning,ignore::DeprecationWarning}

CACHE=${KFP_UPSTREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keras_fastpredict/upstream}
WORKERS=${WORKERS:-2}
MODES=${MODES:-plain patch defer}
TEST_TIMEOUT=${TEST_TIMEOUT:-300}   # seconds per test (pytest-timeout): a hang fails its test
if [ $# -gt 0 ]; then SUITES="$*"; else SUITES=${SUITES:-keras rl}; fi
if [ -n "${TESTS:-}" ] && [ "$(echo $SUITES | wc -w)" -ne 1 ]; then
    echo "TESTS applies to one suite: name it (tools/upstream_tests.sh keras|rl)" >&2
    exit 2
fi

# One suite's settings. DIST==VERSION is downloaded; TOP is the sdist's top folder, of which
# only EXTRACT is unpacked into ROOT (never a keras/ folder that would shadow the installed
# keras); PATCH (if any) is applied there; LOCAL names packages that are not installed and
# must be imported from ROOT (pytest runs there, so ROOT is sys.path[0]).
suite() {
    case "$1" in
        keras)
            DIST=keras VERSION=2.2.5 TOP=Keras-2.2.5 EXTRACT="tests" PATCH= LOCAL=
            DEFAULT_TESTS="tests/keras/engine tests/keras/test_sequential_model.py"
            DEFAULT_TESTS="$DEFAULT_TESTS tests/keras/layers"
            KNOWN=$REPO/tests/upstream/known_differences.txt ;;
        rl)
            DIST=keras-rl VERSION=0.4.2 TOP=keras-rl-0.4.2 EXTRACT="rl tests" LOCAL=rl
            PATCH=$REPO/tests/upstream/keras-rl/keras-rl-0.4.2.patch
            DEFAULT_TESTS="tests/rl"
            KNOWN=$REPO/tests/upstream/keras-rl/known_differences.txt ;;
        *)
            echo "unknown suite: $1 (known: keras rl)" >&2
            exit 2 ;;
    esac
    ROOT=$CACHE/$(echo "$TOP" | tr '[:upper:]' '[:lower:]')
    SDIST=$CACHE/sdist/$TOP.tar.gz
}

for name in $SUITES; do (suite "$name") || exit 2; done

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd -P)
case "$CACHE/" in
    "$REPO"/*) echo "KFP_UPSTREAM_CACHE must be outside the repository: $CACHE" >&2; exit 2 ;;
esac

# The test suites' own requirements (the `test` extra of setup.cfg) when missing.
if ! "$PY" -c 'import pandas, flaky, xdist, pytest' 2>/dev/null; then
    "$PY" -m pip install -q -c constraints.txt -e ".[test]"
fi

# Downloads the sdist once, and (re-)extracts it when the extracted copy is missing or was
# made from another sdist or patch (a stamp in ROOT records which).
prepare() {
    if [ ! -f "$SDIST" ]; then
        "$PY" -m pip download -q --no-deps --no-binary :all: "$DIST==$VERSION" -d "$CACHE/sdist"
    fi
    local want paths="" p
    want="$(cksum < "$SDIST") ${PATCH:+$(cksum < "$PATCH")}"
    if [ ! -f "$ROOT/.kfp-extracted" ] || [ "$(cat "$ROOT/.kfp-extracted")" != "$want" ]; then
        local tmp
        tmp=$(mktemp -d "$CACHE/extract.XXXXXX")
        for p in $EXTRACT; do paths="$paths $TOP/$p"; done
        tar -xzf "$SDIST" -C "$tmp" $paths
        if [ -n "$PATCH" ] && command -v patch > /dev/null; then
            (cd "$tmp/$TOP" && patch -p1 -s --no-backup-if-mismatch < "$PATCH")
        elif [ -n "$PATCH" ]; then      # no patch(1): git apply, kept out of any repository
            (cd "$tmp/$TOP" && GIT_CEILING_DIRECTORIES="$tmp" git apply -p1 "$PATCH")
        fi
        echo "$want" > "$tmp/$TOP/.kfp-extracted"
        rm -rf "$ROOT"
        mv "$tmp/$TOP" "$ROOT"
        rmdir "$tmp"
    fi
    if [ -e "$ROOT/keras" ]; then
        echo "$ROOT/keras exists: it would shadow the installed keras; remove it" >&2
        exit 2
    fi
    # kfp_plugin checks that keras is the installed one; check here that each LOCAL package
    # is the extracted (and patched) copy, found as the test runs will find it.
    for p in $LOCAL; do
        where=$(cd "$ROOT" && PYTHONPATH="$REPO/tests/upstream${PYTHONPATH:+:$PYTHONPATH}" \
            "$PY" -c 'import importlib.util, os, sys
spec = importlib.util.find_spec(sys.argv[1])
print(os.path.realpath(spec.origin) if spec and spec.origin else "nowhere")' "$p")
        case "$where" in
            "$ROOT"/*) ;;
            *) echo "$p would be imported from $where, not from $ROOT" >&2; exit 2 ;;
        esac
    done
}

STAMP=$(date +%Y%m%d-%H%M%S)-$$
status=0
for name in $SUITES; do
    suite "$name"
    prepare
    TESTS_RUN=${TESTS:-$DEFAULT_TESTS}
    OUT=$CACHE/runs/$STAMP/$name
    mkdir -p "$OUT"
    echo
    echo "==== suite $name: $DIST $VERSION tests in $ROOT; results: $OUT"
    suite_start=$(date +%s)
    complete=1
    for mode in $MODES; do
        echo
        echo "== $name run: $mode (pytest -n $WORKERS $TESTS_RUN)"
        start=$(date +%s)
        set +e
        (cd "$ROOT" && PYTHONPATH="$REPO/tests/upstream${PYTHONPATH:+:$PYTHONPATH}" \
            KFP_UPSTREAM_MODE=$mode KFP_UPSTREAM_OUT="$OUT/$mode" \
            "$PY" -m pytest -n "$WORKERS" -p no:cacheprovider -p kfp_plugin --rootdir "$ROOT" \
            -W ignore::DeprecationWarning -W ignore::FutureWarning -W ignore::UserWarning \
            --timeout "$TEST_TIMEOUT" -r fE --tb=short ${PYTEST_ARGS:-} $TESTS_RUN) \
            > "$OUT/$mode.log" 2>&1
        rc=$?
        set -e
        echo "exit status $rc, $(( $(date +%s) - start )) s; log: $OUT/$mode.log"
        grep -E '^(kfp_plugin:|FAILED|ERROR)' "$OUT/$mode.log" || true
        grep -E '[0-9]+ (passed|failed|skipped|errors?)\b|no tests ran' "$OUT/$mode.log" \
            | tail -n 1 || true
        if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then
            echo "pytest did not complete the $name $mode run (exit status $rc)" >&2
            tail -n 30 "$OUT/$mode.log" >&2
            complete=0
            status=2
            break
        fi
    done
    if [ "$complete" = 1 ]; then
        echo
        echo "== suite $name: outcomes ($(( $(date +%s) - suite_start )) s for the runs)"
        set +e
        "$PY" "$REPO/tests/upstream/compare.py" "$OUT" "$KNOWN" $MODES
        rc=$?
        set -e
        if [ "$rc" -gt "$status" ]; then status=$rc; fi
    fi
done
exit $status
