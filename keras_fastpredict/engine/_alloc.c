/* Deferred results that do not bring garbage collections on (engine/deferred.py); below
 * it, a deferred call's usual path (Deferrer, AutoCall, Serves, settle, forget,
 * Materializer: the Python code of engine/deferred.py, engine/pending.py and
 * adapters/keras.py is their specification, and runs where this is not built).
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
#include <structmember.h>

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

/* The type made uncounted, and where its objects hold the wrapped object (0: not
 * found): a proxy made as its init leaves it (no dict, the wrapped object set) is then
 * made directly by ``new_proxy``, without wrapt's dict and its copies of the wrapped
 * object's __module__ and __doc__, which the init drops. */
static PyTypeObject *proxy_type = NULL;
static Py_ssize_t wrapped_offset = 0;

static int
find_wrapped(PyTypeObject *type)
{
    PyObject *sentinel = PyList_New(0);             /* (an object at an address of its own) */
    if (sentinel == NULL)
        return -1;
    PyObject *probe = PyObject_CallFunctionObjArgs((PyObject *)type, sentinel, NULL);
    if (probe == NULL) {
        Py_DECREF(sentinel);
        return -1;
    }
    Py_ssize_t found = 0, matches = 0;
    PyObject **dict = _PyObject_GetDictPtr(probe);
    for (Py_ssize_t off = sizeof(PyObject); off + (Py_ssize_t)sizeof(PyObject *)
             <= type->tp_basicsize; off += sizeof(PyObject *))
        if (*(PyObject **)((char *)probe + off) == sentinel) {
            found = off;
            matches++;
        }
    if (matches == 1 && dict != NULL && *dict == NULL && found != type->tp_dictoffset
            && found != type->tp_weaklistoffset && Py_REFCNT(sentinel) == 2) {
        proxy_type = type;
        wrapped_offset = found;
    }
    Py_DECREF(probe);
    Py_DECREF(sentinel);
    return 0;
}

/* type(wrapped), as calling the type would make it (a new reference). */
static PyObject *
new_proxy(PyObject *type, PyObject *wrapped)
{
    PyTypeObject *t = (PyTypeObject *)type;
    if (t != proxy_type || wrapped_offset == 0 || t->tp_alloc != uncounted_alloc
            || t->tp_init != dictless_init)
        return PyObject_CallFunctionObjArgs(type, wrapped, NULL);
    PyObject *proxy = t->tp_alloc(t, 0);            /* (zeroed: no dict, no weak references) */
    if (proxy == NULL)
        return NULL;
    Py_INCREF(wrapped);
    *(PyObject **)((char *)proxy + wrapped_offset) = wrapped;
    return proxy;
}

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
    if (find_wrapped(type) < 0)
        return NULL;
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

/* Attributes held in slots (classes with __slots__ and no attribute hooks: _Batch,
 * ModelStats, Auto) read and written at their offsets, as PyObject_GetAttr and SetAttr
 * would, without their lookups; any other attribute through them. One cache per use
 * (the object's kind and the name): the type whose slot it found, and where. A type it
 * has found stays alive (its reference is never released), so that its address is no
 * other type's. */
typedef struct {
    PyTypeObject *type;
    Py_ssize_t offset;
} Slot;

static void
find_slot(Slot *c, PyObject *obj, PyObject *name)
{
    PyTypeObject *t = Py_TYPE(obj);
    if (t->tp_getattro != PyObject_GenericGetAttr || t->tp_setattro != PyObject_GenericSetAttr)
        return;
    PyObject *d = _PyType_Lookup(t, name);                  /* (borrowed) */
    if (d == NULL || Py_TYPE(d) != &PyMemberDescr_Type)
        return;
    PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
    if (m->type != T_OBJECT_EX || (m->flags & READONLY))
        return;
    Py_INCREF(t);
    c->type = t;
    c->offset = m->offset;
}

