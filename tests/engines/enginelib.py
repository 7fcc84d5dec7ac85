"""What the engine tests and the benchmark suite share, without pytest: the busybox image built offline, daemons
started and stopped, an engine's CLI run, and waiting with a deadline."""
import os
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE = "localhost/busybox:latest"


def wait_for(predicate, timeout=30.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def make_image(path):
    """Builds IMAGE offline from busybox-static into the docker-archive `path` (make-image.sh)."""
    subprocess.run([os.path.join(HERE, "make-image.sh"), str(path)], check=True, timeout=300)
    return str(path)


class Engine:
    """Runs an engine's CLI; the result is a CompletedProcess with text output."""

    def __init__(self, argv, env=None):
        self.base, self.env = list(argv), env

    def __call__(self, *args, input=None, timeout=180, check=False):
        result = subprocess.run(self.base + list(args), input=input, capture_output=True, text=True,
                                timeout=timeout, env=self.env)
        if check and result.returncode:
            raise AssertionError(f"{' '.join(self.base + list(args))}: {result.returncode}: {result.stderr}")
        return result

    def argv(self, *args):
        return self.base + list(args)


def start_daemon(argv, log, ready):
    """Starts argv in a session of its own, its output to the open file `log`; waits up to 60 s for ready()."""
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if not wait_for(ready, timeout=60):
        stop_daemon(proc)
        raise RuntimeError(f"{argv[0]} did not start; see {log.name}")
    return proc


def stop_daemon(proc):
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
