#!/usr/bin/env bash
# Creates .venv with Python 3.7 and installs the project into it, once.
# Re-installs only when setup.cfg, setup.py, constraints.txt or a C source changed since
# the last install (an editable install builds the C extensions in place).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test,bench,examples,spark,celery}

find_python37() {
    local candidates=()
    [ -n "${PYTHON37:-}" ] && candidates+=("$PYTHON37")
    candidates+=(python3.7)
    local root=${PYENV_ROOT:-$HOME/.pyenv}
    for p in "$root"/versions/3.7*/bin/python3.7; do candidates+=("$p"); done
    for c in "${candidates[@]}"; do
        # A pyenv shim is on PATH even where 3.7 is not selected: run it to be sure.
        if out=$("$c" -c 'import sys, venv; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) && [ "$out" = 3.7 ]; then
            command -v "$c" 2>/dev/null || echo "$c"
            return 0
        fi
    done
    return 1
}

if [ ! -x "$VENV/bin/python" ]; then
    if ! py=$(find_python37); then
        cat >&2 <<'MSG'
keras_fastpredict needs Python 3.7 (TensorFlow 1.15 supports nothing newer), and none was found:
not as `python3.7` on PATH, nor under $PYENV_ROOT/versions (default ~/.pyenv/versions).
Install it, then run this command again, for example:
    pyenv install 3.7.16          # with pyenv
    apt-get install python3.7 python3.7-venv   # where your distribution still ships it
or point PYTHON37=/path/to/python3.7 at an existing interpreter.
MSG
        exit 1
    fi
    echo "creating $VENV with $py" >&2
    "$py" -m venv "$VENV"
fi

stamp="$VENV/.installed"
want="$(cat setup.cfg setup.py constraints.txt keras_fastpredict/report/_steady.c \
    keras_fastpredict/engine/_native/*.[ch] | cksum) $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade 'pip<24' 'setuptools<68' wheel
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[${EXTRAS}]"
    echo "$want" > "$stamp"
fi

# The Celery tests and example start their own redis-server (on a Unix socket): Debian's
# package, installed here where it is missing and apt can install it.
if ! command -v redis-server >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "installing Debian's redis-server (for the Celery tests)" >&2
        apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    else
        echo "warning: redis-server is missing (the Celery tests need it): install Debian's redis-server" >&2
    fi
fi
