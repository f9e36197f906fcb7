"""What ``Session.run`` and ``K.function`` calls share on a TensorFlow 1 session: session
callables run on TF's inter-op pool or the caller's thread (``engine.ways``), whether
running some fetches has side effects, and Keras' learning phase."""
import threading
import weakref

from ..engine import batch_safety, ways, work

_lock = threading.Lock()
_tf = None
_Tensor = None     # set by bind()


class _TF(object):
    """TensorFlow's pieces, bound on first use (importing this module imports no TF)."""

    def __init__(self):
        from tensorflow.core.protobuf import config_pb2
        from tensorflow.python import pywrap_tensorflow as tf_session
        from tensorflow.python.client import session
        from tensorflow.python.framework import errors, ops
        from tensorflow.python.util import compat
        self.Tensor = ops.Tensor
        self.Operation = ops.Operation
        self.OpError = errors.OpError
        self.CallableOptions = config_pb2.CallableOptions
        self.FetchHandler = session._FetchHandler
        self.convert_to_numpy_obj = session._convert_to_numpy_obj
        self.run_callable = tf_session.TF_SessionRunCallable
        self.make_callable = tf_session.TF_SessionMakeCallable
        self.release_callable = tf_session.TF_SessionReleaseCallable
        self.new_buffer = tf_session.TF_NewBufferFromString
        self.delete_buffer = tf_session.TF_DeleteBuffer
        self.as_bytes = compat.as_bytes


def bind():
    """TensorFlow's pieces (bound on the first call)."""
    global _tf, _Tensor
    if _tf is None:
        tf = _TF()
        _Tensor = tf.Tensor
        _tf = tf
    return _tf


def side_effect_free(graph, feeds, fetches):
    """Whether running ``fetches`` with ``feeds`` fed runs no op with side effects (a
    variable write, a random draw, a queue), by the engine's graph analysis. Anything it
    cannot read counts as having side effects."""
    bind()
    try:
        if not all(type(t) is _Tensor for t in fetches):
            return False
        verdict, reason = batch_safety.analyse(graph, feeds, fetches)
    except Exception:
        return False
    return verdict != batch_safety.STATEFUL and not (reason or '').startswith('analysis failed')


def keras_phase(graph):
    """Keras' learning phase of ``graph`` (a placeholder with default False), if any."""
    bind()
    try:
        from .keras import adapter
        if adapter.tfb is None:
            import sys
            if 'keras.backend.tensorflow_backend' not in sys.modules:
                return None
            adapter.bind()
        phase = adapter.learning_phases().get(graph)
    except Exception:
        return None
    if type(phase) is not _Tensor or phase.op.type != 'PlaceholderWithDefault':
        return None
    return phase


class Runner(object):
    """Session callables for one set of feeds, fetches and targets on one session: on
    TF's inter-op pool as plain TF runs them (in the caller's thread where a row's work is
    tiny or runs a loop: ``engine.work``), the other way once that may pay
    (``engine.ways``). Holds the session weakly; its callables are released when it is
    dropped (a closed or deleted session frees them itself)."""
    __slots__ = ('session_ref', 'feeds', 'fetches', 'targets', 'ways', '__weakref__')

    def __init__(self, session, feeds, fetches, targets):
        self.session_ref = weakref.ref(session)
        self.feeds, self.fetches, self.targets = feeds, fetches, targets
        self.ways = None

    def run(self, session, arrays):
        """One run; TF's own errors, unwrapped (``Session._do_call`` wraps them)."""
        made = self.ways
        if made is None:
            with _lock:
                made = self.ways
                if made is None:
                    first = (ways.INLINE
                             if work.starts_inline(self.feeds, self.fetches, self.targets)
                             else ways.POOL)
                    made = self.ways = ways.Ways(_maker(weakref.ref(self)), first=first)
        return made.run(session._session, arrays)

    def make(self, way):
        """A new callable (its handle) for ``way``."""
        session = self.session_ref()
        if session is None:
            raise RuntimeError('the session was dropped')
        tf = bind()
        options = tf.CallableOptions()
        options.feed.extend(t.name for t in self.feeds)
        options.fetch.extend(t.name for t in self.fetches)
        options.target.extend(op.name for op in self.targets)
        if way == ways.INLINE:
            options.run_options.inter_op_thread_pool = -1
        session._extend_graph()
        buf = tf.new_buffer(tf.as_bytes(options.SerializeToString()))
        try:
            return tf.make_callable(session._session, buf)
        finally:
            tf.delete_buffer(buf)

    def __del__(self):
        # Only names bound to the class: a runner can be dropped as the interpreter tears
        # the modules down (a Session.run signature's, held by the session Keras' backend
        # keeps to the end), after this module's globals were set to None ("Exception
        # ignored in: Runner.__del__ ... 'NoneType' object is not callable").
        made = self.ways
        if made is not None:
            self.ways = None
            self.release(self.session_ref(), [h for h in made.handles if h is not None])


def _maker(runner_ref):
    # (Weakly: the runner holds the Ways that holds this.)
    def make(way):
        return runner_ref().make(way)
    return make


def _release(session, handles):
    if not handles or session is None or _tf is None:    # (_tf: None at shutdown too)
        return
    try:
        if session._session is None or session._closed:
            return          # the session frees its callables itself
        for handle in handles:
            _tf.release_callable(session._session, handle)
    except Exception:       # interpreter shutdown
        pass


Runner.release = staticmethod(_release)
