"""Spark executors patched by keras_fastpredict, on a cluster as in ``local[N]``.

Executors are not started from the driver's environment: the variables the runner hands
to its children (``processes.child_environ``) must reach them as ``spark.executorEnv.*``.

* ``configure(builder_or_conf, ...)``: sets them on a ``SparkSession.Builder`` or a
  ``SparkConf`` before the context starts: the one line a job adds.
* ``conf(...)``: the same settings as a dict, for ``spark-submit --conf`` (the command
  line ``python -m keras_fastpredict.spark conf`` prints them as flags).
* ``summary(folder)``: the executors' reports (``stats_dir``), one line per Python worker
  and the total, for the driver to print (``python -m keras_fastpredict.spark reports``).
"""
import argparse
import os
import site
import sys

from . import config, processes

PREFIX = 'spark.executorEnv.'


def _source_root():
    """The folder this keras_fastpredict is imported from when it is not an installed
    package (a source tree, an editable install): executors need it on their path to
    import this very copy. None for site-packages, which must not go before the
    standard library on ``PYTHONPATH``."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    installed = list(site.getsitepackages()) + [site.getusersitepackages()]
    if any(os.path.abspath(p) == here for p in installed):
        return None
    return here


def conf(bootstrap=None, stats=None, stats_dir=None, pythonpath='', **options):
    """``{'spark.executorEnv.NAME': value}`` that patch every executor's Python workers.

    ``bootstrap``: the bootstrap folder as the executors see it. By default this install's
    (right on this machine and where executors have the same install path), with the
    source tree it was imported from if any; with a packed environment shipped with
    ``--archives env.tar.gz#env``, ``env/lib/python3.7/site-packages/keras_fastpredict/bootstrap``.
    ``stats``: each Python worker prints its counters to its executor's stderr after every
    task. ``stats_dir``: each writes them as JSON there (a folder all executors see).
    ``options``: as for ``patch()``. Options, ``stats`` and ``stats_dir`` not given are
    taken from this process' ``KERAS_FASTPREDICT_*`` variables (the runner's, when the
    driver runs under it). ``pythonpath``: the executors' own entries, kept after ours."""
    given = options
    options = config.from_environ()
    options.update(given)
    config.Settings().update(**options)         # unknown names and bad values raise here
    if stats is None:
        stats = os.environ.get(processes.STATS_ENV, '') not in ('', '0')
    if stats_dir is None:
        stats_dir = os.environ.get(processes.STATS_DIR_ENV) or None
    paths = [bootstrap] if bootstrap else [processes.BOOTSTRAP_DIR, _source_root()]
    paths += pythonpath.split(os.pathsep)
    seen, ordered = set(), []
    for p in paths:
        if p and p not in seen:
            seen.add(p)
            ordered.append(p)
    env = processes.child_environ(options, stats=stats, environ={})
    env['PYTHONPATH'] = os.pathsep.join(ordered)
    if stats_dir:
        env[processes.STATS_DIR_ENV] = os.path.abspath(stats_dir)
    return {PREFIX + name: value for name, value in env.items()}


def configure(target, bootstrap=None, stats=None, stats_dir=None, **options):
    """Patch every executor's Python workers: sets ``spark.executorEnv.*`` (see ``conf``)
    on ``target``, a ``SparkSession.Builder`` or a ``SparkConf``, and returns it. Call it
    before the context starts (``getOrCreate()``): executors' environments are fixed then.
    A ``spark.executorEnv.PYTHONPATH`` already set is kept, after the bootstrap folder."""
    key = PREFIX + 'PYTHONPATH'
    if hasattr(target, 'setIfMissing'):                     # SparkConf
        existing, setter = target.get(key, ''), target.set
    elif hasattr(target, 'getOrCreate'):                    # SparkSession.Builder
        # The builder keeps its options in a dict and has no getter.
        existing, setter = getattr(target, '_options', {}).get(key, ''), target.config
    else:
        raise TypeError('configure() takes a SparkSession.Builder or a SparkConf, not %s'
                        % type(target).__name__)
    settings = conf(bootstrap, stats, stats_dir, pythonpath=existing or '', **options)
    for name, value in settings.items():
        setter(name, value)
    return target


def summary(folder):
    """The reports executors wrote into ``folder`` (``stats_dir``): one line per Python
    worker (pid, calls, fast calls, fallbacks, batches) and the total."""
    records = processes.collect(folder)
    lines = []
    for record in records:
        one = processes.totals([record])
        if one['processes']:
            lines.append('  pid %-7d %7d calls, %7d fast, %d fallbacks, %d batches (%s)'
                         % (record['pid'], one['calls'], one['fast_calls'],
                            one['fallbacks'], one['batches'], record.get('when')))
    total = processes.totals(records)
    lines.append('keras_fastpredict: executors\' Python workers: %(processes)d predicted, '
                 '%(calls)d calls, %(fast_calls)d fast, %(fallbacks)d fallbacks, '
                 '%(batches)d batches' % total)
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m keras_fastpredict.spark',
        description='Spark executors patched by keras_fastpredict: the spark-submit flags, '
                    'and the reports executors wrote.')
    sub = parser.add_subparsers(dest='command')
    flags = sub.add_parser('conf', help='print the --conf flags that patch the executors '
                                        '(options from KERAS_FASTPREDICT_* variables)')
    flags.add_argument('--bootstrap', help='the bootstrap folder as executors see it')
    flags.add_argument('--stats', action='store_true', default=None,
                       help="a table per Python worker in its executor's stderr")
    flags.add_argument('--stats-dir', help='a JSON report per Python worker in this folder')
    read = sub.add_parser('reports', help='summarize the reports in a --stats-dir folder')
    read.add_argument('folder')
    args = parser.parse_args(argv)
    if args.command == 'conf':
        settings = conf(args.bootstrap, args.stats, args.stats_dir)
        print(' '.join('--conf %s=%s' % item for item in sorted(settings.items())))
    elif args.command == 'reports':
        print(summary(args.folder))
    else:
        parser.print_help()
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
