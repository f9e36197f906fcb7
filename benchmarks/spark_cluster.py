"""python -m benchmarks.spark_cluster [--workers 2] [--cores 1] [--memory 1g]

A Spark standalone cluster on this machine, from pyspark's own distribution (the pip
package holds ``bin/spark-class``, ``bin/spark-submit`` and the jars): a master and
``workers`` workers, each a JVM of its own on 127.0.0.1, each starting its own executor
and that executor its own Python workers. Nothing is installed: it needs pyspark (the
``spark`` extra) and Java 8, 11 or 17.

* Every port is picked by the system (``--port 0``); the master's URL is read from its log.
* Logs, the workers' folders (executors' stdout and stderr), Spark's scratch space and
  config folder are in one temporary folder, removed by ``stop()``.
* ``stop()`` ends the daemons (SIGTERM, then SIGKILL to their process groups), then looks
  for any process still carrying this cluster's mark in its environment (every executor,
  Python worker and spark-submit started through ``submit()`` inherits it) and kills it by
  pid. It returns what it had to kill that way: nothing, when Spark cleaned up.
* The cluster patches nothing itself: ``KERAS_FASTPREDICT_*`` variables and the bootstrap
  folder are taken out of its environment, so executors are patched only when a job asks
  (``spark.executorEnv.*``).

Run as a script, it starts a cluster, prints how to submit to it and waits for Ctrl-C.
"""
import argparse
import glob
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import time

MARK = 'KFP_SPARK_CLUSTER'           # this cluster's folder, in every process it starts
LOCAL_IP = '127.0.0.1'
BOOTSTRAP_TAIL = os.path.join('keras_fastpredict', 'bootstrap')


def spark_home():
    """pyspark's own distribution: the package folder is a SPARK_HOME."""
    import pyspark
    home = os.path.dirname(os.path.abspath(pyspark.__file__))
    if not os.path.exists(os.path.join(home, 'bin', 'spark-class')):
        raise RuntimeError('%s has no bin/spark-class: not a pip-installed pyspark' % home)
    return home


class Submitted(object):
    """A finished spark-submit: its exit code, output, wall time and application id."""

    def __init__(self, cmd, returncode, stdout, stderr, seconds):
        self.cmd, self.returncode, self.stdout, self.stderr = cmd, returncode, stdout, stderr
        self.seconds = seconds
        found = re.search(r'app ID (app-\S+)', stderr)
        self.app_id = found.group(1) if found else None

    def check(self):
        if self.returncode:
            raise RuntimeError('%s exited %d:\n%s' % (' '.join(self.cmd), self.returncode,
                                                      self.stderr[-5000:]))
        return self


