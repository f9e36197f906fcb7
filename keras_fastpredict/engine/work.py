"""A static bound on the work of one row of a graph: whether its runs are too small for
TF's inter-op pool to gain on them, so that its first callable may run in the caller's
thread (``engine.ways``); and whether it runs a loop, whose ops the pool's executor hands
to its threads one by one at each iteration (measured here, one step of a seq2seq
decoder, LSTM(128): 133 us a run inline against 295 through ours on the pool; a stateful
LSTM(32) step 83 against 199 a call; the char-RNN's LSTM(128) x 40 steps as fast either
way), so that it starts there too.

Counted from the graph alone, per row: matrix products and convolutions (transposed too)
at two operations a multiply-add, every other op at its output's size. A graph with a
loop, an op whose work the graph does not show (a Python or graph function), more ops than
``MAX_OPS``, or a shape not known past the batch axis is not small. ``TINY_FLOPS`` (a
row of Dense(64)x2 on 32 features: 14,000) is about 100 us of one core's work at 10
GFLOP/s, the least a run needs before the pool's parallel ops can save more than its
hand-off; measured here, Dense(64)x2 runs a row in 10 us inline against 36-50 on the pool.
"""

TINY_FLOPS = 1e6
MAX_OPS = 200
_LOOP_OPS = frozenset(('Enter', 'Exit', 'NextIteration', 'LoopCond', 'While',
                       'StatelessWhile'))
# Ops whose work is not in the graph's shapes: a Python function, a graph function called
# (or branched to) by one op.
_OPAQUE_OPS = frozenset(('PyFunc', 'PyFuncStateless', 'EagerPyFunc', 'PartitionedCall',
                         'StatefulPartitionedCall', 'If', 'StatelessIf', 'Case',
                         'SymbolicGradient', 'RemoteCall'))


def _per_row(shape):
    """Elements of one row of a tensor's static shape, or None if not fully known."""
    if shape.ndims is None or shape.ndims == 0:
        return 1 if shape.ndims == 0 else None
    dims = shape.as_list()[1:]
    if any(d is None for d in dims):
        return None
    size = 1
    for d in dims:
        size *= d
    return size


def _flops(op):
    """One row's operations for ``op``, or None if its shapes are not known."""
    kind = op.type
    out = _per_row(op.outputs[0].shape) if op.outputs else 0
    if out is None and kind == 'Reshape':
        # (Keras' Flatten: a shape computed in the graph.) A row keeps its elements.
        out = _per_row(op.inputs[0].shape)
    if out is None:
        return None
    if kind in ('MatMul', 'BatchMatMul', 'BatchMatMulV2'):
        inner = _inner(op, kind)
        if inner is None:
            return None
        return 2 * out * inner
    if kind in ('Conv2D', 'DepthwiseConv2dNative', 'Conv3D'):
        kernel = op.inputs[1].shape
        if not kernel.is_fully_defined():
            return None
        taps = 1
        for d in kernel.as_list()[:-1]:      # all but the output channels (or multiplier)
            taps *= d
        if kind == 'DepthwiseConv2dNative':
            taps //= kernel.as_list()[-2]     # each output channel reads one input channel
        return 2 * out * taps
    if kind in ('Conv2DBackpropInput', 'Conv3DBackpropInputV2'):    # transposed: each
        kernel = op.inputs[1].shape                     # input element meets every tap
        fed = _per_row(op.inputs[2].shape)
        if not kernel.is_fully_defined() or fed is None:
            return None
        taps = 1
        for d in kernel.as_list()[:-1]:      # all but the input channels
            taps *= d
        return 2 * fed * taps
    return out


def _inner(op, kind):
    """A product's inner size, from either factor's static shape (after Keras' Flatten
    the rows' is not known, the kernel's is)."""
    a, b = op.inputs[0].shape, op.inputs[1].shape
    if kind == 'MatMul':
        sides = ((a, -2 if op.get_attr('transpose_a') else -1),
                 (b, -1 if op.get_attr('transpose_b') else -2))
    else:
        sides = ((a, -2 if op.get_attr('adj_x') else -1),
                 (b, -1 if op.get_attr('adj_y') else -2))
    for shape, axis in sides:
        if shape.ndims is not None and shape.ndims >= -axis and shape[axis].value is not None:
            return shape[axis].value
    return None


TINY, LOOP, OTHER = 'tiny', 'loop', 'other'


def starts_inline(feeds, fetches, targets=()):
    """Whether such runs should start in the caller's thread: tiny, or a loop."""
    return kind(feeds, fetches, targets) != OTHER


def kind(feeds, fetches, targets=()):
    """What one row's work between ``feeds`` and ``fetches`` (and the ops ``targets`` that
    run with them: a training step's) is: TINY (at most ``TINY_FLOPS``: TF's pool cannot
    gain on a one-row run), LOOP (a loop op met before the work passed ``TINY_FLOPS`` or
    ``MAX_OPS`` ops), or OTHER (anything not understood too)."""
    try:
        stop = {t.op for t in feeds}
        seen = set()
        todo = [t.op for t in fetches] + list(targets)
        total = 0
        while todo:
            op = todo.pop()
            if op in seen:
                continue
            seen.add(op)
            if op.type in _LOOP_OPS:
                return LOOP
            if len(seen) > MAX_OPS or op.type in _OPAQUE_OPS:
                return OTHER
            if op in stop:
                continue
            flops = _flops(op)
            if flops is None:
                return OTHER
            total += flops
            if total > TINY_FLOPS:
                return OTHER
            todo.extend(t.op for t in op.inputs)
            todo.extend(op.control_inputs)
        return TINY
    except Exception:           # anything not understood: not small
        return OTHER
