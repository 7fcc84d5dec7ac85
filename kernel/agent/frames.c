/* The host's frames, each to its handler; the handlers that are neither processes nor cgroups. */
#define _GNU_SOURCE
#include "agent.h"
#include "protocol.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static int kmsg = -1;

static ino_t pidns_of(pid_t pid)
{
    char path[64];
    struct stat st;
    snprintf(path, sizeof path, "/proc/%d/ns/pid", pid);
    return stat(path, &st) == 0 ? st.st_ino : 0;
}

/* A process's pid as the container sees it (the last NSpid entry); 0 outside the container. */
static long container_pid(pid_t pid, ino_t ns, long *ppid, long *uid, char *comm)
{
    char path[64], line[512];
    long nspid = 0;
    if (pidns_of(pid) != ns) return 0;
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    while (fgets(line, sizeof line, f)) {
        if (comm && !strncmp(line, "Name:", 5)) sscanf(line + 5, "%63s", comm);
        else if (ppid && !strncmp(line, "PPid:", 5)) *ppid = atol(line + 5);
        else if (uid && !strncmp(line, "Uid:", 4)) *uid = atol(line + 4);
        else if (!strncmp(line, "NSpid:", 6)) { char *last = strrchr(line, '\t'); nspid = atol(last ? last : line + 6); }
    }
    fclose(f);
    return nspid;
}

struct ps_out { struct buf text; ino_t ns; };

static void describe_one(pid_t pid, void *arg)
{
    struct ps_out *out = arg;
    char comm[64] = "?", row[256];
    long ppid = 0, uid = 0;
    long nspid = container_pid(pid, out->ns, &ppid, &uid, comm);
    long nsppid = container_pid((pid_t)ppid, out->ns, NULL, NULL, NULL);
    int n = snprintf(row, sizeof row, "%ld %ld %ld %s\n", nspid, nsppid, uid, comm);
    buf_append(&out->text, row, (size_t)n);
}

static void reply_ps(uint32_t container)
{
    struct proc *init = running_init(container);
    struct ps_out out = {{0}, 0};
    if (init) {
        out.ns = pidns_of(init->pid);
        for_each_container_pid(container, describe_one, &out);
    }
    send_frame(FR_REPLY, container, out.text.data, (uint32_t)out.text.len);
    free(out.text.data);
}

/* The kernel's log records, as the kernel prints them, to the serial console (our stderr). The kernel
 * itself prints little (quiet): console output costs boot time under TCG, so this waits to be asked. */
void forward_kmsg(void)
{
    char record[8192];
    for (;;) {
        ssize_t n = read(kmsg, record, sizeof record - 1);
        if (n < 0 && errno == EPIPE) continue; /* records overwritten before we read them */
        if (n <= 0) break;
        record[n] = 0;
        unsigned long long usec = 0;
        char *text = strchr(record, ';');
        if (!text || sscanf(record, "%*u,%*u,%llu", &usec) != 1) continue;
        text[strcspn(text, "\n")] = 0;
        fprintf(stderr, "[%5llu.%06llu] %s\n", usec / 1000000, usec % 1000000, text + 1);
    }
}

static void start_kmsg(uint32_t id)
{
    int watching = 0;
    if (kmsg < 0) {
        kmsg = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (kmsg < 0) { send_text(FR_ERROR, id, strerror(errno)); return; }
        epoll_set(kmsg, TAG(0, R_KMSG), EPOLLIN, &watching);
    }
    forward_kmsg();
    send_frame(FR_OK, id, NULL, 0);
}

/* RESTORED: a saved VM runs again, maybe a template shared by many. Its clock stood still while it was
 * saved, and its random state is the saved one's: take the host's time, and reseed from the host's bytes. */