class StandaloneCluster(object):
    """``with StandaloneCluster() as cluster: cluster.submit(...)``; or start()/stop()."""

    def __init__(self, workers=2, cores=1, memory='1g', python=sys.executable,
                 start_timeout=120):
        self.workers, self.cores, self.memory = workers, cores, memory
        self.python = python
        self.start_timeout = start_timeout
        self.home = spark_home()
        self.folder = None
        self.url = None
        self._daemons = []           # (name, Popen, log path), the master first

    # --- environment ---------------------------------------------------------------------

    def env(self, extra=None):
        """The environment of the cluster's processes and of the jobs submitted to it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith('KERAS_FASTPREDICT_')}
        paths = [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                 if p and not os.path.abspath(p).endswith(BOOTSTRAP_TAIL)]
        if paths:
            env['PYTHONPATH'] = os.pathsep.join(paths)
        else:
            env.pop('PYTHONPATH', None)
        f = self.folder
        env.update({
            MARK: f,
            'SPARK_HOME': self.home,
            'SPARK_CONF_DIR': os.path.join(f, 'conf'),     # empty: no stray config is read
            'SPARK_LOG_DIR': os.path.join(f, 'logs'),
            'SPARK_PID_DIR': os.path.join(f, 'pids'),
            'SPARK_LOCAL_DIRS': os.path.join(f, 'local'),  # shuffle and block files
            'SPARK_LOCAL_IP': LOCAL_IP,
            'SPARK_DAEMON_MEMORY': '256m',                # master and workers' own heaps
            'PYSPARK_PYTHON': self.python,
        })
        env.update(extra or {})
        return env

    # --- start -----------------------------------------------------------------------------

    def start(self):
        self.folder = tempfile.mkdtemp(prefix='kfp-spark-cluster-')
        for sub in ('conf', 'logs', 'pids', 'local', 'work'):
            os.makedirs(os.path.join(self.folder, sub))
        try:
            master = self._daemon('master', 'org.apache.spark.deploy.master.Master',
                                  ['--host', LOCAL_IP, '--port', '0', '--webui-port', '0'])
            self.url = self._wait(master, r'Starting Spark master at (spark://\S+)').group(1)
            started = []
            for i in range(1, self.workers + 1):
                work = os.path.join(self.folder, 'work', 'worker-%d' % i)
                os.makedirs(work)
                started.append(self._daemon(
                    'worker-%d' % i, 'org.apache.spark.deploy.worker.Worker',
                    ['--host', LOCAL_IP, '--port', '0', '--webui-port', '0',
                     '--cores', str(self.cores), '--memory', self.memory,
                     '--work-dir', work, self.url]))
            for worker in started:
                self._wait(worker, r'Successfully registered with master')
        except BaseException:
            self.stop()
            raise
        return self

    def _daemon(self, name, main_class, args):
        log = os.path.join(self.folder, 'logs', name + '.log')
        with open(log, 'wb') as out:
            # A session of its own: stop() can end the daemon and whatever it started.
            proc = subprocess.Popen(
                [os.path.join(self.home, 'bin', 'spark-class'), main_class] + args,
                env=self.env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.folder)
        daemon = (name, proc, log)
        self._daemons.append(daemon)
        return daemon

    def _wait(self, daemon, pattern):
        name, proc, log = daemon
        deadline = time.monotonic() + self.start_timeout
        while True:
            with open(log, errors='replace') as f:
                text = f.read()
            found = re.search(pattern, text)
            if found:
                return found
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError('Spark %s did not start (%s):\n%s' % (
                    name, 'exit code %s' % proc.returncode if proc.returncode is not None
                    else 'no %r after %d s' % (pattern, self.start_timeout), text[-4000:]))
            time.sleep(0.2)

    # --- jobs ------------------------------------------------------------------------------

    def submit(self, app, args=(), conf=None, env=None, deploy_mode=None, timeout=900):
        """spark-submit ``app`` to this cluster (client deploy mode unless told), wait for
        it, return a ``Submitted``. ``conf``: {key: value} for ``--conf``. Executors get
        512m (the workers have ``memory`` each) unless ``conf`` says otherwise."""
        conf = dict({'spark.executor.memory': '512m'}, **(conf or {}))
        cmd = [os.path.join(self.home, 'bin', 'spark-submit'), '--master', self.url]
        if deploy_mode:
            cmd += ['--deploy-mode', deploy_mode]
        for key, value in sorted(conf.items()):
            cmd += ['--conf', '%s=%s' % (key, value)]
        cmd += [app] + [str(a) for a in args]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=self.env(env), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)      # spark-submit, its JVM, the driver
            proc.communicate()
            raise
        return Submitted(cmd, proc.returncode, stdout, stderr, time.perf_counter() - start)

    def executor_logs(self, app_id, stream='stderr'):
        """The executors' log files of one application (one per executor), worker order."""
        return sorted(glob.glob(os.path.join(self.folder, 'work', 'worker-*', app_id, '*',
                                             stream)))

    # --- stop ------------------------------------------------------------------------------

    def survivors(self):
        """Pids of live processes carrying this cluster's mark (Linux: /proc)."""
        if not self.folder:
            return []
        needle = ('\0%s=%s\0' % (MARK, self.folder)).encode()
        found = []
        for entry in os.listdir('/proc'):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open('/proc/%s/environ' % entry, 'rb') as f:
                    environ = b'\0' + f.read()
            except OSError:                 # gone, or not ours to read
                continue
            if needle in environ:
                found.append(int(entry))
        return found

    def stop(self, timeout=20, keep_folder=False):
        """End everything the cluster started; returns the pids that outlived the daemons
        by 5 s and had to be killed one by one (an empty list when Spark cleaned up)."""
        # Workers first (each ends its executors, each executor its Python workers),
        # then the master.
        for _, proc, _ in reversed(self._daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc, _ in reversed(self._daemons):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # the daemon's group, if any is left
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        self._daemons = []
        # An executor's Python workers end when their executor is gone, a moment later.
        deadline = time.monotonic() + 5
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.survivors()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.folder and not keep_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        return left

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks.spark_cluster',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--cores', type=int, default=1, help='per worker')
    parser.add_argument('--memory', default='1g', help='per worker')
    args = parser.parse_args(argv)
    cluster = StandaloneCluster(args.workers, args.cores, args.memory).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        print('Spark standalone cluster: master %s, %d worker(s), folder %s'
              % (cluster.url, args.workers, cluster.folder))
        print('submit with:\n  SPARK_LOCAL_IP=%s PYSPARK_PYTHON=%s %s --master %s job.py'
              % (LOCAL_IP, cluster.python, os.path.join(cluster.home, 'bin', 'spark-submit'),
                 cluster.url))
        print('executors\' logs: %s/work/worker-*/APP-ID/*/stderr\nCtrl-C stops it.'
              % cluster.folder, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        left = cluster.stop()
        print('stopped%s' % ('; killed %d leftover process(es)' % len(left) if left else
                             ', no process left'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
