"""The container's network: the VM's tap, joined to the interface an engine put in the netns.

The monitor lives in the container's network namespace. Before QEMU starts it makes a tap there, and
QEMU gets the tap's fd for the guest's virtio-net NIC. At start, once the engine (CNI, netavark,
docker's prestart hook) has put its veth in the namespace, `plumb` redirects every frame between the
veth and the tap both ways (tc ingress + mirred, as Kata's tcfilter mode does) and returns what the
guest needs to take the veth's place: its MAC, MTU, IPv4 addresses and routes.

pyroute2 costs about 12 MiB and 150 ms to import, so `plumb` runs in a short-lived child process
(`main`) and only when the namespace holds an interface to plumb."""
import errno
import fcntl
import os
import socket
import struct
import sys

from .. import jsonlite
from ..errors import PyrunvError

TAP_PREFIX = "pyrunv"  # the kernel numbers the taps: several VMs may share one namespace (a pod)
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_UP = 0x0002, 0x1000, 0x1
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
ETH_P_ALL = 0x0003
RTPROT_KERNEL = 2
RTNH_F_ONLINK = 4
ARPHRD_ETHER = 1
MAIN_TABLE = 254
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1


def host_port(address: str) -> tuple:
    """(host, port) of "HOST:PORT" or "[V6]:PORT", for a socket; ValueError if PORT is no number."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def make_tap() -> tuple:
    """(fd, name) of a new tap in the current network namespace, up. It lives as long as the fd: it goes
    when QEMU and the monitor have closed it."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        name = struct.unpack("16sH", fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", f"{TAP_PREFIX}%d".encode(),
                                                                            IFF_TAP | IFF_NO_PI))[:18])[0]
        name = name.rstrip(b"\0")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", name, 0))[:18])[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", name, flags | IFF_UP))
    except OSError as e:
        os.close(fd)
        raise PyrunvError(f"cannot make the VM's tap device: {e.strerror}") from None
    return fd, name.decode()


def is_ours(name: str) -> bool:
    return name == "lo" or name.startswith(TAP_PREFIX)


def interfaces_to_plumb() -> list:
    """The namespace's interfaces besides the loopback and VMs' taps, read cheaply from /proc/self/net/dev."""
    with open("/proc/self/net/dev") as f:
        names = [line.split(":", 1)[0].strip() for line in f.readlines()[2:]]
    return [name for name in names if not is_ours(name)]


def plumb(tap_name: str) -> dict:
    """Joins the namespace's first Ethernet interface to the tap; {} if there is none.

    The interface's redirect is replaced, not added to: in a pod's namespace the VM started last (an
    app container's, after the pause container's) gets the pod's network."""
    from pyroute2.iproute.linux import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    with IPRoute() as ip:
        links = [link for link in ip.get_links()
                 if link["ifi_type"] == ARPHRD_ETHER and not is_ours(link.get_attr("IFLA_IFNAME"))]
        if not links:
            return {}
        link = min(links, key=lambda link: link["index"])
        index, tap = link["index"], ip.link_lookup(ifname=tap_name)[0]
        addrs = [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                 for a in ip.get_addr(family=socket.AF_INET, index=index)]
        routes = []
        for r in ip.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            gateway = r.get_attr("RTA_GATEWAY")
            if r.get_attr("RTA_OIF") != index or (not gateway and r["proto"] == RTPROT_KERNEL):
                continue  # the guest's kernel makes the subnet's route from the address itself
            if gateway and r["flags"] & RTNH_F_ONLINK:
                routes.append(f"{gateway}/32 -")  # the guest's route ioctl knows no onlink: a link route to the gateway
            routes.append(f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']} {gateway or '-'}")
        routes = sorted(dict.fromkeys(routes), key=lambda route: not route.endswith(" -"))  # link routes first
        # IPv6: the global addresses (the guest makes its own link-local one from the same MAC), and the
        # routes the namespace was given; the kernel's own, for the addresses' prefixes and multicast, are made
        # again in the guest.
        addrs6 = [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                  for a in ip.get_addr(family=socket.AF_INET6, index=index) if a["scope"] == RT_SCOPE_UNIVERSE]
        routes6 = sorted(dict.fromkeys(
            f"{r.get_attr('RTA_DST') or '::'}/{r['dst_len']} {r.get_attr('RTA_GATEWAY') or '-'}"
            for r in ip.get_routes(family=socket.AF_INET6, table=MAIN_TABLE)
            if r.get_attr("RTA_OIF") == index and r["proto"] != RTPROT_KERNEL and r["type"] == RTN_UNICAST),
            key=lambda route: not route.endswith(" -"))
        ip.link("set", index=tap, mtu=link.get_attr("IFLA_MTU"))
        try:
            ip.tc("del", "ingress", index, "ffff:")  # with the filters of an earlier VM, if any
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL):
                raise
        for source, target in ((index, tap), (tap, index)):
            ip.tc("add", "ingress", source, "ffff:")
            ip.tc("add-filter", "u32", source, parent="ffff:", protocol=ETH_P_ALL, prio=1, target=1,
                  keys=["0x0/0x0+0"],
                  action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target})
    return {"interface": link.get_attr("IFLA_IFNAME"), "mac": link.get_attr("IFLA_ADDRESS"),
            "mtu": link.get_attr("IFLA_MTU"), "addrs": addrs, "routes": routes, "addrs6": addrs6, "routes6": routes6}


def agent_records(found: dict) -> list:
    """The agent's NETWORK records (docs/protocol.md) for what `plumb` found."""
    return ([("mac", found["mac"]), ("mtu", found["mtu"])] + [("addr", a) for a in found["addrs"]]
            + [("route", r) for r in found["routes"]] + [("addr6", a) for a in found["addrs6"]]
            + [("route6", r) for r in found["routes6"]])


def plumb_command(tap_name: str) -> list:
    """The child that runs `main`: a fresh interpreter with this one's module path, without site."""
    return [sys.executable, "-S", "-c", "import sys; sys.path[:] = sys.argv[1].split('\\n'); "
            "from pyrunv.host.network import main; main(sys.argv[2])", "\n".join(sys.path), tap_name]


def main(tap_name: str) -> None:
    try:
        print(jsonlite.dumps(plumb(tap_name)))
    except Exception as e:  # netlink errors carry no strerror of their own
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
