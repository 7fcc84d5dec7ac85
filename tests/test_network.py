"""The guest takes the place of the container's end of a veth, as CNI, netavark or docker leave one in the
network namespace; driven here with a namespace and a veth pair made by hand."""
import functools
import http.server
import socket
import subprocess
import threading
import uuid

import pytest

pytestmark = pytest.mark.vm

HOST, GUEST = "10.213.7.1", "10.213.7.2"
HOST6, GUEST6 = "fd00:213:7::1", "fd00:213:7::2"  # a unique local prefix of the test's own


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


# How the namespace's eth0 reaches HOST: a /24 as bridges give (podman, docker), or a /32 with a route to
# the gateway on the link (Calico's way), or a /32 with an `onlink` default route.
ROUTING = {
    "subnet": [["addr", "add", f"{GUEST}/24", "dev", "eth0"], ["route", "add", "default", "via", HOST]],
    "host route": [["addr", "add", f"{GUEST}/32", "dev", "eth0"], ["route", "add", HOST, "dev", "eth0"],
                   ["route", "add", "default", "via", HOST, "dev", "eth0"]],
    "onlink": [["addr", "add", f"{GUEST}/32", "dev", "eth0"],
               ["route", "add", "default", "via", HOST, "dev", "eth0", "onlink"]],
    # Dual stack, as a CNI bridge with IPv6 ranges gives: both families' addresses and default routes.
    "dual stack": [["addr", "add", f"{GUEST}/24", "dev", "eth0"], ["route", "add", "default", "via", HOST],
                   ["-6", "addr", "add", f"{GUEST6}/64", "dev", "eth0", "nodad"],
                   ["-6", "route", "add", "default", "via", HOST6]],
}


def make_netns(routing):
    """A namespace whose eth0 (GUEST, MTU 1400) is a veth to the host's HOST; returns (name, host end)."""
    name, host_end = f"pyrunv-{uuid.uuid4().hex[:8]}", f"pyh{uuid.uuid4().hex[:8]}"
    ip("netns", "add", name)
    ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", name)
    ip("addr", "add", f"{HOST}/24", "dev", host_end)
    ip("-6", "addr", "add", f"{HOST6}/64", "dev", host_end, "nodad")
    ip("link", "set", host_end, "up")
    ip("-n", name, "link", "set", "eth0", "mtu", "1400", "up")
    for command in ROUTING[routing]:
        ip("-n", name, *command)
    return name, host_end


@pytest.fixture(params=list(ROUTING))
def netns(request):
    name = host_end = None
    try:
        name, host_end = make_netns(request.param)
        yield name
    finally:
        if name:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        if host_end:
            subprocess.run(["ip", "link", "del", host_end], capture_output=True)


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello").write_text("hello through the veth\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def in_netns(path):
    def edit(config):
        for ns in config["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = path
    return edit


def test_the_guest_takes_the_veths_address_and_reaches_the_host(runtime, bundle, netns, http_server):
    mac = subprocess.run(["ip", "-n", netns, "-br", "link", "show", "eth0"], capture_output=True, text=True,
                         check=True).stdout.split()[2]
    script = (f"ip -o link show eth0; ip -4 -o addr show eth0; ip route; "
              f"timeout 30 wget -q -O- http://{HOST}:{http_server}/hello")
    result = runtime("run", "--bundle", bundle("sh", "-c", script, edit=in_netns(f"/run/netns/{netns}")), "net")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert f"link/ether {mac}" in out and "mtu 1400" in out, out
    assert f"inet {GUEST}/" in out and f"default via {HOST} dev eth0" in out, out
    assert out.endswith("hello through the veth\n"), out
    # The tap went with the VM; the namespace is the engine's and stays.
    links = subprocess.run(["ip", "-n", netns, "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert " pyrunv" not in links and "eth0" in links
    assert runtime.leftovers() == []


@pytest.mark.parametrize("netns", ["subnet"], indirect=True)
def test_in_a_shared_namespace_the_vm_started_last_holds_the_network(runtime, bundle, netns, http_server):
    """As in a pod: the pause container's VM starts first, the app container's later."""
    shared = in_netns(f"/run/netns/{netns}")
    runtime.detached("run", "--detach", "--bundle", bundle("sleep", "600", edit=shared), "pause")
    fetch = f"timeout 30 wget -q -O- http://{HOST}:{http_server}/hello"
    result = runtime("run", "--bundle", bundle("sh", "-c", fetch, edit=shared), "app")
    assert (result.returncode, result.stdout) == (0, b"hello through the veth\n"), result.stderr
    runtime("delete", "--force", "pause", check=True)
    assert runtime.leftovers() == []


def test_an_empty_new_namespace_leaves_the_guest_with_a_loopback_only(runtime, bundle):
    result = runtime("run", "--bundle", bundle("sh", "-c", "ip -4 -o addr; ip route"), "nonet")
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "inet 127.0.0.1/8" in out and "eth0" not in out and "default" not in out, out


@pytest.mark.parametrize("netns", ["dual stack"], indirect=True)
def test_a_dual_stack_namespace_gives_the_guest_its_ipv6_address_and_route(runtime, bundle, netns, tmp_path):
    root = tmp_path / "www6"
    root.mkdir()
    (root / "hello").write_text("hello over IPv6\n")

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6
    server = Server((HOST6, 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        script = (f"ip -6 -o addr show dev eth0 scope global; ip -6 route show default; "
                  f"timeout 30 wget -q -O- http://[{HOST6}]:{server.server_address[1]}/hello")
        result = runtime("run", "--bundle", bundle("sh", "-c", script, edit=in_netns(f"/run/netns/{netns}")), "v6")
    finally:
        server.shutdown()
    out = result.stdout.decode()
    assert result.returncode == 0, (out, result.stderr)
    assert f"inet6 {GUEST6}/64" in out and f"default via {HOST6} dev eth0" in out, out
    assert out.endswith("hello over IPv6\n"), out
