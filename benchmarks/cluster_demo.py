"""python -m benchmarks.cluster_demo [--rows 40000] [--rounds 3] [--quick]   (make cluster-demo)

The legacy Spark scoring job (``examples/spark_scoring.py``: one ``model.predict`` per
row in ``mapPartitions``) on a Spark standalone cluster started here (a master and two
workers of one core each, ``benchmarks.spark_cluster``), submitted with ``spark-submit``
in client deploy mode, plainly and with the executors patched as the README tells a user
(``--conf spark.executorEnv.PYTHONPATH=<bootstrap folder>`` and the options as
``spark.executorEnv.KERAS_FASTPREDICT_*``), the job unchanged. ``--rounds`` rounds, the
two runs of a round back to back, which one goes first alternating.

Printed: the job's time as the driver script measures it (its first scoring job, the one a
script that runs once sees: Python workers import Keras and load the model inside it; and
its second job on the same workers), spark-submit's wall time, medians with the range, the
ratios plain/patched; the scores compared (equal, or exit status 1); what Spark says to
cluster deploy mode; the executors' reports (their JSON files and the tables in their
stderr logs); then the cluster is stopped and no process of it may be left.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.spark_cluster import StandaloneCluster

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLE = os.path.join(ROOT, 'examples', 'spark_scoring.py')
PHASES = os.path.join(HERE, 'spark_phases.py')
# Jobs start once both executors are up, and a task goes to whichever executor is free
# (no 3 s wait for the one holding its cached partition, which often holds 3 of the 4):
# the runs differ by the patch, not by where Spark happened to cache the table.
JOB_CONF = {'spark.scheduler.minRegisteredResourcesRatio': '1.0',
            'spark.locality.wait': '0'}


def make_model(path, env):
    subprocess.run([sys.executable, '-c', 'import sys; sys.path.insert(0, "examples"); '
                    'import spark_scoring; spark_scoring.make_model(sys.argv[1])', path],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def patched_conf(stats_dir):
    """What the README has a user pass to spark-submit: the bootstrap folder first on the
    executors' PYTHONPATH, a table per Python worker in its executor's stderr and a JSON
    report per Python worker in ``stats_dir``."""
    from keras_fastpredict import spark
    return spark.conf(stats=True, stats_dir=stats_dir)


def job_times(submitted):
    times = [float(t) for t in re.findall(r'scored \d+ rows in ([0-9.]+) s', submitted.stdout)]
    if not times:
        raise RuntimeError('no job time in the output of %s:\n%s'
                           % (' '.join(submitted.cmd), submitted.stdout[-2000:]))
    return times


def last_tables(log):
    """The last keras_fastpredict table each Python worker wrote into an executor's log."""
    with open(log, errors='replace') as f:
        lines = f.read().splitlines()
    tables, i = {}, 0
    while i < len(lines):
        found = re.match(r'keras_fastpredict \[pid (\d+)\]:', lines[i])
        if not found:
            i += 1
            continue
        block = [lines[i]]
        i += 1
        while i < len(lines) and lines[i].startswith(' '):   # the table's own lines
            block.append(lines[i])
            i += 1
        tables[found.group(1)] = block
    return tables


