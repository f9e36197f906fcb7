/* settle and forget: deferred._settle's and deferred._retire's usual case in C (the
 * Python code is their specification, and runs where this is not built). */
#include "deferral.h"

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
    if (kfp_wrapped_offset == 0 || PyList_GET_SIZE(results) != n)
        Py_RETURN_NONE;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *proxy = PyList_GET_ITEM(proxies, i);
        if (Py_TYPE(proxy) != kfp_proxy_type || *kfp_wrapped(proxy) == NULL
                || PyExceptionInstance_Check(PyList_GET_ITEM(results, i)))
            Py_RETURN_NONE;
    }
    PyObject *retired = PyList_New(n);
    if (retired == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject **p = kfp_wrapped(PyList_GET_ITEM(proxies, i));
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

static PyMethodDef functions[] = {
    {"settle", settle, METH_VARARGS,
     "settle(proxies, results): each proxy pointed at its result, what they wrapped returned "
     "(None: a result is an exception, or a proxy not made uncounted; nothing changed)."},
    {"forget", forget, METH_VARARGS, "forget(calls, objects): calls.pop(id(obj), None) each."},
    {NULL, NULL, 0, NULL}
};

int
kfp_add_settle(PyObject *module)
{
    return PyModule_AddFunctions(module, functions);
}
