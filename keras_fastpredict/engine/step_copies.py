"""Unrolling without running a layer's Python once per time step.

Unrolled as Keras unrolls, a recurrent layer's step function (its cell's ``call``) runs
in Python once per time step and creates its ops one by one: about 0.4 ms per op, so an
LSTM(128) over 40 steps takes 0.75 s to build. Here the step function runs once, on
placeholders (the template); every time step then gets a copy of the template's ops,
made by TensorFlow's graph importer (C++) with the placeholders mapped to that step's
input and states. The ops, and so the results, are those Keras' own step would create;
the caller checks the outputs against the model's own graph before using them anyway.
Whatever the template cannot copy (nested states, control inputs of ops without
outputs, an import error) runs Keras' own step instead.

TensorFlow's importer finds the ops it made by walking every op of the graph (O(graph)
per import, which would make the copies as slow as Keras' own steps); within the block,
this thread's imports walk only the ops made since the last walk.
"""
import contextlib
import threading

_TEMPLATE_SCOPE = 'step_template'


class _Template(object):
    """One time step's ops, recorded once, copied per step."""

    def __init__(self, step, inp, states):
        import tensorflow as tf
        from tensorflow.core.framework import graph_pb2
        graph = inp.graph
        flat = [inp] + list(states)
        self.placeholders = [tf.compat.v1.placeholder(t.dtype, t.shape) for t in flat]
        first = graph._last_id
        with tf.name_scope(_TEMPLATE_SCOPE):
            output, new_states = step(self.placeholders[0], type(states)(self.placeholders[1:]))
        ops = [graph._nodes_by_id[i] for i in range(first + 1, graph._last_id + 1)
               if i in graph._nodes_by_id]
        outs = [output] + list(new_states)
        if not all(isinstance(t, tf.Tensor) for t in outs):
            raise TypeError('not a flat list of tensors')
        self.structure = type(new_states)
        self.uses_learning_phase = getattr(output, '_uses_learning_phase', False)
        names = {op.name for op in ops}
        graph_def = graph_pb2.GraphDef()
        graph_def.versions.CopyFrom(graph.graph_def_versions)
        external = {}
        used = set()
        for op in ops:
            node = graph_def.node.add()
            node.CopyFrom(op.node_def)
            if '_class' in node.attr:       # colocation with ops outside: CPU only anyway
                del node.attr['_class']
            for t in op.inputs:
                if t.op.name not in names:
                    external[t.name] = t
            for c in op.control_inputs:
                if c.name not in names:
                    if not c.outputs:
                        raise TypeError('control input without outputs')
                    external['^' + c.name] = c.outputs[0]
        position = {p.name: i for i, p in enumerate(self.placeholders)}
        for name in list(external):
            if name in position:
                used.add(position[name])
                del external[name]
        self.used = sorted(used)
        self.external = external
        self.graph_def = graph_def
        # Each output: ('input', i) for a placeholder passed through, else its name.
        self.returns = [('input', position[t.name]) if t.name in position else ('op', t.name)
                        for t in outs]
        self.return_names = [name for kind, name in self.returns if kind == 'op']

    def copy(self, flat):
        from tensorflow.python.framework import importer
        input_map = dict(self.external)
        for i in self.used:
            input_map[self.placeholders[i].name] = flat[i]
        made = iter(importer.import_graph_def(self.graph_def, input_map=input_map,
                                              return_elements=self.return_names,
                                              name='step'))
        outs = [flat[name] if kind == 'input' else next(made) for kind, name in self.returns]
        if self.uses_learning_phase:
            outs[0]._uses_learning_phase = True
        return outs[0], self.structure(outs[1:])


class _Step(object):
    """A step function whose calls after the first are template copies."""

    def __init__(self, step):
        self.step = step
        self.template = None
        self.failed = False

    def __call__(self, inp, states):
        import tensorflow as tf
        flat = [inp] + list(states) if isinstance(states, (list, tuple)) else None
        if self.failed or flat is None or not all(isinstance(t, tf.Tensor) for t in flat):
            return self.step(inp, states)
        try:
            if self.template is None:
                self.template = _Template(self.step, inp, states)
            return self.template.copy(flat)
        except Exception:           # Keras' own step, for this layer from now on
            self.failed = True
            return self.step(inp, states)


@contextlib.contextmanager
def copying_steps(backend, graph):
    """Within the block, recurrent layers applied by this thread through ``backend.rnn``
    are unrolled, and copy their step's ops instead of running their step function per
    time step. Other threads' calls are left as they are."""
    from tensorflow.python import pywrap_tensorflow as c_api
    from tensorflow.python.framework import c_api_util
    original, original_new = backend.rnn, c_api_util.new_tf_operations
    thread = threading.get_ident()
    walked = [0]            # the graph position up to which every op has its Operation

    def rnn(step_function, *args, **kwargs):
        if threading.get_ident() == thread:
            # A recurrent layer's loop, unrolled (TimeDistributed's own loop over time
            # is left as its layer asks).
            if not getattr(step_function, '__qualname__', '').startswith('TimeDistributed.'):
                kwargs['unroll'] = True
            step_function = _Step(step_function)
        return original(step_function, *args, **kwargs)

    def new_tf_operations(g):
        if g is not graph or threading.get_ident() != thread:
            for c_op in original_new(g):
                yield c_op
            return
        c_op, pos = c_api.TF_GraphNextOperation(g._c_graph, walked[0])
        while c_op is not None:
            try:
                g._get_operation_by_tf_operation(c_op)
            except KeyError:
                yield c_op
            walked[0] = pos
            c_op, pos = c_api.TF_GraphNextOperation(g._c_graph, pos)
    backend.rnn = rnn
    c_api_util.new_tf_operations = new_tf_operations
    try:
        yield
    finally:
        if backend.rnn is rnn:
            backend.rnn = original
        if c_api_util.new_tf_operations is new_tf_operations:
            c_api_util.new_tf_operations = original_new
