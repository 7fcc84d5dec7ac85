/* What runs in a new container process between fork and execve: namespaces, rootfs, mounts, limits, credentials. */
#define _GNU_SOURCE
#include "agent.h"
#include "protocol.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include <grp.h>

static char resolved_path[PATH_MAX];

void fail(int sync_fd, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    msg[0] = 'E';
    va_start(ap, fmt);
    vsnprintf(msg + 1, sizeof msg - 1, fmt, ap);
    va_end(ap);
    if (write(sync_fd, msg, strlen(msg)) < 0) { /* nobody left to tell */ }
    _exit(127);
}

int send_fd(int sock, int fd)
{
    char byte = 'K';
    struct iovec iov = { .iov_base = &byte, .iov_len = 1 };
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (fd >= 0) {
        msg.msg_control = u.buf;
        msg.msg_controllen = sizeof u.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL) == 1 ? 0 : -1;
}

static long parse_num(const char *v, int base)
{
    return strtol(v, NULL, base);
}

static int nibble(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Lowercase hex, decoded in place (the record outlives the fork): the byte count, or -1. */
static ssize_t unhex(char *text)
{
    size_t n = strlen(text);
    if (n % 2) return -1;
    for (size_t i = 0; i < n / 2; i++) {
        int high = nibble(text[2 * i]), low = nibble(text[2 * i + 1]);
        if (high < 0 || low < 0) return -1;
        text[i] = (char)(high << 4 | low);
    }
    return (ssize_t)(n / 2);
}

int spec_parse(struct spec *s, char *buf, size_t len, char *err, size_t errlen)
{
    memset(s, 0, sizeof *s);
    s->cwd = "/";
    s->umask = 022;
    for (char *p = buf, *next; p < buf + len; p = next) {
        next = p + strnlen(p, buf + len - p) + 1;
        char *v = strchr(p, '=');
        if (!v || next > buf + len + 1) {
            snprintf(err, errlen, "malformed record");
            return -1;
        }
        *v++ = 0;
#define LIST(arr, n) do { if ((n) >= MAX_LIST) { snprintf(err, errlen, "too many %s records", p); return -1; } (arr)[(n)++] = v; } while (0)
        if (!strcmp(p, "arg")) LIST(s->args, s->nargs);
        else if (!strcmp(p, "env")) LIST(s->env, s->nenv);
        else if (!strcmp(p, "mount")) LIST(s->mounts, s->nmounts);
        else if (!strcmp(p, "masked")) LIST(s->masked, s->nmasked);
        else if (!strcmp(p, "readonly")) LIST(s->readonly, s->nreadonly);
        else if (!strcmp(p, "sysctl")) LIST(s->sysctls, s->nsysctls);
        else if (!strcmp(p, "cgroup")) LIST(s->cgroup, s->ncgroup);
        else if (!strcmp(p, "device")) LIST(s->devices, s->ndevices);
        else if (!strcmp(p, "uidmap")) LIST(s->uidmap, s->nuidmap);
        else if (!strcmp(p, "gidmap")) LIST(s->gidmap, s->ngidmap);
        else if (!strcmp(p, "userns")) s->userns = atoi(v);
        else if (!strcmp(p, "group")) {
            if (s->ngroups >= MAX_LIST) { snprintf(err, errlen, "too many groups"); return -1; }
            s->groups[s->ngroups++] = (gid_t)strtoul(v, NULL, 10);
        }
        else if (!strcmp(p, "cwd")) s->cwd = v;
        else if (!strcmp(p, "uid")) s->uid = (uid_t)strtoul(v, NULL, 10);
        else if (!strcmp(p, "gid")) s->gid = (gid_t)strtoul(v, NULL, 10);
        else if (!strcmp(p, "umask")) s->umask = (int)parse_num(v, 8);
        else if (!strcmp(p, "rlimit")) {
            if (s->nrlimits >= 32) { snprintf(err, errlen, "too many rlimits"); return -1; }
            int r = s->nrlimits++;
            unsigned long long soft, hard;
            if (sscanf(v, "%d %llu %llu", &s->rlimits[r].resource, &soft, &hard) != 3) {
                snprintf(err, errlen, "bad rlimit %s", v);
                return -1;
            }
            s->rlimits[r].soft = soft;
            s->rlimits[r].hard = hard;
        }
        else if (!strcmp(p, "caps")) {
            unsigned long long c[5];
            if (sscanf(v, "%llx %llx %llx %llx %llx", &c[0], &c[1], &c[2], &c[3], &c[4]) != 5) {
                snprintf(err, errlen, "bad caps %s", v);
                return -1;
            }
            for (int i = 0; i < 5; i++) s->caps[i] = c[i];
            s->have_caps = 1;
        }
        else if (!strcmp(p, "nnp")) s->no_new_privs = atoi(v);
        else if (!strcmp(p, "seccomp")) {
            ssize_t n = unhex(v);
            if (n <= 0 || n % 8) { snprintf(err, errlen, "bad seccomp record"); return -1; }
            s->seccomp = (const unsigned char *)v;
            s->seccomp_len = (size_t)n;
        }
        else if (!strcmp(p, "seccomp_flags")) s->seccomp_flags = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(p, "terminal")) s->terminal = atoi(v);
        else if (!strcmp(p, "oom_score_adj")) { s->oom_score_adj = atoi(v); s->have_oom_score_adj = 1; }
        else if (!strcmp(p, "hostname")) s->hostname = v;
        else if (!strcmp(p, "root")) s->root = v;
        else if (!strcmp(p, "root_readonly")) s->root_readonly = atoi(v);
        else if (!strcmp(p, "root_propagation")) s->root_propagation = strtoul(v, NULL, 16);
        else if (!strcmp(p, "container")) s->container = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(p, "join")) {
            static const char *kinds[] = {"pid", "ipc", "uts"};
            char kind[8];
            unsigned long id;
            int k = -1;
            if (sscanf(v, "%7s %lu", kind, &id) == 2)
                for (int i = 0; i < 3; i++) if (!strcmp(kind, kinds[i])) k = i;
            if (k < 0 || !id) { snprintf(err, errlen, "bad join %s", v); return -1; }
            s->join[k] = (uint32_t)id;
        }
        /* unknown keys are ignored so that a newer host can talk to an older agent */
#undef LIST
    }
    if (s->nargs == 0) {
        snprintf(err, errlen, "process has no args");
        return -1;
    }
    return 0;
}

