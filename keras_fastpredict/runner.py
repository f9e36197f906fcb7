"""The zero-change runner: ``python -m keras_fastpredict [options] script.py [args...]``
(or ``-m module [args...]``, or the ``keras-fastpredict`` console script).

Patches, then runs the script or module as ``__main__`` the way ``python`` itself would:

* Only the options before the script path (or before ``-m module``) are the runner's;
  everything after it is the script's ``sys.argv[1:]``, untouched (``--``, ``-q``, even
  ``--stats``). A ``--`` before the script ends the runner's options.
* ``sys.path[0]``, the runner's own entry, is replaced as python sets it: the real folder
  of the script (symlinks resolved), the script itself for a folder or zip file holding a
  ``__main__.py``, the working directory for ``-m``.
* The script's exit code and exceptions pass through; a missing script or module fails
  with python's message and exit code (2 and 1).

Options may also come from ``KERAS_FASTPREDICT_*`` environment variables. Every Python
process the script starts is patched too (``keras_fastpredict.processes``): the runner
puts the bootstrap folder first on ``PYTHONPATH`` and its options in ``KERAS_FASTPREDICT_*``.
"""
import argparse
import importlib.machinery
import os
import runpy
import shutil
import sys
import tempfile
import types
import zipfile

from . import config, import_freeze, patching, processes
from . import counters as _stats
from .engine import deferred as _deferred
from .report import JSON_ENV as _REPORT_JSON_ENV, at_exit as _report_at_exit

# The runner's options that take a value (``--opt value``; ``--opt=value`` also works).
_VALUED = ('--max-batch-size', '--verify', '--stats-json')


def _parser():
    p = argparse.ArgumentParser(
        prog='python -m keras_fastpredict',
        usage='%(prog)s [options] (script.py | -m module) [args...]',
        description='Run a Python script or module with Keras predict calls sped up (no code '
                    'changes). Options after the script or module are its own.',
        allow_abbrev=False)
    p.add_argument('--stats', action='store_true',
                   help='print what was sped up, batched or left to Keras when the script ends')
    p.add_argument('--defer', action='store_true',
                   help='return deferred results and run calls in batches (docs/how-it-works.md)')
    p.add_argument('--auto-batch', action='store_true',
                   help='defer the calls of each site measured not to read its results before '
                        'its next calls, and run them in batches (docs/how-it-works.md)')
    p.add_argument('--no-readahead', action='store_true',
                   help='do not predict rows ahead when a loop walks an array')
    p.add_argument('--no-concurrent', action='store_true',
                   help='do not merge calls made from several threads at once')
    p.add_argument('--stats-json', metavar='FILE',
                   help='write the call-site report (docs/report.md: schema) as JSON at exit; '
                        "child processes write FILE named by their pid")
    p.add_argument('--no-gc-freeze', action='store_true',
                   help="do not freeze the objects of TensorFlow's import for Python's garbage "
                        'collector (keras_fastpredict/import_freeze.py)')
    p.add_argument('--max-batch-size', type=int)
    p.add_argument('--verify', choices=['auto', 'true', 'false'])
    return p