/* obj.name (a new reference) */
static PyObject *
get(Slot *c, PyObject *obj, PyObject *name)
{
    if (Py_TYPE(obj) == c->type) {
        PyObject *v = *(PyObject **)((char *)obj + c->offset);
        if (v != NULL) {
            Py_INCREF(v);
            return v;
        }
    } else {
        find_slot(c, obj, name);
    }
    return PyObject_GetAttr(obj, name);
}

/* obj.name = value */
static int
set(Slot *c, PyObject *obj, PyObject *name, PyObject *value)
{
    if (Py_TYPE(obj) == c->type) {
        PyObject **p = (PyObject **)((char *)obj + c->offset), *old = *p;
        Py_INCREF(value);
        *p = value;
        Py_XDECREF(old);
        return 0;
    }
    find_slot(c, obj, name);
    return PyObject_SetAttr(obj, name, value);
}

static PyObject *one;

/* obj.name += 1 */
static int
count(Slot *c, PyObject *obj, PyObject *name)
{
    PyObject *v = get(c, obj, name);
    if (v == NULL)
        return -1;
    PyObject *sum = PyNumber_Add(v, one);
    Py_DECREF(v);
    if (sum == NULL)
        return -1;
    int r = set(c, obj, name, sum);
    Py_DECREF(sum);
    return r;
}

#define GET(obj, name) get(&slot_##name, obj, s_##name)

/* A batch's count ``name`` (-1 with an error set where it is none). */
static Py_ssize_t
size_attr(Slot *c, PyObject *obj, PyObject *name)
{
    PyObject *v = get(c, obj, name);
    if (v == NULL)
        return -1;
    Py_ssize_t n = PyLong_CheckExact(v) ? PyLong_AsSsize_t(v) : -1;
    Py_DECREF(v);
    if (n < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "a batch's count expected");
    return n;
}

#define SIZE(obj, name) size_attr(&slot_##name, obj, s_##name)

static Slot slot_n, slot_capacity, slot_n_outputs, slot_buffers, slot_stops, slot_proxies,
    slot_key, slot_deferred, slot_calls, slot_fast_calls, slot_owner_calls, slot_on;

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

static PyObject *
defer(Deferrer *self, PyObject *entry, PyObject *x, Py_ssize_t rows, PyObject *owner)
{
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
            || (proxy = new_proxy(self->proxy, pending)) == NULL)
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
            || set(&slot_n, batch, s_n, stop_obj) < 0)
        goto done;              /* (out of memory: the batch as Scope.defer leaves it) */
    if (count(&slot_deferred, stats, s_deferred) < 0
            || (owner != Py_None && (count(&slot_owner_calls, owner, s_calls) < 0
                                     || count(&slot_calls, stats, s_calls) < 0
                                     || count(&slot_fast_calls, stats, s_fast_calls) < 0)))
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
    return defer(self, entry, x, rows, owner);
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

/* Serves(serves, stack_of, backend): adapters.keras' serving check in C (``serves``,
 * the Python closure, is its specification and takes any call it does not make):
 * ``serves(model, entry)``, whether the session Keras' predict would use now (the top of
 * TensorFlow's default-session stack ``stack_of.stack``, else the backend module's
 * ``_SESSION``) is the entry's, open, and the model's predict function the entry's. */
typedef struct {
    PyObject_HEAD
    PyObject *serves, *stack_of, *backend;
} Serves;

static PyObject *s_stack, *s__SESSION, *s_session, *s_function, *s_predict_function,
    *s__closed;

