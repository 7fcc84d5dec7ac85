#ifndef PYRUNV_AGENT_H
#define PYRUNV_AGENT_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "protocol.h"

#define MAX_LIST 256

/* A process as the host describes it: NUL-terminated "key=value" records (docs/protocol.md). */
struct spec {
    char *args[MAX_LIST + 1];
    int nargs;
    char *env[MAX_LIST + 1];
    int nenv;
    const char *cwd;
    uid_t uid;
    gid_t gid;
    gid_t groups[MAX_LIST];
    int ngroups;
    int umask;
    struct { int resource; uint64_t soft, hard; } rlimits[32];
    int nrlimits;
    uint64_t caps[5]; /* bounding, effective, permitted, inheritable, ambient */
    int have_caps;
    int no_new_privs;
    /* linux.seccomp compiled by the host: classic BPF, installed just before execve. An exec takes its
     * container's, kept with the container's init (struct proc). */
    const unsigned char *seccomp;
    size_t seccomp_len;
    unsigned seccomp_flags;
    int terminal;
    int oom_score_adj;
    int have_oom_score_adj;
    uint32_t container; /* exec: the container whose namespaces and cgroup it joins */
    /* container-only */
    uint32_t join[3];   /* the container whose pid, ipc, uts namespace it joins; 0: a new one */
    const char *devices[MAX_LIST]; /* "type major minor mode uid gid path [disk serial]" */
    int ndevices;
    const char *cgroup[MAX_LIST]; /* "file value": the container's cgroup limits */
    int ncgroup;
    int userns;         /* a user namespace of its own, with these mappings ("inside outside count") */
    const char *uidmap[MAX_LIST];
    int nuidmap;
    const char *gidmap[MAX_LIST];
    int ngidmap;
    const char *hostname;
    const char *root;
    int root_readonly;
    unsigned long root_propagation; /* linux.rootfsPropagation's MS_ flags; 0: private */
    char *mounts[MAX_LIST]; /* "flags\tpropagation\ttype\tsource\tdest\tdata" */
    int nmounts;
    const char *masked[MAX_LIST];
    int nmasked;
    const char *readonly[MAX_LIST];
    int nreadonly;
    const char *sysctls[MAX_LIST];
    int nsysctls;
};

enum joined { J_PID = 0, J_IPC = 1, J_UTS = 2 };

int spec_parse(struct spec *s, char *buf, size_t len, char *err, size_t errlen);

/* Set-up run in the child, before it waits for the start byte. On failure it writes a message to sync_fd and exits. */
void prepare_container(const struct spec *s, const pid_t join_pids[3], int sync_fd);
void prepare_exec(const struct spec *s, pid_t init_pid, int sync_fd);
/* Called in the child once started: credentials, then execve. Never returns. */
void become_process(const struct spec *s, int sync_fd);

/* NETWORK: the guest's NIC as the records say; -1 with a message in err on failure. */
int configure_network(char *records, size_t len, char *err, size_t errlen);

