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
#include "deferral.h"

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

/* The type made uncounted, and where its objects hold the wrapped object (0: not
 * found): a proxy made as its init leaves it (no dict, the wrapped object set) is then
 * made directly by ``kfp_new_proxy``, without wrapt's dict and its copies of the wrapped
 * object's __module__ and __doc__, which the init drops. */
PyTypeObject *kfp_proxy_type = NULL;
Py_ssize_t kfp_wrapped_offset = 0;

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
        kfp_proxy_type = type;
        kfp_wrapped_offset = found;
    }
    Py_DECREF(probe);
    Py_DECREF(sentinel);
    return 0;
}

/* type(wrapped), as calling the type would make it (a new reference). */
PyObject *
kfp_new_proxy(PyObject *type, PyObject *wrapped)
{
    PyTypeObject *t = (PyTypeObject *)type;
    if (t != kfp_proxy_type || kfp_wrapped_offset == 0 || t->tp_alloc != uncounted_alloc
            || t->tp_init != dictless_init)
        return PyObject_CallFunctionObjArgs(type, wrapped, NULL);
    PyObject *proxy = t->tp_alloc(t, 0);            /* (zeroed: no dict, no weak references) */
    if (proxy == NULL)
        return NULL;
    Py_INCREF(wrapped);
    *kfp_wrapped(proxy) = wrapped;
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
    /* The nearest static type: wrapt's C proxy (object where wrapt's proxy is its Python
     * class: its layout is not the one this code reads, so nothing is changed). */
    PyTypeObject *base = type;
    while (base != NULL && (base->tp_flags & Py_TPFLAGS_HEAPTYPE))
        base = base->tp_base;
    if (base_init != NULL                       /* (one type only: its base's init kept) */
            || base == NULL || base == &PyBaseObject_Type || base->tp_init == NULL
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

static PyMethodDef functions[] = {
    {"uncounted", uncounted, METH_O,
     "uncounted(type): its objects no longer count towards the collector's next run."},
    {NULL, NULL, 0, NULL}
};

int
kfp_add_uncounted(PyObject *module)
{
    return PyModule_AddFunctions(module, functions);
}
