/* The call-site report's usual call, in C: the steps at the top of the ``rest`` functions
 * of predict_calls.py and announced.py, which are the specification (the same logic in
 * Python, used where this extension is not built; tests/test_report_*.py run both).
 *
 * A recorder stands where wrapt calls the entry's wrapper: recorder(wrapped, instance,
 * args, kwargs). Its usual call is one of a site whose sample is taken, from the same
 * instruction of the same code, on the same model (or Session.run / K.function state):
 * the calling frame's instruction is looked up in the report's table, the call is timed
 * around ``through(wrapper, wrapped, instance, args, kwargs)`` (a Python function: its
 * frame tells the report's frame walk that a recorded call is in progress), and the
 * site's accumulators are updated. Any other call goes to ``rest``, the report's Python
 * recorder, with the calling frame.
 *
 * Tables: a predict site's hot tuple (predict_calls.hot_tuple: code, instance weakly,
 * rows, stats, acc, site, and under auto-batch a seventh item: the site's Auto.call, or
 * None where its calls pass on uncounted; a site whose sample one thread made, with its
 * results unread, has an eighth: that thread's id, another thread's calls go to ``rest``
 * (watch.py), and its seventh is False where it has no call); an announced site's steady tuple (announced._steady_at: code,
 * instance weakly, rows, state weakly, acc, site, the state's stats, the stats its paths
 * are read from, the site table, entry name), whose call in flight is this thread's
 * ``_in_flight.current``: [steady, the state's fast_calls before (-1: not announced yet,
 * -2: announced otherwise), frame, the whole call's list].
 *
 * While a thread times plain Keras (report/plain.py, ``passing``), every patched entry
 * hands that thread's calls to the original: the recorders check this thread's flag
 * first, and ``Gate`` does for the entries the report does not record. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    PyObject *table;        /* f_lasti -> the site's tuple */
    PyObject *wrapper;
    PyObject *rest;         /* rest(frame, wrapped, instance, args, kwargs) */
    PyObject *through;
    PyObject *type;         /* predict: numpy.ndarray; announced: the report's Watched */
    PyObject *helper;       /* predict: take(stats, site); announced: None */
    PyObject *passed_on;    /* passed_on(site, stats, rows, elapsed) */
    PyObject *error;        /* predict: error(site, elapsed); announced: error(call, elapsed) */
    PyObject *unsteady;     /* announced: unsteady(call, frame, out, elapsed, wrapped, ...) */
} Recorder;

#define FIELDS(X) X(table) X(wrapper) X(rest) X(through) X(type) X(helper) X(passed_on) \
    X(error) X(unsteady)
#define N_FIELDS 9

static PyObject *str_report_owner, *str_fast_calls, *minus_one;

/* This thread's announced call in flight (announced.py's ``_in_flight.current``): a strong
 * reference, or NULL for None. */
static _Thread_local PyObject *current_call = NULL;

static void
set_current(PyObject *value)
{
    PyObject *old = current_call;
    Py_XINCREF(value);
    current_call = value;                       /* (set before the old one is released) */
    Py_XDECREF(old);
}

/* Whether this thread times plain Keras now (passing.py's ``this_thread.plain``). */
static _Thread_local int timing_plain = 0;

/* The original's call, as wrapt's wrapper makes it: wrapped(*args, **kwargs). */
static PyObject *
original(PyObject *wrapped, PyObject *args, PyObject *kwargs)
{
    if (!PyTuple_Check(args) || (kwargs != Py_None && !PyDict_Check(kwargs))) {
        PyErr_SetString(PyExc_TypeError, "wrapt's args and kwargs expected");
        return NULL;
    }
    return PyObject_Call(wrapped, args, kwargs == Py_None ? NULL : kwargs);
}

typedef struct {
    PyObject_HEAD
} Calls;

static PyObject *
Calls_get_current(PyObject *self, void *closure)
{
    PyObject *value = current_call != NULL ? current_call : Py_None;
    Py_INCREF(value);
    return value;
}

static int
Calls_set_current(PyObject *self, PyObject *value, void *closure)
{
    set_current(value == Py_None ? NULL : value);
    return 0;
}

