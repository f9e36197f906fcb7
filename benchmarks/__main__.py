"""python -m benchmarks [--quick] [--cases PATTERNS] [--repeats N] [--out DIR]

Runs each case's loop unpatched and patched in this one process, checks the outputs
agree, and writes results.md, results.json and PNG plots into --out.
Exit status: 1 when a patched result disagrees with plain Keras or a run raised;
with --strict also 2 when a target fails.
"""
import argparse
import contextlib
import io
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))


def _quiet():
    """Silence TensorFlow's and Keras' chatter: the table is the output."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    warnings.simplefilter('ignore')
    with contextlib.redirect_stderr(io.StringIO()):      # "Using TensorFlow backend."
        import tensorflow as tf
        import keras  # noqa: F401
    tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
    from tensorflow.python.util import deprecation
    deprecation._PRINT_DEPRECATION_WARNINGS = False


def _release(selected):
    """Free session callables while TensorFlow is still loaded (freed at interpreter
    teardown they print 'Exception ignored in _Callable.__del__')."""
    import gc
    from . import models
    for case in selected:
        case.variants = case.model = None
    models._built.clear()
    gc.collect()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog='python -m benchmarks', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='tiny sizes (for a test)')
    parser.add_argument('--cases', default='',
                        help='comma-separated patterns, e.g. "mlp64/*,cnn/collect"')
    parser.add_argument('--repeats', type=int, default=None,
                        help='timed runs per variant (default 5, 1 with --quick)')
    parser.add_argument('--out', default=os.path.join(HERE, 'results'))
    parser.add_argument('--list', action='store_true', help='list the cases and exit')
    parser.add_argument('--strict', action='store_true', help='exit 2 when a target fails')
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)

    from . import cases as cases_mod
    selected = cases_mod.select(cases_mod.all_cases(args.quick), args.cases)
    if args.list or not selected:
        print('\n'.join('%-28s %6d rows' % (c.name, c.rows) for c in selected)
              or 'no case matches %r' % args.cases)
        return 0 if selected else 1

    _quiet()
    from tqdm import tqdm
    from . import report
    started = time.time()
    results = []
    for case in tqdm(selected, desc='building', leave=False):
        case.setup()
    warmup = not args.quick         # one untimed round first: first calls cost extra
    with tqdm(total=sum(len(c.variants) for c in selected) * (repeats + warmup), unit='run',
              desc='benchmarks') as bar:
        for case in selected:
            bar.set_description(case.name)
            results.append(report.run_case(case, repeats, bar, say=tqdm.write, warmup=warmup))
    paired = None
    if not args.cases or args.quick:
        # The batcher against concurrent=False, in paired blocks (tiny with --quick).
        from . import threads_ab
        tqdm.write('paired: concurrent batcher vs concurrent=False')
        paired = (threads_ab.never_slower({'mlp64': 64}, (1, 4), blocks=3, say=tqdm.write)
                  if args.quick else threads_ab.never_slower(say=tqdm.write))
    command = 'python -m benchmarks ' + ' '.join(argv)
    text, mismatch, error, failed = report.write(results, args.out, command.strip(), repeats,
                                                 args.quick, time.time() - started, paired)
    print(text)
    print('Written to %s' % os.path.abspath(args.out))
    _release(selected)
    if mismatch or error:
        print('\nFAILED: %s' % ('results disagree with plain Keras' if mismatch
                                else 'a run raised an exception'), file=sys.stderr)
        return 1
    return 2 if (failed and args.strict) else 0


if __name__ == '__main__':
    sys.exit(main())
