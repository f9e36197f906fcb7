/* Serves(serves, stack_of, backend): adapters.keras' serving check in C (``serves``,
 * the Python closure, is its specification and takes any call it does not make):
 * ``serves(model, entry)``, whether the session Keras' predict would use now (the top of
 * TensorFlow's default-session stack ``stack_of.stack``, else the backend module's
 * ``_SESSION``) is the entry's, open, and the model's predict function the entry's.
 * AutoCall (auto_call.c) makes the check through kfp_serves_call. */
#include "deferral.h"

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
    int r = kfp_serves_call((PyObject *)self, model, entry);
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
    .tp_name = "keras_fastpredict.engine._deferral.Serves",
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
int
kfp_serves_call(PyObject *serves, PyObject *model, PyObject *entry)
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

int
kfp_add_serves(PyObject *module)
{
    if (!(KFP_INTERN(stack) && KFP_INTERN(_SESSION) && KFP_INTERN(session)
          && KFP_INTERN(function) && KFP_INTERN(predict_function) && KFP_INTERN(_closed)))
        return -1;
    return kfp_add_type(module, "Serves", &ServesType);
}