static PyObject *
Calls_get_plain(PyObject *self, void *closure)
{
    return PyBool_FromLong(timing_plain);
}

static int
Calls_set_plain(PyObject *self, PyObject *value, void *closure)
{
    int on = value == NULL ? 0 : PyObject_IsTrue(value);
    if (on < 0)
        return -1;
    timing_plain = on;
    return 0;
}

static PyGetSetDef Calls_getset[] = {
    {"current", Calls_get_current, Calls_set_current, "this thread's call in flight", NULL},
    {"plain", Calls_get_plain, Calls_set_plain, "whether this thread times plain Keras now",
     NULL},
    {NULL}
};

static PyTypeObject CallsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "keras_fastpredict.report._steady.Calls",
    .tp_basicsize = sizeof(Calls),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Calls(): each thread's announced call in flight, as ``current``; whether it "
              "times plain Keras, as ``plain``.",
    .tp_new = PyType_GenericNew,
    .tp_getset = Calls_getset,
};

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);        /* (time.perf_counter's clock) */
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* acc[i] += value, as Python's += does it. */
static int
add_to(PyObject *acc, Py_ssize_t i, PyObject *value)
{
    if (i >= PyList_GET_SIZE(acc))
        return 0;
    PyObject *sum = PyNumber_Add(PyList_GET_ITEM(acc, i), value);
    if (sum == NULL)
        return -1;
    PyList_SetItem(acc, i, sum);                /* (steals sum, releases the old item) */
    return 0;
}

static PyObject *
rest(Recorder *self, PyFrameObject *f, PyObject *wrapped, PyObject *instance,
     PyObject *args, PyObject *kwargs)
{
    return PyObject_CallFunctionObjArgs(self->rest, (PyObject *)f, wrapped, instance, args,
                                        kwargs, NULL);
}

/* The site's tuple (borrowed) where the call from f on instance is a site's usual call
 * as far as the table tells: its tuple of ``size`` items, the same code, the same
 * instance. NULL otherwise (with an error set only where the lookup failed). */
static PyObject *
site_of(Recorder *self, PyFrameObject *f, PyObject *instance, PyObject *args,
        Py_ssize_t size)
{
    if (!PyTuple_CheckExact(args))
        return NULL;
    PyObject *key = PyLong_FromLong(f->f_lasti);
    if (key == NULL)
        return NULL;
    PyObject *site = PyDict_GetItemWithError(self->table, key);
    Py_DECREF(key);
    /* (a predict site's tuple has one or two items more: see the top) */
    if (site == NULL || !PyTuple_CheckExact(site) || (PyTuple_GET_SIZE(site) != size
            && !(size == 6 && (PyTuple_GET_SIZE(site) == 7 || PyTuple_GET_SIZE(site) == 8))))
        return NULL;
    PyObject *ref = PyTuple_GET_ITEM(site, 1), *acc = PyTuple_GET_ITEM(site, 4);
    if (PyTuple_GET_ITEM(site, 0) != (PyObject *)f->f_code || !PyWeakref_CheckRef(ref)
            || PyWeakref_GET_OBJECT(ref) != instance || !PyList_CheckExact(acc)
            || PyList_GET_SIZE(acc) != 2)
        return NULL;
    return site;
}

/* x's rows where x is an array of ``type`` with rows equal to ``rows`` (else -1). */
static Py_ssize_t
same_rows(PyObject *x, PyObject *type, PyObject *rows)
{
    if ((PyObject *)Py_TYPE(x) != type || !PyLong_CheckExact(rows))
        return -1;
    Py_ssize_t n = PyObject_Size(x);            /* (a 0-d array raises: not the usual call) */
    if (n <= 0 || n != PyLong_AsSsize_t(rows)) {
        PyErr_Clear();
        return -1;
    }
    return n;
}

