"""A small client of the Kubernetes CRI (runtime.v1) over a unix socket, as a kubelet would use it, and `serve`: a
containerd of its own with the CRI plugin, for the engine tests (the `cri` fixture) and the benchmark suite alike.

It speaks to containerd's CRI plugin through the gRPC stubs of the container-runtime-interface-api package.
Pods and containers are made as the kubelet makes them by default: network and IPC namespaces shared by the
pod, a PID namespace of each container's own. Nothing here needs pytest."""
import contextlib
import json
import os
import pathlib
import re
import subprocess
import uuid

import grpc
from cri_api.v1 import api_pb2 as api
from cri_api.v1.api_pb2_grpc import ImageServiceStub, RuntimeServiceStub

from enginelib import HERE, IMAGE, Engine, start_daemon, stop_daemon, wait_for

PAUSE_IMAGE = "localhost/pause:latest"

# The kubelet's defaults (shareProcessNamespace: false).
NAMESPACES = api.NamespaceOption(network=api.POD, pid=api.CONTAINER, ipc=api.POD)

SANDBOX_STATES = {api.SANDBOX_READY: "ready", api.SANDBOX_NOTREADY: "notready"}
CONTAINER_STATES = {api.CONTAINER_CREATED: "created", api.CONTAINER_RUNNING: "running",
                    api.CONTAINER_EXITED: "exited", api.CONTAINER_UNKNOWN: "unknown"}


