/* CREATE, EXEC and START: a process cloned into its container's namespaces and cgroup, its set-up in the
 * child (spawn.c) awaited, then its start. */
#define _GNU_SOURCE
#include "agent.h"
#include "protocol.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define SETUP_TIMEOUT_MS 30000

int root_pidns = -1;

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

/* Whether a mount record ("flags\tpropagation\t...") makes its mount shared. */
static int any_shared(const struct spec *s)
{
    for (int i = 0; i < s->nmounts; i++) {
        const char *propagation = strchr(s->mounts[i], '\t');
        if (propagation && strtoul(propagation + 1, NULL, 16) & MS_SHARED) return 1;
    }
    return 0;
}

/* Fork the process (a container's init into its namespaces, new or joined), wait for its set-up report. */
void spawn(uint32_t type, uint32_t id, char *payload, uint32_t len)
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
    if (type == FR_EXEC) {  /* as runc: an exec gets its container's seccomp filter */
        s.seccomp = init->seccomp;
        s.seccomp_len = init->seccomp_len;
        s.seccomp_flags = init->seccomp_flags;
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
    if (p->is_init && s.seccomp_len) {
        p->seccomp = malloc(s.seccomp_len);
        if (!p->seccomp) die("malloc");
        memcpy(p->seccomp, s.seccomp, s.seccomp_len);
        p->seccomp_len = s.seccomp_len;
        p->seccomp_flags = s.seccomp_flags;
    }
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
    if (p->is_init && any_shared(&s)) watch_mounts(p);
    send_frame(FR_OK, id, NULL, 0);
    return;
fail_pipes:
    close_all(sp.parent, 3);
    close_all(sp.child, 3);
fail:
    release(p);
    send_text(FR_ERROR, id, err);
}

void start(uint32_t id)
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
