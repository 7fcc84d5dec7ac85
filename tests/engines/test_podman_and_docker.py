"""podman (with conmon) and docker (dockerd 20.10, pyrunv its default runtime) driving pyrunv through the
command line they share: run, exit codes, stdin, tty, exec, the engine's network and published ports, stop,
kill, pause, rm; and podman's rlimits.
`docker top` runs the host's ps on the pids pyrunv reports, so it cannot show guest processes and is not
tested."""
import functools
import os
import http.server
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import IMAGE, TRAP_TERM, TRAP_USR1, TTY_AND_SIZE, inspect, listed, logs, run_detached, tty_run, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.vm]

RM_FORCE = {"podman": ["rm", "--force", "--time", "0"], "docker": ["rm", "--force"]}
RUNTIME_FIELD = {"podman": ".OCIRuntime", "docker": ".HostConfig.Runtime"}


@pytest.fixture(params=["podman", "docker"])
def engine_name(request):
    return request.param


@pytest.fixture
def engine(request, engine_name):
    return request.getfixturevalue(engine_name)


@pytest.fixture
def cid(engine, engine_name, name):
    """The test's container name; the container is removed afterwards, whatever happened."""
    yield name
    engine(*RM_FORCE[engine_name], name)


def gone(engine, cid):
    # With --rm, dockerd removes the container once it has exited: allow it a moment.
    return wait_for(lambda: not listed(engine, cid), timeout=10)


def test_run_rm_echo(engine, cid):
    result = engine("run", "--rm", "--name", cid, IMAGE, "echo", "hello")
    assert (result.returncode, result.stdout) == (0, "hello\n"), result.stderr
    assert gone(engine, cid)


def test_the_engines_default_seccomp_profile_is_in_force(engine, cid):
    """podman and docker put their default profile in every spec; the guest applies it to the container."""
    result = engine("run", "--rm", "--name", cid, IMAGE, "grep", "Seccomp:", "/proc/self/status")
    assert (result.returncode, result.stdout) == (0, "Seccomp:\t2\n"), result.stderr


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code(engine, cid, code):
    result = engine("run", "--rm", "--name", cid, IMAGE, "sh", "-c", f"exit {code}")
    assert (result.returncode, result.stdout) == (code, ""), result.stderr


def test_sigkill_exit_137(engine, engine_name, cid):
    run_detached(engine, cid, "sleep", "600")
    assert inspect(engine, cid, RUNTIME_FIELD[engine_name]) == "pyrunv"
    engine("kill", "--signal", "KILL", cid, check=True)
    assert engine("wait", cid).stdout == "137\n"
    assert inspect(engine, cid, ".State.ExitCode") == "137"


def test_piped_stdin(engine, cid):
    result = engine("run", "--rm", "-i", "--name", cid, IMAGE, "cat", input="piped\n")
    assert (result.returncode, result.stdout) == (0, "piped\n"), result.stderr


def test_tty(engine, cid):
    output, code = tty_run(engine.argv("run", "--rm", "-it", "--name", cid, IMAGE, "sh", "-c", TTY_AND_SIZE),
                           env=engine.env)
    assert code == 0, output
    assert "/dev/pts/0\n" in output and "33 111\n" in output, output


def test_exec(engine, cid):
    run_detached(engine, cid, "sleep", "600")
    result = engine("exec", cid, "sh", "-c", "echo exec-ok; exit 4")
    assert (result.returncode, result.stdout) == (4, "exec-ok\n"), result.stderr
    output, code = tty_run(engine.argv("exec", "-it", cid, "tty"), env=engine.env)
    assert code == 0 and "/dev/pts/" in output, output


