/* pyrunv guest agent: PID 1 of the VM. Mounts the guest's file systems and the virtio-fs share,
 * then serves the host over one virtio-serial port: it prepares, starts, signals and reaps the
 * container's processes and multiplexes their stdio with per-stream credit (docs/protocol.md). */
#define _GNU_SOURCE
#include "agent.h"
#include "protocol.h"

#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS 64
#define SETUP_TIMEOUT_MS 30000

struct buf { char *data; size_t len, cap; };

struct proc {
    int used;
    uint32_t id;
    uint32_t container; /* the id of its container's init; its own id for an init */
    pid_t pid;
    int is_init, started, terminal;
    int sync;          /* to the child until it has exec'd */
    int in_fd;         /* stdin pipe (or a dup of the tty master) */
    int out_fd[3];     /* [S_STDOUT], [S_STDERR]: read ends, or the tty master */
    int deferred[3];   /* waits for more output until coalesce_until */
    int watching[3];
    uint32_t credit[3];
    struct buf in_pending;
    int in_eof;
    int exited, code, sig;
};

/* Output that is less than a frame's worth waits this long for more, so that a process that writes a little at
 * a time still fills frames: each frame is a trip through the emulated device (a kick, an interrupt), which
 * under TCG costs far more than its bytes. */
#define COALESCE_MS 5
static long long coalesce_until; /* CLOCK_MONOTONIC ms; 0 while no output waits */

static int chan = -1, epfd = -1, sigfd = -1, root_pidns = -1, kmsg = -1;
static struct buf chan_out, chan_in;
static int chan_watching_out;
static struct proc procs[MAX_PROCS];

enum role { R_CHAN = 0, R_SIGNAL = 1, R_OUT = 2, R_ERR = 3, R_IN = 4, R_KMSG = 5 };
#define TAG(slot, role) (((uint64_t)(slot) << 8) | (role))

static void die(const char *what)
{
    fprintf(stderr, "pyrunv-agent: %s: %s\n", what, strerror(errno));
    sync();
    reboot(RB_AUTOBOOT); /* -no-reboot on the host turns this into QEMU's exit */
    _exit(1);
}

static void buf_append(struct buf *b, const void *data, size_t len)
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