/* 1, 0, or -1 with an error set; -2 where the Python closure must answer. */
static int
serves_now(Serves *self, PyObject *model, PyObject *entry)
{
    PyObject *stack = PyObject_GetAttr(self->stack_of, s_stack), *session, *v;
    if (stack == NULL || !PyList_CheckExact(stack)) {
        Py_XDECREF(stack);
        PyErr_Clear();
        return -2;
    }
    if (PyList_GET_SIZE(stack))
        session = PyList_GET_ITEM(stack, PyList_GET_SIZE(stack) - 1);
    else if ((session = PyDict_GetItemWithError(PyModule_GetDict(self->backend),
                                                s__SESSION)) == NULL) {
        Py_DECREF(stack);
        PyErr_Clear();
        return -2;
    }
    Py_INCREF(session);
    Py_DECREF(stack);
    int r = -2;
    PyObject **dict = _PyObject_GetDictPtr(model);
    if ((v = PyObject_GetAttr(entry, s_session)) == NULL)
        goto done;
    Py_DECREF(v);
    if (v != session) {
        r = 0;
        goto done;
    }
    if (dict == NULL || *dict == NULL || !PyDict_CheckExact(*dict))
        goto done;
    PyObject *function = PyDict_GetItemWithError(*dict, s_predict_function);    /* borrowed */
    if (function == NULL && PyErr_Occurred())
        goto done;
    if (function == NULL)
        function = Py_None;
    Py_INCREF(function);
    v = PyObject_GetAttr(entry, s_function);
    Py_XDECREF(v);
    Py_DECREF(function);
    if (v == NULL)
        goto done;
    if (v != function) {
        r = 0;
        goto done;
    }
    if ((v = PyObject_GetAttr(session, s__closed)) == NULL)
        goto done;
    r = PyObject_IsTrue(v);
    Py_DECREF(v);
    r = r < 0 ? -2 : !r;
done:
    if (r == -2)
        PyErr_Clear();
    Py_DECREF(session);
    return r;
}

static int
serves_call(PyObject *serves, PyObject *model, PyObject *entry);

static PyObject *
Serves_call(Serves *self, PyObject *args, PyObject *kw)
{
    PyObject *model, *entry;
    if (self->serves == NULL) {
        PyErr_SetString(PyExc_TypeError, "serves is not initialised");
        return NULL;
    }
    if ((kw != NULL && PyDict_GET_SIZE(kw))
            || !PyArg_UnpackTuple(args, "serves", 2, 2, &model, &entry))
        return PyObject_Call(self->serves, args, kw);
    int r = serves_call((PyObject *)self, model, entry);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static int
Serves_init(Serves *self, PyObject *args, PyObject *kwds)
{
    PyObject *serves, *stack_of, *backend;
    if (!PyArg_ParseTuple(args, "OOO!", &serves, &stack_of, &PyModule_Type, &backend))
        return -1;
#define SET(name) Py_INCREF(name); Py_XSETREF(self->name, name);
    SET(serves) SET(stack_of) SET(backend)
#undef SET
    return 0;
}

static int
Serves_traverse(Serves *self, visitproc visit, void *arg)
{
    Py_VISIT(self->serves);
    Py_VISIT(self->stack_of);
    Py_VISIT(self->backend);
    return 0;
}

static int
Serves_clear(Serves *self)
{
    Py_CLEAR(self->serves);
    Py_CLEAR(self->stack_of);
    Py_CLEAR(self->backend);
    return 0;
}

static void
Serves_dealloc(Serves *self)
{
    PyObject_GC_UnTrack(self);
    Serves_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef Serves_members[] = {
    {"python", T_OBJECT, offsetof(Serves, serves), READONLY, "the closure it stands for"},
    {NULL}
};

static PyTypeObject ServesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "keras_fastpredict.engine._alloc.Serves",
    .tp_basicsize = sizeof(Serves),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Serves(serves, stack_of, backend): the Keras adapter's serving check.",
    .tp_members = Serves_members,
    .tp_call = (ternaryfunc)Serves_call,
    .tp_init = (initproc)Serves_init,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)Serves_traverse,
    .tp_clear = (inquiry)Serves_clear,
    .tp_dealloc = (destructor)Serves_dealloc,
};

/* serves(model, entry)'s truth: 1, 0, or -1 with an error (a Serves answers in C where
 * it can; any other callable, or its closure, is called). */