@pytest.fixture(scope="module")
def host_http(tmp_path_factory):
    """An HTTP server on the host, on every address: the container reaches it through its gateway."""
    root = tmp_path_factory.mktemp("www")
    (root / "hello").write_text("hello from the host\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_the_guest_takes_the_engines_address_and_reaches_the_host(engine, cid, host_http):
    run_detached(engine, cid, "sleep", "600")
    address = inspect(engine, cid, ".NetworkSettings.IPAddress")
    assert address, "the engine gave the container no address"
    shown = engine("exec", cid, "ip", "-4", "-o", "addr", "show", "eth0", check=True).stdout
    assert f" {address}/" in shown, shown
    # (not wget -T: Debian's static busybox 1.35 segfaults with it, under runc too)
    fetch = f"gw=$(ip route | awk '/^default/ {{print $3}}'); timeout 20 wget -q -O- http://$gw:{host_http}/hello"
    result = engine("exec", cid, "sh", "-c", fetch)
    assert (result.returncode, result.stdout) == (0, "hello from the host\n"), result.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_published_port_reaches_a_server_in_the_vm(engine, engine_name, cid):
    port = free_port()
    serve = "mkdir -p /www && echo served-from-the-vm > /www/index.html && exec httpd -f -p 80 -h /www"
    engine("run", "-d", "--name", cid, "-p", f"{port}:80", IMAGE, "sh", "-c", serve, check=True)

    def fetch():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
                return reply.read()
        except OSError:
            return b""
    assert wait_for(lambda: fetch() == b"served-from-the-vm\n", timeout=30), fetch()


def test_stop_trapped_term(engine, cid):
    run_detached(engine, cid, "sh", "-c", TRAP_TERM)
    assert wait_for(lambda: "ready" in logs(engine, cid))
    began = time.monotonic()
    engine("stop", "--time", "20", cid, check=True)
    assert time.monotonic() - began < 10
    assert inspect(engine, cid, ".State.ExitCode") == "0"


def test_stop_ignored_term(engine, cid):
    # sleep as PID 1 has no handler for SIGTERM, so the signal is ignored (as under runc): stop kills.
    run_detached(engine, cid, "sleep", "600")
    began = time.monotonic()
    engine("stop", "--time", "2", cid, check=True)
    assert time.monotonic() - began >= 2
    assert inspect(engine, cid, ".State.ExitCode") == "137"


def test_kill_usr1(engine, cid):
    run_detached(engine, cid, "sh", "-c", TRAP_USR1)
    assert wait_for(lambda: "ready" in logs(engine, cid))
    engine("kill", "--signal", "USR1", cid, check=True)
    assert wait_for(lambda: "got USR1\n" in logs(engine, cid)), logs(engine, cid)
    assert inspect(engine, cid, ".State.Status") == "running"


def test_pause_unpause(engine, cid):
    run_detached(engine, cid, "sleep", "600")
    engine("pause", cid, check=True)
    assert inspect(engine, cid, ".State.Status") == "paused"
    engine("unpause", cid, check=True)
    assert inspect(engine, cid, ".State.Status") == "running"
    result = engine("exec", cid, "echo", "alive")
    assert (result.returncode, result.stdout) == (0, "alive\n"), result.stderr


def test_rm_force_running(engine, cid):
    run_detached(engine, cid, "sleep", "600")
    assert inspect(engine, cid, ".State.Status") == "running"
    engine("rm", "--force", cid, check=True)
    assert gone(engine, cid)


def test_podman_default_rlimits_apply_in_the_guest(podman, name):
    # podman's default nofile (1048576) is above this host's hard limit and runc could not set it here
    # (no CAP_SYS_RESOURCE); pyrunv sets rlimits in the guest.
    try:
        result = podman("run", "--rm", "--name", name, IMAGE, "sh", "-c", "ulimit -n; ulimit -Hn")
        assert (result.returncode, result.stdout) == (0, "1048576\n1048576\n"), result.stderr
    finally:
        podman(*RM_FORCE["podman"], name)


def test_a_memory_limit_oom_kills_with_137(engine, cid):
    result = engine("run", "--name", cid, "--memory", "64m", IMAGE, "dd", "if=/dev/zero", "of=/dev/null",
                    "bs=100M", "count=1")
    assert result.returncode == 137, result.stderr
    assert inspect(engine, cid, ".State.OOMKilled") in ("true", "false")  # the engine's own bookkeeping


def test_stats_of_a_busy_container_show_cpu_and_memory(engine, engine_name, cid):
    run_detached(engine, cid, "sh", "-c", "while :; do :; done")

    def figures():
        out = engine("stats", "--no-stream", "--format", "{{.CPUPerc}} {{.MemUsage}}", cid, check=True).stdout
        cpu, memory = out.split(maxsplit=1)
        return float(cpu.rstrip("%")), memory
    assert wait_for(lambda: figures()[0] > 0, timeout=60), figures()
    time.sleep(2)  # podman's one sample averages over the time since start: let that be more than a moment
    cpu, memory = figures()
    assert 0 < cpu <= 100 * os.cpu_count(), (cpu, memory)  # never more than the host's cores allow
    assert not memory.startswith("0B"), memory


def test_memory_the_guest_takes_shows_in_the_engines_stats(engine, cid):
    """What the guest touches is QEMU's memory on the host, in the container's cgroup."""
    run_detached(engine, cid, "sleep", "600")

    def used_mib():
        out = engine("stats", "--no-stream", "--format", "{{.MemUsage}}", cid, check=True).stdout.split("/")[0]
        number, unit = float(out.strip().rstrip("BKMGTiB")), out.strip().lstrip("0123456789.")
        return number * {"B": 2 ** -20, "kB": 2 ** -10, "KiB": 2 ** -10, "MB": 1, "MiB": 1, "GB": 1024,
                         "GiB": 1024}[unit]
    idle = used_mib()
    # dd holds its 64 MiB buffer, written full, while the pipe it writes to is not read. Anonymous memory of
    # the guest: a tmpfs such as docker's /dev/shm lives on the host and in the guest's cache, twice.
    engine("exec", "-d", cid, "sh", "-c", "dd if=/dev/zero bs=64M count=1 | sleep 600", check=True)
    assert wait_for(lambda: used_mib() - idle > 56, timeout=60), (idle, used_mib())
    assert used_mib() - idle < 96, (idle, used_mib())


def test_docker_update_memory_is_seen_in_the_guest_and_on_the_host(docker, name):
    docker("run", "-d", "--name", name, "--memory", "128m", IMAGE, "sleep", "600", check=True)
    try:
        result = docker("update", "--memory", "96m", "--memory-swap", "-1", name)
        assert result.returncode == 0, result.stderr
        assert docker("exec", name, "cat", "/sys/fs/cgroup/memory.max", check=True).stdout == f"{96 << 20}\n"
        full_id = inspect(docker, name, ".Id")
        with open(f"/sys/fs/cgroup/memory/docker/{full_id}/memory.limit_in_bytes") as f:
            assert int(f.read()) == (96 + 32 + 128) << 20  # the VM's RAM, and the host overhead beyond it
    finally:
        docker("rm", "--force", name)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="max_vcpus defaults to the host's cores: one here")
