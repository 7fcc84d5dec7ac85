/* The channel to the host: one virtio-serial port, frames in and out (docs/protocol.md); and the console,
 * where the agent's own words go (stderr). */
#define _GNU_SOURCE
#include "agent.h"
#include "protocol.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/reboot.h>
#include <unistd.h>
#include <fcntl.h>
#include <time.h>

int chan = -1, epfd = -1, tracing;
static struct buf chan_out, chan_in;
static int chan_watching_out;

void die(const char *what)
{
    fprintf(stderr, "pyrunv-agent: %s: %s\n", what, strerror(errno));
    sync();
    reboot(RB_AUTOBOOT); /* -no-reboot on the host turns this into QEMU's exit */
    _exit(1);
}

void buf_append(struct buf *b, const void *data, size_t len)
{
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len) cap *= 2;
        b->data = realloc(b->data, cap);
        if (!b->data) die("realloc");
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

void buf_consume(struct buf *b, size_t n)
{
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

void epoll_set(int fd, uint64_t tag, uint32_t events, int *watching)
{
    struct epoll_event ev = { .events = events, .data.u64 = tag };
    int op = *watching ? (events ? EPOLL_CTL_MOD : EPOLL_CTL_DEL) : EPOLL_CTL_ADD;
    if (!*watching && !events) return;
    if (epoll_ctl(epfd, op, fd, &ev) < 0 && errno != ENOENT) die("epoll_ctl");
    *watching = events != 0;
}

void flush_channel(void)
{
    while (chan_out.len) {
        ssize_t n = write(chan, chan_out.data, chan_out.len);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            die("write to host");
        }
        buf_consume(&chan_out, (size_t)n);
    }
    epoll_set(chan, TAG(0, R_CHAN), EPOLLIN | (chan_out.len ? EPOLLOUT : 0), &chan_watching_out);
}

void send_frame(uint32_t type, uint32_t id, const void *payload, uint32_t len)
{
    struct frame_header h = { type, id, len };
    buf_append(&chan_out, &h, sizeof h);
    if (len) buf_append(&chan_out, payload, len);
    flush_channel();
}

void send_text(uint32_t type, uint32_t id, const char *text)
{
    send_frame(type, id, text, (uint32_t)strlen(text));
}

void read_channel(void (*handle)(const struct frame_header *h, char *payload))
{
    char tmp[65536];
    for (;;) {
        ssize_t n = read(chan, tmp, sizeof tmp);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) break;
        if (n <= 0) { usleep(10000); break; } /* host not connected yet */
        buf_append(&chan_in, tmp, (size_t)n);
    }
    while (chan_in.len >= sizeof(struct frame_header)) {
        struct frame_header h;
        memcpy(&h, chan_in.data, sizeof h);
        if (h.len > MAX_PAYLOAD) { errno = EPROTO; die("frame too large"); }
        if (chan_in.len < sizeof h + h.len) break;
        char *payload = malloc(h.len + 1);
        memcpy(payload, chan_in.data + sizeof h, h.len);
        payload[h.len] = 0;
        buf_consume(&chan_in, sizeof h + h.len);
        handle(&h, payload);
        free(payload);
    }
}

int open_agent_port(void)
{
    /* The port appears once the host's side of virtio-serial has announced it: look every millisecond. */
    for (int tries = 0; tries < 5000; tries++) {
        char port[64], path[80];
        if (find_entry("/sys/class/virtio-ports", "name", AGENT_PORT_NAME, port, sizeof port) == 0) {
            snprintf(path, sizeof path, "/dev/%s", port);
            int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
            if (fd < 0) die(path);
            return fd;
        }
        usleep(1000);
    }
    errno = ENODEV;
    die("no " AGENT_PORT_NAME " port");
    return -1;
}

/* With pyrunv.trace on the kernel command line: boot milestones, timed since the kernel started. */
void trace(const char *what)
{
    struct timespec ts;
    if (!tracing) return;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    fprintf(stderr, "pyrunv-agent: [%ld.%06ld] %s\n", (long)ts.tv_sec, ts.tv_nsec / 1000, what);
}
