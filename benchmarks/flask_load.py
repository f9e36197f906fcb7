"""python -m benchmarks.flask_load [--clients 1,4,16] [--requests 200] [--repeats 3]

The Flask example under load (examples/flask_server.py, a Dense(64)x2 model; the load and
its checks are examples/load.py's): a plain server (the classic ``graph.as_default()``
workaround) and a patched one run side by side on loopback, and each repeat loads each in
turn at every client count (the order rotated by one each repeat), so both meet the same
machine load. Prints throughput and p50/p99 latency per client count, medians over the
repeats, and the patched/plain ratios. Every answer is checked by load.py against the
prediction of the row that client sent; any error or wrong answer fails the run.
"""
import argparse
import importlib.util
import os
import sys
import time

import numpy as np

from .plain_env import byte_compile_package, plain_environ

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'examples')


def _load_module():
    spec = importlib.util.spec_from_file_location('example_load',
                                                  os.path.join(EXAMPLES, 'load.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks.flask_load', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--clients', default='1,4,16')
    parser.add_argument('--requests', type=int, default=200, help='per client and run')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--rows-per-client', type=int, default=8)
    args = parser.parse_args(argv)
    load = _load_module()
    byte_compile_package()       # as installed: see plain_env
    # The servers inherit this environment: nothing of the runner's (its bootstrap folder
    # would patch the plain server, its options change the patched one's).
    environ = plain_environ()
    os.environ.clear()
    os.environ.update(environ)
    counts = [int(c) for c in args.clients.split(',') if c]
    print('%s, %d cores, load average %.2f %.2f %.2f; %d repeats of %d requests per client'
          % (time.strftime('%Y-%m-%d %H:%M'), len(os.sched_getaffinity(0)),
             *os.getloadavg(), args.repeats, args.requests), flush=True)
    servers = {}
    results = {(v, c): [] for v in ('plain', 'patched') for c in counts}
    bad = 0
    try:
        servers['plain'] = load.Server(unpatched=True)
        servers['patched'] = load.Server(unpatched=False)
        order = ['plain', 'patched']
        for r in range(args.repeats):
            for clients in counts:
                for v in order[r % 2:] + order[:r % 2]:
                    res = load.run_load(servers[v].port, clients, args.requests,
                                        args.rows_per_client, duration=600.0,
                                        timeout=30.0, seed=1234 + r)
                    bad += res['errors'] + res['wrong'] + (res['ok'] == 0)
                    results[v, clients].append(res)
                    print('  repeat %d, %2d clients, %-7s %7.0f req/s  p50 %6.2f ms  '
                          'p99 %6.2f ms  errors %d  wrong %d  (load %.2f)'
                          % (r + 1, clients, v, res['throughput'], res['p50_ms'],
                             res['p99_ms'], res['errors'], res['wrong'], os.getloadavg()[0]),
                          flush=True)
        stats = load.get_stats(servers['patched'].port)
    finally:
        for server in servers.values():
            server.stop()
    print()
    print('| clients | plain req/s | patched req/s | ratio | plain p50 / p99 ms '
          '| patched p50 / p99 ms |')
    print('|---:|---:|---:|---:|---:|---:|')
    for clients in counts:
        med = {v: {k: float(np.median([x[k] for x in results[v, clients]]))
                   for k in ('throughput', 'p50_ms', 'p99_ms')} for v in ('plain', 'patched')}
        ratios = [b['throughput'] / a['throughput']
                  for a, b in zip(results['plain', clients], results['patched', clients])]
        print('| %d | %.0f | %.0f | %.2fx (%.2f-%.2f) | %.2f / %.2f | %.2f / %.2f |'
              % (clients, med['plain']['throughput'], med['patched']['throughput'],
                 float(np.median(ratios)), min(ratios), max(ratios),
                 med['plain']['p50_ms'], med['plain']['p99_ms'],
                 med['patched']['p50_ms'], med['patched']['p99_ms']))
    for model, s in sorted(stats.items()):
        print('patched server, %s: calls %d, batches %d, mean batch %.2f'
              % (model, s['calls'], s['batches'], s['mean_batch_size']))
    print('load average at the end %.2f %.2f %.2f' % os.getloadavg())
    if bad:
        print('FAILED: errors or wrong answers (see above)', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