static void buf_consume(struct buf *b, size_t n)
{
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

static void epoll_set(int fd, uint64_t tag, uint32_t events, int *watching)
{
    struct epoll_event ev = { .events = events, .data.u64 = tag };
    int op = *watching ? (events ? EPOLL_CTL_MOD : EPOLL_CTL_DEL) : EPOLL_CTL_ADD;
    if (!*watching && !events) return;
    if (epoll_ctl(epfd, op, fd, &ev) < 0 && errno != ENOENT) die("epoll_ctl");
    *watching = events != 0;
}

static void flush_channel(void)
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

static void send_frame(uint32_t type, uint32_t id, const void *payload, uint32_t len)
{
    struct frame_header h = { type, id, len };
    buf_append(&chan_out, &h, sizeof h);
    if (len) buf_append(&chan_out, payload, len);
    flush_channel();
}

static void send_text(uint32_t type, uint32_t id, const char *text)
{
    send_frame(type, id, text, (uint32_t)strlen(text));
}

static struct proc *find_proc(uint32_t id)
{
    for (int i = 0; i < MAX_PROCS; i++)
        if (procs[i].used && procs[i].id == id) return &procs[i];
    return NULL;
}

/* A container's init, if it is still running: its namespaces are the container's. */
static struct proc *running_init(uint32_t container)
{
    struct proc *p = find_proc(container);
    return p && p->is_init && !p->exited ? p : NULL;
}

/* Containers removed while some of their processes were still exiting: their cgroups go once empty. */
static uint32_t doomed[MAX_PROCS];

static void remove_cgroups(void)
{
    for (int i = 0; i < MAX_PROCS; i++) {
        char path[128];
        if (!doomed[i]) continue;
        cgroup_path(path, sizeof path, doomed[i], "");
        if (rmdir(path) == 0 || errno == ENOENT) doomed[i] = 0;
    }
}

static int slot_of(struct proc *p) { return (int)(p - procs); }

static void set_nonblock(int fd)
{
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static void watch_output(struct proc *p, int s)
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
    close(p->in_fd);
    p->in_fd = -1;
}

static void release(struct proc *p)
{
    close_input(p);
    if (p->sync >= 0) close(p->sync);
    free(p->in_pending.data);
    memset(p, 0, sizeof *p);
}

static unsigned long long cgroup_number(uint32_t container, const char *file, const char *key);

/* The exit status goes out only after the last byte of output: nothing written before exit is lost. A
 * container's init also says how many of the container's processes the OOM killer took, so that the host
 * needs no STATS round trip while the VM ends. */
static void maybe_finish(struct proc *p)
{
    if (!p->exited || p->out_fd[S_STDOUT] >= 0 || p->out_fd[S_STDERR] >= 0) return;
    uint32_t oom_kills = p->is_init ? (uint32_t)cgroup_number(p->container, "memory.events", "oom_kill") : 0;
    int32_t payload[3] = { p->code, p->sig, (int32_t)oom_kills };
    send_frame(FR_EXIT, p->id, payload, sizeof payload);
    release(p);
}

static uint32_t frame_limit(const struct proc *p, int s)
{
    return p->credit[s] < DATA_CHUNK ? p->credit[s] : DATA_CHUNK;
}

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

/* Whether readable output waits for more: less than a frame's worth is there, and more may come. */
static int defer_output(struct proc *p, int s, uint32_t events)
{
    int avail = 0;
    if (p->terminal || p->exited || (events & (EPOLLHUP | EPOLLERR)) || ioctl(p->out_fd[s], FIONREAD, &avail) < 0
        || avail <= 0 || (uint32_t)avail >= frame_limit(p, s))
        return 0;
    p->deferred[s] = 1;
    epoll_set(p->out_fd[s], 0, 0, &p->watching[s]);
    if (!coalesce_until) coalesce_until = now_ms() + COALESCE_MS;
    return 1;
}

static void pump_output(struct proc *p, int s)
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
static void pump_deferred(void)
{
    coalesce_until = 0;
    for (int i = 0; i < MAX_PROCS; i++)
        for (int s = S_STDOUT; s <= S_STDERR; s++)
            if (procs[i].used && procs[i].deferred[s]) pump_output(&procs[i], s);
}

static void pump_input(struct proc *p)
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

static void reap(void)
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

static int wait_readable(int fd, int timeout_ms)
{
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    int r;
    do r = poll(&pfd, 1, timeout_ms); while (r < 0 && errno == EINTR);
    return r;
}

/* Reads one sync message from the child: 'K' (+ tty master), 'E' + error, or EOF (exec happened). */
static int read_sync(int sync, char *msg, size_t msglen, int *fd)
{
    char data[1024];
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
    struct iovec iov = { .iov_base = data, .iov_len = sizeof data - 1 };
    struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf };
    if (wait_readable(sync, SETUP_TIMEOUT_MS) <= 0) {
        snprintf(msg, msglen, "process set-up timed out");
        return 'E';
    }
    ssize_t n = recvmsg(sync, &m, MSG_CMSG_CLOEXEC);
    if (n <= 0) return 0;
    data[n] = 0;
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    if (fd && c && c->cmsg_type == SCM_RIGHTS) memcpy(fd, CMSG_DATA(c), sizeof(int));
    if (data[0] == 'E') snprintf(msg, msglen, "%s", data + 1);
    return data[0];
}

struct stdio_pipes { int child[3]; int parent[3]; };

static int make_stdio(struct stdio_pipes *sp, int terminal)
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

static void close_all(int *fds, int n)
{
    for (int i = 0; i < n; i++) if (fds[i] >= 0) { close(fds[i]); fds[i] = -1; }
}

/* In the child: stdio in place, sync socket at fd 3, nothing else inherited, default signals. */
static void child_fds(struct stdio_pipes *sp, int sync)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    setsid();
    if (!(sp->child[0] < 0)) for (int i = 0; i < 3; i++) dup2(sp->child[i], i);
    else {
        int null = open("/dev/null", O_RDWR);
        for (int i = 0; i < 3; i++) dup2(null, i);
    }
    dup2(sync, 3);
    syscall(SYS_close_range, 4, ~0U, 0);
    fcntl(3, F_SETFD, FD_CLOEXEC);
}

