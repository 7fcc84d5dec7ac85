/* The VM's network interface, configured as the host found the engine's veth: same MAC, MTU, IPv4 and
 * IPv6 addresses and routes (docs/protocol.md, NETWORK). The host redirects every frame between that veth
 * and the VM's tap, so the guest simply is the container's end of the veth. */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static int err_out(char *err, size_t errlen, const char *what, const char *arg)
{
    snprintf(err, errlen, "network: %s %s: %s", what, arg, strerror(errno));
    return -1;
}

/* The guest's one NIC: the first interface that is not the loopback. */
static int find_nic(char *name)
{
    struct if_nameindex *all = if_nameindex(), *i;
    int found = 0;
    for (i = all; i && i->if_index; i++) {
        if (strcmp(i->if_name, "lo") == 0) continue;
        snprintf(name, IFNAMSIZ, "%s", i->if_name);
        found = 1;
        break;
    }
    if (all) if_freenameindex(all);
    return found;
}

static int parse_prefix(const char *text, struct in_addr *addr, struct in_addr *mask)
{
    char ip[INET_ADDRSTRLEN];
    const char *slash = strchr(text, '/');
    int bits = slash ? atoi(slash + 1) : 32;
    size_t n = slash ? (size_t)(slash - text) : strlen(text);
    if (n >= sizeof ip || bits < 0 || bits > 32) return -1;
    memcpy(ip, text, n);
    ip[n] = 0;
    mask->s_addr = bits ? htonl(~0u << (32 - bits)) : 0;
    return inet_pton(AF_INET, ip, addr) == 1 ? 0 : -1;
}

static void set_sockaddr(struct sockaddr *sa, struct in_addr addr)
{
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr = addr };
    memcpy(sa, &sin, sizeof sin);
}

static int add_address(int s, const char *nic, int n, const char *text, char *err, size_t errlen)
{
    struct ifreq ifr = {0};
    struct in_addr addr, mask;
    if (parse_prefix(text, &addr, &mask) < 0) { errno = EINVAL; return err_out(err, errlen, "address", text); }
    /* A second address goes on an alias label, as ifconfig would put it. */
    if (n) snprintf(ifr.ifr_name, IFNAMSIZ, "%.10s:%d", nic, n & 0xff);
    else snprintf(ifr.ifr_name, IFNAMSIZ, "%s", nic);
    set_sockaddr(&ifr.ifr_addr, addr);
    if (ioctl(s, SIOCSIFADDR, &ifr) < 0) return err_out(err, errlen, "address", text);
    set_sockaddr(&ifr.ifr_netmask, mask);
    if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0) return err_out(err, errlen, "netmask of", text);
    return 0;
}

/* "DST/BITS GATEWAY", the gateway "-" for a route on the link. */
static int add_route(int s, char *nic, const char *text, char *err, size_t errlen)
{
    char dst[64], gw[INET_ADDRSTRLEN];
    struct in_addr d, mask, g = {0};
    if (sscanf(text, "%63s %15s", dst, gw) != 2 || parse_prefix(dst, &d, &mask) < 0
        || (strcmp(gw, "-") && inet_pton(AF_INET, gw, &g) != 1)) {
        errno = EINVAL;
        return err_out(err, errlen, "route", text);
    }
    struct rtentry rt = {0};
    set_sockaddr(&rt.rt_dst, d);
    set_sockaddr(&rt.rt_genmask, mask);
    set_sockaddr(&rt.rt_gateway, g);
    rt.rt_flags = RTF_UP | (g.s_addr ? RTF_GATEWAY : 0) | (mask.s_addr == 0xffffffff ? RTF_HOST : 0);
    rt.rt_dev = nic;
    if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST) return err_out(err, errlen, "route", text);
    return 0;
}

static int link_up(int s, struct ifreq *ifr, char *err, size_t errlen)
{
    if (ioctl(s, SIOCGIFFLAGS, ifr) < 0) return err_out(err, errlen, "flags of", ifr->ifr_name);
    ifr->ifr_flags |= IFF_UP;
    return ioctl(s, SIOCSIFFLAGS, ifr) < 0 ? err_out(err, errlen, "up", ifr->ifr_name) : 0;
}

/* The kernel's struct in6_ifreq and struct in6_rtmsg (linux/ipv6.h, linux/ipv6_route.h), which musl lacks. */
struct ifreq6 { struct in6_addr addr; uint32_t prefixlen; int ifindex; };
struct rtmsg6 { struct in6_addr dst, src, gateway; uint32_t type; uint16_t dst_len, src_len; uint32_t metric;
                unsigned long info; uint32_t flags; int ifindex; };

