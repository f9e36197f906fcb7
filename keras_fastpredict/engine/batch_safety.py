"""Batch safety from the graph: may rows of several calls share one session run?

A model may be batched only if each output row depends on its own input row alone.
Layer class names cannot tell (a ``Lambda`` hidden in ``TimeDistributed``,
``BatchNormalization(training=True)``, a nested model), so this walks the ops between the
feeds and the fetches and tracks, per tensor, which axis holds the batch rows:

* ``('rows', axis, k)``: along ``axis``, each run of ``k`` entries belongs to one input row
  (``k`` > 1 after a reshape folds time steps into the batch axis, as ``TimeDistributed`` does);
* ``FREE``: no dependence on the fed rows (weights, constants);
* ``SHAPE``: values computed from shapes only (they hold the batch size, not the data);
* ``('cross', op)``: proven to mix rows or to depend on the batch size;
* ``('unknown', op)``: an op this module does not model (while loops, py_func, ...);
* ``DEAD``: on the branch of a ``tf.cond`` that inference does not take.

Only the branch that inference takes is judged: ``BatchNormalization`` reads its moving
statistics at inference, and the batch moments behind its learning-phase switch are dead.
The verdict is ``'safe'`` (every output is ``('rows', 0, 1)``), ``'unsafe'`` (a row-mixing op,
or an output whose rows are not the input rows), ``'stateful ops'`` (a live op with side
effects, such as a random draw: never batched, and never run more often than plain Keras
runs it) or ``'unknown'`` (then callers verify on distinct rows before batching).
"""
import numpy as np

SAFE, UNSAFE, UNKNOWN = 'safe', 'unsafe', 'unknown'
STATEFUL = 'stateful ops'   # unsafe, and no run beyond the calls' own may be made
FREE = ('free',)
SHAPE = ('shape',)
DEAD = ('dead',)

_ELEMENTWISE_UNARY = frozenset('''
    Abs Acos Acosh Asin Asinh Atan Atanh Cast Ceil CheckNumerics Cos Cosh Digamma Elu Erf
    Erfc Exp Expm1 Floor Identity Inv IsFinite IsInf IsNan LeakyRelu Lgamma Log Log1p
    LogicalNot Neg OnesLike PreventGradient Reciprocal Relu Relu6 Rint Round Rsqrt Selu
    Sigmoid Sign Sin Sinh Snapshot Softplus Softsign Sqrt Square StopGradient Tan Tanh
    ZerosLike EnsureShape
'''.split())
_ELEMENTWISE_NARY = frozenset('''
    Add AddN AddV2 ApproximateEqual Atan2 BiasAdd ClipByValue Div DivNoNan Equal FloorDiv
    FloorMod Greater GreaterEqual Less LessEqual LogicalAnd LogicalOr Maximum Minimum Mod Mul
    MulNoNan NotEqual Pow RealDiv SelectV2 SquaredDifference Sub TruncateDiv TruncateMod
    Xdivy Xlogy
'''.split())
# Ops whose first input is a batch of images or sequences along axis 0 and whose other
# inputs are weights, sizes or constants: each output entry along axis 0 comes from the
# same entry of the input.
_PER_EXAMPLE = frozenset('''
    AvgPool AvgPool3D Conv2D Conv3D DepthToSpace DepthwiseConv2dNative Dilation2D LRN
    MaxPool MaxPool3D MaxPoolV2 ResizeArea ResizeBicubic ResizeBilinear
    ResizeNearestNeighbor SpaceToDepth
'''.split())
_REDUCTIONS = frozenset('All Any EuclideanNorm Max Mean Min Prod Sum'.split())
_SHAPE_OF = frozenset('Shape ShapeN Size Rank'.split())
# Stateful ops that only read variables or hold per-run state (TensorArrays). Any other
# stateful op (a random draw, a counter's assign_add) gives results that depend on how
# many runs are made: such a model is never batched, and no extra run may be made.
_HARMLESS_STATEFUL = frozenset('''
    VariableV2 Variable VarHandleOp ReadVariableOp VarIsInitializedOp IsVariableInitialized
    TensorArrayV3 TensorArrayReadV3 TensorArrayWriteV3 TensorArrayScatterV3
    TensorArrayGatherV3 TensorArraySizeV3 TensorArrayConcatV3 TensorArraySplitV3
    TensorArrayCloseV3 TensorArrayGradV3 Placeholder PlaceholderWithDefault
'''.split())
# Ops taking a ref input that only pass it on or read it (any other, such as Assign or
# AssignAdd, writes a variable: TF 1.15 does not mark those as stateful).
_REF_READERS = frozenset('''
    RefSwitch RefMerge RefIdentity RefEnter RefExit RefNextIteration RefSelect
    IsVariableInitialized
'''.split())
_WHILE_OPS = frozenset('Enter Exit NextIteration LoopCond RefEnter RefExit RefNextIteration'
                       .split())