/* The container's cgroup in the guest: CGROUP_DIR/c<id of its init>. */
void cgroup_path(char *out, size_t len, uint32_t container, const char *file);
/* Writes text to a file (a cgroup's, /proc's): 0, or -1 with errno set. */
int write_text(const char *path, const char *text);
/* The entry of sysfs directory dir whose file reads want on its first line, into entry: 0, or -1. */
int find_entry(const char *dir, const char *file, const char *want, char *entry, size_t size);
/* Writes "file value" records into the container's cgroup; -1 with a message in err on failure. */
int cgroup_limits(uint32_t container, const char *const *records, int n, char *err, size_t errlen);
void fail(int sync_fd, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
int send_fd(int sock, int fd);

/* The agent's own parts, one file each, each calling only those after it: main.c (boot and the event loop),
 * frames.c (each frame to its handler), launch.c (CREATE, EXEC, START), process.c (the process table and the
 * processes' stdio), cgroup.c (a cgroup per container), channel.c (frames to and from the host, the console). */
#define MAX_PROCS 64

struct buf { char *data; size_t len, cap; };

struct proc {
    int used;
    uint32_t id;
    uint32_t container; /* the id of its container's init; its own id for an init */
    pid_t pid;
    int is_init, started, terminal;
    int is_conn;       /* a CONNECT: no process; in_fd and out_fd[S_STDOUT] are the socket */
    int sync;          /* to the child until it has exec'd */
    int in_fd;         /* stdin pipe (or a dup of the tty master) */
    int out_fd[3];     /* [S_STDOUT], [S_STDERR]: read ends, or the tty master */
    int deferred[3];   /* waits for more output until coalesce_until */
    int watching[3];
    uint32_t credit[3];
    struct buf in_pending;
    int in_eof;
    int exited, code, sig;
    int mounts_fd;     /* an init's with a shared mount: its /proc/PID/mountinfo, watched for changes */
    char *mounts_sent; /* what FR_MOUNTS said last */
    unsigned char *seccomp;   /* an init's: its container's filter, for its execs */
    size_t seccomp_len;
    unsigned seccomp_flags;
};

struct stdio_pipes { int child[3]; int parent[3]; };

/* What an epoll event is about: the role, and the slot in procs for a process's fds. */
enum role { R_CHAN = 0, R_SIGNAL = 1, R_OUT = 2, R_ERR = 3, R_IN = 4, R_KMSG = 5, R_MOUNTS = 6 };
#define TAG(slot, role) (((uint64_t)(slot) << 8) | (role))

/* frames.c */
void handle_frame(const struct frame_header *h, char *payload);
void forward_kmsg(void);

/* launch.c */
extern int root_pidns;
void spawn(uint32_t type, uint32_t id, char *payload, uint32_t len);
void start(uint32_t id);

/* process.c */
extern struct proc procs[MAX_PROCS];
extern long long coalesce_until; /* CLOCK_MONOTONIC ms; 0 while no output waits */
struct proc *find_proc(uint32_t id);
struct proc *running_init(uint32_t container);
struct proc *new_proc(uint32_t id);
int slot_of(struct proc *p);
void release(struct proc *p);
long long now_ms(void);
void set_nonblock(int fd);
int make_stdio(struct stdio_pipes *sp, int terminal);
void watch_output(struct proc *p, int s);
int defer_output(struct proc *p, int s, uint32_t events);
void pump_output(struct proc *p, int s);
void pump_deferred(void);
void pump_input(struct proc *p);
void reap(void);
void signal_proc(uint32_t id, const uint32_t *payload, uint32_t len);
void connect_port(uint32_t id, const char *payload, uint32_t len);
void watch_mounts(struct proc *init);
void report_mounts(struct proc *init);

/* cgroup.c */
#define CONTAINERS_CGROUP CGROUP_DIR "/containers" /* every container's cgroup is one of its children */
#define GUEST_RESERVE_MIB 16 /* what the guest's kernel and agent keep beyond the containers' reach */
void make_containers_cgroup(void);
void limit_containers(unsigned long long added);
void remove_cgroups(void);
void for_each_container_pid(uint32_t container, void (*fn)(pid_t, void *), void *arg);
/* Sends sig to every process in the container's cgroup. */
void signal_container(uint32_t container, int sig);
unsigned long long cgroup_number(uint32_t container, const char *file, const char *key);
void reply_stats(uint32_t container);
void remove_container(uint32_t container);
void update_container(uint32_t container, char *payload, uint32_t len);
int online_cpus(int n, char *err, size_t errlen);
void freeze_container(uint32_t container, const char *payload, uint32_t len);

/* memory.c */
void grow_memory(uint32_t id, const char *payload, uint32_t len);

/* channel.c */
extern int chan, epfd, tracing;
void die(const char *what) __attribute__((noreturn));
void trace(const char *what);
void buf_append(struct buf *b, const void *data, size_t len);
void buf_consume(struct buf *b, size_t n);
void epoll_set(int fd, uint64_t tag, uint32_t events, int *watching);
void flush_channel(void);
void send_frame(uint32_t type, uint32_t id, const void *payload, uint32_t len);
void send_text(uint32_t type, uint32_t id, const char *text);
void read_channel(void (*handle)(const struct frame_header *h, char *payload));
int open_agent_port(void);

#endif
