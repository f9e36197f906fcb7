"""The zero-change runner: ``python -m keras_fastpredict [options] script.py [args...]``.

Patches, then runs the script as ``__main__`` with its own ``sys.argv``, the way
``python -m cProfile`` does. The script's exit code and exceptions pass through.
Options may also come from ``KERAS_FASTPREDICT_*`` environment variables.
"""
import argparse
import os
import runpy
import sys

from . import config, patching
from . import counters as _stats


def _parser():
    p = argparse.ArgumentParser(
        prog='python -m keras_fastpredict',
        description='Run a Python script with Keras predict calls sped up (no code changes).')
    p.add_argument('--stats', action='store_true',
                   help='print what was sped up, batched or left to Keras when the script ends')
    p.add_argument('--defer', action='store_true',
                   help='return deferred results and run calls in batches (see README)')
    p.add_argument('--no-readahead', action='store_true',
                   help='do not predict rows ahead when a loop walks an array')
    p.add_argument('--no-concurrent', action='store_true',
                   help='do not merge calls made from several threads at once')
    p.add_argument('--max-batch-size', type=int)
    p.add_argument('--verify', choices=['auto', 'true', 'false'])
    p.add_argument('-m', dest='module', help='run a library module as a script')
    p.add_argument('script', nargs='?', help='the script to run')
    p.add_argument('args', nargs=argparse.REMAINDER, help='its arguments')
    return p


def options_from(ns):
    options = config.from_environ()
    if ns.defer:
        options['defer'] = True
    if ns.no_readahead:
        options['readahead'] = False
    if ns.no_concurrent:
        options['concurrent'] = False
    if ns.max_batch_size:
        options['max_batch_size'] = ns.max_batch_size
    if ns.verify:
        options['verify'] = {'true': True, 'false': False}.get(ns.verify, 'auto')
    return options


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    ns = parser.parse_args(argv)
    if not ns.script and not ns.module:
        parser.error('a script (or -m module) to run is required')
    show_stats = ns.stats or os.environ.get('KERAS_FASTPREDICT_STATS', '') not in ('', '0')
    patching.patch(**options_from(ns))
    try:
        if ns.module:
            sys.argv = [ns.module] + ([ns.script] if ns.script else []) + ns.args
            runpy.run_module(ns.module, run_name='__main__', alter_sys=True)
        else:
            sys.argv = [ns.script] + ns.args
            sys.path.insert(0, os.path.dirname(os.path.abspath(ns.script)))
            runpy.run_path(ns.script, run_name='__main__')
    finally:
        if show_stats:
            sys.stderr.write(_stats.format_table() + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
