/* Materializer(resolve, proxy_type, pending_types): pending.materialize in C (which is
 * its specification): ``materializer(obj)`` is obj with every proxy in it (in lists,
 * tuples and dicts, exactly of those types) replaced by what it wraps, and a proxy that
 * wraps one of ``pending_types`` by ``resolve(proxy)`` (which runs its batch). */
#include "deferral.h"

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
        if (t == kfp_proxy_type && kfp_wrapped_offset)
            inner = *kfp_wrapped(obj);
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
    .tp_name = "keras_fastpredict.engine._deferral.Materializer",
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

int
kfp_add_materializer(PyObject *module)
{
    return kfp_add_type(module, "Materializer", &MaterializerType);
}
