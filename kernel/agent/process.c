/* The process table, and each process's stdio: output framed as the host's credit allows, input written
 * as it comes; its exit status once its output is all out. */
#define _GNU_SOURCE
#include "agent.h"
#include "protocol.h"

#include <errno.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct proc procs[MAX_PROCS];

struct proc *find_proc(uint32_t id)
{
    for (int i = 0; i < MAX_PROCS; i++)
        if (procs[i].used && procs[i].id == id) return &procs[i];
    return NULL;
}

/* A container's init, if it is still running: its namespaces are the container's. */
struct proc *running_init(uint32_t container)
{
    struct proc *p = find_proc(container);
    return p && p->is_init && !p->exited ? p : NULL;
}

struct proc *new_proc(uint32_t id)
{
    for (int i = 0; i < MAX_PROCS; i++) {
        if (procs[i].used) continue;
        struct proc *p = &procs[i];
        memset(p, 0, sizeof *p);
        p->used = 1;
        p->id = id;
        p->sync = p->mounts_fd = p->in_fd = p->out_fd[0] = p->out_fd[1] = p->out_fd[2] = -1;
        p->credit[S_STDOUT] = p->credit[S_STDERR] = WINDOW;
        return p;
    }
    return NULL;
}

int slot_of(struct proc *p) { return (int)(p - procs); }

/* Output that is less than a frame's worth waits this long for more, so that a process that writes a little at
 * a time still fills frames: each frame is a trip through the emulated device (a kick, an interrupt), which
 * under TCG costs far more than its bytes. */
#define COALESCE_MS 5
long long coalesce_until; /* CLOCK_MONOTONIC ms; 0 while no output waits */