static struct proc *new_proc(uint32_t id)
{
    for (int i = 0; i < MAX_PROCS; i++) {
        if (procs[i].used) continue;
        struct proc *p = &procs[i];
        memset(p, 0, sizeof *p);
        p->used = 1;
        p->id = id;
        p->sync = p->in_fd = p->out_fd[0] = p->out_fd[1] = p->out_fd[2] = -1;
        p->credit[S_STDOUT] = p->credit[S_STDERR] = WINDOW;
        return p;
    }
    return NULL;
}

#define CLONE_INTO_CGROUP 0x200000000ULL
struct clone3_args { uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
                     set_tid_size, cgroup; };

/* A child born in the container's cgroup: moving it there afterwards would cost a cgroup migration, which
 * waits for an RCU grace period (some 10 ms of a create under TCG). -1 with errno on failure. */
static pid_t clone_into_cgroup(uint32_t container, uint64_t flags)
{
    char path[128];
    cgroup_path(path, sizeof path, container, "");
    int cgroup = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (cgroup < 0) return -1;
    struct clone3_args args = { .flags = flags | CLONE_INTO_CGROUP, .exit_signal = SIGCHLD, .cgroup = (uint64_t)cgroup };
    pid_t pid = (pid_t)syscall(SYS_clone3, &args, sizeof args);
    int saved = errno;
    close(cgroup);
    errno = saved;
    return pid;
}

static int write_map(pid_t pid, const char *file, const char *const *lines, int n, char *err, size_t errlen)
{
    char path[64], text[4096] = "";
    size_t used = 0;
    for (int i = 0; i < n && used < sizeof text; i++)
        used += (size_t)snprintf(text + used, sizeof text - used, "%s\n", lines[i]);
    snprintf(path, sizeof path, "/proc/%d/%s", pid, file);
    if (used >= sizeof text || write_text(path, text) < 0) {
        snprintf(err, errlen, "user namespace %s: %s", file, used >= sizeof text ? "too long" : strerror(errno));
        return -1;
    }
    return 0;
}

/* The new user namespace's maps, and what only the agent's privilege may set, before the child goes on. */
static int map_user_namespace(const struct spec *s, pid_t pid, int sync, char *err, size_t errlen)
{
    if (write_map(pid, "uid_map", s->uidmap, s->nuidmap, err, errlen) < 0
        || write_map(pid, "gid_map", s->gidmap, s->ngidmap, err, errlen) < 0)
        return -1;
    if (s->have_oom_score_adj) {
        char path[64], value[16];
        snprintf(path, sizeof path, "/proc/%d/oom_score_adj", pid);
        snprintf(value, sizeof value, "%d", s->oom_score_adj);
        if (write_text(path, value) < 0) { snprintf(err, errlen, "oom_score_adj: %s", strerror(errno)); return -1; }
    }
    return write(sync, "m", 1) == 1 ? 0 : (snprintf(err, errlen, "process set-up failed"), -1);
}

