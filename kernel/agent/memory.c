/* Memory the host adds at run time: QEMU holds the VM's maximum from its boot, the kernel uses what mem=
 * allowed, and the rest is added here block by block through the probe file, where the firmware's map says
 * RAM is. A guest without ACPI has no other way to learn of new memory. */
#define _GNU_SOURCE
#include "agent.h"
#include "protocol.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MEMORY_DIR "/sys/devices/system/memory"

static unsigned long long added; /* bytes, since the boot */

static unsigned long long read_number(const char *path, int base)
{
    char text[32] = "";
    FILE *f = fopen(path, "re");
    if (f && !fgets(text, sizeof text, f)) text[0] = 0;
    if (f) fclose(f);
    return strtoull(text, NULL, base);
}

/* Adds and onlines the block at addr if the kernel does not have it yet: 1 if it did, 0 if it was there. */
static int add_block(unsigned long long addr, unsigned long long block, char *err, size_t errlen)
{
    char path[96], text[32];
    snprintf(path, sizeof path, MEMORY_DIR "/memory%llu/state", addr / block);
    if (access(path, F_OK) == 0) return 0;
    snprintf(text, sizeof text, "0x%llx", addr);
    if (write_text(MEMORY_DIR "/probe", text) < 0 || write_text(path, "online") < 0) {
        snprintf(err, errlen, "adding memory at %s: %s", text, strerror(errno));
        return -1;
    }
    return 1;
}

/* Adds memory until `wanted` bytes have been added since the boot: every RAM range of the firmware's map,
 * whole blocks only. */
static int add_memory(unsigned long long wanted, char *err, size_t errlen)
{
    unsigned long long block = read_number(MEMORY_DIR "/block_size_bytes", 16);
    char path[64], type[32];
    if (!block) { snprintf(err, errlen, "no memory blocks: the kernel cannot add memory"); return -1; }
    for (int n = 0; added < wanted; n++) {
        snprintf(path, sizeof path, "/sys/firmware/memmap/%d/type", n);
        FILE *f = fopen(path, "re");
        if (!f) {
            snprintf(err, errlen, "no more RAM to add: %llu MiB of %llu added", added >> 20, wanted >> 20);
            return -1;
        }
        int ram = fgets(type, sizeof type, f) && !strncmp(type, "System RAM", 10);
        fclose(f);
        if (!ram) continue;
        snprintf(path, sizeof path, "/sys/firmware/memmap/%d/start", n);
        unsigned long long start = read_number(path, 16);
        snprintf(path, sizeof path, "/sys/firmware/memmap/%d/end", n);
        unsigned long long end = read_number(path, 16) + 1;
        for (unsigned long long addr = (start + block - 1) / block * block; addr + block <= end && added < wanted;
             addr += block) {
            int got = add_block(addr, block, err, errlen);
            if (got < 0) return -1;
            if (got) added += block;
        }
    }
    limit_containers(added);
    return 0;
}

/* MEMORY: payload, the bytes the host wants added since the boot (decimal); the reply, those added. */
void grow_memory(uint32_t id, const char *payload, uint32_t len)
{
    char text[32], err[256];
    snprintf(text, sizeof text, "%.*s", (int)(len < 31 ? len : 31), payload);
    if (add_memory(strtoull(text, NULL, 10), err, sizeof err) < 0) { send_text(FR_ERROR, id, err); return; }
    snprintf(text, sizeof text, "%llu", added);
    send_frame(FR_REPLY, id, text, strlen(text));
}