static int mkdir_p(const char *path, mode_t mode)
{
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s", path) >= (int)sizeof tmp) return -1;
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(tmp, mode) < 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    if (mkdir(tmp, mode) < 0 && errno != EEXIST) return -1;
    return 0;
}

static int touch_p(const char *path)
{
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = 0;
        if (mkdir_p(dir, 0755) < 0) return -1;
    }
    int fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    if (fd < 0) return errno == EISDIR ? 0 : -1;
    close(fd);
    return 0;
}

/* The guest's numbers of the virtio-blk disk whose serial the host gave it. */
static int disk_numbers(const char *serial, unsigned *major, unsigned *minor)
{
    char disk[64], path[300];
    int found = -1;
    if (find_entry("/sys/block", "serial", serial, disk, sizeof disk) < 0) return -1;
    snprintf(path, sizeof path, "/sys/block/%s/dev", disk);
    FILE *f = fopen(path, "re");
    if (f) {
        if (fscanf(f, "%u:%u", major, minor) == 2) found = 0;
        fclose(f);
    }
    return found;
}

/* A node of linux.devices, with the spec's type, numbers, mode and owner; a block device of the host is the
 * virtio-blk disk that carries it, so the node gets that disk's numbers in the guest. */
static void make_device(const char *root, const char *record, int sync_fd)
{
    char type, path[1025], serial[64] = "", full[PATH_MAX + sizeof path];  /* paths: 1024 bytes at most */
    unsigned major, minor, mode, uid, gid;
    if (sscanf(record, "%c %u %u %o %u %u %1024s %63s", &type, &major, &minor, &mode, &uid, &gid, path, serial) < 7)
        fail(sync_fd, "bad device record %s", record);
    if (*serial && disk_numbers(serial, &major, &minor) < 0) fail(sync_fd, "device %s: no disk %s in the VM", path, serial);
    if (type == 'b' && !*serial) { /* numbers the host has no device for: a node, as runc makes, but never a VM's disk */
        char sys[64];
        snprintf(sys, sizeof sys, "/sys/dev/block/%u:%u", major, minor);
        if (access(sys, F_OK) == 0)
            fail(sync_fd, "device %s: %u:%u is a disk of the VM's, not the container's", path, major, minor);
    }
    snprintf(full, sizeof full, "%s%s", root, path);
    mode_t kind = type == 'b' ? S_IFBLK : type == 'p' ? S_IFIFO : S_IFCHR;
    mode_t old = umask(0);
    unlink(full);
    if (touch_p(full) < 0 || unlink(full) < 0 || mknod(full, kind | (mode & 07777), makedev(major, minor)) < 0
        || lchown(full, uid, gid) < 0)
        fail(sync_fd, "device %s: %s", path, strerror(errno));
    umask(old);
}

