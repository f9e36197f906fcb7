"""The README's plot: time per call for each kind of legacy loop, unpatched against patched.

Reads the results.json that ``python -m benchmarks`` writes and draws, per loop, the
unpatched variant and each patched one (median µs per call, min-max whiskers):

    .venv/bin/python -m benchmarks --cases 'mlp64/immediate,mlp64/sess-run,mlp64/k-function,detector/*,mlp64_session/*'
    .venv/bin/python benchmarks/plot_per_call.py [benchmarks/results/results.json] [docs/per_call.png]
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# (case, label): the loops shown, in order, when present in the results.
LOOPS = [
    ('mlp64/immediate', 'model.predict(X[i:i+1])\nDense(64)x2'),
    ('mlp64/sess-run', 'sess.run(model.output,\n{model.input: X[i][None]})'),
    ('mlp64_session/sess-run', 'sess.run per row in a\ntf.Session the script made'),
    ('mlp64/k-function', 'K.function(inputs, outputs)\nper row'),
    ('mlp64/k-function-layer', 'K.function([input, phase],\n[hidden layer]) per row'),
    ('detector/sess-run', 'sess.run([boxes, scores], ...)\nper image, small conv net'),
]
COLORS = {'unpatched': '#999999', 'patched': '#e6550d'}
SHADES = ['#e6550d', '#fdae6b', '#a63603']


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    source = argv[0] if argv else os.path.join(HERE, 'results', 'results.json')
    target = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(HERE), 'docs',
                                                         'per_call.png')
    with open(source) as f:
        results = {r['case']: r for r in json.load(f)}
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = []          # (loop label, variant label, median, lo, hi, color)
    for case, label in LOOPS:
        result = results.get(case)
        if result is None:
            continue
        shade = iter(SHADES)
        for v in result['variants']:
            if v['role'] not in COLORS or not v['times']:
                continue
            times = np.array(v['times']) * 1e6
            color = COLORS['unpatched'] if v['role'] == 'unpatched' else next(shade)
            rows.append((label, v['name'], float(np.median(times)), float(times.min()),
                         float(times.max()), color))
    if not rows:
        raise SystemExit('none of the loops %s in %s' % ([c for c, _ in LOOPS], source))

    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.4))
    y = np.arange(len(rows))[::-1]
    med = np.array([r[2] for r in rows])
    ax.barh(y, med, xerr=[med - [r[3] for r in rows], np.array([r[4] for r in rows]) - med],
            color=[r[5] for r in rows], error_kw={'elinewidth': 0.8})
    ax.set_yticks(y)
    ax.set_yticklabels([r[1] for r in rows], fontsize=7)
    base = {}
    for yy, r in zip(y, rows):
        base.setdefault(r[0], r[2])
        ax.text(r[2] * 1.05, yy, '%.3g µs%s' % (r[2], '' if r[2] == base[r[0]] else
                                                  '  (%.1fx)' % (base[r[0]] / r[2])),
                va='center', fontsize=7)
    # Loop names at the first row of each group.
    seen = set()
    for yy, r in zip(y, rows):
        if r[0] not in seen:
            seen.add(r[0])
            ax.text(-0.01, yy + 0.45, r[0].replace('\n', ' '), transform=ax.get_yaxis_transform(),
                    ha='right', va='bottom', fontsize=7.5, fontweight='bold')
            ax.axhline(yy + 0.5, color='#dddddd', linewidth=0.6)
    ax.set_xscale('log')
    ax.set_xlim(right=med.max() * 4)
    ax.set_xlabel('µs per call (median of the repeats, min-max), log scale')
    ax.set_title('keras_fastpredict: one call per sample, unpatched (grey) and patched',
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    fig.savefig(target, dpi=100)
    print('written to %s' % target)


if __name__ == '__main__':
    main()
