/* A cgroup per container in the guest: its limits, statistics, freezing and removal. */
#define _GNU_SOURCE
#include "agent.h"
#include "protocol.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <unistd.h>

/* The containers' parent cgroup, limited to the VM's memory but the guest's reserve: a container with no
 * limit of its own that fills the VM meets this cgroup's OOM killer at once, where the whole guest's
 * reclaim could spin for minutes first (under TCG). It sees its own memory.max ("max") as before. */
static unsigned long long booted_ram;

void make_containers_cgroup(void)
{
    struct sysinfo si;
    mkdir(CONTAINERS_CGROUP, 0755);
    write_text(CONTAINERS_CGROUP "/cgroup.subtree_control", "+memory +pids +cpu");
    if (sysinfo(&si) < 0) return;
    booted_ram = (unsigned long long)si.totalram * si.mem_unit;
    limit_containers(0);
}

/* The parent's limit for the RAM the guest booted with and `added` since; the balloon's share is not
 * counted out: a container's own limit keeps it within what the host gives. */
void limit_containers(unsigned long long added)
{
    char limit[32];
    unsigned long long total = booted_ram + added, reserve = GUEST_RESERVE_MIB << 20;
    if (total <= 2 * reserve) return;
    snprintf(limit, sizeof limit, "%llu", total - reserve);
    write_text(CONTAINERS_CGROUP "/memory.max", limit);
}

/* Containers removed while some of their processes were still exiting: their cgroups go once empty. */
static uint32_t doomed[MAX_PROCS];

void remove_cgroups(void)
{
    for (int i = 0; i < MAX_PROCS; i++) {
        char path[128];
        if (!doomed[i]) continue;
        cgroup_path(path, sizeof path, doomed[i], "");
        if (rmdir(path) == 0 || errno == ENOENT) doomed[i] = 0;
    }
}

/* Calls fn for every process in the container's cgroup. */
void for_each_container_pid(uint32_t container, void (*fn)(pid_t, void *), void *arg)
{
    char path[128];
    long pid;
    cgroup_path(path, sizeof path, container, "cgroup.procs");
    FILE *f = fopen(path, "re");
    while (f && fscanf(f, "%ld", &pid) == 1) fn((pid_t)pid, arg);
    if (f) fclose(f);
}

static void count_one(pid_t pid, void *n) { (void)pid; ++*(long *)n; }

static void kill_one(pid_t pid, void *sig) { kill(pid, *(int *)sig); }

/* Every process of the container, and any it forks meanwhile, SIGKILLed by the kernel: 0, or -1 with errno. */
static int kill_cgroup(uint32_t container)
{
    char path[128];
    cgroup_path(path, sizeof path, container, "cgroup.kill");
    return write_text(path, "1");
}

/* SIGKILL goes through cgroup.kill: a process forked while the list is read would escape the list. */
void signal_container(uint32_t container, int sig)
{
    if (sig != SIGKILL || kill_cgroup(container) < 0) for_each_container_pid(container, kill_one, &sig);
}

/* The first number in a cgroup file, or in the line of it that starts with key; 0 for "max" or none. */
unsigned long long cgroup_number(uint32_t container, const char *file, const char *key)
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
void reply_stats(uint32_t container)
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
void remove_container(uint32_t container)
{
    if (kill_cgroup(container) < 0 && errno != ENOENT) { send_text(FR_ERROR, container, strerror(errno)); return; }
    for (int i = 0; i < MAX_PROCS; i++)
        if (!doomed[i] || doomed[i] == container) { doomed[i] = container; break; }
    remove_cgroups();
    send_frame(FR_OK, container, NULL, 0);
}

/* UPDATE: new limits for a container's cgroup, as "cgroup=file value" records. */
void update_container(uint32_t container, char *payload, uint32_t len)
{
    char err[256];
    const char *records[MAX_LIST];
    int n = 0, vcpus = 0;
    for (char *p = payload; p < payload + len && n < MAX_LIST; p += strlen(p) + 1) {
        if (!strncmp(p, "cgroup=", 7)) records[n++] = p + 7;
        if (!strncmp(p, "vcpus=", 6)) vcpus = atoi(p + 6);
    }
    if ((vcpus && online_cpus(vcpus, err, sizeof err) < 0) || cgroup_limits(container, records, n, err, sizeof err) < 0)
        send_text(FR_ERROR, container, err);
    else send_frame(FR_OK, container, NULL, 0);
}

/* The guest's first n CPUs online, the rest of those present offline (the kernel moves their tasks). The
 * VM has them all from its boot (maxcpus= kept the others offline): a guest without ACPI cannot be given
 * a CPU later. */
int online_cpus(int n, char *err, size_t errlen)
{
    char path[64], now[4];
    for (int cpu = 1;; cpu++) {
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/online", cpu);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return 0;
        ssize_t got = read(fd, now, sizeof now);
        close(fd);
        const char *want = cpu < n ? "1" : "0";
        if (got > 0 && now[0] == want[0]) continue;
        if (write_text(path, want) < 0) {
            snprintf(err, errlen, "cpu%d online=%s: %s", cpu, want, strerror(errno));
            return -1;
        }
    }
}

void freeze_container(uint32_t container, const char *payload, uint32_t len)
{
    char path[128];
    uint32_t frozen = 0;
    if (len >= 4) memcpy(&frozen, payload, 4);
    cgroup_path(path, sizeof path, container, "cgroup.freeze");
    if (write_text(path, frozen ? "1" : "0") < 0) send_text(FR_ERROR, container, strerror(errno));
    else send_frame(FR_OK, container, NULL, 0);
}

void cgroup_path(char *out, size_t len, uint32_t container, const char *file)
{
    snprintf(out, len, CONTAINERS_CGROUP "/c%u%s%s", container, *file ? "/" : "", file);
}

int cgroup_limits(uint32_t container, const char *const *records, int n, char *err, size_t errlen)
{
    for (int i = 0; i < n; i++) {
        char file[64], path[160];
        const char *value = strchr(records[i], ' ');
        size_t len = value ? (size_t)(value - records[i]) : 0;
        if (!len || len >= sizeof file || memchr(records[i], '/', len)) {
            snprintf(err, errlen, "bad cgroup record %s", records[i]);
            return -1;
        }
        memcpy(file, records[i], len);
        file[len] = 0;
        cgroup_path(path, sizeof path, container, file);
        if (write_text(path, value + 1) < 0) {
            snprintf(err, errlen, "cgroup %s %s: %s", file, value + 1, strerror(errno));
            return -1;
        }
    }
    return 0;
}