class CRI:
    """RuntimeService and ImageService of the CRI endpoint at `socket`. Every call has a deadline of `timeout`
    seconds, or longer where the call itself waits (stop, exec)."""

    def __init__(self, socket, handler="runc", timeout=120):
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.runtime = RuntimeServiceStub(self.channel)
        self.images = ImageServiceStub(self.channel)
        self.handler, self.timeout = handler, timeout

    def close(self):
        self.channel.close()

    def version(self):
        return self.runtime.Version(api.VersionRequest(), timeout=self.timeout)

    def network_ready(self):
        conditions = self.runtime.Status(api.StatusRequest(), timeout=self.timeout).status.conditions
        return any(c.type == "NetworkReady" and c.status for c in conditions)

    def image_names(self):
        return [tag for image in self.images.ListImages(api.ListImagesRequest(), timeout=self.timeout).images
                for tag in image.repo_tags]

    # Pods.
    def pod_config(self, name, hostname=None, annotations=None, log_directory=None, cgroup_parent=""):
        """The PodSandboxConfig of pod `name` (namespace "default"); CreateContainer needs it again. A kubelet
        gives every pod a `cgroup_parent` of its own, limited to the sum of its containers' limits."""
        return api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, uid=str(uuid.uuid4()), namespace="default"),
            hostname=hostname or name, log_directory=log_directory or "", annotations=annotations or {},
            linux=api.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                security_context=api.LinuxSandboxSecurityContext(namespace_options=NAMESPACES)))

    def run_pod(self, name=None, runtime_handler=None, hostname=None, annotations=None, log_directory=None,
                config=None):
        """RunPodSandbox; returns the pod's ID. Give a `config` (pod_config) or the fields to make one."""
        config = config or self.pod_config(name, hostname, annotations, log_directory)
        request = api.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler or self.handler)
        return self.runtime.RunPodSandbox(request, timeout=self.timeout).pod_sandbox_id

    def pod_status(self, pod):
        """("ready" or "notready", the pod's IP)."""
        status = self.pod_status_full(pod).status
        return SANDBOX_STATES[status.state], status.network.ip

    def pod_status_full(self, pod, verbose=False):
        """The whole PodSandboxStatusResponse; verbose adds .info["info"], containerd's JSON (with the spec)."""
        request = api.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=verbose)
        return self.runtime.PodSandboxStatus(request, timeout=self.timeout)

    def pod_info(self, pod):
        """containerd's verbose information on the pod as a dict: pid, runtimeSpec, netNamespacePath..."""
        return json.loads(self.pod_status_full(pod, verbose=True).info["info"])

    def stop_pod(self, pod):
        self.runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=self.timeout)

    def remove_pod(self, pod):
        self.runtime.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=self.timeout)

    def pods(self):
        """IDs of all pods."""
        return [pod.id for pod in self.runtime.ListPodSandbox(api.ListPodSandboxRequest(),
                                                               timeout=self.timeout).items]

    # Containers.
    def create_container(self, pod, pod_config, name, command=(), args=(), image="localhost/busybox:latest",
                         log_path=None, envs=None, annotations=None, working_dir="", memory_limit=0, attempt=0):
        """CreateContainer in `pod` (with the pod's config, as the kubelet passes it); returns its ID.
        `log_path` is relative to the pod's log_directory; by default NAME.log."""
        config = api.ContainerConfig(
            metadata=api.ContainerMetadata(name=name, attempt=attempt), image=api.ImageSpec(image=image),
            command=list(command), args=list(args), working_dir=working_dir,
            envs=[api.KeyValue(key=k, value=v) for k, v in (envs or {}).items()],
            annotations=annotations or {}, log_path=log_path or f"{name}.log",
            linux=api.LinuxContainerConfig(
                resources=api.LinuxContainerResources(memory_limit_in_bytes=memory_limit),
                security_context=api.LinuxContainerSecurityContext(namespace_options=NAMESPACES)))
        request = api.CreateContainerRequest(pod_sandbox_id=pod, config=config, sandbox_config=pod_config)
        return self.runtime.CreateContainer(request, timeout=self.timeout).container_id

    def start_container(self, cid):
        self.runtime.StartContainer(api.StartContainerRequest(container_id=cid), timeout=self.timeout)

    def run_container(self, pod, pod_config, name, *command, **kwargs):
        """create_container and start_container with `command` as the command; returns the ID."""
        cid = self.create_container(pod, pod_config, name, command=command, **kwargs)
        self.start_container(cid)
        return cid

    def update_memory(self, cid, limit):
        """UpdateContainerResources with a new memory limit in bytes, as an in-place pod resize sends it."""
        resources = api.LinuxContainerResources(memory_limit_in_bytes=limit)
        self.runtime.UpdateContainerResources(api.UpdateContainerResourcesRequest(container_id=cid, linux=resources),
                                              timeout=self.timeout)

    def stop_container(self, cid, timeout=10):
        """StopContainer: SIGTERM (or the image's stop signal), SIGKILL after `timeout` seconds."""
        self.runtime.StopContainer(api.StopContainerRequest(container_id=cid, timeout=timeout),
                                   timeout=self.timeout + timeout)

    def remove_container(self, cid):
        self.runtime.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=self.timeout)

    def container_status(self, cid):
        """("created", "running", "exited" or "unknown", exit code, log path)."""
        status = self.container_status_full(cid).status
        return CONTAINER_STATES[status.state], status.exit_code, status.log_path

    def container_status_full(self, cid, verbose=False):
        request = api.ContainerStatusRequest(container_id=cid, verbose=verbose)
        return self.runtime.ContainerStatus(request, timeout=self.timeout)

    def container_info(self, cid):
        """containerd's verbose information on the container as a dict: pid, runtimeSpec, sandboxID..."""
        return json.loads(self.container_status_full(cid, verbose=True).info["info"])

    def containers(self, pod=None):
        """IDs of all containers, or of those of `pod`."""
        request = api.ListContainersRequest(filter=api.ContainerFilter(pod_sandbox_id=pod or ""))
        return [c.id for c in self.runtime.ListContainers(request, timeout=self.timeout).containers]

    def exec_sync(self, cid, cmd, timeout=30):
        """ExecSync; returns (stdout, stderr, exit code), the output as text."""
        request = api.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout)
        response = self.runtime.ExecSync(request, timeout=self.timeout + timeout)
        return response.stdout.decode(), response.stderr.decode(), response.exit_code

    def remove_all(self):
        """Stops and removes every pod (and with it its containers)."""
        for pod in self.pods():
            self.stop_pod(pod)
            self.remove_pod(pod)