def _median_range(values):
    return '%6.2f s (%.2f-%.2f)' % (np.median(values), min(values), max(values))


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks.cluster_demo',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--rows', type=int, default=40000)
    parser.add_argument('--partitions', type=int, default=4)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--quick', action='store_true', help='2,000 rows, one round')
    parser.add_argument('--phases', action='store_true',
                        help='then where the tasks\' time goes (benchmarks/spark_phases.py), '
                             'plain and patched')
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.rounds = 2000, 1
    with open('/proc/loadavg') as f:
        load = ' '.join(f.read().split()[:3])
    print('Spark standalone cluster: 1 master, 2 workers x 1 core x 1g, on 127.0.0.1 '
          '(load average before: %s)' % load, flush=True)
    work = tempfile.mkdtemp(prefix='kfp-cluster-demo-')
    cluster = StandaloneCluster(workers=2, cores=1, memory='1g')
    cluster.start()
    status = 0
    try:
        print('  master %s; logs and executors\' folders under %s' % (cluster.url,
                                                                     cluster.folder))
        model = os.path.join(work, 'model.h5')
        make_model(model, cluster.env())
        common = ['--rows', args.rows, '--partitions', args.partitions, '--model', model,
                  '--repeat', 2]

        refused = cluster.submit(EXAMPLE, common, deploy_mode='cluster', conf=JOB_CONF)
        said = [l for l in refused.stderr.splitlines() if 'Exception' in l][:1]
        print('  --deploy-mode cluster: exit %d, Spark says: %s' % (
            refused.returncode, said[0] if said else refused.stderr[-300:]))

        flags = patched_conf(os.path.join(work, 'reports-N'))
        print('  job: spark-submit --master %s %s examples/spark_scoring.py --rows %d '
              '--partitions %d (client deploy mode)' % (
                  cluster.url, ' '.join('--conf %s=%s' % kv for kv in sorted(JOB_CONF.items())),
                  args.rows, args.partitions))
        print('  patched: the same, plus\n    ' + '\n    '.join(
            '--conf %s=%s' % kv for kv in sorted(flags.items())), flush=True)
        runs = {'plain': [], 'patched': []}
        reference, last_patched = None, None
        for n in range(1, args.rounds + 1):
            order = ('plain', 'patched') if n % 2 else ('patched', 'plain')
            for variant in order:
                out = os.path.join(work, '%s-%d.npy' % (variant, n))
                conf = dict(JOB_CONF)
                if variant == 'patched':
                    stats_dir = os.path.join(work, 'reports-%d' % n)
                    os.makedirs(stats_dir)
                    conf.update(patched_conf(stats_dir))
                done = cluster.submit(EXAMPLE, common + ['--out', out], conf=conf).check()
                times = job_times(done)
                runs[variant].append((times[0], times[-1], done.seconds))
                scores = np.load(out)
                if reference is None:
                    reference = scores
                equal = scores.shape == reference.shape and (scores == reference).all()
                if not equal:
                    status = 1
                if variant == 'patched':
                    last_patched = (done, stats_dir)
                print('  round %d %-8s first job %6.2f s, second job %6.2f s, spark-submit '
                      '%6.1f s, scores %s' % (n, variant, times[0], times[-1], done.seconds,
                                              'equal' if equal else 'DIFFER'), flush=True)

        print('\n%-34s %-24s %-24s %s' % ('', 'plain', 'patched', 'plain/patched'))
        for i, label in enumerate(('first scoring job (driver)', 'second scoring job (driver)',
                                   'spark-submit, whole run')):
            plain = [r[i] for r in runs['plain']]
            fast = [r[i] for r in runs['patched']]
            print('%-34s %-24s %-24s %.2fx' % (label, _median_range(plain),
                                               _median_range(fast),
                                               np.median(plain) / np.median(fast)))
        print('scores: %s' % ('every patched run equal to the plain runs (%d rows)'
                              % len(reference) if not status else 'MISMATCH'))

        done, stats_dir = last_patched
        from keras_fastpredict import spark
        print('\nexecutors\' reports, last patched run (%s):' % done.app_id)
        print('JSON files in %s (python -m keras_fastpredict.spark reports DIR):' % stats_dir)
        print(spark.summary(stats_dir))
        for log in cluster.executor_logs(done.app_id):
            print('%s, last table per Python worker:' % os.path.relpath(log, cluster.folder))
            for block in last_tables(log).values():
                print('\n'.join('  ' + line for line in block))
        if args.phases:
            print('\nwhere the time goes (benchmarks/spark_phases.py: the same loop, timed '
                  'in phases inside each task):')
            for variant in ('plain', 'patched'):
                conf = dict(JOB_CONF)
                if variant == 'patched':
                    os.makedirs(os.path.join(work, 'reports-phases'))
                    conf.update(patched_conf(os.path.join(work, 'reports-phases')))
                done = cluster.submit(PHASES, ['--model', model, '--rows', args.rows,
                                               '--partitions', args.partitions],
                                      conf=conf).check()
                for line in done.stdout.splitlines():
                    if line.startswith('job '):
                        print('  %-8s %s' % (variant, line))
    finally:
        left = cluster.stop()
        survivors = cluster.survivors()
        shutil.rmtree(work, ignore_errors=True)
        print('\ncluster stopped: %s' % (
            'no process left' if not left and not survivors else
            '%d process(es) outlived Spark\'s shutdown and were killed' % len(left)))
    return status


if __name__ == '__main__':
    sys.exit(main())
