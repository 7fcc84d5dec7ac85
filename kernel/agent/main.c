/* pyrunv guest agent: PID 1 of the VM. Mounts the guest's file systems and the virtio-fs share,
 * then serves the host over one virtio-serial port: it prepares, starts, signals and reaps the
 * container's processes and multiplexes their stdio with per-stream credit (docs/protocol.md). */
#define _GNU_SOURCE
#include "agent.h"
#include "protocol.h"

#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void mount_or_die(const char *src, const char *dst, const char *type, unsigned long flags, const char *data)
{
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, data) < 0) die(dst);
}

static int sigfd = -1;

static void loopback_up(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr = {0};
    strcpy(ifr.ifr_name, "lo");
    if (s >= 0 && ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags |= IFF_UP;
        ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    if (s >= 0) close(s);
}

static int cmdline_has(const char *word)
{
    char cmdline[4096] = "";
    FILE *f = fopen("/proc/cmdline", "re");
    if (f) { if (!fgets(cmdline, sizeof cmdline, f)) cmdline[0] = 0; fclose(f); }
    return strstr(cmdline, word) != NULL;
}

/* pivot_root(2) cannot leave the initramfs, so the container could not pivot out of it either: make a
 * tmpfs the root, as switch_root does. Nothing needs re-executing; the agent keeps running from the
 * initramfs underneath. */
static void leave_initramfs(void)
{
    mount_or_die("tmpfs", "/newroot", "tmpfs", 0, "mode=0755");
    static const char *dirs[] = {"dev", "proc", "sys", "share", "run", "tmp"};
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        char path[64];
        snprintf(path, sizeof path, "/newroot/%s", dirs[i]);
        mkdir(path, 0755);
    }
    if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 || chdir("/") < 0)
        die("switch root");
}

static void boot(void)
{
    mount_or_die("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    int console = open("/dev/console", O_RDWR | O_NOCTTY);
    if (console < 0) console = open("/dev/null", O_RDWR);
    for (int i = 0; i < 3; i++) dup2(console, i);
    if (console > 2) close(console);
    mount_or_die("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    tracing = cmdline_has("pyrunv.trace");
    trace("boot: /dev and /proc mounted");
    mount_or_die("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    if (cmdline_has("pyrunv.probe")) {
        /* The host's accelerator probe: the guest got this far, which is all it asks. */
        fprintf(stderr, "pyrunv-agent: probe ok\n");
        reboot(RB_AUTOBOOT);
    }
    /* Every container gets a cgroup of its own: its processes, its limits, its statistics. */
    mount_or_die("cgroup2", CGROUP_DIR, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    write_text(CGROUP_DIR "/cgroup.subtree_control", "+memory +pids +cpu");
    make_containers_cgroup();
    /* A container's memory limit is its cgroup's, not the VM's size: an allocation beyond the VM's RAM is
     * not refused up front, and one beyond the limit meets the cgroup's OOM killer, as on a host. */
    write_text("/proc/sys/vm/overcommit_memory", "1");
    mount_or_die("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620");
    mount_or_die("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    mkdir(SHARE_DIR, 0755);
    if (!cmdline_has("pyrunv.share=plugged")) {
        trace("boot: mounting the share");
        mount_or_die(SHARE_TAG, SHARE_DIR, "virtiofs", 0, NULL);
        trace("boot: share mounted");
    }
    loopback_up();
}

int main(int argc, char **argv)
{
    if (getpid() != 1 || argc < 1) { fprintf(stderr, "pyrunv-agent must run as PID 1 of the guest\n"); return 1; }
    leave_initramfs();
    boot();
    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    root_pidns = open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    chan = open_agent_port();
    trace("boot: agent port open");
    if (sigfd < 0 || root_pidns < 0 || epfd < 0) die("agent set-up");
    int sig_watching = 0;
    epoll_set(sigfd, TAG(0, R_SIGNAL), EPOLLIN, &sig_watching);
    send_text(FR_READY, 0, PROTOCOL_VERSION);
    trace("boot: ready sent");

    for (;;) {
        struct epoll_event events[32];
        int timeout = -1; /* the clock is read only while output waits */
        if (coalesce_until) {
            long long wait = coalesce_until - now_ms();
            if (wait <= 0) {
                pump_deferred();
                continue;
            }
            timeout = (int)wait;
        }
        int n = epoll_wait(epfd, events, 32, timeout);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int slot = (int)(events[i].data.u64 >> 8);
            struct proc *p = &procs[slot];
            switch (events[i].data.u64 & 0xff) {
            case R_CHAN:
                if (events[i].events & EPOLLOUT) flush_channel();
                if (events[i].events & (EPOLLIN | EPOLLHUP)) read_channel(handle_frame);
                break;
            case R_SIGNAL: {
                struct signalfd_siginfo si;
                while (read(sigfd, &si, sizeof si) == sizeof si) {}
                reap();
                break;
            }
            case R_OUT: if (p->used && !defer_output(p, S_STDOUT, events[i].events)) pump_output(p, S_STDOUT); break;
            case R_ERR: if (p->used && !defer_output(p, S_STDERR, events[i].events)) pump_output(p, S_STDERR); break;
            case R_IN: if (p->used) pump_input(p); break;
            case R_KMSG: forward_kmsg(); break;
            case R_MOUNTS: if (p->used && p->mounts_fd >= 0) report_mounts(p); break;
            }
        }
    }
}