/* Fork the process (a container's init into its namespaces, new or joined), wait for its set-up report. */
static void spawn(uint32_t type, uint32_t id, char *payload, uint32_t len)
{
    char err[1024];
    struct spec s;
    struct proc *init = NULL;
    pid_t join_pids[3] = {0, 0, 0};
    if (find_proc(id)) { send_text(FR_ERROR, id, "process id in use"); return; }
    if (spec_parse(&s, payload, len, err, sizeof err) < 0) { send_text(FR_ERROR, id, err); return; }
    if (type == FR_EXEC && !(init = running_init(s.container))) {
        send_text(FR_ERROR, id, "container is not running");
        return;
    }
    if (type == FR_CREATE) {
        for (int k = 0; k < 3; k++) {
            struct proc *other = s.join[k] ? running_init(s.join[k]) : NULL;
            if (s.join[k] && !other) { send_text(FR_ERROR, id, "the container whose namespaces it joins is not running"); return; }
            join_pids[k] = other ? other->pid : 0;
        }
        s.container = id;
        char path[128];
        cgroup_path(path, sizeof path, id, "");
        if ((mkdir(path, 0755) < 0 && errno != EEXIST && snprintf(err, sizeof err, "cgroup %s: %s", path, strerror(errno)))
            || cgroup_limits(id, s.cgroup, s.ncgroup, err, sizeof err) < 0) {
            rmdir(path);
            send_text(FR_ERROR, id, err);
            return;
        }
    }
    struct proc *p = new_proc(id);
    if (!p) { send_text(FR_ERROR, id, "too many processes"); return; }
    p->container = s.container;

    struct stdio_pipes sp;
    int sv[2];
    if (make_stdio(&sp, s.terminal) < 0 || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
        snprintf(err, sizeof err, "stdio: %s", strerror(errno));
        goto fail;
    }
    pid_t pid, pidns_of = type == FR_EXEC ? init->pid : join_pids[J_PID];
    if (pidns_of) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/ns/pid", pidns_of);
        int nsfd = open(path, O_RDONLY | O_CLOEXEC);
        if (nsfd < 0 || setns(nsfd, CLONE_NEWPID) < 0) {
            snprintf(err, sizeof err, "join pid namespace: %s", strerror(errno));
            if (nsfd >= 0) close(nsfd);
            close_all(sv, 2);
            goto fail_pipes;
        }
        close(nsfd);
    }
    uint64_t flags = 0;
    if (type == FR_CREATE) {
        flags = CLONE_NEWNS | (s.userns ? CLONE_NEWUSER : 0);
        if (!join_pids[J_PID]) flags |= CLONE_NEWPID;
        if (!join_pids[J_IPC]) flags |= CLONE_NEWIPC;
        if (!join_pids[J_UTS]) flags |= CLONE_NEWUTS;
    }
    pid = clone_into_cgroup(s.container, flags);
    if (pidns_of && pid != 0 && setns(root_pidns, CLONE_NEWPID) < 0) die("return to the root pid namespace");
    if (pid == 0) {
        child_fds(&sp, sv[1]);
        /* An init's cgroup namespace is rooted at its cgroup: made here, as clone3 would root it at ours. */
        if (type == FR_CREATE && unshare(CLONE_NEWCGROUP) < 0) fail(3, "cgroup namespace: %s", strerror(errno));
        char mapped;
        if (s.userns) {
            if (read(3, &mapped, 1) != 1) _exit(127); /* until the agent has written its maps */
            /* Root of the new namespace (where the maps give it one): what it creates gets a mapped owner. */
            if (setresgid(0, 0, 0) == 0) setresuid(0, 0, 0);
        }
        if (type == FR_CREATE) {
            prepare_container(&s, join_pids, 3);
            char go;
            if (read(3, &go, 1) != 1) _exit(127);
        } else {
            prepare_exec(&s, init->pid, 3);
        }
        become_process(&s, 3);
    }
    close(sv[1]);
    close_all(sp.child, 3);
    if (pid < 0) {
        snprintf(err, sizeof err, "clone into the cgroup: %s", strerror(errno));
        close(sv[0]);
        goto fail_pipes;
    }
    p->pid = pid;
    p->sync = sv[0];
    if (s.userns && map_user_namespace(&s, pid, p->sync, err, sizeof err) < 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        goto fail_pipes;
    }
    p->is_init = type == FR_CREATE;
    p->terminal = s.terminal;
    int master = -1;
    int r = read_sync(p->sync, err, sizeof err, &master);
    if (r == 'K' && type == FR_EXEC) {
        r = read_sync(p->sync, err, sizeof err, NULL); /* EOF once it has exec'd */
        if (r == 0) { close(p->sync); p->sync = -1; p->started = 1; }
    }
    if (r == 'E' || (r == 0 && type == FR_CREATE)) {
        if (r == 0) snprintf(err, sizeof err, "process set-up failed");
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        if (master >= 0) close(master);
        goto fail_pipes;
    }
    if (s.terminal) {
        set_nonblock(master);
        p->out_fd[S_STDOUT] = master;
        p->in_fd = fcntl(master, F_DUPFD_CLOEXEC, 0);
    } else {
        p->in_fd = sp.parent[0];
        p->out_fd[S_STDOUT] = sp.parent[1];
        p->out_fd[S_STDERR] = sp.parent[2];
    }
    watch_output(p, S_STDOUT);
    watch_output(p, S_STDERR);
    send_frame(FR_OK, id, NULL, 0);
    return;