/* After a call that returned: served (stats' fast_calls moved) or passed on. */
static int
counted(Recorder *self, PyObject *acc, PyObject *stats, PyObject *fc, PyObject *site,
        PyObject *rows, PyObject *elapsed)
{
    if (add_to(acc, 0, elapsed) < 0)
        return -1;
    PyObject *fc_after = PyObject_GetAttr(stats, str_fast_calls);
    if (fc_after == NULL)
        return -1;
    int served = PyObject_RichCompareBool(fc_after, fc, Py_NE);
    Py_DECREF(fc_after);
    if (served < 0)
        return -1;
    PyObject *r;
    if (served) {
        PyObject *one = PyLong_FromLong(1);
        int failed = one == NULL || add_to(acc, 1, one) < 0;
        Py_XDECREF(one);
        return failed ? -1 : 0;
    }
    r = PyObject_CallFunctionObjArgs(self->passed_on, site, stats, rows, elapsed, NULL);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* The entry's call, timed; with an exception, ``on_error(first, second)`` is told and
 * the call's own exception raised. */
static PyObject *
timed(Recorder *self, PyObject *wrapped, PyObject *instance, PyObject *args,
      PyObject *kwargs, PyObject **elapsed)
{
    double t0 = now();
    PyObject *out = PyObject_CallFunctionObjArgs(self->through, self->wrapper, wrapped,
                                                 instance, args, kwargs, NULL);
    *elapsed = PyFloat_FromDouble(now() - t0);
    return out;
}

static void
tell_error(PyObject *on_error, PyObject *first, PyObject *second)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (second != NULL) {
        PyObject *r = PyObject_CallFunctionObjArgs(on_error, first, second, NULL);
        Py_XDECREF(r);
    }
    PyErr_Clear();
    PyErr_Restore(type, value, tb);             /* the call's own exception */
}

/* wrapt's call: (wrapped, instance, args, kwargs). A thread that times plain Keras
 * calls the original. A thread with no Python frame (a C-level thread's target) has no
 * call site: its call is not recorded. */
#define UNPACK_CALL(name) \
    PyObject *wrapped, *instance, *args, *kwargs; \
    if (self->table == NULL || self->unsteady == NULL) { \
        PyErr_SetString(PyExc_TypeError, name " is not initialised"); \
        return NULL; \
    } \
    if (callkw != NULL && PyDict_GET_SIZE(callkw)) { \
        PyErr_SetString(PyExc_TypeError, name " takes no keyword arguments"); \
        return NULL; \
    } \
    if (!PyArg_UnpackTuple(callargs, name, 4, 4, &wrapped, &instance, &args, &kwargs)) \
        return NULL; \
    if (timing_plain) \
        return original(wrapped, args, kwargs); \
    PyFrameObject *f = PyEval_GetFrame(); \
    if (f == NULL) \
        return PyObject_CallFunctionObjArgs(self->through, self->wrapper, wrapped, instance, \
                                            args, kwargs, NULL);

