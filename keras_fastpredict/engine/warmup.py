"""TensorFlow's first matrix product of more than one row in a process generates its CPU
kernels (MKL-DNN's JIT GEMM: 25-40 ms on this machine, once per process). A plain
one-row loop never pays it; read-ahead, deferral and merged calls run several rows, and
would pay it inside the loop. It is paid once, on a thread of its own, when the engine
first wants several rows in one run (a session exists by then, so no fork is made
unsafe): read-ahead serves rows alone until it is done; a deferred or merged batch that
comes first waits for it. A loop that never batches never pays it. The product runs on
a private graph and session through TensorFlow's own calls, never through the patched
entry points (which would settle the user's pending work)."""
import threading

from ..config import settings

_Thread = threading.Thread

_started = False
_lock = threading.Lock()
done = threading.Event()


def ready():
    """Whether the kernels are made; starts making them if nobody has yet."""
    if done.is_set():
        return True
    start()
    return False


def running():
    """Whether the kernels are being made on their thread now."""
    return _started and not done.is_set()


def expect_batches():
    """A session exists (so TF's thread pools are set as the user's session set them;
    the first session in a process sets them for all) and auto-batch alone is on: its
    sites will run several rows at once, so the kernels are begun now, beside the first
    call's own one-time work (Keras' variable initialisation, the entry), not at the entry
    (the first batch then waited about 10 ms for them). Not where the report times plain
    Keras: it waits for our threads, and its sites' calls with it."""
    if settings.auto_batch and not settings.report and not _started:
        start(prepare_here=True)


def start(prepare_here=False):
    """Begin making the kernels on a thread of their own. ``prepare_here``: the product's
    graph, session and callable (about 2 ms, all Python) are made in the caller's thread
    first, so that the thread only runs it (TensorFlow's run, without the GIL): begun
    where the caller goes on with Python at once (a deferring loop), the thread would wait
    for the GIL at each of its steps, up to the interpreter's switch interval each."""
    global _started
    if _started:
        return
    with _lock:
        if _started:
            return
        _started = True
    prepared = []
    if prepare_here:
        try:
            prepared.append(_prepare())
        except Exception:   # (the thread tries again, and gives up as it does)
            pass
    try:
        _Thread(target=_warm, args=(prepared,), name='keras_fastpredict-warmup',
                daemon=True).start()
    except Exception:
        # (No thread to be had, a thread limit say: nothing waits for the kernels, merged
        # runs pay them inline once, 25-40 ms.)
        if prepared:
            session, fn, _ = prepared.pop()
            del fn                      # (released before its session closes)
            session.close()
        done.set()


def _prepare():
    """A one-product graph on a private session: (session, its callable, its feed)."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (None, 8))
        y = tf.matmul(x, tf.ones((8, 8)))
    # Its own one-thread inter-op pool, never TF's global one: a session on a server
    # (tf.train.Server's target) sets no local pool, so this one could be the first local
    # session, whose pools every later one shares (the user's would then run its ops one
    # at a time). The intra-op pool is TF's global one as soon as any local device exists;
    # where this session's device is the first, its size is TF's default, as a plain
    # default session's.
    config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=1,
                                      use_per_session_threads=True)
    session = tf.compat.v1.Session(graph=graph, config=config)
    try:
        options = config_pb2.CallableOptions(feed=[x.name], fetch=[y.name])
        fn = session._make_callable_from_options(options)
    except Exception:
        session.close()
        raise
    return session, fn, np.ones((2, 8), np.float32)


def _warm(prepared=()):
    """Run the product (the kernels are made then), on a private session closed after;
    ``prepared``: a list holding what ``_prepare`` made, taken from it (so that the
    callable is released before its session closes)."""
    try:
        from tensorflow.python import pywrap_tensorflow
        session, fn, feed = prepared.pop() if prepared else _prepare()
        try:
            pywrap_tensorflow.TF_SessionRunCallable(session._session, fn._handle, [feed],
                                                    None)
            del fn
        finally:
            session.close()
    except Exception:       # a warm-up only: whatever fails here costs the loop 25 ms
        pass
    finally:
        done.set()
