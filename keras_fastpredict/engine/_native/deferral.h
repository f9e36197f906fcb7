/* What the C files of engine/_native share: they are compiled into one extension module
 * (module.c), and each adds its part to it. Names shared between the files begin with kfp_
 * and are hidden from the built module's symbol table (KFP_INTERNAL): it exports only its
 * init function, as it did in one file. */
#ifndef KFP_DEFERRAL_H
#define KFP_DEFERRAL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#if defined(__GNUC__) && !defined(_WIN32)
#define KFP_INTERNAL __attribute__((visibility("hidden")))
#else
#define KFP_INTERNAL
#endif

/* s_<name>: the interned string "<name>" (0 where it cannot be made, with an error set) */
#define KFP_INTERN(name) ((s_##name = PyUnicode_InternFromString(#name)) != NULL)

/* module.c: ``type`` made ready and added to the module as ``name`` (-1 with an error). */
KFP_INTERNAL int kfp_add_type(PyObject *module, const char *name, PyTypeObject *type);

/* Each file's part of the module: its types and functions, with what they need made
 * (their interned strings); -1 with an error set. */
KFP_INTERNAL int kfp_add_uncounted(PyObject *module);       /* uncounted.c */
KFP_INTERNAL int kfp_add_deferrer(PyObject *module);        /* deferrer.c */
KFP_INTERNAL int kfp_add_serves(PyObject *module);          /* serves.c */
KFP_INTERNAL int kfp_add_auto_call(PyObject *module);       /* auto_call.c */
KFP_INTERNAL int kfp_add_materializer(PyObject *module);    /* materializer.c */
KFP_INTERNAL int kfp_add_settle(PyObject *module);          /* settle.c */

/* uncounted.c: the type made uncounted, and where its objects hold the wrapped object (0:
 * not found); type(wrapped) as calling the type would make it (a new reference). */
KFP_INTERNAL extern PyTypeObject *kfp_proxy_type;
KFP_INTERNAL extern Py_ssize_t kfp_wrapped_offset;
KFP_INTERNAL PyObject *kfp_new_proxy(PyObject *type, PyObject *wrapped);

/* Where a proxy of kfp_proxy_type holds the object it wraps (kfp_wrapped_offset set). */
static inline PyObject **
kfp_wrapped(PyObject *proxy)
{
    return (PyObject **)((char *)proxy + kfp_wrapped_offset);
}

/* numpy's array layout (PyArrayObject_fields, stable since numpy 1.7), read without its
 * headers (a build needs no numpy): checked against a probe array where a Deferrer is
 * made, and against the type's size where an AutoCall is. */
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

/* slots.c: attributes held in slots read and written at their offsets. One cache per use
 * (the object's kind and the name): the type whose slot it found, and where. */
typedef struct {
    PyTypeObject *type;
    Py_ssize_t offset;
} Slot;

KFP_INTERNAL PyObject *kfp_get(Slot *c, PyObject *obj, PyObject *name);    /* obj.name */
KFP_INTERNAL int kfp_set(Slot *c, PyObject *obj, PyObject *name, PyObject *value);
KFP_INTERNAL int kfp_count(Slot *c, PyObject *obj, PyObject *name);        /* += 1 */
KFP_INTERNAL Py_ssize_t kfp_size_attr(Slot *c, PyObject *obj, PyObject *name);
KFP_INTERNAL int kfp_init_slots(void);     /* (-1 with an error set) */

/* obj.name and a batch's count ``name``, each through the file's own cache slot_<name>. */
#define GET(obj, name) kfp_get(&slot_##name, obj, s_##name)
#define SIZE(obj, name) kfp_size_attr(&slot_##name, obj, s_##name)

/* deferrer.c: the Deferrer type, and a call of one (``deferrer`` one of its objects). */
KFP_INTERNAL extern PyTypeObject kfp_DeferrerType;
KFP_INTERNAL PyObject *kfp_defer(PyObject *deferrer, PyObject *entry, PyObject *x,
                                 Py_ssize_t rows, PyObject *owner);

/* serves.c: serves(model, entry)'s truth: 1, 0, or -1 with an error (a Serves answers in
 * C where it can; any other callable, or its closure, is called). */
KFP_INTERNAL int kfp_serves_call(PyObject *serves, PyObject *model, PyObject *entry);

#endif
