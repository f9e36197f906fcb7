"""The benchmark suite runs end to end on a tiny configuration (and its check bites)."""
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_suite_writes_table_plots_and_checks(tmp_path):
    out = tmp_path / 'results'
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks', '--quick', '--repeats', '1',
         '--cases', 'mlp64/collect,mlp64/threads-4', '--out', str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / 'results.md').read_text()
    assert '| case | variant | µs/row (median) |' in text
    for variant in ('unpatched predict', 'patched + batching()', 'raw callable, whole array',
                    'patched (concurrent batcher)'):
        assert variant in text
    # The correctness check ran on every timed run (7 + 4 variants, one repeat each).
    assert 'Correctness: all 11 timed runs agree with unpatched predict' in text
    assert '## Targets' in text and ('PASS' in text or 'FAIL' in text)
    assert (out / 'mlp64.png').stat().st_size > 1000
    assert (out / 'threads.png').exists()
    assert 'Exception ignored' not in proc.stderr


def test_check_reports_a_mismatch():
    from benchmarks.report import check
    ref = [np.array([[1.0, 2.0]], dtype='float32')]
    assert check(ref, [ref[0] * (1 + 1e-7)]) is None
    assert 'output 0' in check(ref, [ref[0] * 1.001])
    assert 'shape' in check(ref, [ref[0][0]])
    assert '2 outputs' in check(ref, [ref[0], ref[0]])
