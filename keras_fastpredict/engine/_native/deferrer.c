/* Deferrer(open, max_rows, pending_type, proxy_type, calls, dtypes, itemsizes, probe,
 * probe_address): a scope's usual deferral in C (deferred.Scope.defer is its specification
 * and takes every other call). ``deferrer(entry, x, rows, owner)`` adds the call of one
 * input array ``x`` of ``rows`` rows to ``open[entry]``, the entry's batch being filled,
 * where there is one with room for the rows that this call does not fill, for a model of
 * one output, ``x`` of the buffer's dtype (one of ``dtypes``: no object references) and
 * row shape, both C-contiguous: its rows copied into the buffer, an untracked Pending
 * placed by its id in ``calls``, its proxy made, the counters moved
 * (``entry.stats.deferred``; with an ``owner``, the auto-batched site's: ``owner.calls``,
 * ``stats.calls``, ``stats.fast_calls``). It returns the proxy; in any other case None,
 * having changed nothing.
 *
 * It takes no lock: between its last look at the batch and its last change to it, it
 * runs no Python code and releases no GIL, and a run takes its batch out of ``open``
 * before it reads it (Scope._run): a row is added before (and runs with the batch), or
 * finds no batch. The objects are made first (a proxy's dict may come from the
 * allocator, which may start a collection, whose finalizers may run anything): the batch
 * is looked at again after them.
 *
 * Rows are copied as numpy's own assignment would copy them between arrays of one dtype;
 * numpy's array layout (Array, deferral.h) is checked against ``probe`` at init. */
#include "deferral.h"

#include <string.h>

typedef struct {
    PyObject_HEAD
    PyObject *open, *pending, *proxy, *calls, *dtypes, *itemsizes, *ndarray;
    Py_ssize_t max_rows;
} Deferrer;

static int
address_of(PyObject *obj, void **out)
{
    *out = PyLong_AsVoidPtr(obj);
    return *out != NULL || !PyErr_Occurred();
}

static PyObject *s_n, *s_capacity, *s_n_outputs, *s_buffers, *s_stops, *s_proxies, *s_key,
    *s_stats, *s_deferred, *s_calls, *s_fast_calls;

static Slot slot_n, slot_capacity, slot_n_outputs, slot_buffers, slot_stops, slot_proxies,
    slot_key, slot_deferred, slot_calls, slot_fast_calls, slot_owner_calls;

/* The bytes of one of x's rows where they can be copied into buf's rows [n, n + rows)
 * byte for byte (see above), else 0. */
static Py_ssize_t
row_bytes(Deferrer *self, PyObject *x, PyObject *buf, Py_ssize_t n, Py_ssize_t rows)
{
    if (Py_TYPE(x) != (PyTypeObject *)self->ndarray
            || Py_TYPE(buf) != (PyTypeObject *)self->ndarray)
        return 0;
    Array *a = (Array *)x, *b = (Array *)buf;
    if (a->descr != b->descr || a->nd != b->nd || a->nd < 1 || a->dimensions[0] != rows
            || b->dimensions[0] < n + rows || !(a->flags & C_CONTIGUOUS)
            || !(b->flags & C_CONTIGUOUS))
        return 0;
    Py_ssize_t size = -1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->dtypes); i++)
        if (PyTuple_GET_ITEM(self->dtypes, i) == a->descr) {
            size = PyLong_AsSsize_t(PyTuple_GET_ITEM(self->itemsizes, i));
            break;
        }
    if (size <= 0) {
        PyErr_Clear();
        return 0;
    }
    for (int i = 1; i < a->nd; i++) {
        if (a->dimensions[i] != b->dimensions[i] || a->dimensions[i] < 0)
            return 0;
        size *= a->dimensions[i];
    }
    return size;
}

/* type(), as object.__new__ makes it where the type has no __new__ or __init__ of its
 * own (a new reference). */
static PyObject *
new_pending(PyObject *type)
{
    PyTypeObject *t = (PyTypeObject *)type;
    if (!PyType_Check(type) || t->tp_new != PyBaseObject_Type.tp_new
            || t->tp_init != PyBaseObject_Type.tp_init || (t->tp_flags & Py_TPFLAGS_IS_ABSTRACT))
        return PyObject_CallObject(type, NULL);
    return t->tp_alloc(t, 0);
}

