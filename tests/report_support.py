"""What the call-site report's test modules share: every test runs with the usual call
in C (the extension, built by the install) and with the report's Python recorder (where
the extension is not built); helpers to find a site by the caller's line."""
import sys

import pytest

import keras_fastpredict as kfp
from conftest import assert_same
from keras_fastpredict.report import calls, passing


@pytest.fixture(autouse=True, params=['C', 'Python'])
def recorder(request, monkeypatch):
    """Every test with the usual call in C (the extension, built by the install) and with
    the report's Python recorder (where the extension is not built)."""
    if request.param == 'C':
        if not calls.WRAPT_IN_C:    # (WRAPT_DISABLE_EXTENSIONS=1: the C recorder is not used)
            pytest.skip("wrapt's C wrappers are not in use")
        assert calls.Recorder is not None, 'keras_fastpredict.report._steady is not built'
    else:
        monkeypatch.setattr(calls, 'Recorder', None)
        # The gate and the timing flag too (their Python forms: a closure, a thread local).
        monkeypatch.setattr(passing, 'Gate', None)
        monkeypatch.setattr(passing, 'this_thread', passing._Thread())
    return request.param


def line():
    """The caller's current line."""
    return sys._getframe(1).f_lineno


def sites(**match):
    out = [s for s in kfp.report()['sites']
           if all(s[k] == v for k, v in match.items())]
    return out


def site_at(lineno, file=None):
    """The one site at ``lineno`` of ``file`` (default: the calling test module)."""
    found = sites(line=lineno, file=file or sys._getframe(1).f_code.co_filename)
    assert len(found) == 1, (lineno, [s['site'] for s in kfp.report()['sites']])
    return found[0]


def assert_same_outcomes(got, expected):
    """Loop outcomes, one by one: results as plain Keras', (type, message) of errors."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if isinstance(e, tuple):
            assert g == e
        else:
            assert_same(g, e)


def kinds(site):
    return [a['kind'] for a in site['advice']]


class _CountingCalls(object):
    def __init__(self, real):
        self.real = real
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.real(*args)


class _Counting(object):
    def __init__(self, real):
        self.real = real
        self.calls = 0

    def __call__(self, depth=0):
        self.calls += 1
        return self.real(depth + 1)


def helper(model, x):
    return model.predict(x)            # the first frame outside Keras: this line


HELPER_FILE = helper.__code__.co_filename
HELPER_LINE = helper.__code__.co_firstlineno + 1


def in_turns(threads, steps, step, scope=None):
    """``step(k, j)`` for j in range(steps) in thread k, the threads taking turns: thread
    0's step j, thread 1's, ..., then thread 0's step j + 1 (an interleaving as concurrent
    callers may make, fixed). Each thread runs in Keras' graph and in ``scope()`` if given
    (a deferral scope is per thread). Returns nothing; a thread's exception is raised."""
    import threading
    from keras import backend as K
    from conftest import run_in_threads
    graph = K.get_session().graph
    turn = [0]
    cond = threading.Condition()

    def work(k):
        with graph.as_default(), (scope() if scope else _Nothing()):
            for j in range(steps):
                with cond:
                    if not cond.wait_for(lambda: turn[0] == j * threads + k, timeout=120):
                        raise RuntimeError('turn %d of thread %d never came' % (j, k))
                try:
                    step(k, j)
                finally:
                    with cond:
                        turn[0] += 1
                        cond.notify_all()
    errors = run_in_threads(threads, work)
    if errors:
        raise errors[0]


class _Nothing(object):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