def test_update_cpus_brings_a_second_vcpu_online(engine, cid):
    engine("run", "-d", "--name", cid, "--cpus", "1", IMAGE, "sleep", "600", check=True)
    try:
        online = ("exec", cid, "cat", "/sys/devices/system/cpu/online")
        assert engine(*online, check=True).stdout == "0\n"
        result = engine("update", "--cpus", "2", cid)
        assert result.returncode == 0, result.stderr
        assert engine(*online, check=True).stdout == "0-1\n"
        assert engine("exec", cid, "cat", "/sys/fs/cgroup/cpu.max", check=True).stdout == "200000 100000\n"
    finally:
        engine("rm", "--force", cid)


def test_update_memory_grows_the_vm_beyond_its_boot_size(engine, cid):
    engine("run", "-d", "--name", cid, "--memory", "128m", IMAGE, "sleep", "600", check=True)
    try:
        allocate = ("exec", cid, "dd", "if=/dev/zero", "of=/dev/null", "bs=400M", "count=1")
        assert engine(*allocate).returncode != 0  # its VM has 160 MiB
        result = engine("update", "--memory", "512m", "--memory-swap", "-1", cid)
        assert result.returncode == 0, result.stderr
        assert engine("exec", cid, "cat", "/sys/fs/cgroup/memory.max", check=True).stdout == f"{512 << 20}\n"
        result = engine(*allocate)
        assert result.returncode == 0, result.stderr
    finally:
        engine("rm", "--force", cid)


def test_podman_tmpfs_copies_the_images_files_up(podman, name):
    result = podman("run", "--rm", "--name", name, "--tmpfs", "/etc", IMAGE, "sh", "-c",
                    "head -1 /etc/passwd; touch /etc/new; mount | grep -c ' /etc type tmpfs'")
    assert (result.returncode, result.stdout) == (0, "root:x:0:0:root:/root:/bin/sh\n1\n"), result.stderr


def test_podman_device_passes_a_host_block_device_through(podman, name, tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                            check=True).stdout.strip()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        result = podman("run", "--rm", "--name", name, "--device", f"{device}:/dev/xvdb", "--cap-add", "SYS_ADMIN",
                        IMAGE, "sh", "-c", "mke2fs -q /dev/xvdb && mkdir -p /mnt && mount -t ext2 /dev/xvdb /mnt && "
                        "echo through-podman > /mnt/proof && umount /mnt")
        assert result.returncode == 0, result.stderr
        subprocess.run(["mount", "-o", "ro", device, str(mountpoint)], check=True)
        assert (mountpoint / "proof").read_text() == "through-podman\n"
        subprocess.run(["umount", str(mountpoint)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", device])
