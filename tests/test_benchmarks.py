"""The benchmark suite runs end to end on a tiny configuration (and its check bites)."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_suite(tmp_path, cases):
    """``python -m benchmarks --quick --repeats 1`` on ``cases``: (its process, results.md,
    the output folder); it must exit 0."""
    out = tmp_path / 'results'
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks', '--quick', '--repeats', '1',
         '--cases', cases, '--out', str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, (out / 'results.md').read_text(), out


def test_quick_suite_writes_table_plots_and_checks(tmp_path):
    proc, text, out = quick_suite(tmp_path, 'mlp64/collect,mlp64/threads-4,mlp64/threads-16')
    assert '| case | variant | µs/row (median) |' in text
    for variant in ('unpatched predict', 'patched + batching()', 'raw callable, whole array',
                    'patched (concurrent batcher)'):
        assert variant in text
    # The correctness check ran on every run (7 + 5 + 5 variants, one repeat each); the
    # threads plot follows each variant across thread counts.
    assert 'Correctness: all 17 runs agree with unpatched predict' in text
    assert '## Targets' in text and ('PASS' in text or 'FAIL' in text)
    # The batcher against concurrent=False in paired blocks ran (tiny with --quick).
    assert 'concurrent batcher vs fast path alone (concurrent=False), paired' in text
    assert (out / 'mlp64.png').stat().st_size > 1000
    assert (out / 'threads.png').exists()
    assert 'Exception ignored' not in proc.stderr


def test_never_slower_fails_a_batcher_slower_beyond_chance(monkeypatch):
    # The paired check's verdict, on made-up per-block ratios (concurrent=False's time
    # over the batcher's): consistently below 1 fails; scattered around 1 passes, as does
    # a batcher consistently faster.
    from benchmarks import threads_ab
    rng = np.random.RandomState(0)
    noise = np.exp(rng.normal(0, 0.2, 15))
    for ratios, passed in ((0.8 * noise, False), (noise / np.exp(np.mean(np.log(noise))),
                                                  True), (1.5 * noise, True)):
        monkeypatch.setattr(threads_ab, 'compare',
                            lambda *a, **k: {'ratio': list(ratios)})
        (ok, line), = threads_ab.never_slower({'mlp64': 10}, (16,), say=lambda *a: None)
        assert ok is passed, line
        assert line.startswith('PASS' if passed else 'FAIL') and '16 thr' in line
    # A count found slower once is measured again: it fails only if slower again.
    runs = iter([list(0.8 * noise), list(noise / np.exp(np.mean(np.log(noise))))])
    monkeypatch.setattr(threads_ab, 'compare', lambda *a, **k: {'ratio': next(runs)})
    (ok, line), = threads_ab.never_slower({'mlp64': 10}, (16,), say=lambda *a: None)
    assert ok and 'not so again' in line, line


def test_quick_suite_runs_session_run_cases(tmp_path):
    # Session.run and K.function cases (benchmarks/tf1_cases) have cases of their own
    # kind: a change to how the suite warms a variant's model once failed every patched
    # run of theirs (TypeError), seen only in a full make bench.
    proc, text, _ = quick_suite(tmp_path, 'mlp64/sess-run,mlp64/k-function')
    assert 'ERROR' not in text and 'ERROR' not in proc.stdout, proc.stdout[-3000:]
    assert '| mlp64/sess-run | **patched (read-ahead)** |' in text
    assert '| mlp64/k-function | **patched (read-ahead)** |' in text


def test_check_reports_a_mismatch():
    from benchmarks.report import check
    ref = [np.array([[1.0, 2.0]], dtype='float32')]
    assert check(ref, [ref[0] * (1 + 1e-7)]) is None
    assert 'output 0' in check(ref, [ref[0] * 1.001])
    assert 'shape' in check(ref, [ref[0][0]])
    assert '2 outputs' in check(ref, [ref[0], ref[0]])


def test_a_mismatching_variant_is_reported_and_recorded():
    from types import SimpleNamespace
    from benchmarks.cases import Variant
    from benchmarks.report import run_case
    ones = np.ones((4, 2), dtype='float32')
    case = SimpleNamespace(
        name='fake/collect', rows=4, threads=None, model_name='fake',
        model=SimpleNamespace(name='fake'), warm=lambda: None,
        variants=[Variant('unpatched predict', 'unpatched', lambda: ones, None),
                  Variant('raw callable, whole array', 'limit', lambda: ones, None),
                  Variant('wrong', 'peer', lambda: ones * 1.01, None)])
    said = []
    result = run_case(case, repeats=2, say=said.append)
    assert len(result.get('wrong').mismatches) == 2
    assert result.get('raw callable, whole array').mismatches == []
    assert result.get('wrong').checks == 2 and len(result.get('wrong').times) == 2
    assert any('MISMATCH in fake/collect / wrong' in s for s in said)


def test_processes_quick_pool_plain_against_runner(tmp_path):
    # benchmarks.processes end to end on its cheap case (the Spark case runs the same
    # example that tests/test_processes.py runs).
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.processes', '--quick', '--cases', 'pool',
         '--out', str(tmp_path)],
        cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / 'processes.md').read_text()
    assert '| Pool(4) fork, 800 rows, predict per row | runner |' in text
    assert 'all patched runs agree with the plain run' in text


def test_first_pass_quick_runs_scripts_plain_and_under_the_runner(tmp_path):
    # benchmarks.first_pass end to end on two of its scripts: each run in fresh processes
    # plainly and under the runner, outputs compared (exit status 1 on a mismatch).
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.first_pass', '--quick', '--cases',
         'fresh rows: sess.run,array rows: LSTM,hand-batched', '--out', str(tmp_path)],
        cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / 'first_pass.md').read_text()
    assert '| fresh rows: sess.run | 100 |' in text and '| array rows: LSTM | 50 |' in text
    assert '| collect rows: hand-batched predict(X) | 200 |' in text
    assert 'outputs differ' not in text
    saved = json.loads((tmp_path / 'first_pass.json').read_text())
    assert [r['mismatches'] for r in saved['results']] == [0, 0, 0]
    assert all(r['plain_cpu_s'] > 0 and r['patched_cpu_s'] > 0 for r in saved['results'])


def test_first_call_quick_times_phases_plain_and_under_the_runner():
    # benchmarks.first_call end to end: the phases of each process's first calls, plain
    # and under the runner, results checked against plain's (exit status 1 on a mismatch).
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.first_call', '--quick', '--ways',
         'sess.run,K.function'], cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split(' | ')[0]: line.split(' | ')[1:] for line in proc.stdout.splitlines()}
    assert '| sess.run (10 calls)' in rows and '| K.function (10 calls)' in rows
    # Plain Keras' session and its variables' init (K.function's first call); the model's
    # entry made by ours in each patched process, within its first two calls.
    made = rows['| ours: model entry (its callable included)']
    assert made[-1].endswith('(1) |') and made[-2] == '-'
    keras_session = rows["| Keras: get_session (session, variables' init)"]
    assert keras_session[0] != '-'


def test_threads_quick_prints_ratios_checked_against_plain(tmp_path):
    # benchmarks.threads end to end on one model and two thread counts: every variant's
    # outputs are checked against plain Keras (a mismatch exits non-zero).
    out = tmp_path / 'threads.json'
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.threads', '--quick', '--repeats', '2',
         '--models', 'mlp64', '--threads', '1,4', '--always', '--policy', '--json', str(out)],
        cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '| Dense(64)x2 | 4 |' in proc.stdout and 'batcher / direct' in proc.stdout
    assert 'mlp64, 4 threads: batcher' in proc.stdout and 'load average' in proc.stdout
    saved = json.loads(out.read_text())
    assert [(r['model'], r['threads']) for r in saved['results']] == [('mlp64', 1),
                                                                      ('mlp64', 4)]
    for r in saved['results']:
        assert sorted(r['per_row_s']) == ['batcher', 'concurrent=False', 'merge=True',
                                          'plain']
        assert all(len(times) == 2 for times in r['per_row_s'].values())
    assert 'Exception ignored' not in proc.stderr


def test_threads_steady_does_not_time_plain_keras_while_patched(tmp_path):
    # --steady keeps one patch per case: plain Keras would run patched (it was timed so,
    # at patched speed), so it is not timed; outputs are still checked against it.
    out = tmp_path / 'steady.json'
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.threads', '--quick', '--repeats', '2', '--steady',
         '--models', 'mlp64', '--threads', '4', '--json', str(out)],
        cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())['results']
    assert sorted(result['per_row_s']) == ['batcher', 'concurrent=False']
    row = [line for line in proc.stdout.split('\n') if line.startswith('| Dense(64)x2 | 4 |')]
    assert len(row) == 1 and row[0].split(' | ')[2] == '-'
    assert 'of plain' not in proc.stdout           # no target against plain either


def test_server_quick_loads_plain_and_patched_servers(tmp_path):
    # benchmarks.flask_load end to end: both Flask servers started and stopped, every answer
    # checked by examples/load.py.
    import pytest
    pytest.importorskip('flask')
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.flask_load', '--clients', '1,2', '--requests', '5',
         '--repeats', '1', '--rows-per-client', '2'],
        cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '| 1 |' in proc.stdout and '| 2 |' in proc.stdout
    assert 'errors 0  wrong 0' in proc.stdout and 'FAILED' not in proc.stderr


def test_benchmark_children_get_nothing_of_the_runner():
    # A driver whose environment carries the runner's bootstrap folder and options (run
    # under the runner, or from a shell that exported them) started its "plain" processes
    # patched (first_pass's plain fresh-rows loop: 10 ms for 500 calls, not 97). The
    # environment it gives them now patches nothing; the runner's own does (the control).
    from keras_fastpredict import processes
    from benchmarks.plain_env import plain_environ
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))
    dirty = processes.child_environ({'auto_batch': True},
                                    environ=dict(os.environ, PYTHONPATH=path))
    ask = ('import sys, keras; m = sys.modules.get("keras_fastpredict.patching"); '
           'print(bool(m and m.is_patched()))')

    def patched_in(env):
        proc = subprocess.run([sys.executable, '-c', ask], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=120,
                              env=dict(env, TF_CPP_MIN_LOG_LEVEL='2'))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.split()[-1]
    assert patched_in(dirty) == 'True'
    clean = plain_environ(dirty)
    assert not any(k.startswith('KERAS_FASTPREDICT_') for k in clean)
    assert patched_in(clean) == 'False'


def test_benchmarks_byte_compile_the_package_as_pip_does(tmp_path):
    # With PYTHONDONTWRITEBYTECODE set (this machine's environment) an editable install
    # was compiled from source in every process the benchmarks started (46 ms against
    # 9 ms), charged to the runner's whole-process time. After the benchmarks' step, a
    # fresh process compiles none of the package's modules; before it, a copy of the
    # package with no .pyc files is compiled module by module (the control).
    import shutil
    from benchmarks.plain_env import byte_compile_package
    copy = tmp_path / 'keras_fastpredict'
    shutil.copytree(os.path.join(ROOT, 'keras_fastpredict'), str(copy),
                    ignore=shutil.ignore_patterns('__pycache__'))
    count = (
        'import importlib._bootstrap_external as b\n'
        'seen = []\n'
        'original = b.SourceLoader.source_to_code\n'
        'def counted(self, data, path, **kw):\n'
        '    seen.append(path)\n'
        '    return original(self, data, path, **kw)\n'
        'b.SourceLoader.source_to_code = counted\n'
        'import keras_fastpredict, keras_fastpredict.report\n'
        'assert keras_fastpredict.__file__.startswith(%r), keras_fastpredict.__file__\n'
        'print(len([p for p in seen if "keras_fastpredict" in p]))\n' % str(tmp_path))

    def compiled_in_a_fresh_process():
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1', PYTHONPATH=str(tmp_path))
        proc = subprocess.run([sys.executable, '-c', count], cwd=str(tmp_path), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return int(proc.stdout.split()[-1])
    assert compiled_in_a_fresh_process() > 10
    assert byte_compile_package(str(copy))
    assert compiled_in_a_fresh_process() == 0
