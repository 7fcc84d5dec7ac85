#ifndef PYRUNV_AGENT_H
#define PYRUNV_AGENT_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

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
#endif