/* predict / predict_on_batch */
static PyObject *
Recorder_call(Recorder *self, PyObject *callargs, PyObject *callkw)
{
    UNPACK_CALL("recorded")
    PyObject *hot = site_of(self, f, instance, args, 6);
    if (hot == NULL) {
        if (PyErr_Occurred())
            return NULL;
        return rest(self, f, wrapped, instance, args, kwargs);
    }
    PyObject *rows = PyTuple_GET_ITEM(hot, 2), *stats = PyTuple_GET_ITEM(hot, 3);
    PyObject *acc = PyTuple_GET_ITEM(hot, 4), *site = PyTuple_GET_ITEM(hot, 5);
    if (PyTuple_GET_SIZE(args) == 0 || same_rows(PyTuple_GET_ITEM(args, 0), self->type,
                                                 rows) < 0)
        return rest(self, f, wrapped, instance, args, kwargs);
    Py_ssize_t n = PyTuple_GET_SIZE(hot);
    /* Another thread than the one of the sample, its results unread: watch.py counts
     * each thread's calls from now on. */
    if (n == 8 && PyLong_AsUnsignedLong(PyTuple_GET_ITEM(hot, 7))
            != PyThread_get_thread_ident()) {
        if (PyErr_Occurred())
            return NULL;
        return rest(self, f, wrapped, instance, args, kwargs);
    }
    /* Auto-batch alone, a site it does not batch: nothing to count (no report is shown). */
    if (n == 7 && PyTuple_GET_ITEM(hot, 6) == Py_None)
        return PyObject_CallFunctionObjArgs(self->through, self->wrapper, wrapped, instance,
                                            args, kwargs, NULL);
    /* Held for the call (another thread may replace the site's tuple meanwhile). */
    Py_INCREF(hot);
    PyObject *out = NULL, *fc = NULL, *elapsed = NULL;
    PyObject *owner = PyObject_GetAttr(stats, str_report_owner);
    if (owner == NULL)
        goto done;
    Py_DECREF(owner);
    if (owner != site) {
        PyObject *r = PyObject_CallFunctionObjArgs(self->helper, stats, site, NULL);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
    }
    if (n >= 7 && PyTuple_GET_ITEM(hot, 6) != Py_False) {   /* (not None: see above) */
        /* Auto-batched (predict_calls.hot_tuple): the site's Auto.call gives the call's
         * deferred result, counted as a usual call, or None for the usual path. */
        double t0 = now();
        PyObject *r = PyObject_CallFunctionObjArgs(PyTuple_GET_ITEM(hot, 6), instance, args,
                                                   kwargs, NULL);
        if (r == NULL)
            goto done;
        if (r != Py_None) {
            PyObject *one = PyLong_FromLong(1);
            elapsed = PyFloat_FromDouble(now() - t0);
            if (one == NULL || elapsed == NULL || add_to(acc, 0, elapsed) < 0
                    || add_to(acc, 1, one) < 0)
                Py_CLEAR(r);
            Py_XDECREF(one);
            out = r;
            goto done;
        }
        Py_DECREF(r);
    }
    fc = PyObject_GetAttr(stats, str_fast_calls);
    if (fc == NULL)
        goto done;
    out = timed(self, wrapped, instance, args, kwargs, &elapsed);
    if (out == NULL) {
        if (elapsed != NULL && add_to(acc, 0, elapsed) == 0)
            tell_error(self->error, site, elapsed);     /* (not usual time: other_s) */
        else
            tell_error(self->error, site, NULL);
    } else if (elapsed == NULL || counted(self, acc, stats, fc, site, rows, elapsed) < 0) {
        Py_CLEAR(out);
    }
done:
    Py_XDECREF(fc);
    Py_XDECREF(elapsed);
    Py_DECREF(hot);
    return out;
}

/* A watched result among the feeds (a feed dict's values, an input list): the report's
 * Python code passes such calls on as plain arrays. */
static int
holds(PyObject *a, PyObject *type)
{
    if (PyDict_CheckExact(a)) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(a, &pos, &k, &v))
            if ((PyObject *)Py_TYPE(v) == type)
                return 1;
    } else if (PyList_CheckExact(a) || PyTuple_CheckExact(a)) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(a);
        PyObject **items = PySequence_Fast_ITEMS(a);
        for (Py_ssize_t i = 0; i < n; i++)
            if ((PyObject *)Py_TYPE(items[i]) == type)
                return 1;
    }
    return 0;
}

static int
feeds_watched(PyObject *args, PyObject *kwargs, PyObject *watched)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args); i++)
        if (holds(PyTuple_GET_ITEM(args, i), watched))
            return 1;
    if (PyDict_CheckExact(kwargs)) {
        PyObject *fd = PyDict_GetItemString(kwargs, "feed_dict");
        if (fd != NULL && holds(fd, watched))
            return 1;
    }
    return 0;
}

