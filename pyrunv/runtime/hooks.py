"""OCI hooks, run on the host with the container's state on stdin at the points the runtime spec names."""
from .. import jsonlite, logs
from ..errors import PyrunvError

FATAL = ("prestart", "createRuntime", "createContainer", "startContainer")  # poststart/poststop only warn
AFTER_CREATE = ("startContainer", "poststart", "poststop")  # kept in the state record by create


def run(kind: str, hooks, state: dict) -> None:
    if not hooks:
        return
    import subprocess  # not at the top: most containers have no hooks, and `start` is on every engine's path
    for hook in hooks:
        argv = hook.get("args") or [hook["path"]]
        env = dict(e.split("=", 1) for e in hook.get("env", ()))
        try:
            result = subprocess.run(argv, executable=hook["path"], input=jsonlite.dumps(state).encode(), env=env,
                                    capture_output=True, timeout=hook.get("timeout"))
            problem = f"exit status {result.returncode}: {result.stderr.decode(errors='replace').strip()}" \
                if result.returncode else None
        except subprocess.TimeoutExpired:
            problem = f"timed out after {hook['timeout']}s"
        except OSError as e:
            problem = e.strerror
        if problem:
            message = f"{kind} hook {hook['path']} failed: {problem}"
            if kind in FATAL:
                raise PyrunvError(message)
            logs.log.warning(message)
