/* Deferred results that do not bring garbage collections on (engine/deferred.py).
 *
 * CPython starts a collection when the count of live objects of garbage-collected types
 * allocated since the last one passes a threshold. A deferred result stands for an
 * ndarray, which is no such object; but it is a wrapt proxy, which is, and wrapt makes
 * each proxy an instance dict besides: a collect loop's kept results brought collections
 * into the loop, and with them the full one that TensorFlow's and Keras' imports leave
 * owed (75-85 ms over 160,000 objects), which plain Keras' loop pays too but the runner's
 * fast path, whose results are ndarrays, never does.
 *
 * ``uncounted(type)`` gives the proxy type an allocator that leaves that count as it is:
 * its objects are allocated and tracked exactly as PyType_GenericAlloc does it (the
 * collector still sees them, and frees any cycle through them when it runs), less the
 * count; and drops the instance dict wrapt makes each proxy (where it keeps copies of the
 * wrapped object's __module__ and __doc__; back to the dict free list, so that the next
 * proxy's comes from there, uncounted too; attribute code makes one again if it is ever
 * needed: DeferredArray sets no attribute of its own). It returns False, changing
 * nothing, where the type is not laid out as expected (the proxy then counts as any
 * object). CPython 3.7's object layout. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static initproc base_init = NULL;   /* the proxy type's own tp_init (wrapt's) */

static PyObject *
uncounted_alloc(PyTypeObject *type, Py_ssize_t nitems)
{
    const size_t size = _PyObject_VAR_SIZE(type, nitems + 1);
    PyGC_Head *g = (PyGC_Head *)PyObject_Malloc(sizeof(PyGC_Head) + size);
    if (g == NULL)
        return PyErr_NoMemory();
    memset(g, 0, sizeof(PyGC_Head) + size);
    _PyGCHead_SET_REFS(g, _PyGC_REFS_UNTRACKED);
    PyObject *obj = (PyObject *)(g + 1);
    if (type->tp_flags & Py_TPFLAGS_HEAPTYPE)
        Py_INCREF(type);
    (void)PyObject_INIT(obj, type);
    PyObject_GC_Track(obj);
    return obj;
}

static void
uncounted_free(void *op)
{
    PyObject_GC_UnTrack(op);            /* (the dealloc did: then a no-op) */
    PyObject_Free(_Py_AS_GC((PyObject *)op));
}

static int
dictless_init(PyObject *self, PyObject *args, PyObject *kwds)
{
    PyObject **dict = _PyObject_GetDictPtr(self);
    if (dict == NULL) {
        PyErr_SetString(PyExc_TypeError, "a proxy with no instance dict");
        return -1;
    }
    if (*dict == NULL && (*dict = PyDict_New()) == NULL)   /* (wrapt's init writes it) */
        return -1;
    if (base_init(self, args, kwds) < 0)
        return -1;
    /* Only what wrapt's init put there: a subclass's own attributes stay. */
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(*dict, &pos, &key, &value))
        if (!PyUnicode_Check(key) || (!_PyUnicode_EqualToASCIIString(key, "__module__")
                                      && !_PyUnicode_EqualToASCIIString(key, "__doc__")))
            return 0;
    Py_CLEAR(*dict);
    return 0;
}

/* The type's __init__, for an explicit call (``y.__init__(x)``): wrapt's own, reached
 * through its base's slot wrapper, would write to the dict dropped above. */
