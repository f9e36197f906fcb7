"""The report as a table, JSON and children's files (keras_fastpredict/report/output.py)."""
import json
import os
import subprocess
import sys
import textwrap


import keras_fastpredict as kfp
from conftest import inputs_for
from keras_fastpredict.report import output
from report_support import recorder  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_table_and_json(models, tmp_path):
    model = models['dense']
    X = inputs_for('dense', 10)
    kfp.patch(report=True)
    model.predict(X)
    data = kfp.report()
    assert data['version'] == 1 and data['pid'] == os.getpid() and data['report'] is True
    table = output.format_table(data)
    assert 'output.py:' in table and 'fast/ra/def/mrg/keras' in table
    path = output.write_json(str(tmp_path / 'r.json'), data)
    with open(path) as f:
        back = json.load(f)
    assert back['sites'][0]['calls'] == 1 and set(back['sites'][0]) >= {
        'site', 'file', 'line', 'function', 'entry', 'model', 'calls', 'rows', 'paths',
        'keras_reasons', 'time_s', 'plain_estimate_s', 'plain_estimate', 'results_read',
        'advice'}
    assert output.child_path('/x/out.json', 42) == '/x/out.42.json'


def test_runner_stats_json_and_children(tmp_path):
    script = tmp_path / 'job.py'
    script.write_text(textwrap.dedent('''
        import subprocess, sys
        import numpy as np, keras
        from keras import layers
        def main():
            m = keras.models.Sequential([layers.Dense(2, input_shape=(3,))])
            X = np.random.rand(20, 3).astype('float32')
            return [m.predict(np.array(X[i:i + 1])) for i in range(20)]
        if __name__ == '__main__':
            main()
            if len(sys.argv) == 1:
                subprocess.check_call([sys.executable, __file__, 'child'])
    '''))
    out = tmp_path / 'report.json'
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    proc = subprocess.run([sys.executable, '-m', 'keras_fastpredict', '--stats', '--stats-json',
                           str(out), str(script)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    err = proc.stderr.decode()
    assert 'call sites' in err and 'job.py:8 in <listcomp>' in err
    assert '@keras_fastpredict.fast_predict on main' in err
    data = json.loads(out.read_text())
    assert [s['site'].rsplit('/', 1)[-1] for s in data['sites']] == ['job.py:8 in <listcomp>']
    children = [p for p in os.listdir(str(tmp_path)) if p.startswith('report.')
                and p != 'report.json' and p.endswith('.json')]
    assert len(children) == 1
    child = json.loads((tmp_path / children[0]).read_text())
    assert child['pid'] != data['pid'] and child['sites'][0]['calls'] == 20
    assert children[0] == 'report.%d.json' % child['pid']