/* Removes `name` from a comma-separated option list; 1 if it was there. */
static int take_option(char *data, const char *name)
{
    size_t n = strlen(name);
    for (char *p = data; *p; ) {
        char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && !strncmp(p, name, n)) {
            memmove(p, end ? end + 1 : p + len, strlen(end ? end + 1 : p + len) + 1);
            if (!end && p > data) p[-1] = 0;  /* it was the last: drop the comma before it */
            return 1;
        }
        p += len + (end != NULL);
    }
    return 0;
}

/* Copies a directory's contents (files, directories, links, nodes; owners and modes) into another. */
static int copy_tree(const char *from, const char *to)
{
    DIR *d = opendir(from);
    struct dirent *e;
    int result = 0;
    if (!d) return errno == ENOENT ? 0 : -1;
    while (result == 0 && (e = readdir(d))) {
        char src[PATH_MAX], dst[PATH_MAX], link[PATH_MAX];
        struct stat st;
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(src, sizeof src, "%s/%s", from, e->d_name);
        snprintf(dst, sizeof dst, "%s/%s", to, e->d_name);
        if (lstat(src, &st) < 0) { result = -1; break; }
        if (S_ISDIR(st.st_mode)) {
            result = mkdir(dst, st.st_mode & 07777) < 0 ? -1 : copy_tree(src, dst);
        } else if (S_ISREG(st.st_mode)) {
            int in = open(src, O_RDONLY | O_CLOEXEC), out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, st.st_mode & 07777);
            char buf[65536];
            ssize_t n = 0;
            while (in >= 0 && out >= 0 && (n = read(in, buf, sizeof buf)) > 0)
                if (write(out, buf, (size_t)n) != n) { n = -1; break; }
            if (in < 0 || out < 0 || n < 0) result = -1;
            if (in >= 0) close(in);
            if (out >= 0) close(out);
        } else if (S_ISLNK(st.st_mode)) {
            ssize_t n = readlink(src, link, sizeof link - 1);
            if (n < 0) { result = -1; break; }
            link[n] = 0;
            result = symlink(link, dst);
        } else {
            result = mknod(dst, st.st_mode, st.st_rdev);
        }
        if (result == 0 && lchown(dst, st.st_uid, st.st_gid) < 0) result = -1;
        if (result == 0 && !S_ISLNK(st.st_mode)) chmod(dst, st.st_mode & 07777); /* past the umask */
    }
    closedir(d);
    return result;
}

/* A tmpfs over what the image has at dest, holding a copy of it (podman's --tmpfs; runc's tmpcopyup). */
static void mount_tmpfs_copy(const char *dest, unsigned long flags, const char *data, const char *shown, int sync_fd)
{
    char staging[] = "/run/tmpcopyup.XXXXXX";
    if (!mkdtemp(staging)) fail(sync_fd, "mount %s: tmpcopyup: %s", shown, strerror(errno));
    if (mount("tmpfs", staging, "tmpfs", flags, *data ? data : NULL) < 0)
        fail(sync_fd, "mount %s (tmpfs): %s", shown, strerror(errno));
    if (copy_tree(dest, staging) < 0) fail(sync_fd, "mount %s: tmpcopyup: %s", shown, strerror(errno));
    if (mount(staging, dest, NULL, MS_MOVE, NULL) < 0) fail(sync_fd, "mount %s: tmpcopyup: %s", shown, strerror(errno));
    rmdir(staging);
}

