"""podman pods: the infra container's VM holds the pod; `podman run --pod` containers join it."""
import os

import pytest

from conftest import IMAGE, vm_processes, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.vm]


def test_a_podman_pod_is_one_vm_and_its_containers_share_localhost(podman, tmp_path_factory):
    name = f"pyrunv-pod-{os.getpid()}"  # the pod's hostname: at most 63 characters
    podman("pod", "create", "--name", name, check=True)
    try:
        podman("run", "-d", "--pod", name, "--name", f"{name}-web", IMAGE,
               "httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/etc", check=True)
        fetch = podman("run", "--rm", "--pod", name, IMAGE, "sh", "-c",
                       "for i in $(seq 50); do timeout 5 wget -q -O - http://127.0.0.1:8080/passwd && break; "
                       "sleep 0.2; done | head -1; hostname", check=True)
        assert fetch.stdout.splitlines() == ["root:x:0:0:root:/root:/bin/sh", name]
        qemus = [p for p in vm_processes(tmp_path_factory.getbasetemp()) if "pyrunv.agent" in p]
        assert len(qemus) == 1, qemus
    finally:
        podman("pod", "rm", "--force", "--time", "0", name)
    assert wait_for(lambda: not vm_processes(tmp_path_factory.getbasetemp()), timeout=30)
