/* Host <-> agent framing over one virtio-serial port. See docs/protocol.md. */
#ifndef PYRUNV_PROTOCOL_H
#define PYRUNV_PROTOCOL_H
#include <stdint.h>

#define PROTOCOL_VERSION "pyrunv-agent/2"
#define AGENT_PORT_NAME "pyrunv.agent"
#define SHARE_TAG "pyrunv"
#define SHARE_DIR "/share"
#define CGROUP_DIR "/sys/fs/cgroup"

/* Every frame: little-endian header, then `len` bytes of payload. */
struct frame_header {
    uint32_t type;
    uint32_t id;
    uint32_t len;
};
#define MAX_PAYLOAD (1u << 20)
#define DATA_CHUNK (64u << 10)
#define WINDOW (256u << 10) /* initial credit of every stream, in bytes */

enum frame_type {
    /* host -> guest */
    FR_CREATE = 1,   /* payload: records; prepares a container's init process, which waits for START */
    FR_EXEC = 2,     /* payload: records; runs a process in a container's namespaces at once */
    FR_START = 3,
    FR_SIGNAL = 4,   /* payload: u32 signal, u32 all */
    FR_STDIN = 5,    /* payload: data; empty = EOF */
    FR_WINSIZE = 6,  /* payload: u16 rows, u16 cols */
    FR_CREDIT = 7,   /* both ways; payload: u32 stream, u32 bytes */
    FR_PS = 8,       /* id: a container's init */
    FR_STATS = 9,    /* id: a container's init */
    FR_POWEROFF = 10,
    FR_NETWORK = 11, /* payload: records (mac, mtu, addr, route); configures the guest's NIC */
    FR_REMOVE = 12,  /* id: a container's init; kills what is left of the container and frees it */
    FR_FREEZE = 13,  /* id: a container's init; payload: u32 1 (freeze) or 0 (thaw) */
    FR_UPDATE = 14,  /* id: a container's init; payload: records (cgroup); its cgroup's limits */
    FR_KMSG = 15,    /* the kernel log to the serial console, from its start, and from then on as it grows */
    FR_RESTORED = 16, /* payload: i64 seconds, u32 nanoseconds (the host's clock), then entropy: after a load */
    FR_SHARE = 17,   /* mounts the share, which the host plugs in after the boot (pyrunv.share=plugged) */
    FR_CONNECT = 18, /* payload: u32 port; a TCP connection to the guest's 127.0.0.1, relayed as a process's stdio */
    FR_MEMORY = 19,  /* payload: decimal bytes; memory added since the boot, at least (the reply: those added) */
    /* guest -> host */
    FR_READY = 64,   /* payload: version text */
    FR_OK = 65,
    FR_ERROR = 66,   /* payload: message */
    FR_STDOUT = 67,  /* payload: data; empty = EOF */
    FR_STDERR = 68,
    FR_EXIT = 69,    /* payload: i32 exit code (128+N for signal N), u32 signal, u32 OOM kills (a container's init) */
    FR_REPLY = 70,   /* payload: text answer to PS / STATS */
    FR_MOUNTS = 71,  /* id: a container's init; payload: its mountinfo, whenever it changed (shared mounts only) */
};

enum stream { S_STDIN = 0, S_STDOUT = 1, S_STDERR = 2 };

#endif
