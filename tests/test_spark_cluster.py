"""The legacy scoring job (examples/spark_scoring.py) on a Spark standalone cluster started
here (benchmarks.spark_cluster: a master and two workers, JVMs of their own on 127.0.0.1,
each worker's executor with its own Python workers), submitted with spark-submit in client
deploy mode: plainly; with the executors patched as the README tells a user
(``--conf spark.executorEnv.*``); and with ``keras_fastpredict.spark.configure(builder)``
in the job. Same scores as the plain run; the executors' own reports (JSON files, and the
tables in their stderr logs) show every call on the fast path. The cluster is stopped, and
no process of it is left, whatever the tests do.

pyspark comes with the project's ``spark`` extra and Java is on CI: a missing one fails
these tests, it does not skip them.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.spark_cluster import StandaloneCluster
from keras_fastpredict import processes, spark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, 'examples', 'spark_scoring.py')
ROWS, PARTITIONS = 400, 2
JOB_CONF = {'spark.scheduler.minRegisteredResourcesRatio': '1.0'}   # both executors up
SUBMIT_TIMEOUT = 150

# One cluster for the module: its tests go to one xdist worker (make test: --dist loadgroup).
pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group('spark_cluster')]


@pytest.fixture(scope='module')
def cluster():
    c = StandaloneCluster(workers=2, cores=1, memory='1g')
    c.start()
    try:
        yield c
    finally:
        c.stop()
        assert c.survivors() == [], 'processes of the cluster left after stop()'


@pytest.fixture(scope='module')
def model_path(cluster, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('model') / 'model.h5')
    subprocess.run([sys.executable, '-c', 'import sys; sys.path.insert(0, "examples"); '
                    'import spark_scoring; spark_scoring.make_model(sys.argv[1])', path],
                   cwd=ROOT, env=cluster.env(), check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def run_job(cluster, model_path, out, conf=None, env=None, extra=()):
    conf = dict(JOB_CONF, **(conf or {}))
    args = ['--rows', ROWS, '--partitions', PARTITIONS, '--model', model_path,
            '--out', out] + list(extra)
    done = cluster.submit(EXAMPLE, args, conf=conf, env=env, timeout=SUBMIT_TIMEOUT).check()
    assert 'scored %d rows in' % ROWS in done.stdout, done.stdout[-2000:]
    assert done.app_id, done.stderr[-3000:]
    return np.load(out), done


@pytest.fixture(scope='module')
def plain(cluster, model_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('plain') / 'scores.npy')
    return run_job(cluster, model_path, out)


def logs_text(cluster, app_id):
    logs = cluster.executor_logs(app_id)
    assert len(logs) == 2, logs                 # one executor per worker
    texts = []
    for log in logs:
        with open(log, errors='replace') as f:
            texts.append(f.read())
    return texts


def assert_fast_in_reports(folder, cluster, app_id):
    records = [r for r in processes.collect(str(folder)) if r.get('models')]
    total = processes.totals(records)
    # (Where calls fell back, each model's reasons, to tell why.)
    why = [(name, counters.get('fallback_reasons')) for r in records
           for name, counters in r['models'].items() if counters.get('fallbacks')]
    assert total['calls'] == total['fast_calls'] == ROWS, (total, why)
    assert total['fallbacks'] == 0 and total['batches'] == 0, total
    # What the driver (or python -m keras_fastpredict.spark reports DIR) prints of them.
    assert ('%d predicted, %d calls, %d fast, 0 fallbacks' % (len(records), ROWS, ROWS)
            in spark.summary(str(folder)))
    # Each reporting Python worker also wrote its table into its executor's stderr log,
    # the one Spark's UI shows.
    text = '\n'.join(logs_text(cluster, app_id))
    for record in records:
        assert 'keras_fastpredict [pid %d]:' % record['pid'] in text, text[-3000:]


def test_plain_job_is_plain(cluster, plain):
    scores, done = plain
    assert scores.shape == (ROWS, 2)
    assert (scores[:, 0] == np.arange(ROWS)).all()
    for text in logs_text(cluster, done.app_id):     # the cluster patches nothing itself
        assert not re.search(r'keras_fastpredict( \[pid \d+\])?: ', text), text[-3000:]


def test_executors_patched_by_submit_flags(cluster, model_path, plain, tmp_path):
    # The README's way: spark-submit --conf spark.executorEnv.PYTHONPATH=<bootstrap>
    # and the options as spark.executorEnv.KERAS_FASTPREDICT_*; the job unchanged.
    reports = tmp_path / 'reports'
    reports.mkdir()
    flags = spark.conf(stats=True, stats_dir=str(reports))
    assert flags['spark.executorEnv.PYTHONPATH'].split(os.pathsep)[0] == \
        processes.BOOTSTRAP_DIR
    scores, done = run_job(cluster, model_path, str(tmp_path / 'scores.npy'), conf=flags)
    # One row per call on the fast path: the same kernels as plain Keras, equal scores.
    np.testing.assert_array_equal(scores, plain[0])
    assert_fast_in_reports(reports, cluster, done.app_id)


def test_executors_patched_by_configure_in_the_job(cluster, model_path, plain, tmp_path):
    # keras_fastpredict.spark.configure(builder) in the job (--patch-executors); the
    # reports' folder comes from the driver's KERAS_FASTPREDICT_STATS_DIR, with
    # KERAS_FASTPREDICT_STATS=1 the tables in the executors' logs.
    reports = tmp_path / 'reports'
    reports.mkdir()
    scores, done = run_job(cluster, model_path, str(tmp_path / 'scores.npy'),
                           env={'KERAS_FASTPREDICT_STATS_DIR': str(reports),
                                'KERAS_FASTPREDICT_STATS': '1'},
                           extra=['--patch-executors'])
    np.testing.assert_array_equal(scores, plain[0])
    assert_fast_in_reports(reports, cluster, done.app_id)


def test_cluster_deploy_mode_is_refused_for_python_apps(cluster, model_path, tmp_path):
    # What the docs say: Spark's standalone mode runs Python drivers in client mode only.
    done = cluster.submit(EXAMPLE, ['--rows', ROWS, '--model', model_path],
                          deploy_mode='cluster', timeout=SUBMIT_TIMEOUT)
    assert done.returncode != 0
    assert ('Cluster deploy mode is currently not supported for python applications on '
            'standalone clusters') in done.stderr, done.stderr[-2000:]


# --- keras_fastpredict.spark without a cluster: what configure() sets -------------------

def test_conf_options_from_the_environment_and_arguments(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith('KERAS_FASTPREDICT_'):
            monkeypatch.delenv(name)
    monkeypatch.setenv('KERAS_FASTPREDICT_DEFER', '1')
    monkeypatch.setenv('KERAS_FASTPREDICT_STATS_DIR', str(tmp_path))
    got = spark.conf(max_batch_size=8)
    paths = got.pop('spark.executorEnv.PYTHONPATH').split(os.pathsep)
    assert paths[0] == processes.BOOTSTRAP_DIR
    assert got == {'spark.executorEnv.KERAS_FASTPREDICT_DEFER': '1',
                   'spark.executorEnv.KERAS_FASTPREDICT_MAX_BATCH_SIZE': '8',
                   'spark.executorEnv.KERAS_FASTPREDICT_STATS_DIR': str(tmp_path)}
    # A packed environment's relative bootstrap folder, as the executors see it.
    packed = 'env/lib/python3.7/site-packages/keras_fastpredict/bootstrap'
    got = spark.conf(bootstrap=packed, stats=True, defer=False)
    assert got['spark.executorEnv.PYTHONPATH'] == packed
    assert got['spark.executorEnv.KERAS_FASTPREDICT_STATS'] == '1'
    assert got['spark.executorEnv.KERAS_FASTPREDICT_DEFER'] == '0'
    with pytest.raises(TypeError, match='bogus'):
        spark.conf(bogus=1)
    with pytest.raises(ValueError):
        spark.conf(verify='sometimes')


def test_configure_sets_a_conf_and_a_builder_keeping_their_pythonpath(monkeypatch):
    for name in list(os.environ):
        if name.startswith('KERAS_FASTPREDICT_'):
            monkeypatch.delenv(name)
    from pyspark import SparkConf
    from pyspark.sql import SparkSession
    conf = SparkConf(loadDefaults=False).set('spark.executorEnv.PYTHONPATH', '/opt/libs')
    assert spark.configure(conf, bootstrap='/b', defer=True) is conf
    assert conf.get('spark.executorEnv.PYTHONPATH') == os.pathsep.join(['/b', '/opt/libs'])
    assert conf.get('spark.executorEnv.KERAS_FASTPREDICT_DEFER') == '1'
    builder = SparkSession.Builder().config('spark.executorEnv.PYTHONPATH', '/opt/libs')
    assert spark.configure(builder, bootstrap='/b') is builder
    assert builder._options['spark.executorEnv.PYTHONPATH'] == \
        os.pathsep.join(['/b', '/opt/libs'])
    with pytest.raises(TypeError):
        spark.configure({'spark.master': 'local'})