static void do_mount(const char *root, char *record, int sync_fd)
{
    char *field[6];
    char *p = record;
    for (int i = 0; i < 6; i++) {
        field[i] = p;
        p = i < 5 ? strchr(p, '\t') : NULL;
        if (i < 5) {
            if (!p) fail(sync_fd, "malformed mount record");
            *p++ = 0;
        }
    }
    unsigned long flags = strtoul(field[0], NULL, 16);
    unsigned long propagation = strtoul(field[1], NULL, 16);
    const char *type = field[2], *source = field[3];
    char *data = field[5];
    char dest[PATH_MAX];
    snprintf(dest, sizeof dest, "%s%s", root, field[4]);

    if (!strcmp(type, "bind")) {
        char src[PATH_MAX];
        struct stat st;
        snprintf(src, sizeof src, "%s/%s", SHARE_DIR, source);
        if (stat(src, &st) < 0) fail(sync_fd, "mount %s: source: %s", field[4], strerror(errno));
        if ((S_ISDIR(st.st_mode) ? mkdir_p(dest, 0755) : touch_p(dest)) < 0)
            fail(sync_fd, "mount %s: create mount point: %s", field[4], strerror(errno));
        if (mount(src, dest, NULL, MS_BIND | (flags & MS_REC), NULL) < 0)
            fail(sync_fd, "mount %s: bind: %s", field[4], strerror(errno));
        unsigned long extra = flags & ~(MS_BIND | MS_REC);
        if (extra && mount(NULL, dest, NULL, MS_REMOUNT | MS_BIND | extra, NULL) < 0)
            fail(sync_fd, "mount %s: remount: %s", field[4], strerror(errno));
    } else {
        if (mkdir_p(dest, 0755) < 0) fail(sync_fd, "mount %s: create mount point: %s", field[4], strerror(errno));
        if (!strcmp(type, "cgroup")) {
            /* The guest has one unified hierarchy; the VM is the container's. */
            if (mount("cgroup2", dest, "cgroup2", flags, NULL) < 0)
                fprintf(stderr, "agent: mount cgroup2 on %s: %s\n", field[4], strerror(errno));
            return;
        }
        if (!strcmp(type, "tmpfs") && take_option(data, "tmpcopyup")) {
            mount_tmpfs_copy(dest, flags, data, field[4], sync_fd);
            goto propagate;
        }
        int r = mount(source, dest, type, flags, *data ? data : NULL);
        /* sysfs needs a network namespace of the user namespace's own; a VM's containers share the
         * guest's, so a user namespace gets the guest's sysfs, bound, as runc does without a netns. */
        if (r < 0 && errno == EPERM && !strcmp(type, "sysfs"))
            r = mount("/sys", dest, NULL, MS_BIND | MS_REC, NULL) < 0 ? -1
                : mount(NULL, dest, NULL, MS_REMOUNT | MS_BIND | (flags & ~MS_REC), NULL);
        if (r < 0) fail(sync_fd, "mount %s (%s): %s", field[4], type, strerror(errno));
    }
propagate:
    if (propagation && mount(NULL, dest, NULL, propagation, NULL) < 0)
        fail(sync_fd, "mount %s: propagation: %s", field[4], strerror(errno));
}

/* The devices runc puts in a /dev tmpfs. In a user namespace mknod is refused: the guest's own nodes
 * are bound instead, as runc does. Made under root before the pivot, while the guest's /dev is there. */
static void make_default_devices(const char *root, int userns, int sync_fd)
{
    static const struct { const char *name; int major, minor; } devs[] = {
        {"/dev/null", 1, 3}, {"/dev/zero", 1, 5}, {"/dev/full", 1, 7},
        {"/dev/random", 1, 8}, {"/dev/urandom", 1, 9}, {"/dev/tty", 5, 0},
    };
    static const char *links[][2] = {
        {"/proc/self/fd", "/dev/fd"}, {"/proc/self/fd/0", "/dev/stdin"},
        {"/proc/self/fd/1", "/dev/stdout"}, {"/proc/self/fd/2", "/dev/stderr"},
        {"pts/ptmx", "/dev/ptmx"},
    };
    char path[PATH_MAX];
    mode_t old = umask(0);
    for (size_t i = 0; i < sizeof devs / sizeof devs[0]; i++) {
        snprintf(path, sizeof path, "%s%s", root, devs[i].name);
        unlink(path);
        if (userns) {
            if (touch_p(path) < 0 || mount(devs[i].name, path, NULL, MS_BIND, NULL) < 0)
                fail(sync_fd, "bind %s: %s", devs[i].name, strerror(errno));
        } else if (mknod(path, S_IFCHR | 0666, makedev(devs[i].major, devs[i].minor)) < 0) {
            fail(sync_fd, "mknod %s: %s", devs[i].name, strerror(errno));
        }
    }
    for (size_t i = 0; i < sizeof links / sizeof links[0]; i++) {
        snprintf(path, sizeof path, "%s%s", root, links[i][1]);
        if (!strcmp(links[i][1], "/dev/ptmx")) unlink(path);
        if (symlink(links[i][0], path) < 0 && errno != EEXIST)
            fail(sync_fd, "symlink %s: %s", links[i][1], strerror(errno));
    }
    umask(old);
}

