/* Attributes held in slots (classes with __slots__ and no attribute hooks: _Batch,
 * ModelStats, Auto) read and written at their offsets, as PyObject_GetAttr and SetAttr
 * would, without their lookups; any other attribute through them. One cache per use
 * (the object's kind and the name): the type whose slot it found, and where. A type it
 * has found stays alive (its reference is never released), so that its address is no
 * other type's. Used by the Deferrer (deferrer.c) and AutoCall (auto_call.c). */
#include "deferral.h"

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
PyObject *
kfp_get(Slot *c, PyObject *obj, PyObject *name)
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
int
kfp_set(Slot *c, PyObject *obj, PyObject *name, PyObject *value)
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
int
kfp_count(Slot *c, PyObject *obj, PyObject *name)
{
    PyObject *v = kfp_get(c, obj, name);
    if (v == NULL)
        return -1;
    PyObject *sum = PyNumber_Add(v, one);
    Py_DECREF(v);
    if (sum == NULL)
        return -1;
    int r = kfp_set(c, obj, name, sum);
    Py_DECREF(sum);
    return r;
}

/* A batch's count ``name`` (-1 with an error set where it is none). */
Py_ssize_t
kfp_size_attr(Slot *c, PyObject *obj, PyObject *name)
{
    PyObject *v = kfp_get(c, obj, name);
    if (v == NULL)
        return -1;
    Py_ssize_t n = PyLong_CheckExact(v) ? PyLong_AsSsize_t(v) : -1;
    Py_DECREF(v);
    if (n < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "a batch's count expected");
    return n;
}

int
kfp_init_slots(void)
{
    return (one = PyLong_FromLong(1)) == NULL ? -1 : 0;
}