/* deferrer(entry, x, rows, owner) (see above), for a Deferrer's call and AutoCall's. */
PyObject *
kfp_defer(PyObject *deferrer, PyObject *entry, PyObject *x, Py_ssize_t rows, PyObject *owner)
{
    Deferrer *self = (Deferrer *)deferrer;
    PyObject *batch = PyDict_GetItemWithError(self->open, entry);     /* (borrowed) */
    if (batch == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    Py_INCREF(batch);
    PyObject *out = NULL, *buffers = NULL, *stops = NULL, *proxies = NULL, *key = NULL;
    PyObject *stats = NULL, *slot = NULL, *stop_obj = NULL, *pending = NULL, *pid = NULL;
    PyObject *proxy = NULL, *again = NULL;
    Py_ssize_t n, capacity, outputs, size;
    if ((n = SIZE(batch, n)) < 0 || (capacity = SIZE(batch, capacity)) < 0
            || (outputs = SIZE(batch, n_outputs)) < 0)
        goto done;
    Py_ssize_t stop = n + rows;
    if (rows < 1 || outputs != 1 || stop > capacity || stop >= self->max_rows)
        goto none;              /* (a full batch runs: Scope.defer's) */
    if ((buffers = GET(batch, buffers)) == NULL || (stops = GET(batch, stops)) == NULL
            || (proxies = GET(batch, proxies)) == NULL || (key = GET(batch, key)) == NULL
            || (stats = PyObject_GetAttr(entry, s_stats)) == NULL)
        goto done;
    if (!PyList_CheckExact(buffers) || PyList_GET_SIZE(buffers) != 1
            || !PyList_CheckExact(stops) || !PyList_CheckExact(proxies)
            || !PyLong_CheckExact(key)
            || (size = row_bytes(self, x, PyList_GET_ITEM(buffers, 0), n, rows)) <= 0)
        goto none;
    /* The objects first (see above). */
    Py_ssize_t index = PyList_GET_SIZE(proxies);
    PyObject *index_obj = PyLong_FromSsize_t(index);
    if (index_obj == NULL)
        goto done;
    slot = PyNumber_Add(key, index_obj);
    Py_DECREF(index_obj);
    if (slot == NULL || (stop_obj = PyLong_FromSsize_t(stop)) == NULL
            || (pending = new_pending(self->pending)) == NULL
            || (pid = PyLong_FromVoidPtr(pending)) == NULL
            || (proxy = kfp_new_proxy(self->proxy, pending)) == NULL)
        goto done;
    /* Then the batch again: still open, as it was. From here on, nothing that runs
     * Python code or releases the GIL. */
    if (PyDict_GetItemWithError(self->open, entry) != batch)
        goto none;
    if ((again = GET(batch, proxies)) == NULL)
        goto done;
    if (again != proxies || PyList_GET_SIZE(proxies) != index || SIZE(batch, n) != n
            || row_bytes(self, x, PyList_GET_ITEM(buffers, 0), n, rows) != size)
        goto none;
    Array *a = (Array *)x, *b = (Array *)PyList_GET_ITEM(buffers, 0);
    memcpy(b->data + n * size, a->data, (size_t)(rows * size));
    if (PyDict_SetItem(self->calls, pid, slot) < 0)
        goto done;
    if (PyList_Append(stops, stop_obj) < 0 || PyList_Append(proxies, proxy) < 0
            || kfp_set(&slot_n, batch, s_n, stop_obj) < 0)
        goto done;              /* (out of memory: the batch as Scope.defer leaves it) */
    if (kfp_count(&slot_deferred, stats, s_deferred) < 0
            || (owner != Py_None && (kfp_count(&slot_owner_calls, owner, s_calls) < 0
                                     || kfp_count(&slot_calls, stats, s_calls) < 0
                                     || kfp_count(&slot_fast_calls, stats, s_fast_calls) < 0)))
        goto done;
    out = proxy;
    proxy = NULL;
    goto done;
none:
    if (PyErr_Occurred())
        goto done;
    Py_INCREF(Py_None);
    out = Py_None;
done:
    Py_XDECREF(again);
    Py_XDECREF(buffers);
    Py_XDECREF(stops);
    Py_XDECREF(proxies);
    Py_XDECREF(key);
    Py_XDECREF(stats);
    Py_XDECREF(slot);
    Py_XDECREF(stop_obj);
    Py_XDECREF(pending);
    Py_XDECREF(pid);
    Py_XDECREF(proxy);
    Py_DECREF(batch);
    return out;
}

static PyObject *
Deferrer_call(Deferrer *self, PyObject *args, PyObject *kw)
{
    PyObject *entry, *x, *owner;
    Py_ssize_t rows;
    if (self->open == NULL) {
        PyErr_SetString(PyExc_TypeError, "deferrer is not initialised");
        return NULL;
    }
    if (kw != NULL && PyDict_GET_SIZE(kw)) {
        PyErr_SetString(PyExc_TypeError, "deferrer takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOnO:deferrer", &entry, &x, &rows, &owner))
        return NULL;
    return kfp_defer((PyObject *)self, entry, x, rows, owner);
}

#define DEFERRER_FIELDS(X) X(open) X(pending) X(proxy) X(calls) X(dtypes) X(itemsizes) \
    X(ndarray)

static int
Deferrer_init(Deferrer *self, PyObject *args, PyObject *kwds)
{
    PyObject *open, *pending, *proxy, *calls, *dtypes, *itemsizes, *probe;
    Py_ssize_t max_rows;
    void *address;
    if (!PyArg_ParseTuple(args, "O!nOOO!O!O!OO&", &PyDict_Type, &open, &max_rows, &pending,
                          &proxy, &PyDict_Type, &calls, &PyTuple_Type, &dtypes, &PyTuple_Type,
                          &itemsizes, &probe, address_of, &address))
        return -1;
    /* probe: numpy.zeros((2, 3), numpy.int16), whose dtype is dtypes[0] */
    Array *a = (Array *)probe;
    if (PyTuple_GET_SIZE(dtypes) != PyTuple_GET_SIZE(itemsizes) || !PyTuple_GET_SIZE(dtypes)
            || Py_TYPE(probe)->tp_basicsize < (Py_ssize_t)sizeof(Array) || a->nd != 2
            || a->dimensions[0] != 2 || a->dimensions[1] != 3 || a->strides[0] != 6
            || a->strides[1] != 2 || (void *)a->data != address
            || a->descr != PyTuple_GET_ITEM(dtypes, 0) || !(a->flags & C_CONTIGUOUS)) {
        PyErr_SetString(PyExc_TypeError, "numpy's arrays are not laid out as expected");
        return -1;
    }
    PyObject *ndarray = (PyObject *)Py_TYPE(probe);
    self->max_rows = max_rows;
#define SET(name) Py_INCREF(name); Py_XSETREF(self->name, name);
    DEFERRER_FIELDS(SET)
#undef SET
    return 0;
}

static int
Deferrer_traverse(Deferrer *self, visitproc visit, void *arg)
{
#define VISIT(name) Py_VISIT(self->name);
    DEFERRER_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int
Deferrer_clear(Deferrer *self)
{
#define CLEAR(name) Py_CLEAR(self->name);
    DEFERRER_FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void
Deferrer_dealloc(Deferrer *self)
{
    PyObject_GC_UnTrack(self);
    Deferrer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyTypeObject kfp_DeferrerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "keras_fastpredict.engine._deferral.Deferrer",
    .tp_basicsize = sizeof(Deferrer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Deferrer(open, max_rows, Pending, DeferredArray, calls, dtypes, itemsizes, "
              "probe, probe_address): a scope's usual deferral (None: Scope.defer's).",
    .tp_call = (ternaryfunc)Deferrer_call,
    .tp_init = (initproc)Deferrer_init,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)Deferrer_traverse,
    .tp_clear = (inquiry)Deferrer_clear,
    .tp_dealloc = (destructor)Deferrer_dealloc,
};

int
kfp_add_deferrer(PyObject *module)
{
    if (!(KFP_INTERN(n) && KFP_INTERN(capacity) && KFP_INTERN(n_outputs)
          && KFP_INTERN(buffers) && KFP_INTERN(stops) && KFP_INTERN(proxies) && KFP_INTERN(key)
          && KFP_INTERN(stats) && KFP_INTERN(deferred) && KFP_INTERN(calls)
          && KFP_INTERN(fast_calls)))
        return -1;
    return kfp_add_type(module, "Deferrer", &kfp_DeferrerType);
}