static void mask_path(const char *path, int sync_fd)
{
    struct stat st;
    if (stat(path, &st) < 0) return;
    int r = S_ISDIR(st.st_mode) ? mount("tmpfs", path, "tmpfs", MS_RDONLY, "size=0")
                                : mount("/dev/null", path, NULL, MS_BIND, NULL);
    if (r < 0 && errno != ENOENT) fail(sync_fd, "mask %s: %s", path, strerror(errno));
}

static void readonly_path(const char *path, int sync_fd)
{
    if (mount(path, path, NULL, MS_BIND | MS_REC, NULL) < 0) {
        if (errno == ENOENT) return;
        fail(sync_fd, "readonly %s: %s", path, strerror(errno));
    }
    if (mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        fail(sync_fd, "readonly %s: %s", path, strerror(errno));
}

int write_text(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    close(fd); /* leaves write's errno: a successful close does not touch it */
    return n < 0 ? -1 : 0;
}

int find_entry(const char *dir, const char *file, const char *want, char *entry, size_t size)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int found = -1;
    while (d && found < 0 && (e = readdir(d))) {
        char path[300], text[64] = "";
        snprintf(path, sizeof path, "%s/%s/%s", dir, e->d_name, file);
        FILE *f = fopen(path, "re");
        if (!f) continue;
        if (fgets(text, sizeof text, f)) text[strcspn(text, "\n")] = 0;
        fclose(f);
        if (!strcmp(text, want) && (size_t)snprintf(entry, size, "%s", e->d_name) < size) found = 0;
    }
    if (d) closedir(d);
    return found;
}

static void write_file(const char *path, const char *value, int sync_fd)
{
    if (write_text(path, value) < 0) fail(sync_fd, "write %s: %s", path, strerror(errno));
}

static void apply_sysctl(const char *kv, int sync_fd)
{
    char path[PATH_MAX] = "/proc/sys/";
    const char *eq = strchr(kv, '=');
    if (!eq) fail(sync_fd, "bad sysctl %s", kv);
    size_t n = strlen(path);
    for (const char *k = kv; k < eq && n < sizeof path - 1; k++) path[n++] = *k == '.' ? '/' : *k;
    path[n] = 0;
    write_file(path, eq + 1, sync_fd);
}

static const char *getenv_from(const struct spec *s, const char *name)
{
    size_t n = strlen(name);
    for (int i = 0; i < s->nenv; i++)
        if (!strncmp(s->env[i], name, n) && s->env[i][n] == '=') return s->env[i] + n + 1;
    return NULL;
}

static int is_executable(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0;
}

/* Like runc: resolve the executable in the container's PATH before start, so that create reports a missing one. */
static void resolve_executable(const struct spec *s, int sync_fd)
{
    const char *name = s->args[0];
    if (strchr(name, '/')) {
        if (!is_executable(name)) fail(sync_fd, "exec: \"%s\": %s", name, strerror(errno ? errno : ENOENT));
        snprintf(resolved_path, sizeof resolved_path, "%s", name);
        return;
    }
    const char *path = getenv_from(s, "PATH");
    if (!path) path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    while (*path) {
        size_t len = strcspn(path, ":");
        snprintf(resolved_path, sizeof resolved_path, "%.*s/%s", (int)len, path, name);
        if (len && is_executable(resolved_path)) return;
        path += len + (path[len] == ':');
    }
    fail(sync_fd, "exec: \"%s\": executable file not found in $PATH", name);
}