@contextlib.contextmanager
def serve(top, image_archive, pyrunv, bridge, subnet, handler="pyrunv", runc=None):
    """A containerd of its own under the directory `top`, with the CRI plugin serving pods on a CNI bridge of their
    own (`bridge`, `subnet`, no masquerading: nothing leaves the machine) and the runtime handlers "runc" (the
    command `runc`, or PATH's) and "pyrunv" (the command `pyrunv`); the busybox image (`image_archive`, from
    enginelib.make_image) and a pause image derived from it imported. Yields a CRI client whose calls default to
    `handler`, with .top, .roots (handler -> the --root the shim gives that runtime), .runtime_root (`handler`'s)
    and .ctr (ctr in namespace k8s.io). On the way out, even on an error, every pod is stopped and removed,
    containerd is stopped and the bridge deleted. Raises RuntimeError if containerd or its CRI does not come up."""
    top = pathlib.Path(top)
    sock = top / "containerd.sock"
    (top / "cni").mkdir(parents=True, exist_ok=True)
    (top / "cni" / "10-pyrunv.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "pyrunv-cri", "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": str(top / "ipam"),
                     "routes": [{"dst": "0.0.0.0/0"}]}}]}))
    pause = top / "pause.tar"
    subprocess.run([os.path.join(HERE, "make-pause-image.sh"), str(image_archive), str(pause)], check=True,
                   timeout=300)
    # restrict_oom_score_adj: without it the sandbox's spec asks for oom_score_adj -998, which runc cannot set
    # here (the bounding set lacks CAP_SYS_RESOURCE); with it the score is clamped to containerd's own, 0.
    cri_plugin = 'plugins."io.containerd.grpc.v1.cri"'
    runc_binary = f'\n    BinaryName = "{runc}"' if runc else ""
    (top / "config.toml").write_text(f'''version = 2
root = "{top}/root"
state = "{top}/state"
[grpc]
  address = "{sock}"
[{cri_plugin}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[{cri_plugin}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{top}/cni"
  max_conf_num = 1
[{cri_plugin}.containerd]
  default_runtime_name = "runc"
[{cri_plugin}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  [{cri_plugin}.containerd.runtimes.runc.options]
    Root = "{top}/runc"{runc_binary}
[{cri_plugin}.containerd.runtimes.pyrunv]
  runtime_type = "io.containerd.runc.v2"
  [{cri_plugin}.containerd.runtimes.pyrunv.options]
    BinaryName = "{pyrunv}"
    Root = "{top}/pyrunv"
''')
    try:
        with open(top / "containerd.log", "wb") as log:
            proc = start_daemon(["containerd", "--config", str(top / "config.toml")], log, sock.exists)
        client = CRI(sock, handler=handler)
        try:
            client.top = top
            client.roots = {name: top / name / "k8s.io" for name in ("runc", "pyrunv")}  # the shim's Root/NAMESPACE
            client.runtime_root = client.roots[handler]
            client.ctr = Engine(["ctr", "--address", str(sock), "--namespace", "k8s.io"])
            plugins = client.ctr("plugins", "ls").stdout
            if not re.search(r"io\.containerd\.grpc\.v1\s+cri\s+\S+\s+ok", plugins):
                raise RuntimeError(f"containerd's CRI plugin is not ok; see {top}/containerd.log:\n{plugins}")
            for archive in (image_archive, pause):
                result = client.ctr("images", "import", str(archive))
                if result.returncode:
                    raise RuntimeError(f"ctr images import {archive}: {result.stderr.strip()}")
            if not wait_for(lambda: {IMAGE, PAUSE_IMAGE} <= set(client.image_names()), timeout=30):
                raise RuntimeError(f"images not listed by the CRI: {client.image_names()}")
            if not wait_for(client.network_ready, timeout=30):
                raise RuntimeError(f"CNI not ready; see {top}/containerd.log")
            yield client
        finally:
            try:
                client.remove_all()
            finally:
                client.close()
                stop_daemon(proc)
    finally:
        subprocess.run(["ip", "link", "delete", bridge], stderr=subprocess.DEVNULL, timeout=60)
