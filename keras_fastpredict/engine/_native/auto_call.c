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
#include "deferral.h"

typedef struct {
    PyObject_HEAD
    PyObject *call, *owner, *entries, *serves, *settings, *globals, *local, *ndarray;
    PyObject *entry_ref, *dtype, *tail;     /* noted from ``call``'s last deferral */
} AutoCall;

#define AUTO_FIELDS(X) X(call) X(owner) X(entries) X(serves) X(settings) X(globals) \
    X(local) X(ndarray) X(entry_ref) X(dtype) X(tail)

static PyObject *s_on, *s_batch_safe, *s_excluded, *s_unroll_ready, *s_defer, *s__active,
    *s_max_batch_size, *s_auto, *s__fast, *s_dtype, *s_shape;

static Slot slot_on;

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
    v = PyDict_GetItemWithError(self->globals, s__active);    /* (borrowed) */
    if (v == NULL || PyObject_IsTrue(v) != 0)               /* (a scope is active) */
        goto none;
    if (kfp_serves_call(self->serves, model, entry) != 1)
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
            || Py_TYPE(fast) != &kfp_DeferrerType)
        goto none;
    out = kfp_defer(fast, entry, x, rows, self->owner);     /* (NULL: its error) */
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
    .tp_name = "keras_fastpredict.engine._deferral.AutoCall",
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

int
kfp_add_auto_call(PyObject *module)
{
    if (!(KFP_INTERN(on) && KFP_INTERN(batch_safe) && KFP_INTERN(excluded)
          && KFP_INTERN(unroll_ready) && KFP_INTERN(defer) && KFP_INTERN(_active)
          && KFP_INTERN(max_batch_size) && KFP_INTERN(auto) && KFP_INTERN(_fast)
          && KFP_INTERN(dtype) && KFP_INTERN(shape)))
        return -1;
    return kfp_add_type(module, "AutoCall", &AutoCallType);
}