#define RNDADDENTROPY 0x40085203 /* _IOW('R', 3, int[2]) */
#define RNDRESEEDCRNG 0x5207     /* _IO('R', 7) */
static void restored(uint32_t id, const char *payload, uint32_t len)
{
    struct { int64_t sec; uint32_t nsec; } __attribute__((packed)) now;
    struct { int entropy_count, buf_size; char buf[256]; } pool;
    if (len < sizeof now || len - sizeof now > sizeof pool.buf) { send_text(FR_ERROR, id, "bad RESTORED frame"); return; }
    memcpy(&now, payload, sizeof now);
    pool.buf_size = (int)(len - sizeof now);
    pool.entropy_count = pool.buf_size * 8;
    memcpy(pool.buf, payload + sizeof now, (size_t)pool.buf_size);
    struct timespec ts = { .tv_sec = now.sec, .tv_nsec = now.nsec };
    const char *failed = NULL;
    int fd = -1, e = 0;
    if (clock_settime(CLOCK_REALTIME, &ts) < 0) failed = "set the clock", e = errno;
    else if ((fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC)) < 0 || ioctl(fd, RNDADDENTROPY, &pool) < 0
             || ioctl(fd, RNDRESEEDCRNG) < 0)
        failed = "reseed the random number generator", e = errno;
    if (fd >= 0) close(fd);
    char err[128];
    if (failed) { snprintf(err, sizeof err, "%s: %s", failed, strerror(e)); send_text(FR_ERROR, id, err); }
    else send_frame(FR_OK, id, NULL, 0);
}

/* SHARE: a VM that booted without its share (a template's, docs/vm.md) has it now, on a hot-plugged PCIe
 * slot. The device's driver binds a moment after the plug: until then the tag is unknown (EINVAL). */
static void mount_share(uint32_t id)
{
    for (int tries = 0;; tries++) {
        if (mount(SHARE_TAG, SHARE_DIR, "virtiofs", 0, NULL) == 0) break;
        if (errno != EINVAL || tries == 10000) { send_text(FR_ERROR, id, strerror(errno)); return; }
        usleep(1000);
    }
    trace("share mounted");
    send_frame(FR_OK, id, NULL, 0);
}

void handle_frame(const struct frame_header *h, char *payload)
{
    struct proc *p = find_proc(h->id);
    switch (h->type) {
    case FR_CREATE:
    case FR_EXEC: spawn(h->type, h->id, payload, h->len); break;
    case FR_START: start(h->id); break;
    case FR_SIGNAL: signal_proc(h->id, (const uint32_t *)payload, h->len); break;
    case FR_CONNECT: connect_port(h->id, payload, h->len); break;
    case FR_STDIN:
        if (!p || p->in_fd < 0) break;
        if (h->len) buf_append(&p->in_pending, payload, h->len);
        else p->in_eof = 1;
        pump_input(p);
        break;
    case FR_WINSIZE:
        if (p && p->terminal && p->out_fd[S_STDOUT] >= 0 && h->len >= 4) {
            uint16_t rc[2];
            memcpy(rc, payload, 4);
            struct winsize ws = { .ws_row = rc[0], .ws_col = rc[1] };
            ioctl(p->out_fd[S_STDOUT], TIOCSWINSZ, &ws);
        }
        break;
    case FR_CREDIT:
        if (p && h->len >= 8) {
            uint32_t c[2];
            memcpy(c, payload, 8);
            if (c[0] == S_STDOUT || c[0] == S_STDERR) {
                p->credit[c[0]] += c[1];
                pump_output(p, (int)c[0]);
            }
        }
        break;
    case FR_PS: reply_ps(h->id); break;
    case FR_STATS: reply_stats(h->id); break;
    case FR_NETWORK: {
        char err[256];
        if (configure_network(payload, h->len, err, sizeof err) < 0) send_text(FR_ERROR, h->id, err);
        else send_frame(FR_OK, h->id, NULL, 0);
        break;
    }
    case FR_REMOVE: remove_container(h->id); break;
    case FR_UPDATE:
        if (running_init(h->id)) update_container(h->id, payload, h->len);
        else send_text(FR_ERROR, h->id, "container is not running");
        break;
    case FR_KMSG: start_kmsg(h->id); break;
    case FR_FREEZE: freeze_container(h->id, payload, h->len); break;
    case FR_RESTORED: restored(h->id, payload, h->len); break;
    case FR_SHARE: mount_share(h->id); break;
    case FR_MEMORY: grow_memory(h->id, payload, h->len); break;
    case FR_POWEROFF:
        sync();
        reboot(RB_AUTOBOOT);
        break;
    default: send_text(FR_ERROR, h->id, "unknown frame type");
    }
}