/* Session.run / K.function: the adapter announces the state that serves the call. */
static PyObject *
AnnouncedRecorder_call(Recorder *self, PyObject *callargs, PyObject *callkw)
{
    UNPACK_CALL("announced")
    PyObject *steady = site_of(self, f, instance, args, 10);
    if (steady == NULL || feeds_watched(args, kwargs, self->type)) {
        if (PyErr_Occurred())
            return NULL;
        return rest(self, f, wrapped, instance, args, kwargs);
    }
    PyObject *rows = PyTuple_GET_ITEM(steady, 2), *acc = PyTuple_GET_ITEM(steady, 4);
    PyObject *site = PyTuple_GET_ITEM(steady, 5), *stats = PyTuple_GET_ITEM(steady, 6);
    Py_INCREF(steady);
    PyObject *out = NULL, *elapsed = NULL;
    PyObject *call = PyList_New(4);
    if (call == NULL)
        goto done;
    Py_INCREF(steady);
    PyList_SET_ITEM(call, 0, steady);
    Py_INCREF(minus_one);
    PyList_SET_ITEM(call, 1, minus_one);
    Py_INCREF(f);
    PyList_SET_ITEM(call, 2, (PyObject *)f);
    Py_INCREF(Py_None);
    PyList_SET_ITEM(call, 3, Py_None);
    set_current(call);
    out = timed(self, wrapped, instance, args, kwargs, &elapsed);
    set_current(NULL);
    if (out == NULL) {
        tell_error(self->error, call, elapsed);
        goto done;
    }
    if (elapsed == NULL || PyList_GET_SIZE(call) < 4)
        goto fail;
    PyObject *fc = PyList_GET_ITEM(call, 1);    /* (noted by announce during the call) */
    long before = PyLong_AsLong(fc);
    if (before == -1 && PyErr_Occurred())
        goto fail;
    if (before < 0) {                           /* left as it was, or announced otherwise */
        PyObject *r = PyObject_CallFunctionObjArgs(self->unsteady, call, (PyObject *)f, out,
                                                   elapsed, wrapped, instance, args, kwargs,
                                                   NULL);
        Py_DECREF(out);
        out = r;
        goto done;
    }
    Py_INCREF(fc);
    int failed = counted(self, acc, stats, fc, site, rows, elapsed) < 0;
    Py_DECREF(fc);
    if (!failed)
        goto done;
fail:
    Py_CLEAR(out);
done:
    Py_XDECREF(call);
    Py_XDECREF(elapsed);
    Py_DECREF(steady);
    return out;
}

static PyTypeObject AnnouncedRecorderType;

static int
Recorder_init(Recorder *self, PyObject *args, PyObject *kwds)
{
    PyObject *v[N_FIELDS] = {NULL};
    if (!PyArg_ParseTuple(args, "O!OOOOOOO|O", &PyDict_Type, &v[0], &v[1], &v[2], &v[3],
                          &v[4], &v[5], &v[6], &v[7], &v[8]))
        return -1;
    if (v[8] == NULL) {
        if (Py_TYPE(self) == &AnnouncedRecorderType) {
            PyErr_SetString(PyExc_TypeError, "AnnouncedRecorder needs unsteady");
            return -1;
        }
        v[8] = Py_None;                         /* (predict's recorder has none) */
    }
    int i = 0;
#define SET(name) Py_XINCREF(v[i]); Py_XSETREF(self->name, v[i]); i++;
    FIELDS(SET)
#undef SET
    return 0;
}