/* A tty is allocated from the container's own devpts, as runc does, so that `tty` names it. */
static void open_terminal(int sync_fd)
{
    int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0)
        fail(sync_fd, "open pty: %s", strerror(errno));
    char *name = ptsname(master);
    int slave = name ? open(name, O_RDWR | O_NOCTTY) : -1;
    if (slave < 0) fail(sync_fd, "open pty slave: %s", strerror(errno));
    if (ioctl(slave, TIOCSCTTY, 0) < 0) fail(sync_fd, "set controlling tty: %s", strerror(errno));
    for (int i = 0; i < 3; i++) dup2(slave, i);
    if (slave > 2) close(slave);
    if (send_fd(sync_fd, master) < 0) fail(sync_fd, "send pty: %s", strerror(errno));
    close(master);
}

/* Through the guest's own /proc, before entering the container's root, which may have no /proc
 * (runc too writes it from outside the container). */
static void set_oom_score_adj(const struct spec *s, int sync_fd)
{
    if (s->have_oom_score_adj) {
        char v[16];
        snprintf(v, sizeof v, "%d", s->oom_score_adj);
        write_file("/proc/self/oom_score_adj", v, sync_fd);
    }
}

static void common_setup(const struct spec *s, int sync_fd)
{
    for (int i = 0; i < s->nrlimits; i++) {
        struct rlimit rl = { s->rlimits[i].soft, s->rlimits[i].hard };
        if (setrlimit(s->rlimits[i].resource, &rl) < 0)
            fail(sync_fd, "setrlimit %d: %s", s->rlimits[i].resource, strerror(errno));
    }
    umask(s->umask);
    if (mkdir_p(s->cwd, 0755) < 0 || chdir(s->cwd) < 0) fail(sync_fd, "chdir %s: %s", s->cwd, strerror(errno));
    resolve_executable(s, sync_fd);
    if (s->terminal) open_terminal(sync_fd);
    else if (send_fd(sync_fd, -1) < 0) _exit(127);
}

/* The namespaces of another container's init (a pod's shared IPC and UTS), joined before anything else. */
static void join_namespaces(const pid_t join_pids[3], int sync_fd)
{
    static const char *kinds[] = {"pid", "ipc", "uts"};
    for (int k = J_IPC; k <= J_UTS; k++) {
        if (!join_pids[k]) continue;
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/ns/%s", join_pids[k], kinds[k]);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || setns(fd, 0) < 0) fail(sync_fd, "join %s namespace: %s", kinds[k], strerror(errno));
        close(fd);
    }
}

void prepare_container(const struct spec *s, const pid_t join_pids[3], int sync_fd)
{
    char root[PATH_MAX];
    if (!s->root) fail(sync_fd, "no root");
    snprintf(root, sizeof root, "%s/%s", SHARE_DIR, s->root);
    join_namespaces(join_pids, sync_fd);
    if (!s->userns) set_oom_score_adj(s, sync_fd); /* else the agent wrote it: lowering it needs its privilege */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) fail(sync_fd, "make / private: %s", strerror(errno));
    if (mount(root, root, NULL, MS_BIND | MS_REC, NULL) < 0) fail(sync_fd, "bind rootfs: %s", strerror(errno));
    int dev_is_tmpfs = 0;
    for (int i = 0; i < s->nmounts; i++) {
        if (strstr(s->mounts[i], "\ttmpfs\t") && strstr(s->mounts[i], "\t/dev\t")) dev_is_tmpfs = 1;
        do_mount(root, s->mounts[i], sync_fd);
    }
    /* In a pod's shared UTS namespace the sandbox has set the pod's hostname. */
    if (s->hostname && !join_pids[J_UTS] && sethostname(s->hostname, strlen(s->hostname)) < 0)
        fail(sync_fd, "sethostname: %s", strerror(errno));
    if (dev_is_tmpfs) make_default_devices(root, s->userns, sync_fd);
    for (int i = 0; i < s->ndevices; i++) make_device(root, s->devices[i], sync_fd);
    if (chdir(root) < 0 || syscall(SYS_pivot_root, ".", ".") < 0 || umount2(".", MNT_DETACH) < 0 || chdir("/") < 0)
        fail(sync_fd, "pivot_root: %s", strerror(errno));
    /* sysctls go in before readonlyPaths make /proc/sys read-only, as runc does it */
    for (int i = 0; i < s->nsysctls; i++) apply_sysctl(s->sysctls[i], sync_fd);
    for (int i = 0; i < s->nmasked; i++) mask_path(s->masked[i], sync_fd);
    for (int i = 0; i < s->nreadonly; i++) readonly_path(s->readonly[i], sync_fd);
    if (s->root_propagation && mount(NULL, "/", NULL, s->root_propagation, NULL) < 0)
        fail(sync_fd, "rootfsPropagation: %s", strerror(errno));
    if (s->root_readonly && mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) < 0)
        fail(sync_fd, "read-only root: %s", strerror(errno));
    common_setup(s, sync_fd);
}