/* "ADDR/BITS" (IPv6), or "DST/BITS GATEWAY", the gateway "-" for a route on the link. */
static int parse6(char *text, struct in6_addr *addr, int *bits, char **gateway)
{
    char *slash = strchr(text, '/');
    if (!slash) return -1;
    *slash = 0;
    char *rest = slash + 1, *space = strchr(rest, ' ');
    if (space) { *space = 0; if (gateway) *gateway = space + 1; }
    *bits = atoi(rest);
    int ok = inet_pton(AF_INET6, text, addr) == 1 && *bits >= 0 && *bits <= 128 && (!gateway || space);
    *slash = '/';
    if (space) *space = ' ';
    return ok ? 0 : -1;
}

static int add_address6(int s6, int index, char *text, char *err, size_t errlen)
{
    struct ifreq6 r = { .ifindex = index };
    int bits;
    if (parse6(text, &r.addr, &bits, NULL) < 0) { errno = EINVAL; return err_out(err, errlen, "address", text); }
    r.prefixlen = (uint32_t)bits;
    return ioctl(s6, SIOCSIFADDR, &r) < 0 && errno != EEXIST ? err_out(err, errlen, "address", text) : 0;
}

static int add_route6(int s6, int index, char *text, char *err, size_t errlen)
{
    struct rtmsg6 r = { .ifindex = index, .metric = 1024, .flags = RTF_UP };
    char *gateway = NULL;
    int bits;
    if (parse6(text, &r.dst, &bits, &gateway) < 0
        || (strcmp(gateway, "-") && inet_pton(AF_INET6, gateway, &r.gateway) != 1)) {
        errno = EINVAL;
        return err_out(err, errlen, "route", text);
    }
    r.dst_len = (uint16_t)bits;
    if (strcmp(gateway, "-")) r.flags |= RTF_GATEWAY;
    if (bits == 128) r.flags |= RTF_HOST;
    return ioctl(s6, SIOCADDRT, &r) < 0 && errno != EEXIST ? err_out(err, errlen, "route", text) : 0;
}

/* The records come in the order the protocol gives: mac and mtu, which need the link down, then
 * addresses and routes, which need it up. */
int configure_network(char *buf, size_t len, char *err, size_t errlen)
{
    char nic[IFNAMSIZ];
    if (!find_nic(nic)) { errno = ENODEV; return err_out(err, errlen, "no interface", "in the guest"); }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return err_out(err, errlen, "socket", "");
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", nic);
    int rc = 0, up = 0, naddr = 0, s6 = -1;
    for (char *rec = buf; rec < buf + len && rc == 0; rec += strlen(rec) + 1) {
        char *value = strchr(rec, '=');
        if (!value) continue;
        *value++ = 0;
        int is_link = !strcmp(rec, "mac") || !strcmp(rec, "mtu");
        if (!is_link && !up) {
            rc = link_up(s, &ifr, err, errlen);
            up = 1;
            if (rc) break;
        }
        if (!strcmp(rec, "mac")) {
            unsigned int b[6];
            if (sscanf(value, "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5]) != 6) {
                errno = EINVAL;
                rc = err_out(err, errlen, "mac", value);
                break;
            }
            ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
            for (int i = 0; i < 6; i++) ifr.ifr_hwaddr.sa_data[i] = (char)b[i];
            if (ioctl(s, SIOCSIFHWADDR, &ifr) < 0) rc = err_out(err, errlen, "mac", value);
        } else if (!strcmp(rec, "mtu")) {
            ifr.ifr_mtu = atoi(value);
            if (ioctl(s, SIOCSIFMTU, &ifr) < 0) rc = err_out(err, errlen, "mtu", value);
        } else if (!strcmp(rec, "addr")) {
            rc = add_address(s, nic, naddr++, value, err, errlen);
        } else if (!strcmp(rec, "route")) {
            rc = add_route(s, nic, value, err, errlen);
        } else if (!strcmp(rec, "addr6") || !strcmp(rec, "route6")) {
            if (s6 < 0) {
                /* The pod's namespace has made sure of its addresses already: no second detection here. */
                char path[96];
                snprintf(path, sizeof path, "/proc/sys/net/ipv6/conf/%s/accept_dad", nic);
                write_text(path, "0");
                s6 = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
                if (s6 < 0) { rc = err_out(err, errlen, "socket", "inet6"); break; }
            }
            int index = (int)if_nametoindex(nic);
            rc = !strcmp(rec, "addr6") ? add_address6(s6, index, value, err, errlen)
                                       : add_route6(s6, index, value, err, errlen);
        }
    }
    if (rc == 0 && !up) rc = link_up(s, &ifr, err, errlen);
    close(s);
    if (s6 >= 0) close(s6);
    return rc;
}