def split_argv(argv):
    """(the runner's options, module or None, script or None, the script's arguments).

    The runner's options end at the first argument that is not one (the script), at
    ``-m module`` / ``-mmodule``, or at ``--`` (the script follows it)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == '--':
            rest = argv[i + 1:]
            return argv[:i], None, (rest[0] if rest else None), rest[1:]
        if arg.startswith('-m') and not arg.startswith('--'):
            if arg != '-m':
                return argv[:i], arg[2:], None, argv[i + 1:]
            if i + 1 == len(argv):
                return argv[:i + 1], None, None, []      # argparse: "expected one argument"
            return argv[:i], argv[i + 1], None, argv[i + 2:]
        if arg == '-' or not arg.startswith('-'):
            return argv[:i], None, arg, argv[i + 1:]
        i += 2 if arg in _VALUED else 1
    return argv, None, None, []


def options_from(ns):
    options = config.from_environ()
    if ns.defer:
        options['defer'] = True
    if ns.auto_batch:
        options['auto_batch'] = True
    if ns.no_readahead:
        options['readahead'] = False
    if ns.no_concurrent:
        options['concurrent'] = False
    if ns.max_batch_size:
        options['max_batch_size'] = ns.max_batch_size
    if ns.verify:
        options['verify'] = {'true': True, 'false': False}.get(ns.verify, 'auto')
    return options


def _fail(message, code):
    sys.stderr.write('%s: %s\n' % (sys.executable, message))
    return code


def _is_zip(path):
    return os.path.isfile(path) and zipfile.is_zipfile(path)


def main(argv=None):
    """Entry point of ``python -m keras_fastpredict`` and ``keras-fastpredict``. Like the
    interpreter, it sets ``sys.argv`` and ``sys.path[0]`` for the script it runs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    own, module, script, args = split_argv(argv)
    if own and own[-1] == '-m':
        parser.error('argument -m: expected one argument')
    ns = parser.parse_args(own)
    if script == '-':
        parser.error('reading the script from standard input is not supported')
    if script is None and module is None:
        parser.error('a script (or -m module) to run is required')
    show_stats = ns.stats or os.environ.get('KERAS_FASTPREDICT_STATS', '') not in ('', '0')
    if module is not None:
        # python -m: the working directory, then the module is looked up there (runpy's
        # private lookup, as python's own -m uses it: the error is its message, no traceback).
        sys.argv = ['-m'] + args
        sys.path[0] = os.getcwd()
        try:
            found = runpy._get_module_details(module, runpy._Error)
        except runpy._Error as e:
            return _fail(e, 1)
    else:
        if not os.path.exists(script):
            return _fail("can't open file %r: [Errno 2] No such file or directory" % script, 2)
        sys.argv = [script] + args
        if os.path.isdir(script) or _is_zip(script):
            del sys.path[0]         # run_path puts the folder or zip at sys.path[0]
        else:
            sys.path[0] = os.path.dirname(os.path.realpath(script))
    options = options_from(ns)
    if show_stats or ns.stats_json:
        options['report'] = True          # the call-site report (keras_fastpredict.report)
    if ns.stats_json:
        os.environ[_REPORT_JSON_ENV] = os.path.abspath(ns.stats_json)
    if ns.no_gc_freeze:
        os.environ[import_freeze.ENV] = '0'     # (for the processes it starts too)
    import_freeze.install()
    stats_dir = _for_children(options, show_stats)
    patching.patch(**options)
    runner_pid = os.getpid()
    try:
        if module is not None:
            # With the module found above: a second lookup fails for a package that
            # replaces itself in sys.modules by a module without __spec__, as celery's
            # does (python -m looks up once).
            _, spec, code = found
            sys.argv[0] = spec.origin
            _run_as_main(code, spec, None)
        elif os.path.isdir(script) or _is_zip(script):
            runpy.run_path(script, run_name='__main__')
        else:
            _run_as_main(runpy._get_code_from_file('__main__', script)[0], None, script)
    finally:
        # A child forked without exec that ends with sys.exit() (a gunicorn worker) comes
        # through here too: the job's table, JSON file and stats folder are the runner's;
        # such a child reports as every child does (processes.report, with its pid).
        if os.getpid() == runner_pid:
            _deferred.flush_auto()      # auto-batched calls still pending: the script's end
            _end(show_stats, ns.stats_json, stats_dir)
    return 0


def _run_as_main(code, spec, script):
    """Run ``code`` as python runs a script or ``-m`` module: in a module that stays
    ``sys.modules['__main__']`` to the end. (runpy runs it in a module it then takes out:
    the script's objects lived on in cycles until after TensorFlow's modules were torn down
    at exit, where a kept K.function's callables printed "Exception ignored in ...
    _Callable.__del__" twice.)"""
    main = types.ModuleType('__main__')
    if spec is None:
        main.__dict__.update(__file__=script, __cached__=None, __package__=None, __spec__=None,
                             __loader__=importlib.machinery.SourceFileLoader('__main__', script))
    else:
        main.__dict__.update(__file__=spec.origin, __cached__=spec.cached, __spec__=spec,
                             __package__=spec.parent, __loader__=spec.loader)
    sys.modules['__main__'] = main
    exec(code, main.__dict__)


def _end(show_stats, stats_json, stats_dir):
    if show_stats:
        sys.stderr.write(_stats.format_table() + '\n' + _children_line())
    if show_stats or stats_json:
        _report_at_exit(show_stats, stats_json)
    if stats_dir:
        shutil.rmtree(stats_dir, ignore_errors=True)


def _for_children(options, show_stats):
    """Every Python process the script starts patches itself (``processes``); with stats,
    each reports into a folder (a temporary one, returned, unless the user gave one)."""
    processes.mark_runner()
    made = None
    if show_stats and not os.environ.get(processes.STATS_DIR_ENV):
        made = os.environ[processes.STATS_DIR_ENV] = tempfile.mkdtemp(
            prefix='keras_fastpredict-stats-')
    os.environ.update(processes.child_environ(options, stats=show_stats))
    return made


def _children_line():
    folder = os.environ.get(processes.STATS_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return ''
    found = processes.totals(processes.collect(folder, exclude_pid=os.getpid()))
    if not found['processes']:
        return ''
    return ('keras_fastpredict: other processes of the job: %(processes)d predicted, '
            '%(calls)d calls, %(fast_calls)d fast, %(fallbacks)d fallbacks, '
            '%(batches)d batches (per process above, with its pid)\n' % found)


if __name__ == '__main__':
    sys.exit(main())
