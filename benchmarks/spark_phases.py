"""Where a Spark scoring task's time goes: examples/spark_scoring.py's job with its
partition function timed in phases. A Spark job script (``spark-submit ... this.py``;
``python -m benchmarks.cluster_demo --phases`` submits it plain and patched).

    spark-submit [--conf ...] benchmarks/spark_phases.py --model M [--rows N] [--partitions P]

Two jobs on the same workers, as the example's ``--repeat 2``. Per task: ``import keras``
(TensorFlow's import; 0 once a Python worker has it), ``load_model`` (every task: the
example's cache does not survive being shipped by value), the per-row loop (reading the
rows included, as the example reads them), and the rest of the task as the driver sees it
(Spark's scheduling, shipping rows and results, starting a Python worker). Prints one line
per job: the job's time, then the sums over its tasks of each phase.
"""
import argparse
import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'examples'))
import spark_scoring  # noqa: E402


def timed_scorer(model_path):
    def score_partition(rows):
        start = time.perf_counter()
        import keras  # noqa: F401
        imported = time.perf_counter()
        from keras.models import load_model
        model = load_model(model_path, compile=False)
        loaded = time.perf_counter()
        n = 0
        for row in rows:                       # the example's loop
            x = np.array(row['features'], dtype='float32')
            model.predict(np.expand_dims(x, 0))
            n += 1
        done = time.perf_counter()
        yield (os.getpid(), n, imported - start, loaded - imported, done - loaded,
               done - start)
    return score_partition


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', required=True)
    parser.add_argument('--rows', type=int, default=40000)
    parser.add_argument('--partitions', type=int, default=4)
    args = parser.parse_args(argv)
    spark = spark_scoring.session()
    try:
        df = spark.createDataFrame(spark_scoring.feature_rows(args.rows), ['id', 'features'])
        df = df.repartition(args.partitions).cache()
        df.count()
        for job in (1, 2):
            start = time.perf_counter()
            tasks = df.rdd.mapPartitions(timed_scorer(args.model)).collect()
            seconds = time.perf_counter() - start
            rows = sum(t[1] for t in tasks)
            imports, loads, loops, inside = (sum(t[i] for t in tasks) for i in (2, 3, 4, 5))
            # Tasks run on two executors at once: the sums are task-seconds, not the
            # job's wall time; per row is the loop's time over the rows it read.
            print('job %d: %.2f s; over %d tasks: import keras %.2f s, load_model %.2f s, '
                  'row loop %.2f s (%.0f us a row), inside tasks %.2f s; tasks per worker %s'
                  % (job, seconds, len(tasks), imports, loads, loops, 1e6 * loops / rows,
                     inside, sorted(collections.Counter(t[0] for t in tasks).values())),
                  flush=True)
    finally:
        spark.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