static int
Recorder_traverse(Recorder *self, visitproc visit, void *arg)
{
#define VISIT(name) Py_VISIT(self->name);
    FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int
Recorder_clear(Recorder *self)
{
#define CLEAR(name) Py_CLEAR(self->name);
    FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void
Recorder_dealloc(Recorder *self)
{
    PyObject_GC_UnTrack(self);
    Recorder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Recorder_get_wrapper(Recorder *self, void *closure)
{
    PyObject *wrapper = self->wrapper != NULL ? self->wrapper : Py_None;
    Py_INCREF(wrapper);
    return wrapper;
}

static PyGetSetDef Recorder_getset[] = {
    {"_kfp_recorder", (getter)Recorder_get_wrapper, NULL, "the entry's wrapper", NULL},
    {NULL}
};

#define RECORDER_TYPE(name, call, doc) { \
    PyVarObject_HEAD_INIT(NULL, 0) \
    .tp_name = "keras_fastpredict.report._steady." name, \
    .tp_basicsize = sizeof(Recorder), \
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, \
    .tp_doc = doc, \
    .tp_call = (ternaryfunc)call, \
    .tp_init = (initproc)Recorder_init, \
    .tp_new = PyType_GenericNew, \
    .tp_traverse = (traverseproc)Recorder_traverse, \
    .tp_clear = (inquiry)Recorder_clear, \
    .tp_dealloc = (destructor)Recorder_dealloc, \
    .tp_getset = Recorder_getset, \
}

static PyTypeObject RecorderType = RECORDER_TYPE(
    "Recorder", Recorder_call,
    "Recorder(table, wrapper, rest, through, ndarray, take, passed_on, error): predict's.");
static PyTypeObject AnnouncedRecorderType = RECORDER_TYPE(
    "AnnouncedRecorder", AnnouncedRecorder_call,
    "AnnouncedRecorder(table, wrapper, rest, through, watched, None, passed_on, error, "
    "unsteady): an announcing adapter's.");

/* The adapters' announce(state, x): a steady site's call announced as its calls go (its
 * state, its rows, its paths' counters still its own) notes the state's fast_calls; any
 * other goes to the report's Python announce. */
typedef struct {
    PyObject_HEAD
    PyObject *general, *ndarray;
} Announce;

static PyObject *
Announce_call(Announce *self, PyObject *args, PyObject *kw)
{
    PyObject *state, *x;
    if (self->general == NULL || self->ndarray == NULL) {
        PyErr_SetString(PyExc_TypeError, "announce is not initialised");
        return NULL;
    }
    if (kw != NULL && PyDict_GET_SIZE(kw))
        return PyObject_Call(self->general, args, kw);
    if (!PyArg_UnpackTuple(args, "announce", 2, 2, &state, &x))
        return NULL;
    PyObject *call = current_call;
    if (call == NULL)
        Py_RETURN_NONE;                         /* not a recorded call */
    Py_INCREF(call);
    if (PyList_CheckExact(call) && PyList_GET_SIZE(call) == 4) {
        PyObject *steady = PyList_GET_ITEM(call, 0), *fc = PyList_GET_ITEM(call, 1);
        if (PyTuple_CheckExact(steady) && PyTuple_GET_SIZE(steady) == 10
                && PyLong_CheckExact(fc) && PyLong_AsLong(fc) == -1) {
            PyObject *state_ref = PyTuple_GET_ITEM(steady, 3);
            PyObject *rows = PyTuple_GET_ITEM(steady, 2), *site = PyTuple_GET_ITEM(steady, 5);
            PyObject *stats = PyTuple_GET_ITEM(steady, 6), *path = PyTuple_GET_ITEM(steady, 7);
            if (PyWeakref_CheckRef(state_ref) && PyWeakref_GET_OBJECT(state_ref) == state
                    && same_rows(x, self->ndarray, rows) > 0) {
                PyObject *owner = PyObject_GetAttr(path, str_report_owner);
                if (owner == NULL) {
                    Py_DECREF(call);
                    return NULL;
                }
                Py_DECREF(owner);
                if (owner == site) {
                    PyObject *now_fc = PyObject_GetAttr(stats, str_fast_calls);
                    if (now_fc == NULL) {
                        Py_DECREF(call);
                        return NULL;
                    }
                    PyList_SetItem(call, 1, now_fc);    /* (steals now_fc) */
                    Py_DECREF(call);
                    Py_RETURN_NONE;
                }
            }
        }
    }
    Py_DECREF(call);
    return PyObject_Call(self->general, args, NULL);
}

static int
Announce_init(Announce *self, PyObject *args, PyObject *kwds)
{
    PyObject *general, *ndarray;
    if (!PyArg_ParseTuple(args, "OO", &general, &ndarray))
        return -1;
    Py_INCREF(general);
    Py_XSETREF(self->general, general);
    Py_INCREF(ndarray);
    Py_XSETREF(self->ndarray, ndarray);
    return 0;
}

static int
Announce_traverse(Announce *self, visitproc visit, void *arg)
{
    Py_VISIT(self->general);
    Py_VISIT(self->ndarray);
    return 0;
}

static int
Announce_clear(Announce *self)
{
    Py_CLEAR(self->general);
    Py_CLEAR(self->ndarray);
    return 0;
}

static void
Announce_dealloc(Announce *self)
{
    PyObject_GC_UnTrack(self);
    Announce_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject AnnounceType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "keras_fastpredict.report._steady.Announce",
    .tp_basicsize = sizeof(Announce),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The adapters' announce (a steady site's call in C, the rest in Python).",
    .tp_call = (ternaryfunc)Announce_call,
    .tp_init = (initproc)Announce_init,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)Announce_traverse,
    .tp_clear = (inquiry)Announce_clear,
    .tp_dealloc = (destructor)Announce_dealloc,
};

