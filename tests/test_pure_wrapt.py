"""Without wrapt's C extension (``WRAPT_DISABLE_EXTENSIONS=1``: wrapt's proxies and
function wrappers are its Python classes), the package imports and every way of using it
gives plain Keras' results: the C code that assumes wrapt's C proxy or wrappers is not
used then (engine/_native/'s in-place proxy code, report/_steady.c's recorders).

One subprocess (the variable is read when wrapt is imported). Its model's weights and
inputs are small integers, so that every sum is exact in float32: batched or one by one,
plain Keras' results are the same bytes, and the patched ones must be too."""
import os
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np
    import keras
    from keras import backend as K, layers

    model = keras.models.Sequential([layers.Dense(5, activation='relu', input_shape=(4,)),
                                     layers.Dense(3)])
    rng = np.random.RandomState(0)
    model.set_weights([rng.randint(-2, 3, w.shape).astype('float32')
                       for w in model.get_weights()])
    x = rng.randint(0, 4, (150, 4)).astype('float32')
    rows = [np.array(r[None]) for r in x]
    sess = K.get_session()


    def loop():
        return np.concatenate([model.predict(r) for r in rows])


    def runs():
        return np.concatenate([sess.run(model.output, {model.input: r}) for r in rows[:20]])


    out = {'plain': loop(), 'plain_run': runs()}

    import wrapt
    import keras_fastpredict as kfp
    from keras_fastpredict.engine import pending
    assert type(wrapt.ObjectProxy) is not type and not pending.C_PROXY   # (Python's proxy)
    try:    # the C allocator refuses a proxy not laid out as wrapt's C one, changing nothing
        from keras_fastpredict.engine._deferral import uncounted
    except ImportError:
        pass
    else:
        class Proxy(wrapt.ObjectProxy):
            pass
        assert uncounted(Proxy) is False and '__init__' not in Proxy.__dict__

    kfp.patch()
    out['patched'] = loop()
    out['patched_run'] = runs()
    with kfp.batching(readahead=False):
        got = [model.predict(r) for r in rows]
        assert type(got[0]) is kfp.DeferredArray and kfp.stats(model)['batches'] == 0
        out['batching'] = np.concatenate(got)


    @kfp.fast_predict(readahead=False)
    def collected():
        return [model.predict(r) for r in rows]


    out['fast_predict'] = np.concatenate(collected())
    out['fast_calls'] = kfp.stats(model)['fast_calls']
    out['deferred'] = kfp.stats(model)['deferred']
    kfp.unpatch()
    kfp.patch(auto_batch=True)          # (what the runner's --auto-batch turns on)
    out['auto_batch'] = loop()
    out['auto_deferred'] = kfp.stats(model)['deferred'] - out['deferred']
    np.savez(sys.argv[1], **out)
''')


def test_without_wrapts_c_extension_results_are_plain_kerass(tmp_path):
    script = tmp_path / 'pure.py'
    script.write_text(SCRIPT)
    out = tmp_path / 'out.npz'
    env = dict(os.environ, WRAPT_DISABLE_EXTENSIONS='1', TF_CPP_MIN_LOG_LEVEL='3',
               PYTHONPATH=ROOT, PYTHONWARNINGS='ignore')
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'Exception ignored' not in proc.stderr, proc.stderr[-4000:]
    got = np.load(str(out))
    plain = got['plain']
    assert plain.shape == (150, 3) and plain.dtype == np.float32 and plain.any()
    for kind in ('patched', 'batching', 'fast_predict', 'auto_batch'):
        assert got[kind].dtype == plain.dtype and got[kind].shape == plain.shape, kind
        assert got[kind].tobytes() == plain.tobytes(), kind
    assert got['patched_run'].tobytes() == got['plain_run'].tobytes()
    assert np.array_equal(got['plain_run'], plain[:20])
    # Each way was taken: the fast path, deferral (two loops' calls), auto-batch.
    assert got['fast_calls'] >= 150 * 3 and got['deferred'] == 150 * 2
    assert got['auto_deferred'] > 0
