"""A SIGTERM the main thread cannot take: Python runs a signal's handler only once the main
thread is back in Python, so a process whose main thread waits in C (a TensorFlow session
run that never returns: a stuck Pool worker) would outlive a SIGTERM for ever once the
reports' handler is installed, where plain Python dies at once (and ``Pool.terminate()``
would wait for ever).

Python's C handler writes each caught signal's number to the "wakeup fd"
(``signal.set_wakeup_fd``), whatever the main thread does. A bare thread reads it: a
SIGTERM whose handler (ours) has not started half a second later gets ``late()`` called (the
report), and the process ends as SIGTERM's default action ends it once that is done or
``grace`` seconds after the signal, whichever comes first.
A program with a wakeup fd of its own (asyncio, gunicorn's workers) is left alone: one
set later replaces ours, and only the watch is lost.
"""
import _thread
import os
import signal
import time

HANDLER_WAIT_S = 0.5    # how long the handler may take to start before the watch acts
_fds = None         # (read end, write end) of this process' wakeup pipe, while it is ours
_calls = None       # (is_ours, started, late, grace): as start() was given them


def start(is_ours, started, late, grace):
    """Watch for SIGTERM (from the main thread). ``is_ours()``: the installed SIGTERM
    handler is the one watched for; ``started()``: it has run; ``late()``: what to do in
    its stead. False where the program has a wakeup fd of its own."""
    global _fds, _calls
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):            # not the main thread
        old = None
    if old != -1:
        if old is not None:
            signal.set_wakeup_fd(old)        # the program's own
        os.close(r)
        os.close(w)
        return False
    _fds, _calls = (r, w), (is_ours, started, late, grace)
    _thread.start_new_thread(_watch, (r,) + _calls)
    return True


def _watch(r, is_ours, started, late, grace):
    term = int(signal.SIGTERM)
    while True:
        try:
            data = os.read(r, 64)
        except OSError:
            return
        if not data:
            return                          # (closed)
        if term not in data or not is_ours():
            continue
        # A main thread in Python runs the handler within milliseconds.
        first = min(HANDLER_WAIT_S, grace / 4)
        end = time.monotonic() + first
        while not started() and time.monotonic() < end:
            time.sleep(0.01)
        if started():
            continue                        # the handler runs: it ends the process
        # late() waited for the rest of the grace period at most: a report blocked for
        # good (a full stderr pipe) does not keep the process either.
        run_for_at_most(late, grace - first)
        _die()


def run_for_at_most(fn, seconds):
    """``fn()`` on a bare thread of its own (threading's would take locks the thread
    that was interrupted may hold), waited for ``seconds`` at most."""
    done = _thread.allocate_lock()
    done.acquire()
    _thread.start_new_thread(_call_then_release, (fn, done))
    done.acquire(True, seconds)


def _call_then_release(fn, done):
    try:
        fn()
    finally:
        done.release()


def _die():
    """End the process as SIGTERM's default action does, from a thread other than the
    main one (where Python's signal.signal() cannot be called)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
        libc.signal.restype = ctypes.c_void_p
        libc.signal(int(signal.SIGTERM), None)          # SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5.0)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)            # (where that could not be done)


def _after_fork_in_child():
    # The pipe is the parent's and the thread is gone: a pipe and a thread of this
    # process, if the wakeup fd was still ours.
    global _fds
    if _fds is None:
        return
    (r, w), _fds = _fds, None
    try:
        current = signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        return
    os.close(r)
    os.close(w)
    if current == w:
        start(*_calls)
    elif current != -1:
        signal.set_wakeup_fd(current)


os.register_at_fork(after_in_child=_after_fork_in_child)