static PyObject *
init_method(PyObject *self, PyObject *args, PyObject *kwds)
{
    if (dictless_init(self, args, kwds) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef init_def = {
    "__init__", (PyCFunction)(void (*)(void))init_method, METH_VARARGS | METH_KEYWORDS,
    "Initialize self.  See help(type(self)) for accurate signature."
};

static PyObject *
uncounted(PyObject *module, PyObject *arg)
{
    if (!PyType_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "uncounted() takes a type");
        return NULL;
    }
    PyTypeObject *type = (PyTypeObject *)arg;
    if (type->tp_alloc == uncounted_alloc)
        Py_RETURN_TRUE;
    PyTypeObject *base = type;                  /* the nearest static type: wrapt's proxy */
    while (base != NULL && (base->tp_flags & Py_TPFLAGS_HEAPTYPE))
        base = base->tp_base;
    if (base_init != NULL                       /* (one type only: its base's init kept) */
            || base == NULL || base->tp_init == NULL
            || PyDict_GetItemString(type->tp_dict, "__init__") != NULL
            || !(type->tp_flags & Py_TPFLAGS_HEAPTYPE) || !PyType_IS_GC(type)
            || type->tp_itemsize != 0 || type->tp_alloc != PyType_GenericAlloc
            || type->tp_free != PyObject_GC_Del || type->tp_dictoffset <= 0
            || (size_t)type->tp_dictoffset + sizeof(PyObject *) > (size_t)type->tp_basicsize)
        Py_RETURN_FALSE;
    PyObject *init = PyDescr_NewMethod(type, &init_def);
    if (init == NULL)
        return NULL;
    int failed = PyObject_SetAttrString(arg, "__init__", init);
    Py_DECREF(init);
    if (failed)
        return NULL;
    base_init = base->tp_init;
    type->tp_init = dictless_init;      /* (direct: the slot would look __init__ up per call) */
    type->tp_alloc = uncounted_alloc;
    type->tp_free = uncounted_free;
    Py_RETURN_TRUE;
}

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
 * numpy's array layout (PyArrayObject_fields, stable since numpy 1.7) is read here
 * without its headers (a build needs no numpy), checked against ``probe`` at init. */
typedef struct {
    PyObject_HEAD
    char *data;
    int nd;
    Py_ssize_t *dimensions;
    Py_ssize_t *strides;
    PyObject *base;
    PyObject *descr;
    int flags;
    PyObject *weakreflist;
} Array;

#define C_CONTIGUOUS 0x0001

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

/* obj.name += 1 */
static int
count(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    PyObject *one = PyLong_FromLong(1);
    PyObject *sum = one == NULL ? NULL : PyNumber_Add(v, one);
    Py_DECREF(v);
    Py_XDECREF(one);
    if (sum == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return r;
}

/* A batch's count ``name`` (-1 with an error set where it is none). */
static Py_ssize_t
size_attr(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    Py_ssize_t n = PyLong_CheckExact(v) ? PyLong_AsSsize_t(v) : -1;
    Py_DECREF(v);
    if (n < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "a batch's count expected");
    return n;
}

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
    if ((n = size_attr(batch, s_n)) < 0 || (capacity = size_attr(batch, s_capacity)) < 0
            || (outputs = size_attr(batch, s_n_outputs)) < 0)
        goto done;
    Py_ssize_t stop = n + rows;
    if (rows < 1 || outputs != 1 || stop > capacity || stop >= self->max_rows)
        goto none;              /* (a full batch runs: Scope.defer's) */
    if ((buffers = PyObject_GetAttr(batch, s_buffers)) == NULL
            || (stops = PyObject_GetAttr(batch, s_stops)) == NULL
            || (proxies = PyObject_GetAttr(batch, s_proxies)) == NULL
            || (key = PyObject_GetAttr(batch, s_key)) == NULL
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
            || (pending = PyObject_CallObject(self->pending, NULL)) == NULL
            || (pid = PyLong_FromVoidPtr(pending)) == NULL
            || (proxy = PyObject_CallFunctionObjArgs(self->proxy, pending, NULL)) == NULL)
        goto done;
    /* Then the batch again: still open, as it was. From here on, nothing that runs
     * Python code or releases the GIL. */
    if (PyDict_GetItemWithError(self->open, entry) != batch)
        goto none;
    if ((again = PyObject_GetAttr(batch, s_proxies)) == NULL)
        goto done;
    if (again != proxies || PyList_GET_SIZE(proxies) != index || size_attr(batch, s_n) != n
            || row_bytes(self, x, PyList_GET_ITEM(buffers, 0), n, rows) != size)
        goto none;
    Array *a = (Array *)x, *b = (Array *)PyList_GET_ITEM(buffers, 0);
    memcpy(b->data + n * size, a->data, (size_t)(rows * size));
    if (PyDict_SetItem(self->calls, pid, slot) < 0)
        goto done;
    if (PyList_Append(stops, stop_obj) < 0 || PyList_Append(proxies, proxy) < 0
            || PyObject_SetAttr(batch, s_n, stop_obj) < 0)
        goto done;              /* (out of memory: the batch as Scope.defer leaves it) */
    if (count(stats, s_deferred) < 0 || (owner != Py_None && (count(owner, s_calls) < 0
            || count(stats, s_calls) < 0 || count(stats, s_fast_calls) < 0)))
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

static PyTypeObject DeferrerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "keras_fastpredict.engine._alloc.Deferrer",
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

static PyMethodDef methods[] = {
    {"uncounted", uncounted, METH_O,
     "uncounted(type): its objects no longer count towards the collector's next run."},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "keras_fastpredict.engine._alloc",
    "Deferred results that do not bring garbage collections on.", -1, methods,
};

PyMODINIT_FUNC
PyInit__alloc(void)
{
    if (PyType_Ready(&DeferrerType) < 0)
        return NULL;
#define INTERN(name) if ((s_##name = PyUnicode_InternFromString(#name)) == NULL) return NULL;
    INTERN(n) INTERN(capacity) INTERN(n_outputs) INTERN(buffers) INTERN(stops)
    INTERN(proxies) INTERN(key) INTERN(stats) INTERN(deferred) INTERN(calls)
    INTERN(fast_calls)
#undef INTERN
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&DeferrerType);
    if (PyModule_AddObject(m, "Deferrer", (PyObject *)&DeferrerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
