"""A legacy Spark scoring job: a table of feature rows scored by a Keras model, one
``model.predict`` per row in a ``mapPartitions`` function, as such jobs were written.

    python examples/spark_scoring.py [--rows N] [--master local[2]] [--out scores.npy]
    spark-submit --master spark://host:7077 examples/spark_scoring.py ...   # a cluster
    python -m keras_fastpredict examples/spark_scoring.py ...    # executors patched too
    python examples/spark_scoring.py --fast-predict ...           # the one-line decorator
    spark-submit ... examples/spark_scoring.py --patch-executors   # keras_fastpredict.spark

The driver saves a small model to a temporary .h5 file (or uses ``--model``); each task
loads it and scores its partition. (Run as a script, the partition function and the
``_model`` cache it reads travel by value with every task, so the cache starts empty in
each task, as in many such jobs; imported by name, as the tests do, a Python worker
loads the model once.) The scores are written to ``--out`` (a .npy array of (id, score)
rows, in id order). The job prints its time. Needs the ``spark`` extra (pyspark 3.4) and
Java 8, 11 or 17.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

FEATURES = 16
_model = None            # the model, once loaded (per task when this file runs as a script)


def make_model(path, seed=0):
    """The model the job scores with: Dense(64)-Dense(64)-Dense(1), fixed weights."""
    import keras
    rng = np.random.RandomState(seed)
    model = keras.models.Sequential([
        keras.layers.Dense(64, activation='relu', input_shape=(FEATURES,)),
        keras.layers.Dense(64, activation='relu'),
        keras.layers.Dense(1, activation='sigmoid')])
    model.set_weights([rng.normal(0, 0.3, w.shape).astype('float32')
                       for w in model.get_weights()])
    model.save(path)
    return path


def feature_rows(n, seed=1):
    rng = np.random.RandomState(seed)
    data = rng.rand(n, FEATURES).astype('float32')
    return [(i, [float(v) for v in data[i]]) for i in range(n)]


def load(path):
    global _model
    if _model is None:
        from keras.models import load_model
        _model = load_model(path, compile=False)
    return _model


def partition_scorer(model_path):
    """The partition function: one ``model.predict`` per row, results collected."""
    def score_partition(rows):
        model = load(model_path)
        ids, predictions = [], []
        for row in rows:
            x = np.array(row['features'], dtype='float32')
            predictions.append(model.predict(np.expand_dims(x, 0)))
            ids.append(row['id'])
        return [(i, float(p[0][0])) for i, p in zip(ids, predictions)]
    return score_partition


def score(spark, model_path, rows, partitions, fast_predict=False):
    """(id, score) rows in id order, and the job's seconds."""
    df = spark.createDataFrame(rows, ['id', 'features']).repartition(partitions)
    df = df.cache()
    df.count()                                    # the table is in memory before the clock
    scorer = partition_scorer(model_path)
    if fast_predict:
        import keras_fastpredict
        scorer = keras_fastpredict.fast_predict(scorer)   # the one line that batches
    start = time.perf_counter()
    scored = df.rdd.mapPartitions(scorer).collect()
    seconds = time.perf_counter() - start
    df.unpersist()
    scored.sort()
    return np.array(scored, dtype='float64'), seconds


def session(master=None, app='keras_fastpredict spark example', patch_executors=False):
    """The job's session: on ``master``; without one, on spark-submit's ``--master``
    when spark-submit started this script, else on ``local[2]``."""
    os.environ.setdefault('PYSPARK_PYTHON', sys.executable)   # executors: this Python
    from pyspark.sql import SparkSession
    builder = SparkSession.builder.appName(app)
    # spark-submit hands the driver its conf (--master, --conf) through the gateway it
    # started (PYSPARK_GATEWAY_PORT): a master set here would override its --master.
    if master or 'PYSPARK_GATEWAY_PORT' not in os.environ:
        builder = builder.master(master or 'local[2]')
    if patch_executors:
        import keras_fastpredict.spark
        keras_fastpredict.spark.configure(builder)     # the one line that patches executors
    return (builder.config('spark.ui.enabled', 'false')
            .config('spark.sql.shuffle.partitions', '4')
            .getOrCreate())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--rows', type=int, default=40000)
    parser.add_argument('--partitions', type=int, default=4)
    parser.add_argument('--master', help="default: spark-submit's --master, else local[2]")
    parser.add_argument('--model', help='a saved .h5 model (default: made by the driver)')
    parser.add_argument('--out', help='write the (id, score) rows here (.npy)')
    parser.add_argument('--fast-predict', action='store_true',
                        help='decorate the partition function with @fast_predict')
    parser.add_argument('--repeat', type=int, default=1, help='run the job this many times')
    parser.add_argument('--patch-executors', action='store_true',
                        help='keras_fastpredict.spark.configure(builder): executors patched '
                             'on a cluster too (options from KERAS_FASTPREDICT_* variables)')
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix='spark_scoring-') as folder:
        model_path = args.model or make_model(os.path.join(folder, 'model.h5'))
        spark = session(args.master, patch_executors=args.patch_executors)
        try:
            rows = feature_rows(args.rows)
            for _ in range(args.repeat):
                scored, seconds = score(spark, model_path, rows, args.partitions,
                                        args.fast_predict)
                print('scored %d rows in %.2f s' % (len(scored), seconds), flush=True)
        finally:
            spark.stop()
    if args.out:
        np.save(args.out, scored)
    return 0


if __name__ == '__main__':
    sys.exit(main())
