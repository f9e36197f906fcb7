/* keras_fastpredict.engine._deferral: deferred results that do not bring garbage
 * collections on (uncounted.c); below it, a deferred call's usual path (Deferrer,
 * AutoCall, Serves, settle, forget, Materializer: the Python code of engine/deferred.py,
 * engine/pending.py and adapters/keras.py is their specification, and runs where this is
 * not built).
 *
 * One extension module of several files, one job each (deferral.h: what they share):
 * uncounted.c the proxies' allocator; deferrer.c a scope's usual deferral; auto_call.c an
 * auto-batched site's usual call; serves.c the Keras adapter's serving check; slots.c the
 * slot attributes those read and write; materializer.c pending.materialize; settle.c a
 * batch's settling; this file the module, made of their parts. */
#include "deferral.h"

int
kfp_add_type(PyObject *module, const char *name, PyTypeObject *type)
{
    if (PyType_Ready(type) < 0)
        return -1;
    Py_INCREF(type);
    return PyModule_AddObject(module, name, (PyObject *)type);
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "keras_fastpredict.engine._deferral",
    "Deferred results that do not bring garbage collections on; a deferred call's usual "
    "path.", -1, NULL,
};

PyMODINIT_FUNC
PyInit__deferral(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (kfp_init_slots() < 0 || kfp_add_settle(m) < 0 || kfp_add_uncounted(m) < 0
            || kfp_add_deferrer(m) < 0 || kfp_add_auto_call(m) < 0
            || kfp_add_materializer(m) < 0 || kfp_add_serves(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