static int
serves_call(PyObject *serves, PyObject *model, PyObject *entry)
{
    if (Py_TYPE(serves) == &ServesType) {
        int r = serves_now((Serves *)serves, model, entry);
        if (r != -2)
            return r;
        serves = ((Serves *)serves)->serves;
    }
    PyObject *v = PyObject_CallFunctionObjArgs(serves, model, entry, NULL);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* AutoCall(call, owner, entries, serves, settings, globals, local, ndarray): an
 * auto-batched site's call in C (deferred.auto_caller: ``call`` is its specification, and
 * takes every call that is not its usual one). The usual call: one array of the input
 * signature ``call`` last validated, on the model of the entry it last deferred a call
 * for (held weakly, as ``call`` holds it), every per-call check of ``call`` passing (in
 * its order, ``serves`` called as it calls it), deferred by this thread's AutoScope's
 * Deferrer: its proxy. Any other call (a first call, another entry or signature, a check
 * failing, no Deferrer or one that leaves the call to Scope.defer) is ``call``'s, which
 * does all of it again; where ``call`` deferred it, its entry and signature are noted.
 * Under the GIL; what another thread notes meanwhile is held here for the call. */
typedef struct {
    PyObject_HEAD
    PyObject *call, *owner, *entries, *serves, *settings, *globals, *local, *ndarray;
    PyObject *entry_ref, *dtype, *tail;     /* noted from ``call``'s last deferral */
} AutoCall;

#define AUTO_FIELDS(X) X(call) X(owner) X(entries) X(serves) X(settings) X(globals) \
    X(local) X(ndarray) X(entry_ref) X(dtype) X(tail)

static PyObject *s_on, *s_batch_safe, *s_excluded, *s_unroll_ready, *s_defer, *s_active,
    *s_max_batch_size, *s_auto, *s__fast, *s_dtype, *s_shape;