void set_nonblock(int fd)
{
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

void watch_output(struct proc *p, int s)
{
    if (p->out_fd[s] < 0) return;
    epoll_set(p->out_fd[s], TAG(slot_of(p), s == S_STDOUT ? R_OUT : R_ERR),
              p->credit[s] ? EPOLLIN : 0, &p->watching[s]);
}

static void close_output(struct proc *p, int s)
{
    epoll_set(p->out_fd[s], 0, 0, &p->watching[s]);
    close(p->out_fd[s]);
    p->out_fd[s] = -1;
    send_frame(s == S_STDOUT ? FR_STDOUT : FR_STDERR, p->id, NULL, 0);
}

static void close_input(struct proc *p)
{
    if (p->in_fd < 0) return;
    epoll_set(p->in_fd, 0, 0, &p->watching[S_STDIN]);
    if (p->is_conn) shutdown(p->in_fd, SHUT_WR); /* the output's dup keeps the socket open */
    close(p->in_fd);
    p->in_fd = -1;
}

void release(struct proc *p)
{
    close_input(p);
    if (p->sync >= 0) close(p->sync);
    if (p->mounts_fd >= 0) close(p->mounts_fd); /* epoll forgets a closed fd */
    free(p->mounts_sent);
    free(p->in_pending.data);
    free(p->seccomp);
    memset(p, 0, sizeof *p);
}

/* The exit status goes out only after the last byte of output: nothing written before exit is lost. A
 * container's init also says how many of the container's processes the OOM killer took, so that the host
 * needs no STATS round trip while the VM ends. A connection ends, with status 0, when its peer has closed. */
static void maybe_finish(struct proc *p)
{
    if (!(p->exited || p->is_conn) || p->out_fd[S_STDOUT] >= 0 || p->out_fd[S_STDERR] >= 0) return;
    struct proc *init = p->is_init ? NULL : running_init(p->container);
    if (init && init->mounts_fd >= 0) report_mounts(init); /* a `mount` is seen before its exit */
    uint32_t oom_kills = p->is_init ? (uint32_t)cgroup_number(p->container, "memory.events", "oom_kill") : 0;
    int32_t payload[3] = { p->code, p->sig, (int32_t)oom_kills };
    send_frame(FR_EXIT, p->id, payload, sizeof payload);
    release(p);
}

static uint32_t frame_limit(const struct proc *p, int s)
{
    return p->credit[s] < DATA_CHUNK ? p->credit[s] : DATA_CHUNK;
}

long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

/* Whether readable output waits for more: less than a frame's worth is there, and more may come. */
int defer_output(struct proc *p, int s, uint32_t events)
{
    int avail = 0;
    if (p->terminal || p->is_conn || p->exited || (events & (EPOLLHUP | EPOLLERR)) || ioctl(p->out_fd[s], FIONREAD, &avail) < 0
        || avail <= 0 || (uint32_t)avail >= frame_limit(p, s))
        return 0;
    p->deferred[s] = 1;
    epoll_set(p->out_fd[s], 0, 0, &p->watching[s]);
    if (!coalesce_until) coalesce_until = now_ms() + COALESCE_MS;
    return 1;
}

void pump_output(struct proc *p, int s)
{
    static char chunk[DATA_CHUNK];
    p->deferred[s] = 0;
    while (p->out_fd[s] >= 0 && p->credit[s]) {
        size_t want = frame_limit(p, s);
        ssize_t n = read(p->out_fd[s], chunk, want);
        if (n > 0) {
            send_frame(s == S_STDOUT ? FR_STDOUT : FR_STDERR, p->id, chunk, (uint32_t)n);
            p->credit[s] -= (uint32_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        /* EAGAIN after exit: drained; the pipe may live on in an orphan, which is not ours to wait for. */
        if (n < 0 && errno == EAGAIN && !p->exited) break;
        close_output(p, s);
    }
    if (p->out_fd[s] >= 0) watch_output(p, s);
    maybe_finish(p);
}

/* Once coalesce_until has passed: the output that waited goes out, whatever its size. */
void pump_deferred(void)
{
    coalesce_until = 0;
    for (int i = 0; i < MAX_PROCS; i++)
        for (int s = S_STDOUT; s <= S_STDERR; s++)
            if (procs[i].used && procs[i].deferred[s]) pump_output(&procs[i], s);
}

void pump_input(struct proc *p)
{
    size_t done = 0;
    while (p->in_fd >= 0 && done < p->in_pending.len) {
        ssize_t n = write(p->in_fd, p->in_pending.data + done, p->in_pending.len - done);
        if (n > 0) { done += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) break;
        close_input(p); /* reader gone: the rest is dropped, as a pipe would */
        done = p->in_pending.len;
    }
    if (done) {
        uint32_t credit[2] = { S_STDIN, (uint32_t)done };
        buf_consume(&p->in_pending, done);
        send_frame(FR_CREDIT, p->id, credit, sizeof credit);
    }
    if (p->in_fd < 0) return;
    if (!p->in_pending.len && p->in_eof) {
        close_input(p); /* for a tty only our dup of the master closes */
        return;
    }
    epoll_set(p->in_fd, TAG(slot_of(p), R_IN), p->in_pending.len ? EPOLLOUT : 0, &p->watching[S_STDIN]);
}

int make_stdio(struct stdio_pipes *sp, int terminal)
{
    for (int i = 0; i < 3; i++) sp->child[i] = sp->parent[i] = -1;
    if (terminal) return 0;
    for (int i = 0; i < 3; i++) {
        int fds[2];
        if (pipe2(fds, O_CLOEXEC) < 0) return -1;
        sp->child[i] = i == 0 ? fds[0] : fds[1];
        sp->parent[i] = i == 0 ? fds[1] : fds[0];
        set_nonblock(sp->parent[i]);
        if (i) fcntl(fds[0], F_SETPIPE_SZ, WINDOW); /* room to write on while its output waits to be framed */
    }
    return 0;
}

void reap(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_PROCS; i++) {
            struct proc *p = &procs[i];
            if (!p->used || p->pid != pid) continue;
            p->exited = 1;
            p->sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
            p->code = p->sig ? 128 + p->sig : WEXITSTATUS(status);
            pump_output(p, S_STDOUT);
            if (p->used) pump_output(p, S_STDERR);
        }
    }
    remove_cgroups();
}

void signal_proc(uint32_t id, const uint32_t *payload, uint32_t len)
{
    struct proc *p = find_proc(id);
    if (len < 8) { send_text(FR_ERROR, id, "bad signal frame"); return; }
    int sig = (int)payload[0];
    if (!p || p->exited || p->is_conn) { send_text(FR_ERROR, id, "process is not running"); return; }
    if (payload[1]) signal_container(p->container, sig);
    if (kill(p->pid, sig) < 0 && errno != ESRCH) { send_text(FR_ERROR, id, strerror(errno)); return; }
    send_frame(FR_OK, id, NULL, 0);
}

/* CONNECT: the host's side of a port-forward. What the host sends is the connection's input; what the peer
 * sends, its output. A connection on the loopback is made or refused at once. */
void connect_port(uint32_t id, const char *payload, uint32_t len)
{
    char err[96];
    uint32_t port = 0;
    if (len >= 4) memcpy(&port, payload, 4);
    if (!port || port > 65535 || find_proc(id)) { send_text(FR_ERROR, id, "bad connect frame"); return; }
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    int sock = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int out = sock < 0 ? -1 : fcntl(sock, F_DUPFD_CLOEXEC, 0);
    struct proc *p = out < 0 ? NULL : new_proc(id);
    if (!p || (connect(sock, (struct sockaddr *)&to, sizeof to) < 0 && errno != EINPROGRESS)) {
        snprintf(err, sizeof err, "connect to 127.0.0.1:%u: %s", port, p ? strerror(errno) : "no room");
        if (p) release(p);
        if (out >= 0) close(out);
        if (sock >= 0) close(sock);
        send_text(FR_ERROR, id, err);
        return;
    }
    p->is_conn = 1;
    p->in_fd = sock;
    p->out_fd[S_STDOUT] = out;
    send_frame(FR_OK, id, NULL, 0);
    watch_output(p, S_STDOUT);
}

/* A container with a shared mount (rshared, Kubernetes' Bidirectional): the host mirrors what its
 * processes mount under it (monitor/propagation.py). The first report is the container as it was made. */
void watch_mounts(struct proc *init)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/mountinfo", init->pid);
    init->mounts_fd = open(path, O_RDONLY | O_CLOEXEC);
    if (init->mounts_fd < 0) return;
    int watching = 0;
    /* A change of the namespace's mounts wakes it (EPOLLPRI); reading does not, and EPOLLIN is always on. */
    epoll_set(init->mounts_fd, TAG(slot_of(init), R_MOUNTS), EPOLLPRI, &watching);
    report_mounts(init);
}

void report_mounts(struct proc *init)
{
    struct buf text = { 0 };
    static char chunk[4096];
    ssize_t n;
    if (lseek(init->mounts_fd, 0, SEEK_SET) < 0) return;
    while ((n = read(init->mounts_fd, chunk, sizeof chunk)) > 0) buf_append(&text, chunk, (size_t)n);
    if (n == 0 && text.len < MAX_PAYLOAD) {
        buf_append(&text, "", 1);
        if (!init->mounts_sent || strcmp(init->mounts_sent, text.data)) {
            send_frame(FR_MOUNTS, init->id, text.data, (uint32_t)text.len - 1);
            free(init->mounts_sent);
            init->mounts_sent = text.data;
            return;
        }
    }
    free(text.data);
}
