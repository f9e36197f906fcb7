"""The main job (make demo) runs, agrees with plain Keras and reports a speed-up."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_job_prints_speed_up_and_difference():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'examples', 'legacy_loop.py'),
                          '--rows', '400'], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert 'within the promised 1e-5: yes' in out.stdout
    speedups = [float(s) for s in re.findall(r'speed-up\s+([0-9.]+)x', out.stdout)]
    assert len(speedups) == 2 and all(s > 0 for s in speedups)
    diff = float(re.search(r'largest difference from unpatched outputs: (\S+)',
                           out.stdout).group(1))
    assert diff <= 1e-5