/* The truth of obj.name (-1 with an error set). */
static int
true_attr(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* The deferred result of the usual call (new reference); None where it is not one
 * (an error in a check included: ``call`` makes the checks again, and raises where it
 * raises); NULL with a deferral's error. */
static PyObject *
usual(AutoCall *self, PyObject *model, PyObject *args, PyObject *kwargs, PyObject *entry_ref,
      PyObject *dtype, PyObject *tail)
{
    if (!PyTuple_CheckExact(args) || PyTuple_GET_SIZE(args) != 1
            || (kwargs != Py_None && (!PyDict_CheckExact(kwargs) || PyDict_GET_SIZE(kwargs)))
            || entry_ref == NULL || !PyTuple_CheckExact(tail))
        Py_RETURN_NONE;
    PyObject *v = GET(self->owner, on);
    int on = v == NULL ? -1 : PyObject_IsTrue(v);
    Py_XDECREF(v);
    if (on != 1)
        goto none_yet;
    PyObject *key = PyLong_FromVoidPtr(model);
    if (key == NULL)
        goto none_yet;
    PyObject *entry = PyDict_GetItemWithError(self->entries, key);
    Py_DECREF(key);
    if (entry == NULL || PyWeakref_GET_OBJECT(entry_ref) != entry)
        goto none_yet;
    Py_INCREF(entry);
    PyObject *out = NULL, *scope = NULL, *fast = NULL;
    if ((v = PyObject_GetAttr(entry, s_batch_safe)) == NULL)
        goto none;
    Py_DECREF(v);
    if (v != Py_True || true_attr(entry, s_excluded) != 0
            || true_attr(entry, s_unroll_ready) != 0 || true_attr(self->settings, s_defer) != 0)
        goto none;
    v = PyDict_GetItemWithError(self->globals, s_active);     /* (borrowed) */
    if (v == NULL || PyObject_IsTrue(v) != 0)               /* (a scope is active) */
        goto none;
    if (serves_call(self->serves, model, entry) != 1)
        goto none;
    PyObject *x = PyTuple_GET_ITEM(args, 0);
    if (Py_TYPE(x) != (PyTypeObject *)self->ndarray)
        goto none;
    Array *a = (Array *)x;
    if (a->descr != dtype || a->nd != PyTuple_GET_SIZE(tail) + 1)
        goto none;
    for (int i = 1; i < a->nd; i++) {
        PyObject *d = PyTuple_GET_ITEM(tail, i - 1);
        if (!PyLong_CheckExact(d) || PyLong_AsSsize_t(d) != a->dimensions[i])
            goto none;
    }
    Py_ssize_t rows = a->dimensions[0];
    if ((v = PyObject_GetAttr(self->settings, s_max_batch_size)) == NULL)
        goto none;
    Py_ssize_t max_rows = PyLong_CheckExact(v) ? PyLong_AsSsize_t(v) : -1;
    Py_DECREF(v);
    if (max_rows < 0 || rows >= max_rows
            || (scope = PyObject_GetAttr(self->local, s_auto)) == NULL
            || (fast = PyObject_GetAttr(scope, s__fast)) == NULL
            || Py_TYPE(fast) != &DeferrerType)
        goto none;
    out = defer((Deferrer *)fast, entry, x, rows, self->owner);    /* (NULL: its error) */
    goto done;
none:
    PyErr_Clear();
    Py_INCREF(Py_None);
    out = Py_None;
done:
    Py_XDECREF(scope);
    Py_XDECREF(fast);
    Py_DECREF(entry);
    return out;
none_yet:
    PyErr_Clear();
    Py_RETURN_NONE;
}

static PyObject *
AutoCall_call(AutoCall *self, PyObject *callargs, PyObject *callkw)
{
    PyObject *model, *args, *kwargs;
    if (self->call == NULL) {
        PyErr_SetString(PyExc_TypeError, "auto call is not initialised");
        return NULL;
    }
    if ((callkw != NULL && PyDict_GET_SIZE(callkw))
            || !PyArg_UnpackTuple(callargs, "auto call", 3, 3, &model, &args, &kwargs))
        return PyObject_Call(self->call, callargs, callkw);
    /* What was noted, held for this call (another thread may note others meanwhile). */
    PyObject *entry_ref = self->entry_ref, *dtype = self->dtype, *tail = self->tail;
    Py_XINCREF(entry_ref);
    Py_XINCREF(dtype);
    Py_XINCREF(tail);
    PyObject *out = usual(self, model, args, kwargs, entry_ref, dtype, tail);
    Py_XDECREF(entry_ref);
    Py_XDECREF(dtype);
    Py_XDECREF(tail);
    if (out != Py_None)
        return out;
    Py_DECREF(out);
    out = PyObject_Call(self->call, callargs, NULL);
    if (out == NULL || out == Py_None || !PyTuple_CheckExact(args) || PyTuple_GET_SIZE(args) != 1)
        return out;
    /* Deferred by ``call``: its entry was eligible and this signature valid (noted). */
    PyObject *x = PyTuple_GET_ITEM(args, 0), *key = PyLong_FromVoidPtr(model), *entry;
    PyObject *ref = NULL, *shape = NULL, *new_tail = NULL, *new_dtype = NULL;
    if (key == NULL)
        goto failed;
    entry = PyDict_GetItemWithError(self->entries, key);
    Py_DECREF(key);
    if (entry == NULL || Py_TYPE(x) != (PyTypeObject *)self->ndarray)
        goto failed;
    if ((ref = PyWeakref_NewRef(entry, NULL)) == NULL
            || (new_dtype = PyObject_GetAttr(x, s_dtype)) == NULL
            || (shape = PyObject_GetAttr(x, s_shape)) == NULL || !PyTuple_CheckExact(shape)
            || PyTuple_GET_SIZE(shape) < 1
            || (new_tail = PyTuple_GetSlice(shape, 1, PyTuple_GET_SIZE(shape))) == NULL)
        goto failed;
    Py_XSETREF(self->entry_ref, ref);
    Py_XSETREF(self->dtype, new_dtype);
    Py_XSETREF(self->tail, new_tail);
    Py_DECREF(shape);
    return out;
failed:                         /* (noted nothing: the next call is ``call``'s again) */
    PyErr_Clear();
    Py_XDECREF(ref);
    Py_XDECREF(new_dtype);
    Py_XDECREF(shape);
    Py_XDECREF(new_tail);
    return out;
}

static int
AutoCall_init(AutoCall *self, PyObject *args, PyObject *kwds)
{
    PyObject *call, *owner, *entries, *serves, *settings, *globals, *local, *ndarray;
    if (!PyArg_ParseTuple(args, "OOO!OOO!OO!", &call, &owner, &PyDict_Type, &entries, &serves,
                          &settings, &PyDict_Type, &globals, &local, &PyType_Type, &ndarray))
        return -1;
    if (((PyTypeObject *)ndarray)->tp_basicsize < (Py_ssize_t)sizeof(Array)) {
        PyErr_SetString(PyExc_TypeError, "numpy's arrays are not laid out as expected");
        return -1;
    }
#define SET(name) Py_INCREF(name); Py_XSETREF(self->name, name);
    SET(call) SET(owner) SET(entries) SET(serves) SET(settings) SET(globals) SET(local)
    SET(ndarray)
#undef SET
    Py_CLEAR(self->entry_ref);
    Py_CLEAR(self->dtype);
    Py_CLEAR(self->tail);
    return 0;
}

static int
AutoCall_traverse(AutoCall *self, visitproc visit, void *arg)
{
#define VISIT(name) Py_VISIT(self->name);
    AUTO_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int
AutoCall_clear(AutoCall *self)
{
#define CLEAR(name) Py_CLEAR(self->name);
    AUTO_FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void
AutoCall_dealloc(AutoCall *self)
{
    PyObject_GC_UnTrack(self);
    AutoCall_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject AutoCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "keras_fastpredict.engine._alloc.AutoCall",
    .tp_basicsize = sizeof(AutoCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "AutoCall(call, owner, entries, serves, settings, globals, local, ndarray): an "
              "auto-batched site's usual call (any other: call's).",
    .tp_call = (ternaryfunc)AutoCall_call,
    .tp_init = (initproc)AutoCall_init,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)AutoCall_traverse,
    .tp_clear = (inquiry)AutoCall_clear,
    .tp_dealloc = (destructor)AutoCall_dealloc,
};

/* Materializer(resolve, proxy_type, pending_types): pending.materialize in C (which is
 * its specification): ``materializer(obj)`` is obj with every proxy in it (in lists,
 * tuples and dicts, exactly of those types) replaced by what it wraps, and a proxy that
 * wraps one of ``pending_types`` by ``resolve(proxy)`` (which runs its batch). */
typedef struct {
    PyObject_HEAD
    PyObject *resolve, *proxy, *pending;
} Materializer;

static PyObject *
materialized(Materializer *self, PyObject *obj)
{
    PyTypeObject *t = Py_TYPE(obj);
    if (t == (PyTypeObject *)self->proxy) {
        PyObject *inner = NULL;
        if (t == proxy_type && wrapped_offset)
            inner = *(PyObject **)((char *)obj + wrapped_offset);
        if (inner != NULL) {
            int pending = 0;
            for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->pending); i++)
                pending |= (PyObject *)Py_TYPE(inner) == PyTuple_GET_ITEM(self->pending, i);
            if (!pending) {
                Py_INCREF(inner);
                return inner;
            }
        }
        return PyObject_CallFunctionObjArgs(self->resolve, obj, NULL);
    }
    if (t != &PyList_Type && t != &PyTuple_Type && t != &PyDict_Type) {
        Py_INCREF(obj);
        return obj;
    }
    if (Py_EnterRecursiveCall(" in materialize"))
        return NULL;
    PyObject *out = NULL;
    if (t == &PyDict_Type) {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        if ((out = PyDict_New()) == NULL)
            goto done;
        /* (resolve may run Python code: the dict's items are read from a copy) */
        PyObject *items = PyDict_Items(obj);
        if (items == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        for (pos = 0; pos < PyList_GET_SIZE(items); pos++) {
            PyObject *item = PyList_GET_ITEM(items, pos);
            key = PyTuple_GET_ITEM(item, 0);
            value = materialized(self, PyTuple_GET_ITEM(item, 1));
            if (value == NULL || PyDict_SetItem(out, key, value) < 0) {
                Py_XDECREF(value);
                Py_CLEAR(out);
                break;
            }
            Py_DECREF(value);
        }
        Py_DECREF(items);
        goto done;
    }
    /* A list as iterating it reads it (resolve may run Python code that changes it). */
    if ((out = PyList_New(0)) == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < Py_SIZE(obj); i++) {
        PyObject *item = t == &PyList_Type ? PyList_GET_ITEM(obj, i) : PyTuple_GET_ITEM(obj, i);
        Py_INCREF(item);
        PyObject *value = materialized(self, item);
        Py_DECREF(item);
        if (value == NULL || PyList_Append(out, value) < 0) {
            Py_XDECREF(value);
            Py_CLEAR(out);
            goto done;
        }
        Py_DECREF(value);
    }
    if (t == &PyTuple_Type)
        Py_SETREF(out, PyList_AsTuple(out));
done:
    Py_LeaveRecursiveCall();
    return out;
}

static PyObject *
Materializer_call(Materializer *self, PyObject *args, PyObject *kw)
{
    PyObject *obj;
    if (self->resolve == NULL) {
        PyErr_SetString(PyExc_TypeError, "materializer is not initialised");
        return NULL;
    }
    if (kw != NULL && PyDict_GET_SIZE(kw)) {
        PyErr_SetString(PyExc_TypeError, "materialize() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "materialize", 1, 1, &obj))
        return NULL;
    return materialized(self, obj);
}

static int
Materializer_init(Materializer *self, PyObject *args, PyObject *kwds)
{
    PyObject *resolve, *proxy, *pending;
    if (!PyArg_ParseTuple(args, "OO!O!", &resolve, &PyType_Type, &proxy, &PyTuple_Type, &pending))
        return -1;
#define SET(name) Py_INCREF(name); Py_XSETREF(self->name, name);
    SET(resolve) SET(proxy) SET(pending)
#undef SET
    return 0;
}

static int
Materializer_traverse(Materializer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->resolve);
    Py_VISIT(self->proxy);
    Py_VISIT(self->pending);
    return 0;
}

static int
Materializer_clear(Materializer *self)
{
    Py_CLEAR(self->resolve);
    Py_CLEAR(self->proxy);
    Py_CLEAR(self->pending);
    return 0;
}

static void
Materializer_dealloc(Materializer *self)
{
    PyObject_GC_UnTrack(self);
    Materializer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject MaterializerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "keras_fastpredict.engine._alloc.Materializer",
    .tp_basicsize = sizeof(Materializer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Materializer(resolve, DeferredArray, PENDING): pending.materialize.",
    .tp_call = (ternaryfunc)Materializer_call,
    .tp_init = (initproc)Materializer_init,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)Materializer_traverse,
    .tp_clear = (inquiry)Materializer_clear,
    .tp_dealloc = (destructor)Materializer_dealloc,
};

/* settle(proxies, results): deferred._settle's usual case in C: where no result is an
 * exception, each proxy (made uncounted) pointed at its result, as set_wrapped points it;
 * returns the list of what they wrapped. None (nothing changed) in any other case. */
static PyObject *
settle(PyObject *module, PyObject *args)
{
    PyObject *proxies, *results;
    if (!PyArg_ParseTuple(args, "O!O!:settle", &PyList_Type, &proxies, &PyList_Type, &results))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(proxies);
    if (wrapped_offset == 0 || PyList_GET_SIZE(results) != n)
        Py_RETURN_NONE;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *proxy = PyList_GET_ITEM(proxies, i);
        if (Py_TYPE(proxy) != proxy_type || *(PyObject **)((char *)proxy + wrapped_offset) == NULL
                || PyExceptionInstance_Check(PyList_GET_ITEM(results, i)))
            Py_RETURN_NONE;
    }
    PyObject *retired = PyList_New(n);
    if (retired == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject **p = (PyObject **)((char *)PyList_GET_ITEM(proxies, i) + wrapped_offset);
        PyObject *result = PyList_GET_ITEM(results, i);
        PyList_SET_ITEM(retired, i, *p);            /* (the proxy's reference, moved) */
        Py_INCREF(result);
        *p = result;
    }
    return retired;
}

/* forget(calls, objects): calls.pop(id(obj), None) for each obj (deferred._retire). */
static PyObject *
forget(PyObject *module, PyObject *args)
{
    PyObject *calls, *objects;
    if (!PyArg_ParseTuple(args, "O!O!:forget", &PyDict_Type, &calls, &PyList_Type, &objects))
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(objects); i++) {
        PyObject *key = PyLong_FromVoidPtr(PyList_GET_ITEM(objects, i));
        if (key == NULL)
            return NULL;
        if (PyDict_DelItem(calls, key) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
                Py_DECREF(key);
                return NULL;
            }
            PyErr_Clear();
        }
        Py_DECREF(key);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"settle", settle, METH_VARARGS,
     "settle(proxies, results): each proxy pointed at its result, what they wrapped returned "
     "(None: a result is an exception, or a proxy not made uncounted; nothing changed)."},
    {"forget", forget, METH_VARARGS, "forget(calls, objects): calls.pop(id(obj), None) each."},
    {"uncounted", uncounted, METH_O,
     "uncounted(type): its objects no longer count towards the collector's next run."},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "keras_fastpredict.engine._alloc",
    "Deferred results that do not bring garbage collections on; a deferred call's usual "
    "path.", -1, methods,
};

