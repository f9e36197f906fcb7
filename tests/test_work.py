"""engine.work: a row's work counted from the graph, against hand counts."""
import tensorflow as tf

from keras_fastpredict.engine import work

v1 = tf.compat.v1


def _graph(build):
    g = tf.Graph()
    with g.as_default():
        return build()


def test_a_small_dense_net_is_tiny_and_its_products_counted():
    def build():
        x = v1.placeholder(tf.float32, (None, 32))
        h = tf.nn.relu(tf.matmul(x, tf.ones((32, 64))))
        y = tf.matmul(h, tf.ones((64, 10)))
        return x, h, y
    x, h, y = _graph(build)
    assert work.kind([x], [y]) == work.TINY
    assert work._flops(y.op) == 2 * 10 * 64
    assert work._flops(h.op.inputs[0].op) == 2 * 64 * 32      # the first product


def test_convolutions_counted_per_output_and_tap():
    def build():
        x = v1.placeholder(tf.float32, (None, 32, 32, 3))
        c = tf.nn.conv2d(x, tf.ones((3, 3, 3, 16)), strides=1, padding='VALID')
        d = tf.nn.depthwise_conv2d(c, tf.ones((3, 3, 16, 2)), strides=[1, 1, 1, 1],
                                   padding='VALID')
        return x, c, d
    x, c, d = _graph(build)
    assert work._flops(c.op) == 2 * (30 * 30 * 16) * (3 * 3 * 3)
    assert work._flops(d.op) == 2 * (28 * 28 * 32) * (3 * 3)
    assert work.kind([x], [d]) != work.TINY          # 1.7 million


def test_loops_unknown_shapes_and_large_graphs_are_not_tiny():
    def loop():
        x = v1.placeholder(tf.float32, (None, 4))
        return x, tf.while_loop(lambda i, a: i < 3, lambda i, a: (i + 1, a * 2.0),
                                [tf.constant(0), x])[1]

    def unknown():
        x = v1.placeholder(tf.float32, (None, None))
        return x, x * 2.0

    def many():
        x = v1.placeholder(tf.float32, (None, 2))
        y = x
        for _ in range(work.MAX_OPS):
            y = y + 1.0
        return x, y
    for build in (loop, unknown, many):
        x, y = _graph(build)
        assert work.kind([x], [y]) != work.TINY, build.__name__
        # A loop starts in the caller's thread all the same (its ops go to the pool one
        # by one at each iteration); the others on the pool.
        assert work.starts_inline([x], [y]) == (build is loop), build.__name__


def test_the_targets_work_counts():
    """What the target ops run with the fetches (a training step's update) counts too."""
    def build():
        x = v1.placeholder(tf.float32, (None, 512))
        w = v1.Variable(tf.ones((512, 512)))
        step = v1.assign(w, tf.matmul(tf.matmul(x, w), w)[:512]).op
        return x, tf.reduce_sum(x), step
    x, count, step = _graph(build)
    assert work.kind([x], [count]) == work.TINY
    assert work.kind([x], [count], [step]) != work.TINY


def test_transposed_convolutions_counted_per_input_and_tap():
    def build():
        x = v1.placeholder(tf.float32, (None, 8, 8, 16))
        y = tf.nn.conv2d_transpose(x, tf.ones((3, 3, 64, 16)), output_shape=(1, 16, 16, 64),
                                   strides=2, padding='SAME')
        return x, y
    x, y = _graph(build)
    assert work._flops(y.op) == 2 * (8 * 8 * 16) * (3 * 3 * 64)
    assert work.kind([x], [y]) != work.TINY      # 1.2 million (counted at its outputs: 16,384)


def test_ops_whose_work_the_graph_does_not_show_are_not_tiny():
    """A Python function, or a graph function called by one op: its work is not in the
    graph's shapes, however small its outputs."""
    import numpy as np

    def py_func():
        x = v1.placeholder(tf.float32, (None, 4))
        y = v1.py_func(lambda a: np.tanh(a), [x], tf.float32)
        y.set_shape((None, 4))
        return x, y

    def function_call():
        x = v1.placeholder(tf.float32, (None, 4))

        @tf.function
        def heavy(a):
            return tf.matmul(a, tf.ones((4, 4)))
        return x, heavy(x)
    for build in (py_func, function_call):
        x, y = _graph(build)
        assert work.kind([x], [y]) != work.TINY, build.__name__


def test_a_reshape_to_a_shape_unknown_statically_keeps_its_rows_size():
    """Keras' Flatten: a reshape to a computed shape; a row keeps its elements, and the
    product after it takes its inner size from its kernel."""
    def build():
        x = v1.placeholder(tf.float32, (None, 28, 28))
        flat = tf.reshape(x, tf.stack([-1, tf.reduce_prod(tf.shape(x)[1:])]))
        y = tf.matmul(flat, tf.ones((784, 128)))
        return x, flat, y
    x, flat, y = _graph(build)
    assert flat.shape.as_list() == [None, None]
    assert work._flops(flat.op) == 784
    assert work._flops(y.op) == 2 * 128 * 784
    assert work.kind([x], [y]) == work.TINY