void prepare_exec(const struct spec *s, pid_t init_pid, int sync_fd)
{
    static const char *kinds[] = {"ipc", "uts", "cgroup", "mnt"};
    int fds[4];
    set_oom_score_adj(s, sync_fd);
    /* The container's user namespace first: the others belong to it. */
    char path[64];
    struct stat own, theirs;
    snprintf(path, sizeof path, "/proc/%d/ns/user", init_pid);
    if (stat(path, &theirs) == 0 && stat("/proc/self/ns/user", &own) == 0 && own.st_ino != theirs.st_ino) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || setns(fd, CLONE_NEWUSER) < 0) fail(sync_fd, "setns user: %s", strerror(errno));
        close(fd);
    }
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "/proc/%d/ns/%s", init_pid, kinds[i]);
        fds[i] = open(path, O_RDONLY | O_CLOEXEC);
        if (fds[i] < 0) fail(sync_fd, "open %s: %s", path, strerror(errno));
    }
    for (int i = 0; i < 4; i++)
        if (setns(fds[i], 0) < 0) fail(sync_fd, "setns %s: %s", kinds[i], strerror(errno));
    for (int i = 0; i < 4; i++) close(fds[i]);
    common_setup(s, sync_fd);
}

static void set_capabilities(const struct spec *s, int sync_fd)
{
    struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2];
    for (int i = 0; i < 2; i++) {
        data[i].effective = (uint32_t)(s->caps[1] >> (32 * i));
        data[i].permitted = (uint32_t)(s->caps[2] >> (32 * i));
        data[i].inheritable = (uint32_t)(s->caps[3] >> (32 * i));
    }
    if (syscall(SYS_capset, &hdr, data) < 0) fail(sync_fd, "capset: %s", strerror(errno));
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    for (int c = 0; c < 64; c++)
        if (s->caps[4] & (1ULL << c)) prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c, 0, 0);
}

/* The container's seccomp filter; what the process does after this is filtered, its execve included. */
static void install_seccomp(const struct spec *s, int sync_fd)
{
    struct sock_fprog prog = { .len = (unsigned short)(s->seccomp_len / 8), .filter = (struct sock_filter *)s->seccomp };
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, s->seccomp_flags, &prog) < 0)
        fail(sync_fd, "seccomp: %s", strerror(errno));
}

void become_process(const struct spec *s, int sync_fd)
{
    /* As runc: without no_new_privs, installing a filter needs CAP_SYS_ADMIN, so it comes before the
     * credentials change; with it, as late as possible, so that the filter sees the least of the set-up. */
    if (s->seccomp && !s->no_new_privs) install_seccomp(s, sync_fd);
    if (s->have_caps) {
        for (int c = 0; c < 64; c++)
            if (!(s->caps[0] & (1ULL << c)) && prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0 && errno != EINVAL)
                fail(sync_fd, "drop bounding capability %d: %s", c, strerror(errno));
        prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0);
    }
    if (setgroups(s->ngroups, s->groups) < 0) fail(sync_fd, "setgroups: %s", strerror(errno));
    if (setresgid(s->gid, s->gid, s->gid) < 0) fail(sync_fd, "setgid %u: %s", s->gid, strerror(errno));
    if (setresuid(s->uid, s->uid, s->uid) < 0) fail(sync_fd, "setuid %u: %s", s->uid, strerror(errno));
    if (s->have_caps) set_capabilities(s, sync_fd);
    if (s->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        fail(sync_fd, "no_new_privs: %s", strerror(errno));
    if (s->seccomp && s->no_new_privs) install_seccomp(s, sync_fd);
    execve(resolved_path, s->args, s->env);
    fail(sync_fd, "exec %s: %s", resolved_path, strerror(errno));
}