/* An entry the report does not record: its wrapper, or the original on a thread that
 * times plain Keras. */
typedef struct {
    PyObject_HEAD
    PyObject *wrapper;
} Gate;

static PyObject *
Gate_call(Gate *self, PyObject *callargs, PyObject *callkw)
{
    PyObject *wrapped, *instance, *args, *kwargs;
    if (self->wrapper == NULL) {
        PyErr_SetString(PyExc_TypeError, "gate is not initialised");
        return NULL;
    }
    if (!timing_plain || (callkw != NULL && PyDict_GET_SIZE(callkw))
            || !PyArg_UnpackTuple(callargs, "gate", 4, 4, &wrapped, &instance, &args, &kwargs)) {
        PyErr_Clear();
        return PyObject_Call(self->wrapper, callargs, callkw);
    }
    return original(wrapped, args, kwargs);
}

static int
Gate_init(Gate *self, PyObject *args, PyObject *kwds)
{
    PyObject *wrapper;
    if (!PyArg_ParseTuple(args, "O", &wrapper))
        return -1;
    Py_INCREF(wrapper);
    Py_XSETREF(self->wrapper, wrapper);
    return 0;
}

static int
Gate_traverse(Gate *self, visitproc visit, void *arg)
{
    Py_VISIT(self->wrapper);
    return 0;
}

static int
Gate_clear(Gate *self)
{
    Py_CLEAR(self->wrapper);
    return 0;
}

static void
Gate_dealloc(Gate *self)
{
    PyObject_GC_UnTrack(self);
    Gate_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Gate_get_wrapper(Gate *self, void *closure)
{
    PyObject *wrapper = self->wrapper != NULL ? self->wrapper : Py_None;
    Py_INCREF(wrapper);
    return wrapper;
}

static PyGetSetDef Gate_getset[] = {
    {"_kfp_gated", (getter)Gate_get_wrapper, NULL, "the entry's wrapper", NULL},
    {NULL}
};

static PyTypeObject GateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "keras_fastpredict.report._steady.Gate",
    .tp_basicsize = sizeof(Gate),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Gate(wrapper): the wrapper, or the original while this thread times plain.",
    .tp_call = (ternaryfunc)Gate_call,
    .tp_init = (initproc)Gate_init,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)Gate_traverse,
    .tp_clear = (inquiry)Gate_clear,
    .tp_dealloc = (destructor)Gate_dealloc,
    .tp_getset = Gate_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "keras_fastpredict.report._steady",
    "The call-site report's usual call, in C.", -1, NULL,
};

PyMODINIT_FUNC
PyInit__steady(void)
{
    if (PyType_Ready(&RecorderType) < 0 || PyType_Ready(&AnnouncedRecorderType) < 0
            || PyType_Ready(&AnnounceType) < 0 || PyType_Ready(&CallsType) < 0
            || PyType_Ready(&GateType) < 0)
        return NULL;
    str_report_owner = PyUnicode_InternFromString("report_owner");
    str_fast_calls = PyUnicode_InternFromString("fast_calls");
    minus_one = PyLong_FromLong(-1);
    if (str_report_owner == NULL || str_fast_calls == NULL || minus_one == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RecorderType);
    Py_INCREF(&AnnouncedRecorderType);
    Py_INCREF(&AnnounceType);
    Py_INCREF(&CallsType);
    Py_INCREF(&GateType);
    if (PyModule_AddObject(m, "Recorder", (PyObject *)&RecorderType) < 0
            || PyModule_AddObject(m, "AnnouncedRecorder", (PyObject *)&AnnouncedRecorderType) < 0
            || PyModule_AddObject(m, "Announce", (PyObject *)&AnnounceType) < 0
            || PyModule_AddObject(m, "Calls", (PyObject *)&CallsType) < 0
            || PyModule_AddObject(m, "Gate", (PyObject *)&GateType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