fail_pipes:
    close_all(sp.parent, 3);
    close_all(sp.child, 3);
fail:
    release(p);
    send_text(FR_ERROR, id, err);
}

static void start(uint32_t id)
{
    struct proc *p = find_proc(id);
    char err[1024];
    if (!p || !p->is_init || p->started || p->sync < 0) { send_text(FR_ERROR, id, "no created process to start"); return; }
    if (write(p->sync, "g", 1) != 1) { send_text(FR_ERROR, id, "process is gone"); return; }
    int r = read_sync(p->sync, err, sizeof err, NULL);
    close(p->sync);
    p->sync = -1;
    p->started = 1;
    if (r == 'E') send_text(FR_ERROR, id, err);
    else send_frame(FR_OK, id, NULL, 0);
}

static ino_t pidns_of(pid_t pid)
{
    char path[64];
    struct stat st;
    snprintf(path, sizeof path, "/proc/%d/ns/pid", pid);
    return stat(path, &st) == 0 ? st.st_ino : 0;
}

/* Calls fn for every process in the container's cgroup. */
static void for_each_container_pid(uint32_t container, void (*fn)(pid_t, void *), void *arg)
{
    char path[128];
    long pid;
    cgroup_path(path, sizeof path, container, "cgroup.procs");
    FILE *f = fopen(path, "re");
    while (f && fscanf(f, "%ld", &pid) == 1) fn((pid_t)pid, arg);
    if (f) fclose(f);
}

static void kill_one(pid_t pid, void *sig) { kill(pid, *(int *)sig); }