def _rows(axis, k=1):
    return ('rows', axis, k)


class _Analysis(object):
    def __init__(self, graph, feeds, fetches, run_shapes):
        self.graph = graph
        self.feeds = set(feeds)
        self.fetches = fetches
        self.run_shapes = run_shapes     # fn(tensors, feed_dict) -> values, or None
        self.values = {}
        self.first_cross = None
        self.first_unknown = None
        self.stateful_op = None     # the first live op with side effects, if any

    # -- helpers ------------------------------------------------------------------------

    def cross(self, op, why):
        if self.first_cross is None:
            self.first_cross = '%s (%s): %s' % (op.name, op.type, why)
        return ('cross', op.name)

    def unknown(self, op, why='op not modelled'):
        if self.first_unknown is None:
            self.first_unknown = '%s (%s): %s' % (op.name, op.type, why)
        return ('unknown', op.name)

    @staticmethod
    def const(tensor):
        from tensorflow.python.framework import tensor_util
        try:
            value = tensor_util.constant_value(tensor)
        except Exception:
            return None
        return value

    @staticmethod
    def rank(tensor):
        return tensor.shape.ndims

    def value(self, tensor):
        return self.values.get(tensor, FREE if tensor not in self.feeds else _rows(0))

    # -- the walk -----------------------------------------------------------------------

    def ordered_ops(self):
        """The ops the fetches depend on (through data and control inputs, stopping at
        the feeds), inputs before consumers. Creation order is no such order: ``tf.cond``
        makes the Switch of a captured tensor after its consumer. While loops' back
        edges are cut (their ops are not modelled anyway)."""
        feed_ops = {t.op for t in self.feeds}
        order, done, on_path = [], set(), set()
        for root in {t.op for t in self.fetches}:
            stack = [(root, False)]
            while stack:
                op, expanded = stack.pop()
                if expanded:
                    on_path.discard(op)
                    done.add(op)
                    order.append(op)
                    continue
                if op in done or op in on_path:
                    continue
                on_path.add(op)
                stack.append((op, True))
                if op not in feed_ops:
                    for dep in list(op.control_inputs) + [t.op for t in op.inputs]:
                        if dep not in done and dep not in on_path:
                            stack.append((dep, False))
        return order

    def run(self):
        for t in self.feeds:
            self.values[t] = _rows(0)
        for op in self.ordered_ops():
            if any(t in self.feeds for t in op.outputs):
                continue
            outs = self.transfer(op)
            for t, v in zip(op.outputs, outs):
                self.values[t] = v
        return self.verdict()

    def verdict(self):
        if self.stateful_op is not None:
            return STATEFUL, ('op %s has side effects (a random draw, an update): its results '
                              'depend on how many runs are made' % self.stateful_op)
        outs = [self.value(t) for t in self.fetches]
        if all(v == _rows(0) for v in outs):
            return SAFE, None
        for t, v in zip(self.fetches, outs):
            if v[0] == 'cross':
                return UNSAFE, 'its output depends on other rows of the batch: ' + (
                    self.first_cross or v[1])
            if v[0] == 'rows' or v in (FREE, SHAPE):
                return UNSAFE, 'output %s does not have one row per input row' % t.name
        return UNKNOWN, self.first_unknown

    def transfer(self, op):
        """The abstract values of ``op``'s outputs."""
        n = len(op.outputs)
        if any(self._op_dead(c) for c in op.control_inputs):
            return [DEAD] * n
        ins = [self.value(t) for t in op.inputs]
        kind = op.type
        if kind == 'Merge':
            live = [v for v in ins if v != DEAD]
            if not live:
                return [DEAD] * n
            crosses = [v for v in live if v[0] == 'cross']
            first = live[0]
            if crosses:                 # a branch that may run mixes rows
                out = crosses[0]
            elif all(v == first for v in live):
                out = first
            else:
                out = self.unknown(op, 'branches differ')
            return [out, FREE]
        if DEAD in ins:
            return [DEAD] * n
        if (op.op_def.is_stateful and kind not in _HARMLESS_STATEFUL) or (
                kind not in _REF_READERS and any(a.is_ref for a in op.op_def.input_arg)):
            if self.stateful_op is None:
                self.stateful_op = '%s (%s)' % (op.name, kind)
            return [self.cross(op, 'has side effects')] * n
        if kind == 'Switch':
            return self.switch(op, ins)
        if kind in _WHILE_OPS or self._in_while(op):
            return [self.unknown(op, 'while loop')] * n
        if all(v == FREE for v in ins):
            return [FREE] * n
        crosses = [v for v in ins if v[0] == 'cross']
        if crosses:
            return [crosses[0]] * n
        if kind == 'Fill' and ins == [SHAPE, FREE]:
            return [self.fill(op)]
        if all(v in (FREE, SHAPE) for v in ins):
            return [SHAPE] * n
        unknowns = [v for v in ins if v[0] == 'unknown']
        if unknowns:
            return [unknowns[0]] * n
        handler = getattr(self, 'op_' + kind, None)
        if handler is not None:
            out = handler(op, ins)
        elif kind in _ELEMENTWISE_UNARY:
            out = ins[0]
        elif kind in _ELEMENTWISE_NARY:
            out = self.broadcast(op, ins)
        elif kind in _PER_EXAMPLE:
            out = self.per_example(op, ins)
        elif kind in _REDUCTIONS:
            out = self.reduce(op, ins, keep=op.get_attr('keep_dims'))
        elif kind in _SHAPE_OF:
            out = SHAPE
        else:
            out = self.unknown(op)
        return out if isinstance(out, list) else [out] * n

    def _op_dead(self, op):
        return bool(op.outputs) and all(self.values.get(t) == DEAD for t in op.outputs)

    @staticmethod
    def _in_while(op):
        ctx = op._get_control_flow_context()
        while ctx is not None:
            if ctx.IsWhileContext():
                return True
            ctx = ctx.outer_context
        return False

    # -- control flow -------------------------------------------------------------------

    def switch(self, op, ins):
        data, pred = ins
        taken = self.static_pred(op.inputs[1])
        if taken is None:
            if pred != FREE:
                return [self.unknown(op, 'condition depends on the input')] * 2
            return [data, data]
        return [DEAD, data] if taken else [data, DEAD]

    def static_pred(self, tensor):
        """The predicate's value at inference when it is fixed (a constant, or a
        placeholder with a default that is not fed: Keras' learning phase), else None."""
        op = tensor.op
        while op.type == 'Identity':
            tensor = op.inputs[0]
            op = tensor.op
        if op.type == 'PlaceholderWithDefault' and tensor not in self.feeds:
            tensor = op.inputs[0]
        value = self.const(tensor)
        return None if value is None else bool(value)

    # -- data ops -----------------------------------------------------------------------

    def broadcast(self, op, ins):
        out_rank = self.rank(op.outputs[0])
        if out_rank is None:
            return self.unknown(op, 'unknown rank')
        if op.type == 'BiasAdd' and op.get_attr('data_format') == b'NCHW':
            rows = ins[0]
            return rows if rows[0] == 'rows' and rows[1] != 1 and ins[1] == FREE else \
                self.unknown(op, 'NCHW bias')
        result = None
        for t, v in zip(op.inputs, ins):
            if v[0] != 'rows':
                continue
            rank = self.rank(t)
            if rank is None:
                return self.unknown(op, 'unknown rank')
            mapped = _rows(v[1] + out_rank - rank, v[2])
            if result is not None and mapped != result:
                return self.unknown(op, 'inputs with different batch axes')
            result = mapped
        axis = result[1]
        for t, v in zip(op.inputs, ins):
            if v == SHAPE:
                return self.cross(op, 'combines data with the batch size')
            if v == FREE:
                rank = self.rank(t)
                if rank is None:
                    return self.unknown(op, 'unknown rank')
                i = axis - (out_rank - rank)
                if i >= 0 and t.shape[i].value != 1:
                    return self.unknown(op, 'broadcasts a constant along the batch axis')
        return result

    def fill(self, op):
        """A constant filling a shape computed from the batch size (tf.keras' RNN initial
        states: ``zeros([batch, units])``): the same value in each row, so one row per input
        row when its first dimension follows the batch size and the others do not."""
        sizes = self.evaluate_shape(op.inputs[0], (13, 17))
        if sizes is not None and all(len(d) >= 1 for d in sizes):
            (a, *rest_a), (b, *rest_b) = ([int(n) for n in d] for d in sizes)
            if rest_a == rest_b and a % 13 == 0 and b % 17 == 0 and a // 13 == b // 17 > 0:
                return _rows(0, a // 13)
        return SHAPE

    def per_example(self, op, ins):
        data = ins[0]
        if data[0] != 'rows' or data[1] != 0:
            return self.unknown(op, 'batch not on axis 0')
        if any(v not in (FREE, SHAPE) for v in ins[1:]):
            return self.unknown(op, 'data in a parameter input')
        return data

    def reduce(self, op, ins, keep):
        data = ins[0]
        axes = self.const(op.inputs[1])
        rank = self.rank(op.inputs[0])
        if data[0] != 'rows' or ins[1] != FREE or axes is None or rank is None:
            return self.unknown(op, 'reduction axes unknown')
        axes = {int(a) % rank for a in np.atleast_1d(axes)}
        axis = data[1]
        if axis in axes:
            return self.cross(op, 'reduces over the batch axis')
        return data if keep else _rows(axis - sum(a < axis for a in axes), data[2])

    def op_ArgMax(self, op, ins):
        return self.reduce(op, ins, keep=False)

    op_ArgMin = op_ArgMax

    def op_Softmax(self, op, ins):
        data = ins[0]
        if data[1] == self.rank(op.inputs[0]) - 1:
            return self.cross(op, 'normalises over the batch axis')
        return data

    op_LogSoftmax = op_Softmax

    def op_Select(self, op, ins):
        rows = [v for v in ins if v[0] == 'rows']
        ranks = {self.rank(t) for t in op.inputs}
        if len(set(rows)) == 1 and len(ranks) == 1 and all(v in (rows[0], FREE) for v in ins) \
                and all(v != FREE or t.shape[rows[0][1]].value == 1
                        for t, v in zip(op.inputs, ins)):
            return rows[0]
        return self.unknown(op, 'select')

    def op_MatMul(self, op, ins):
        a, b = ins
        ta, tb = op.get_attr('transpose_a'), op.get_attr('transpose_b')
        if a[0] == 'rows' and b == FREE:
            if a[1] == (1 if ta else 0):
                return _rows(0, a[2])
            return self.cross(op, 'contracts over the batch axis')
        if b[0] == 'rows' and a == FREE:
            if b[1] == (0 if tb else 1):
                return _rows(1, b[2])
            return self.cross(op, 'contracts over the batch axis')
        return self.unknown(op, 'product of two data tensors')

    def op_BatchMatMul(self, op, ins):
        x, y = ins
        rank = self.rank(op.outputs[0])
        if rank is None:
            return self.unknown(op, 'unknown rank')
        rows = [v for v in ins if v[0] == 'rows']
        axis = rows[0][1]
        same = all(v == rows[0] for v in rows)
        free_ok = all(v != FREE or self.rank(t) <= 2 or t.shape[axis].value == 1
                      for t, v in zip(op.inputs, ins))
        if same and free_ok and axis < rank - 2 and all(
                self.rank(t) == rank for t, v in zip(op.inputs, ins) if v[0] == 'rows'):
            return rows[0]
        return self.unknown(op, 'batch axis among the matrix axes')

    op_BatchMatMulV2 = op_BatchMatMul

    def op_Conv2DBackpropInput(self, op, ins):
        sizes, weights, data = ins
        if data[0] == 'rows' and data[1] == 0 and weights == FREE and sizes in (FREE, SHAPE):
            return data
        return self.unknown(op, 'transposed convolution')

    def op_FusedBatchNorm(self, op, ins):
        if op.get_attr('is_training'):
            return [self.cross(op, 'normalises with batch statistics')] * len(op.outputs)
        out = self.per_example(op, ins)
        return [out] + [FREE] * (len(op.outputs) - 1)

    op_FusedBatchNormV2 = op_FusedBatchNormV3 = op_FusedBatchNorm

    def op_Transpose(self, op, ins):
        data = ins[0]
        perm = self.const(op.inputs[1])
        if data[0] != 'rows' or ins[1] != FREE or perm is None:
            return self.unknown(op, 'transpose')
        return _rows(list(perm).index(data[1]), data[2])

    def op_ExpandDims(self, op, ins):
        data = ins[0]
        dim = self.const(op.inputs[1])
        rank = self.rank(op.outputs[0])
        if data[0] != 'rows' or dim is None or rank is None:
            return self.unknown(op, 'expand_dims')
        dim = int(np.ravel(dim)[0]) % rank
        return _rows(data[1] + (dim <= data[1]), data[2])

    def op_Squeeze(self, op, ins):
        data = ins[0]
        shape = op.inputs[0].shape
        if data[0] != 'rows' or shape.ndims is None:
            return self.unknown(op, 'squeeze')
        dims = op.get_attr('squeeze_dims')
        if dims:
            dims = {d % shape.ndims for d in dims}
        else:
            dims = {i for i, d in enumerate(shape.as_list()) if d == 1}
        if data[1] in dims:
            return self.unknown(op, 'squeezes the batch axis')
        return _rows(data[1] - sum(d < data[1] for d in dims), data[2])

    def op_ConcatV2(self, op, ins, axis_input=-1):
        values = ins[:-1] if axis_input == -1 else ins[1:]
        axis = self.const(op.inputs[axis_input])
        rank = self.rank(op.outputs[0])
        rows = [v for v in values if v[0] == 'rows']
        if axis is None or rank is None or any(v != rows[0] for v in values):
            return self.unknown(op, 'concatenation of data and constants')
        if int(axis) % rank == rows[0][1]:
            return self.cross(op, 'concatenates along the batch axis')
        return rows[0]

    def op_Concat(self, op, ins):
        return self.op_ConcatV2(op, ins, axis_input=0)

    def op_Pack(self, op, ins):
        rank = self.rank(op.outputs[0])
        if rank is None or any(v != ins[0] for v in ins):
            return self.unknown(op, 'stack of data and constants')
        axis = op.get_attr('axis') % rank
        data = ins[0]
        return _rows(data[1] + (axis <= data[1]), data[2])

    def op_Unpack(self, op, ins):
        data = ins[0]
        rank = self.rank(op.inputs[0])
        if rank is None:
            return self.unknown(op, 'unknown rank')
        axis = op.get_attr('axis') % rank
        if axis == data[1]:
            return self.cross(op, 'unstacks the batch axis')
        return _rows(data[1] - (axis < data[1]), data[2])

    def _split(self, op, data, axis_tensor, others):
        axis = self.const(axis_tensor)
        rank = self.rank(op.outputs[0])
        if axis is None or rank is None or data[0] != 'rows' or any(v != FREE for v in others):
            return self.unknown(op, 'split')
        if int(axis) % rank == data[1]:
            return self.cross(op, 'splits the batch axis')
        return data

    def op_Split(self, op, ins):
        return self._split(op, ins[1], op.inputs[0], [ins[0]])

    def op_SplitV(self, op, ins):
        return self._split(op, ins[0], op.inputs[2], ins[1:])

    def op_Tile(self, op, ins):
        data = ins[0]
        multiples = self.const(op.inputs[1])
        if data[0] != 'rows' or multiples is None:
            return self.unknown(op, 'tile')
        if int(multiples[data[1]]) != 1:
            return self.cross(op, 'tiles the batch axis')
        return data

    def op_Pad(self, op, ins):
        data = ins[0]
        pads = self.const(op.inputs[1])
        if data[0] != 'rows' or pads is None or any(v != FREE for v in ins[1:]):
            return self.unknown(op, 'pad')
        if tuple(pads[data[1]]) != (0, 0):
            return self.cross(op, 'pads the batch axis')
        return data

    op_PadV2 = op_MirrorPad = op_Pad

    def op_Slice(self, op, ins):
        data = ins[0]
        begin, size = self.const(op.inputs[1]), self.const(op.inputs[2])
        if data[0] != 'rows' or begin is None or size is None:
            return self.unknown(op, 'slice')
        if int(begin[data[1]]) != 0 or int(size[data[1]]) != -1:
            return self.cross(op, 'slices the batch axis')
        return data

    def op_StridedSlice(self, op, ins):
        data = ins[0]
        rank = self.rank(op.inputs[0])
        begin, end, strides = (self.const(t) for t in op.inputs[1:4])
        if data[0] != 'rows' or rank is None or begin is None or end is None \
                or strides is None or op.get_attr('new_axis_mask'):
            return self.unknown(op, 'strided slice')
        masks = {name: op.get_attr(name + '_mask')
                 for name in ('begin', 'end', 'ellipsis', 'shrink_axis')}
        axis = data[1]
        in_dim = out_dim = 0
        n = len(begin)
        for i in range(n):
            bit = 1 << i
            if masks['ellipsis'] & bit:
                span = rank - (n - 1)
                if in_dim <= axis < in_dim + span:
                    return _rows(out_dim + axis - in_dim, data[2])
                in_dim += span
                out_dim += span
                continue
            if in_dim == axis:
                if masks['shrink_axis'] & bit:
                    return self.cross(op, 'indexes one row')
                full = ((masks['begin'] & bit or int(begin[i]) == 0)
                        and masks['end'] & bit and int(strides[i]) == 1)
                if not full:
                    return self.cross(op, 'slices the batch axis')
                return _rows(out_dim, data[2])
            if not masks['shrink_axis'] & bit:
                out_dim += 1
            in_dim += 1
        return _rows(out_dim + axis - in_dim, data[2])

    def op_GatherV2(self, op, ins):
        params, indices = ins[0], ins[1]
        axis = self.const(op.inputs[2]) if len(op.inputs) > 2 else 0
        if axis is None or (len(ins) > 2 and ins[2] != FREE):
            return self.unknown(op, 'gather axis')
        p_rank = self.rank(op.inputs[0])
        i_rank = self.rank(op.inputs[1])
        if p_rank is None or i_rank is None:
            return self.unknown(op, 'unknown rank')
        axis = int(axis) % p_rank
        if params in (FREE,) and indices[0] == 'rows':
            return _rows(axis + indices[1], indices[2])
        if params[0] == 'rows' and indices == FREE:
            if params[1] == axis:
                return self.cross(op, 'gathers rows')
            return _rows(params[1] if params[1] < axis else params[1] - 1 + i_rank, params[2])
        return self.unknown(op, 'gather of data by data')

    op_Gather = op_GatherV2

    def op_ResourceGather(self, op, ins):
        indices = ins[1]
        if ins[0] == FREE and indices[0] == 'rows':
            return indices
        return self.unknown(op, 'gather')

    def op_OneHot(self, op, ins):
        indices = ins[0]
        if indices[0] != 'rows' or any(v != FREE for v in ins[1:]):
            return self.unknown(op, 'one_hot')
        rank = self.rank(op.outputs[0])
        axis = op.get_attr('axis') % rank
        return _rows(indices[1] + (axis <= indices[1]), indices[2])

    def op_Cumsum(self, op, ins):
        data = ins[0]
        axis = self.const(op.inputs[1])
        rank = self.rank(op.inputs[0])
        if data[0] != 'rows' or axis is None or rank is None:
            return self.unknown(op, 'cumulative op')
        if int(axis) % rank == data[1]:
            return self.cross(op, 'accumulates over the batch axis')
        return data

    op_Cumprod = op_Cumsum

    def op_ReverseV2(self, op, ins):
        data = ins[0]
        axes = self.const(op.inputs[1])
        rank = self.rank(op.inputs[0])
        if data[0] != 'rows' or axes is None or rank is None:
            return self.unknown(op, 'reverse')
        if data[1] in {int(a) % rank for a in np.atleast_1d(axes)}:
            return self.cross(op, 'reverses the batch axis')
        return data

    def op_IdentityN(self, op, ins):
        return list(ins)

    def op_Reshape(self, op, ins):
        data, shape_value = ins
        in_shape = op.inputs[0].shape
        if data[0] != 'rows' or data[1] != 0 or in_shape.ndims is None \
                or not in_shape[1:].is_fully_defined():
            return self.unknown(op, 'reshape')
        per_row = data[2] * int(np.prod(in_shape[1:].as_list(), dtype=np.int64))
        out_shape = op.outputs[0].shape
        if out_shape.ndims is not None and out_shape[1:].is_fully_defined() \
                and out_shape[0].value is None:
            return self._regroup(op, data, per_row,
                                 int(np.prod(out_shape[1:].as_list(), dtype=np.int64)))
        if shape_value not in (FREE, SHAPE):
            return self.unknown(op, 'reshape to a shape computed from data')
        # The target shape is computed from shapes at run time (Flatten, Reshape,
        # TimeDistributed build it from K.shape): evaluate it for two batch sizes.
        sizes = self.evaluate_shape(op.inputs[1], (13, 17))
        if sizes is None:
            return self.unknown(op, 'reshape to an unknown shape')
        groups = set()
        for batch, dims in zip((13, 17), sizes):
            dims = [int(d) for d in dims]
            if dims.count(-1) == 1:
                known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
                if known == 0:
                    return self.unknown(op, 'reshape')
                dims[dims.index(-1)] = batch * per_row // known
            if not dims or int(np.prod(dims, dtype=np.int64)) != batch * per_row:
                return self.unknown(op, 'reshape')
            inner = int(np.prod(dims[1:], dtype=np.int64))
            if dims[0] % batch or inner * (dims[0] // batch) != per_row:
                return self.cross(op, 'reshape merges rows')
            groups.add((tuple(dims[1:]), dims[0] // batch))
        if len(groups) != 1:
            return self.cross(op, 'reshape depends on the batch size')
        return _rows(0, groups.pop()[1])

    def _regroup(self, op, data, per_row, inner):
        if inner and per_row % inner == 0:
            return _rows(0, per_row // inner)
        return self.cross(op, 'reshape merges rows')

    def evaluate_shape(self, tensor, batches):
        """Values of a shape-only tensor for each batch size in ``batches``: the Shape ops
        it is computed from are fed the static shapes with that batch size."""
        if self.run_shapes is None:
            return None
        sources = []
        stack, seen = [tensor.op], set()
        while stack:
            op = stack.pop()
            if op in seen:
                continue
            seen.add(op)
            if op.type in _SHAPE_OF and self.value(op.inputs[0])[0] == 'rows':
                sources.append(op)
                continue
            if op.type in ('Placeholder', 'PlaceholderWithDefault') or op.type in _WHILE_OPS:
                return None
            stack.extend(t.op for t in op.inputs)
        results = []
        for batch in batches:
            feed = {}
            for op in sources:
                for t_in, t_out in zip(op.inputs, op.outputs):
                    v = self.value(t_in)
                    shape = t_in.shape
                    if shape.ndims is None:
                        return None
                    dims = shape.as_list()
                    dims[v[1]] = batch * v[2]
                    if None in dims:
                        return None
                    if op.type == 'Rank':
                        feed[t_out] = np.array(len(dims), t_out.dtype.as_numpy_dtype)
                    elif op.type == 'Size':
                        feed[t_out] = np.array(np.prod(dims), t_out.dtype.as_numpy_dtype)
                    else:
                        feed[t_out] = np.array(dims, t_out.dtype.as_numpy_dtype)
            try:
                results.append(np.ravel(self.run_shapes(tensor, feed)))
            except Exception:
                return None
        return results


def analyse(graph, feeds, fetches, run_shapes=None):
    """``(verdict, reason)`` for running the rows of several calls in one batch.

    ``feeds``: the tensors fed with the calls' rows (batch on axis 0); ``fetches``: the
    outputs; ``run_shapes(tensor, feed_dict)``: evaluates a shape-only tensor (a session
    run adds no graph ops), or None to treat computed shapes as unknown."""
    try:
        return _Analysis(graph, feeds, fetches, run_shapes).run()
    except Exception as exc:     # an op whose attributes surprise us: don't guess
        return UNKNOWN, 'analysis failed: %s' % exc
