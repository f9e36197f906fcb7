"""pytest plugin for running Keras 2.2.5's own test suite under keras_fastpredict.

Loaded by ``tools/upstream_tests.sh`` with ``-p kfp_plugin`` (this folder on PYTHONPATH),
in the controller and in every xdist worker. ``KFP_UPSTREAM_MODE`` picks the run:

* ``plain``: keras_fastpredict is not even imported; only checks which keras is tested.
* ``patch``: ``keras_fastpredict.patch()`` for the whole session (default options).
* ``defer``: ``keras_fastpredict.patch(defer=True)``: every eligible predict call returns a
  deferred result, resolved in batches when it is read (the implicit per-thread scope).
* ``auto``: ``keras_fastpredict.patch(auto_batch=True)``: predict call sites sampled, and
  those measured to keep their results for later deferred (``--auto-batch``).
* ``graph``: ``keras_fastpredict.patch(inference_graph=True)``: every recurrent model, and
  every Keras model whose layers read the learning phase, gets its inference graph at its
  first call (by default only once it has paid for itself: a test's loops rarely get it).

With ``KFP_UPSTREAM_OUT`` set, the process that reports (the xdist controller) writes the
outcome of every test to ``results.json`` there, and each process that runs tests writes its
keras_fastpredict counters (summed over every model it saw) to ``stats-<worker>.json``, so
the script can show that the fast path really ran.
"""
import json
import os

import pytest

MODES = {'plain': None, 'patch': {}, 'defer': {'defer': True}, 'auto': {'auto_batch': True},
         'graph': {'inference_graph': True}}

_totals = {}
_outcomes = {}


def _mode():
    mode = os.environ.get('KFP_UPSTREAM_MODE', 'plain')
    if mode not in MODES:
        raise SystemExit('KFP_UPSTREAM_MODE must be one of %s, not %r' % (sorted(MODES), mode))
    return mode


def _check_keras(rootdir):
    import keras
    where = os.path.realpath(keras.__file__)
    root = os.path.realpath(str(rootdir))
    if where.startswith(root + os.sep):
        raise SystemExit('kfp_plugin: keras was imported from the test folder (%s), not from '
                         'the installed package' % where)
    if keras.__version__ != '2.2.5':
        raise SystemExit('kfp_plugin: expected keras 2.2.5, found %s' % keras.__version__)
    return where


def _add_counters():
    # keras_fastpredict.stats() holds the live models and a bounded number of freed ones (by
    # name, and names repeat after K.clear_session()): read it after each test and start
    # the next from zero, so the session totals are (at worst a lower bound of) the sum.
    import keras_fastpredict
    for found in keras_fastpredict.stats().values():
        _totals['models'] = _totals.get('models', 0) + 1
        for name, value in found.items():
            if name == 'fallback_reasons':
                reasons = _totals.setdefault('fallback_reasons', {})
                for reason, n in value.items():
                    reasons[reason] = reasons.get(reason, 0) + n
            elif type(value) is int and name != 'max_queue_len':
                _totals[name] = _totals.get(name, 0) + value
    keras_fastpredict.reset_stats()


def pytest_configure(config):
    mode = _mode()
    config._kfp_mode = mode
    config._kfp_keras = _check_keras(config.rootpath if hasattr(config, 'rootpath')
                                     else config.rootdir)
    options = MODES[mode]
    if options is not None:
        import keras_fastpredict
        keras_fastpredict.patch(**options)


def pytest_report_header(config):
    line = 'kfp_plugin: mode=%s keras=%s' % (config._kfp_mode, config._kfp_keras)
    if config._kfp_mode != 'plain':
        import keras_fastpredict
        from keras_fastpredict.config import settings
        line += ' patched=%s defer=%s' % (keras_fastpredict.is_patched(), settings.defer)
    return line


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if item.config._kfp_mode != 'plain':
        _add_counters()


def pytest_runtest_logreport(report):
    # In the controller under xdist (workers' reports arrive there), else in the one process.
    # Flaky's reruns report again: the last call decides.
    if report.when == 'call':
        _outcomes[report.nodeid] = 'skipped' if report.skipped else report.outcome
    elif report.failed:
        # A failed setup or teardown is an error; a worker that crashed reports '???'.
        _outcomes[report.nodeid] = 'error' if report.when in ('setup', 'teardown') else 'failed'
    elif report.when == 'setup' and report.skipped:
        _outcomes[report.nodeid] = 'skipped'


def _write(out, name, data):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), 'w') as f:
        json.dump(data, f, indent=1, sort_keys=True)


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    out = os.environ.get('KFP_UPSTREAM_OUT')
    if not out:
        return
    workerinput = getattr(config, 'workerinput', None)
    if workerinput is None:
        _write(out, 'results.json', {'mode': config._kfp_mode, 'exitstatus': int(exitstatus),
                                     'outcomes': _outcomes})
        if config.pluginmanager.hasplugin('dsession'):
            return          # the xdist controller runs no tests
    if config._kfp_mode == 'plain':
        return
    import keras_fastpredict
    data = dict(_totals)
    data['mode'] = config._kfp_mode
    data['patched_at_end'] = keras_fastpredict.is_patched()
    data['pid'] = os.getpid()
    worker = workerinput['workerid'] if workerinput else 'main'
    _write(out, 'stats-%s.json' % worker, data)