PyMODINIT_FUNC
PyInit__alloc(void)
{
    if (PyType_Ready(&DeferrerType) < 0 || PyType_Ready(&AutoCallType) < 0
            || PyType_Ready(&MaterializerType) < 0 || PyType_Ready(&ServesType) < 0
            || (one = PyLong_FromLong(1)) == NULL)
        return NULL;
#define INTERN(name) if ((s_##name = PyUnicode_InternFromString(#name)) == NULL) return NULL;
    INTERN(n) INTERN(capacity) INTERN(n_outputs) INTERN(buffers) INTERN(stops)
    INTERN(proxies) INTERN(key) INTERN(stats) INTERN(deferred) INTERN(calls)
    INTERN(fast_calls) INTERN(on) INTERN(batch_safe) INTERN(excluded) INTERN(unroll_ready)
    INTERN(defer) INTERN(max_batch_size) INTERN(auto) INTERN(dtype) INTERN(shape)
    INTERN(stack) INTERN(session) INTERN(function) INTERN(predict_function)
    if ((s__SESSION = PyUnicode_InternFromString("_SESSION")) == NULL
            || (s__closed = PyUnicode_InternFromString("_closed")) == NULL
            || (s__fast = PyUnicode_InternFromString("_fast")) == NULL
            || (s_active = PyUnicode_InternFromString("_active")) == NULL)
        return NULL;
#undef INTERN
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&DeferrerType);
    Py_INCREF(&AutoCallType);
    Py_INCREF(&MaterializerType);
    Py_INCREF(&ServesType);
    if (PyModule_AddObject(m, "Deferrer", (PyObject *)&DeferrerType) < 0
            || PyModule_AddObject(m, "AutoCall", (PyObject *)&AutoCallType) < 0
            || PyModule_AddObject(m, "Materializer", (PyObject *)&MaterializerType) < 0
            || PyModule_AddObject(m, "Serves", (PyObject *)&ServesType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