static void signal_proc(uint32_t id, const uint32_t *payload, uint32_t len)
{
    struct proc *p = find_proc(id);
    if (len < 8) { send_text(FR_ERROR, id, "bad signal frame"); return; }
    int sig = (int)payload[0];
    if (!p || p->exited) { send_text(FR_ERROR, id, "process is not running"); return; }
    if (payload[1]) for_each_container_pid(p->container, kill_one, &sig);
    if (kill(p->pid, sig) < 0 && errno != ESRCH) { send_text(FR_ERROR, id, strerror(errno)); return; }
    send_frame(FR_OK, id, NULL, 0);
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

static void count_one(pid_t pid, void *n) { (void)pid; ++*(long *)n; }

/* The first number in a cgroup file, or in the line of it that starts with key; 0 for "max" or none. */
static unsigned long long cgroup_number(uint32_t container, const char *file, const char *key)
{
    char path[128], line[256];
    unsigned long long value = 0;
    size_t n = key ? strlen(key) : 0;
    cgroup_path(path, sizeof path, container, file);
    FILE *f = fopen(path, "re");
    while (f && fgets(line, sizeof line, f)) {
        if (key && (strncmp(line, key, n) || line[n] != ' ')) continue;
        value = strtoull(line + (key ? n + 1 : 0), NULL, 10);
        break;
    }
    if (f) fclose(f);
    return value;
}

/* The VM's memory, and the container's CPU time, memory and processes from its cgroup. */
static void reply_stats(uint32_t container)
{
    char line[256], out[1024];
    long mem_total = 0, mem_avail = 0, pids = 0;
    FILE *f = fopen("/proc/meminfo", "re");
    while (f && fgets(line, sizeof line, f)) {
        sscanf(line, "MemTotal: %ld", &mem_total);
        sscanf(line, "MemAvailable: %ld", &mem_avail);
    }
    if (f) fclose(f);
    for_each_container_pid(container, count_one, &pids);
    snprintf(out, sizeof out,
             "memory_total %ld\nmemory_used %ld\ncpu_user_ns %llu\ncpu_system_ns %llu\npids %ld\n"
             "pids_limit %llu\ncgroup_memory %llu\ncgroup_memory_limit %llu\nmemory_max_events %llu\n"
             "oom_kills %llu\n",
             mem_total * 1024, (mem_total - mem_avail) * 1024,
             cgroup_number(container, "cpu.stat", "user_usec") * 1000,
             cgroup_number(container, "cpu.stat", "system_usec") * 1000, pids,
             cgroup_number(container, "pids.max", NULL), cgroup_number(container, "memory.current", NULL),
             cgroup_number(container, "memory.max", NULL), cgroup_number(container, "memory.events", "max"),
             cgroup_number(container, "memory.events", "oom_kill"));
    send_text(FR_REPLY, container, out);
}

/* Whatever of the container still runs is killed; its cgroup goes as soon as it is empty. */
static void remove_container(uint32_t container)
{
    char path[128];
    cgroup_path(path, sizeof path, container, "cgroup.kill");
    if (write_text(path, "1") < 0 && errno != ENOENT) { send_text(FR_ERROR, container, strerror(errno)); return; }
    for (int i = 0; i < MAX_PROCS; i++)
        if (!doomed[i] || doomed[i] == container) { doomed[i] = container; break; }
    remove_cgroups();
    send_frame(FR_OK, container, NULL, 0);
}

/* The kernel's log records, as the kernel prints them, to the serial console (our stderr). The kernel
 * itself prints little (quiet): console output costs boot time under TCG, so this waits to be asked. */
static void forward_kmsg(void)
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

/* UPDATE: new limits for a running container's cgroup, as "cgroup=file value" records. */
static void update_container(uint32_t container, char *payload, uint32_t len)
{
    char err[256];
    const char *records[MAX_LIST];
    int n = 0;
    for (char *p = payload; p < payload + len && n < MAX_LIST; p += strlen(p) + 1)
        if (!strncmp(p, "cgroup=", 7)) records[n++] = p + 7;
    if (!running_init(container)) send_text(FR_ERROR, container, "container is not running");
    else if (cgroup_limits(container, records, n, err, sizeof err) < 0) send_text(FR_ERROR, container, err);
    else send_frame(FR_OK, container, NULL, 0);
}

static void freeze_container(uint32_t container, const char *payload, uint32_t len)
{
    char path[128];
    uint32_t frozen = 0;
    if (len >= 4) memcpy(&frozen, payload, 4);
    cgroup_path(path, sizeof path, container, "cgroup.freeze");
    if (write_text(path, frozen ? "1" : "0") < 0) send_text(FR_ERROR, container, strerror(errno));
    else send_frame(FR_OK, container, NULL, 0);
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

static void mount_or_die(const char *src, const char *dst, const char *type, unsigned long flags, const char *data)
{
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, data) < 0) die(dst);
}

static int tracing;

/* With pyrunv.trace on the kernel command line: boot milestones, timed since the kernel started. */
static void trace(const char *what)
{
    struct timespec ts;
    if (!tracing) return;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    fprintf(stderr, "pyrunv-agent: [%ld.%06ld] %s\n", (long)ts.tv_sec, ts.tv_nsec / 1000, what);
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

static void handle_frame(const struct frame_header *h, char *payload)
{
    struct proc *p = find_proc(h->id);
    switch (h->type) {
    case FR_CREATE:
    case FR_EXEC: spawn(h->type, h->id, payload, h->len); break;
    case FR_START: start(h->id); break;
    case FR_SIGNAL: signal_proc(h->id, (const uint32_t *)payload, h->len); break;
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
    case FR_UPDATE: update_container(h->id, payload, h->len); break;
    case FR_KMSG: start_kmsg(h->id); break;
    case FR_FREEZE: freeze_container(h->id, payload, h->len); break;
    case FR_RESTORED: restored(h->id, payload, h->len); break;
    case FR_SHARE: mount_share(h->id); break;
    case FR_POWEROFF:
        sync();
        reboot(RB_AUTOBOOT);
        break;
    default: send_text(FR_ERROR, h->id, "unknown frame type");
    }
}

static void read_channel(void)
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
        handle_frame(&h, payload);
        free(payload);
    }
}

static int open_agent_port(void)
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
                if (events[i].events & (EPOLLIN | EPOLLHUP)) read_channel();
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
            }
        }
    }
}
