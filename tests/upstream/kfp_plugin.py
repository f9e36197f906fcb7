"""pytest plugin for running Keras 2.2.5's own test suite under keras_fastpredict.

Loaded by ``tools/upstream_tests.sh`` with ``-p kfp_plugin`` (this folder on PYTHONPATH),
in the controller and in every xdist worker. ``KFP_UPSTREAM_MODE`` picks the run:

* ``plain``: keras_fastpredict is not even imported; only checks which keras is tested.
* ``patch``: ``keras_fastpredict.patch()`` for the whole session (default options).
* ``defer``: ``keras_fastpredict.patch(defer=True)``: every eligible predict call returns a
  deferred result, resolved in batches when it is read (the implicit per-thread scope).

With ``KFP_UPSTREAM_OUT`` set, the process that reports (the xdist controller) writes the
outcome of every test to ``results.json`` there, and each process that runs tests writes its
keras_fastpredict counters (summed over every model it saw) to ``stats-<worker>.json``, so
the script can show that the fast path really ran.
"""
import importlib
import json
import os

MODES = {'plain': None, 'patch': {}, 'defer': {'defer': True}}

_tracked = []
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


def _track_stats():
    # Count every model's counters for the whole session: keras_fastpredict's own snapshot
    # keeps only live models and a bounded set of freed ones by name (names repeat after
    # K.clear_session()), so keep a reference to each ModelStats as it is created.
    stats = importlib.import_module('keras_fastpredict.stats')

    class TrackedModelStats(stats.ModelStats):
        def __init__(self, name):
            super(TrackedModelStats, self).__init__(name)
            _tracked.append(self)

    stats.ModelStats = TrackedModelStats


def _totals():
    stats = importlib.import_module('keras_fastpredict.stats')
    totals = {name: 0 for name in stats.COUNTERS}
    reasons = {}
    for found in _tracked:
        for name in stats.COUNTERS:
            totals[name] += getattr(found, name)
        for reason, n in found.fallback_reasons.items():
            reasons[reason] = reasons.get(reason, 0) + n
    totals['models'] = len(_tracked)
    totals['fallback_reasons'] = reasons
    return totals


def pytest_configure(config):
    mode = _mode()
    config._kfp_mode = mode
    config._kfp_keras = _check_keras(config.rootpath if hasattr(config, 'rootpath')
                                     else config.rootdir)
    options = MODES[mode]
    if options is not None:
        import keras_fastpredict
        _track_stats()
        keras_fastpredict.patch(**options)


def pytest_report_header(config):
    line = 'kfp_plugin: mode=%s keras=%s' % (config._kfp_mode, config._kfp_keras)
    if config._kfp_mode != 'plain':
        import keras_fastpredict
        from keras_fastpredict.config import settings
        line += ' patched=%s defer=%s' % (keras_fastpredict.is_patched(), settings.defer)
    return line


def pytest_runtest_logreport(report):
    # In the controller under xdist (workers' reports arrive there), else in the one process.
    # Flaky's reruns report again: the last call decides; a failed setup/teardown is an error.
    if report.when == 'call':
        _outcomes[report.nodeid] = 'skipped' if report.skipped else report.outcome
    elif report.failed:
        _outcomes[report.nodeid] = 'error'
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
    data = _totals()
    data['mode'] = config._kfp_mode
    data['patched_at_end'] = keras_fastpredict.is_patched()
    data['pid'] = os.getpid()
    worker = workerinput['workerid'] if workerinput else 'main'
    _write(out, 'stats-%s.json' % worker, data)
