"""The zygote of a pod's waiters (monitor/zygote.py, host/waiter.py), without a VM: the monitor's side is this test."""
import json
import os
import signal

from pyrunv.monitor.zygote import Zygote


def test_a_forked_waiter_is_adopted_by_the_subreaper_forwards_signals_and_exits_as_told(subreaper, tmp_path):
    zygote = Zygote()
    try:
        ours, pid = zygote.fork(str(tmp_path / "exit.json"))
        second, other = zygote.fork("")
        assert pid != other and os.getppid() != pid
        os.kill(pid, signal.SIGTERM)
        assert json.loads(ours.recv(4096)) == {"signal": signal.SIGTERM}  # forwarded, not obeyed
        ours.sendall(b'{"exit": 3, "signal": 0}\n')
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3  # ours to reap: not the zygote's child
        assert json.loads((tmp_path / "exit.json").read_text()) == {"exit": 3, "signal": 0}
        second.sendall(b'{"exit": 137, "signal": 9}\n')
        assert os.waitstatus_to_exitcode(os.waitpid(other, 0)[1]) == -signal.SIGKILL
    finally:
        zygote.close()
    assert zygote._process.returncode == 0
