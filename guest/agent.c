/*
 * shmguard guest agent: drives QEMU's ivshmem-doorbell device (PCI 1af4:1110) from user space
 * through vfio-pci, prints every message the host rings in, and answers in the reply area.
 *
 * Region layout (shmguard/layout.py): offset 0 holds the host's NUL-terminated message; the last
 * REPLY_SIZE bytes are the reply area where this agent writes "ready <id>" once its MSI-X vectors
 * are live (then rings the host on READY_VECTOR) and "ack <n> <len> <crc32>" after each message
 * (then rings ACK_VECTOR). The host's peer id comes from the kernel parameter shmguard.host=<id>.
 *
 * With shmguard.guests=N (N >= 2) and shmguard.slot=K it is one of several guests, each with a slot at the
 * end of the region (layout.py computes the same offsets): told by the host to send a text to another guest,
 * it writes into that guest's inbox and rings it directly; a guest that receives prints the message and acks
 * to the sender directly; the sender reports the round trip to the host. See serve_exchange().
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/vfio.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define IVSHMEM_VENDOR 0x1af4
#define IVSHMEM_DEVICE 0x1110
#define REG_IVPOSITION 0x08
#define REG_DOORBELL 0x0c
#define PCI_COMMAND 0x04
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define REPLY_SIZE 256
#define READY_VECTOR 0
#define ACK_VECTOR 1
#define HOST_PARAM "shmguard.host="
#define NO_HOST (-1L)

struct ivshmem {
    int device;                 /* vfio device fd */
    uint64_t bar0_offset;       /* registers, accessed with pread/pwrite on the device fd */
    uint64_t config_offset;     /* PCI config space, same */
    volatile uint8_t *mem;      /* BAR2: the shared region */
    size_t size;
    uint32_t own_id;
    int *eventfds;              /* one per MSI-X vector */
    unsigned vectors;
};

/* One write per line so that lines never interleave with other console output. */
static void emit(const char *line, size_t len)
{
    while (len > 0) {
        ssize_t n = write(STDOUT_FILENO, line, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        line += n;
        len -= (size_t)n;
    }
}

static void say(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    emit(line, (size_t)n);
}

/* A failed agent keeps the VM up so that its console stays readable. */
static void __attribute__((noreturn)) fail(const char *what, int err)
{
    if (err)
        say("shmguard-guest: error: %s: %s", what, strerror(err));
    else
        say("shmguard-guest: error: %s", what);
    for (;;)
        pause();
}

static uint32_t crc32_of(const uint8_t *data, size_t len)
{
    static uint32_t table[256];
    if (!table[1]) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++)
                c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    }
    uint32_t crc = 0xffffffffu;
    for (size_t i = 0; i < len; i++)
        crc = table[(crc ^ data[i]) & 0xff] ^ (crc >> 8);
    return crc ^ 0xffffffffu;
}

static unsigned long read_hex_file(const char *dir, const char *name)
{
    char path[PATH_MAX], text[32] = "";
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    if (!fgets(text, sizeof text, f))
        text[0] = 0;
    fclose(f);
    return strtoul(text, NULL, 16);
}

/* Fills bdf with the first ivshmem device's PCI address; returns 0 when there is none. */
static int find_device(char *bdf, size_t bdf_size)
{
    DIR *dir = opendir("/sys/bus/pci/devices");
    if (!dir)
        fail("cannot list /sys/bus/pci/devices", errno);
    struct dirent *entry;
    int found = 0;
    while (!found && (entry = readdir(dir))) {
        char path[PATH_MAX];
        if (entry->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s", entry->d_name);
        if (read_hex_file(path, "vendor") == IVSHMEM_VENDOR && read_hex_file(path, "device") == IVSHMEM_DEVICE) {
            snprintf(bdf, bdf_size, "%s", entry->d_name);
            found = 1;
        }
    }
    closedir(dir);
    return found;
}

static int open_group(const char *bdf)
{
    char link[PATH_MAX], target[256], path[PATH_MAX];
    snprintf(link, sizeof link, "/sys/bus/pci/devices/%s/iommu_group", bdf);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0)
        fail("device has no IOMMU group (is intel_iommu=on and -device intel-iommu given?)", errno);
    target[n] = 0;
    const char *group = strrchr(target, '/');
    snprintf(path, sizeof path, "/dev/vfio/%s", group ? group + 1 : target);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        fail("cannot open the VFIO group (is the device bound to vfio-pci?)", errno);
    return fd;
}

static int open_device(const char *bdf)
{
    int container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
    if (container < 0)
        fail("cannot open /dev/vfio/vfio", errno);
    if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION)
        fail("unknown VFIO API version", 0);
    if (!ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU))
        fail("VFIO type1 IOMMU not supported", 0);
    int group = open_group(bdf);
    struct vfio_group_status status = {.argsz = sizeof status};
    if (ioctl(group, VFIO_GROUP_GET_STATUS, &status) < 0)
        fail("VFIO_GROUP_GET_STATUS", errno);
    if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE))
        fail("VFIO group not viable (another device of the group is bound to a driver)", 0);
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) < 0)
        fail("VFIO_GROUP_SET_CONTAINER", errno);
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU) < 0)
        fail("VFIO_SET_IOMMU (is vfio_iommu_type1.allow_unsafe_interrupts=1 set?)", errno);
    int device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (device < 0)
        fail("VFIO_GROUP_GET_DEVICE_FD", errno);
    return device;
}

static struct vfio_region_info region_info(int device, unsigned index)
{
    struct vfio_region_info info = {.argsz = sizeof info, .index = index};
    if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &info) < 0)
        fail("VFIO_DEVICE_GET_REGION_INFO", errno);
    return info;
}

static void pread_exact(int fd, void *buf, size_t len, uint64_t offset, const char *what)
{
    if (pread(fd, buf, len, (off_t)offset) != (ssize_t)len)
        fail(what, errno);
}

static void pwrite_exact(int fd, const void *buf, size_t len, uint64_t offset, const char *what)
{
    if (pwrite(fd, buf, len, (off_t)offset) != (ssize_t)len)
        fail(what, errno);
}

/* MSI-X messages are memory writes by the device: without bus mastering none arrive. */
static void enable_bus_master(struct ivshmem *dev)
{
    uint16_t command;
    pread_exact(dev->device, &command, sizeof command, dev->config_offset + PCI_COMMAND, "read PCI command");
    command |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    pwrite_exact(dev->device, &command, sizeof command, dev->config_offset + PCI_COMMAND, "write PCI command");
}

static void map_shared_memory(struct ivshmem *dev)
{
    struct vfio_region_info bar2 = region_info(dev->device, VFIO_PCI_BAR2_REGION_INDEX);
    if (bar2.size < 2 * REPLY_SIZE)
        fail("shared memory BAR2 is missing or too small", 0);
    if (!(bar2.flags & VFIO_REGION_INFO_FLAG_MMAP))
        fail("BAR2 cannot be mapped", 0);
    void *mem = mmap(NULL, bar2.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev->device, (off_t)bar2.offset);
    if (mem == MAP_FAILED)
        fail("mmap BAR2", errno);
    dev->mem = mem;
    dev->size = bar2.size;
}

/* Routes every MSI-X vector to its own eventfd. */
static void route_vectors(struct ivshmem *dev)
{
    struct vfio_irq_info irq = {.argsz = sizeof irq, .index = VFIO_PCI_MSIX_IRQ_INDEX};
    if (ioctl(dev->device, VFIO_DEVICE_GET_IRQ_INFO, &irq) < 0)
        fail("VFIO_DEVICE_GET_IRQ_INFO", errno);
    if (irq.count == 0)
        fail("device has no MSI-X vectors", 0);
    dev->vectors = irq.count;
    dev->eventfds = calloc(irq.count, sizeof(int));
    size_t set_size = sizeof(struct vfio_irq_set) + irq.count * sizeof(int32_t);
    struct vfio_irq_set *set = calloc(1, set_size);
    if (!dev->eventfds || !set)
        fail("out of memory", 0);
    for (unsigned v = 0; v < irq.count; v++) {
        dev->eventfds[v] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (dev->eventfds[v] < 0)
            fail("eventfd", errno);
    }
    set->argsz = (uint32_t)set_size;
    set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    set->index = VFIO_PCI_MSIX_IRQ_INDEX;
    set->start = 0;
    set->count = irq.count;
    memcpy(set->data, dev->eventfds, irq.count * sizeof(int32_t));
    if (ioctl(dev->device, VFIO_DEVICE_SET_IRQS, set) < 0)
        fail("VFIO_DEVICE_SET_IRQS (MSI-X)", errno);
    free(set);
}

static void open_ivshmem(struct ivshmem *dev)
{
    char bdf[256]; /* as large as a dirent name */
    if (!find_device(bdf, sizeof bdf))
        fail("no ivshmem-doorbell device (PCI 1af4:1110) found", 0);
    dev->device = open_device(bdf);
    /* BAR0 is a 256-byte register block, smaller than a page: use pread/pwrite, not mmap. */
    dev->bar0_offset = region_info(dev->device, VFIO_PCI_BAR0_REGION_INDEX).offset;
    dev->config_offset = region_info(dev->device, VFIO_PCI_CONFIG_REGION_INDEX).offset;
    enable_bus_master(dev);
    map_shared_memory(dev);
    pread_exact(dev->device, &dev->own_id, sizeof dev->own_id, dev->bar0_offset + REG_IVPOSITION,
                "read IVPosition");
    route_vectors(dev);
}

static void ring(const struct ivshmem *dev, long peer, unsigned vector)
{
    uint32_t value = ((uint32_t)peer << 16) | vector;
    __sync_synchronize(); /* the reply must be visible before the host wakes up */
    pwrite_exact(dev->device, &value, sizeof value, dev->bar0_offset + REG_DOORBELL, "ring doorbell");
}

/* The whole area is rewritten, NULs after the text: a long message that covered it leaves nothing behind,
 * so the region's last byte is NUL again and the next short message is not taken for a truncated one. */
static void write_reply(const struct ivshmem *dev, const char *text)
{
    volatile uint8_t *reply = dev->mem + dev->size - REPLY_SIZE;
    size_t len = strnlen(text, REPLY_SIZE - 1);
    for (size_t i = 0; i < REPLY_SIZE; i++)
        reply[i] = i < len ? (uint8_t)text[i] : 0;
}

/* The value of NAME=N on the kernel command line, fallback when absent; out of 0..max, fail with error. */
static long param_value(const char *name, long fallback, long max, const char *error)
{
    char cmdline[4096];
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, cmdline, sizeof cmdline - 1);
    if (fd >= 0)
        close(fd);
    if (n <= 0)
        return fallback;
    cmdline[n] = 0;
    for (char *word = strtok(cmdline, " \n"); word; word = strtok(NULL, " \n")) {
        if (strncmp(word, name, strlen(name)) != 0)
            continue;
        char *end;
        long value = strtol(word + strlen(name), &end, 10);
        if (*end || end == word + strlen(name) || value < 0 || value > max)
            fail(error, 0);
        return value;
    }
    return fallback;
}

static long host_peer_id(void)
{
    return param_value(HOST_PARAM, NO_HOST, 0xffff, "shmguard.host= must be a peer id 0..65535");
}

/* Copies the message at offset 0 into line as the seed's Zephyr sample prints it (*line_len bytes with the
 * newline) and checksums the copy; returns its text length. */
static size_t read_message(const struct ivshmem *dev, char *line, size_t *line_len, uint32_t *crc)
{
    int truncated = dev->mem[dev->size - 1] != 0;
    const char *prefix = truncated ? "received IRQ and truncated message: " : "received IRQ and full message: ";
    size_t prefix_len = strlen(prefix);
    size_t limit = truncated ? dev->size - 1 : dev->size;
    /* The text is copied once, so the line printed and the ack describe the same bytes. */
    const uint8_t *mem = (const uint8_t *)dev->mem;
    const uint8_t *nul = memchr(mem, 0, limit);
    size_t len = nul ? (size_t)(nul - mem) : limit;
    memcpy(line, prefix, prefix_len);
    memcpy(line + prefix_len, mem, len);
    line[prefix_len + len] = '\n';
    *line_len = prefix_len + len + 1;
    *crc = crc32_of((const uint8_t *)line + prefix_len, len);
    return len;
}

static void serve(const struct ivshmem *dev, long host)
{
    struct pollfd *fds = calloc(dev->vectors, sizeof *fds);
    char *line = malloc(dev->size + 64);
    if (!fds || !line)
        fail("out of memory", 0);
    for (unsigned v = 0; v < dev->vectors; v++)
        fds[v] = (struct pollfd){.fd = dev->eventfds[v], .events = POLLIN};
    unsigned long handled = 0;
    for (;;) {
        if (poll(fds, dev->vectors, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail("poll", errno);
        }
        for (unsigned v = 0; v < dev->vectors; v++) {
            uint64_t count;
            if (!(fds[v].revents & POLLIN) || read(fds[v].fd, &count, sizeof count) != sizeof count)
                continue;
            uint32_t crc;
            size_t line_len, len = read_message(dev, line, &line_len, &crc);
            handled++;
            if (host != NO_HOST) {
                char reply[REPLY_SIZE];
                snprintf(reply, sizeof reply, "ack %lu %zu %08x", handled, len, crc);
                write_reply(dev, reply);
                ring(dev, host, ACK_VECTOR);
            }
            /* The ack says "copied whole and checksummed"; the console line (slow through the emulated UART)
             * is printed after it, from the private copy, once. */
            emit(line, line_len);
        }
    }
}

/* ---- several guests: the slots at the end of the region (shmguard/layout.py, GuestLayout) ------------------- */

#define MAX_GUESTS 16
#define SLOT_LINE 128
#define COMMAND_HEADER 64
#define MAILBOX_HEADER 16
#define ACK_ENTRY 16
#define MIN_TEXT 64
#define MAX_TEXT 4096
#define SLOT_ALIGN 64
#define GUEST_VECTOR 1
#define RESCAN_MS 50 /* while a send waits for its ack: look again, and ring the receiver again, this often */
#define GUESTS_PARAM "shmguard.guests="
#define SLOT_PARAM "shmguard.slot="

struct exchange {
    const struct ivshmem *dev;
    long host;
    unsigned guests, own;       /* how many slots; this guest's */
    size_t text, slot_size, host_end;
    uint32_t last_command;      /* the number of the last command handled */
    char peers_line[SLOT_LINE]; /* the last peers line the host wrote */
    long peer_of_slot[MAX_GUESTS];
    uint32_t seen[MAX_GUESTS];  /* the last seq printed from each sender's mailbox */
    uint32_t out_seq[MAX_GUESTS]; /* the last seq sent to each slot */
    int sending;                /* the one send in flight */
    uint32_t send_command, send_seq, send_crc, send_len;
    unsigned send_slot;
    long send_peer;
    struct timespec send_start;
    unsigned long handled;      /* the host's messages printed */
    char *line;                 /* room for one printed line */
};


static size_t slot_bytes(unsigned guests, size_t text)
{
    size_t raw = COMMAND_HEADER + text + 3 * SLOT_LINE + guests * ACK_ENTRY + guests * (MAILBOX_HEADER + text);
    return (raw + SLOT_ALIGN - 1) / SLOT_ALIGN * SLOT_ALIGN;
}

/* The same arithmetic as GuestLayout.of: the slots take at most half the region. */
static void exchange_layout(struct exchange *x, size_t size)
{
    size_t budget = size / 2 / x->guests;
    long text = ((long)budget - (long)slot_bytes(x->guests, 0)) / (long)(x->guests + 1);
    if (text > MAX_TEXT)
        text = MAX_TEXT;
    text = text / 8 * 8;
    while (text >= MIN_TEXT && slot_bytes(x->guests, (size_t)text) > budget)
        text -= 8;
    if (text < MIN_TEXT)
        fail("the region is too small for shmguard.guests= guests", 0);
    x->text = (size_t)text;
    x->slot_size = slot_bytes(x->guests, x->text);
    x->host_end = size - x->guests * x->slot_size;
}

static size_t slot_of(const struct exchange *x, unsigned k) { return x->host_end + k * x->slot_size; }
static size_t command_at(const struct exchange *x, unsigned k) { return slot_of(x, k); }
static size_t reply_at(const struct exchange *x, unsigned k) { return slot_of(x, k) + COMMAND_HEADER + x->text; }
static size_t report_at(const struct exchange *x, unsigned k) { return reply_at(x, k) + SLOT_LINE; }
static size_t peers_at(const struct exchange *x, unsigned k) { return report_at(x, k) + SLOT_LINE; }
static size_t ack_at(const struct exchange *x, unsigned k, unsigned sender)
{
    return peers_at(x, k) + SLOT_LINE + sender * ACK_ENTRY;
}
static size_t mailbox_at(const struct exchange *x, unsigned k, unsigned sender)
{
    return peers_at(x, k) + SLOT_LINE + x->guests * ACK_ENTRY + sender * (MAILBOX_HEADER + x->text);
}

static uint32_t get32(const struct exchange *x, size_t offset)
{
    uint32_t value;
    __sync_synchronize();
    memcpy(&value, (const void *)(x->dev->mem + offset), sizeof value);
    return value;
}

static void put32(const struct exchange *x, size_t offset, uint32_t value)
{
    memcpy((void *)(x->dev->mem + offset), &value, sizeof value);
    __sync_synchronize();
}

/* A line area (SLOT_LINE bytes) rewritten whole, NULs after the text. Its last byte is a generation, odd while
 * the line is rewritten: the host reads every slot whenever any guest rings, so it may read this one half written,
 * and it takes a line only with the same even generation before and after it. */
static void put_line(const struct exchange *x, size_t offset, const char *text)
{
    volatile uint8_t *area = x->dev->mem + offset;
    size_t len = strnlen(text, SLOT_LINE - 2);
    uint8_t writing = (uint8_t)(area[SLOT_LINE - 1] | 1);
    area[SLOT_LINE - 1] = writing;
    __sync_synchronize();
    for (size_t i = 0; i < SLOT_LINE - 1; i++)
        area[i] = i < len ? (uint8_t)text[i] : 0;
    __sync_synchronize();
    area[SLOT_LINE - 1] = (uint8_t)(writing + 1);
}

static void copy_line(const struct exchange *x, size_t offset, char *out, size_t size)
{
    __sync_synchronize();
    memcpy(out, (const void *)(x->dev->mem + offset), size - 1);
    out[size - 1] = 0;
}

static void report(struct exchange *x, const char *fmt, ...)
{
    char text[SLOT_LINE];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    put_line(x, report_at(x, x->own), text);
    ring(x->dev, x->host, ACK_VECTOR);
}

static uint32_t command_number(const struct exchange *x)
{
    char header[COMMAND_HEADER];
    unsigned long number = 0;
    copy_line(x, command_at(x, x->own), header, sizeof header);
    return sscanf(header, "send %lu", &number) == 1 ? (uint32_t)number : 0;
}

/* What is already in the region when the guest boots belongs to the guest that had this slot before. */
static void exchange_init(struct exchange *x, const struct ivshmem *dev, long host, unsigned guests, unsigned own)
{
    memset(x, 0, sizeof *x);
    x->dev = dev;
    x->host = host;
    x->guests = guests;
    x->own = own;
    exchange_layout(x, dev->size);
    x->line = malloc(x->host_end + x->text + 64);
    if (!x->line)
        fail("out of memory", 0);
    x->last_command = command_number(x);
    copy_line(x, peers_at(x, own), x->peers_line, sizeof x->peers_line);
    for (unsigned k = 0; k < guests; k++) {
        x->peer_of_slot[k] = -1;
        x->seen[k] = get32(x, mailbox_at(x, own, k));
        x->out_seq[k] = get32(x, mailbox_at(x, k, own));
    }
}

/* Every new message in this guest's inbox is copied once, acked to its sender directly, then printed: the line
 * printed and the ack describe the same bytes. */
static void exchange_receive(struct exchange *x)
{
    static const char prefix[] = "received IRQ and full message: ";
    for (unsigned j = 0; j < x->guests; j++) {
        size_t box = mailbox_at(x, x->own, j);
        uint32_t seq = get32(x, box);
        if (j == x->own || seq == x->seen[j])
            continue;
        x->seen[j] = seq;
        uint32_t from = get32(x, box + 4), len = get32(x, box + 8);
        if (len > x->text)
            len = (uint32_t)x->text;
        memcpy(x->line, prefix, sizeof prefix - 1);
        memcpy(x->line + sizeof prefix - 1, (const void *)(x->dev->mem + box + MAILBOX_HEADER), len);
        x->line[sizeof prefix - 1 + len] = '\n';
        uint32_t crc = crc32_of((const uint8_t *)x->line + sizeof prefix - 1, len);
        size_t ack = ack_at(x, j, x->own);
        put32(x, ack + 4, crc);
        put32(x, ack + 8, len);
        put32(x, ack + 12, x->dev->own_id);
        put32(x, ack, seq); /* written last: the sender takes it as the ack */
        if (from <= 0xffff)
            ring(x->dev, (long)from, GUEST_VECTOR);
        emit(x->line, sizeof prefix + len); /* after the ack: the serial console is slow, and not the message's path */
    }
}

static void exchange_check_ack(struct exchange *x)
{
    if (!x->sending)
        return;
    size_t ack = ack_at(x, x->own, x->send_slot);
    if (get32(x, ack) != x->send_seq)
        return;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long us = (now.tv_sec - x->send_start.tv_sec) * 1000000LL + (now.tv_nsec - x->send_start.tv_nsec) / 1000;
    x->sending = 0;
    report(x, "sent %u %ld %u %u %08x %lld", x->send_command, x->send_peer, x->send_seq, get32(x, ack + 8),
           get32(x, ack + 4), us);
}

/* "peers <generation> <id>:<slot> ...": a guest that is no longer listed has left; a send to it is lost. */
static void exchange_check_peers(struct exchange *x)
{
    char line[SLOT_LINE];
    copy_line(x, peers_at(x, x->own), line, sizeof line);
    if (strncmp(line, "peers ", 6) != 0 || strcmp(line, x->peers_line) == 0)
        return;
    memcpy(x->peers_line, line, sizeof line);
    long now[MAX_GUESTS];
    for (unsigned k = 0; k < x->guests; k++)
        now[k] = -1;
    char *save, *word = strtok_r(line + 6, " ", &save); /* the generation */
    while (word && (word = strtok_r(NULL, " ", &save))) {
        long peer;
        unsigned slot;
        if (sscanf(word, "%ld:%u", &peer, &slot) == 2 && slot < x->guests && peer >= 0 && peer <= 0xffff)
            now[slot] = peer;
    }
    for (unsigned k = 0; k < x->guests; k++) {
        if (k == x->own || now[k] == x->peer_of_slot[k])
            continue;
        if (x->peer_of_slot[k] >= 0)
            say("shmguard-guest: peer %ld (guest %u) left", x->peer_of_slot[k], k);
        if (now[k] >= 0)
            say("shmguard-guest: peer %ld is guest %u", now[k], k);
        x->peer_of_slot[k] = now[k];
    }
    if (x->sending && x->peer_of_slot[x->send_slot] != x->send_peer) {
        x->sending = 0;
        report(x, "lost %u %ld peer left", x->send_command, x->send_peer);
    }
}

/* "send <n> <peer> <slot> <length> <crc32>" then the text: into that guest's inbox, and ring it. */
static void exchange_check_command(struct exchange *x)
{
    char header[COMMAND_HEADER];
    unsigned long number, slot, len;
    long peer;
    unsigned crc;
    size_t area = command_at(x, x->own);
    copy_line(x, area, header, sizeof header);
    if (sscanf(header, "send %lu %ld %lu %lu %x", &number, &peer, &slot, &len, &crc) != 5 ||
        (uint32_t)number == x->last_command)
        return;
    x->last_command = (uint32_t)number;
    /* A send still in flight is dropped: the host sends one command at a time, so a new one means it has given
     * up on the old (timed out), and a receiver that never acks must not keep this guest from sending again. */
    x->sending = 0;
    if (slot >= x->guests || slot == x->own || peer < 0 || peer > 0xffff || len > x->text) {
        report(x, "lost %lu %ld bad command", number, peer < 0 || peer > 0xffff ? 0 : peer);
        return;
    }
    size_t box = mailbox_at(x, (unsigned)slot, x->own);
    memcpy((void *)(x->dev->mem + box + MAILBOX_HEADER), (const void *)(x->dev->mem + area + COMMAND_HEADER), len);
    __sync_synchronize();
    uint32_t copied = crc32_of((const uint8_t *)(x->dev->mem + box + MAILBOX_HEADER), len);
    if (copied != crc) {
        report(x, "lost %lu %ld bad checksum", number, peer);
        return;
    }
    put32(x, box + 4, x->dev->own_id);
    put32(x, box + 8, (uint32_t)len);
    put32(x, box + 12, copied);
    uint32_t seq = ++x->out_seq[slot];
    x->sending = 1;
    x->send_command = (uint32_t)number;
    x->send_slot = (unsigned)slot;
    x->send_peer = peer;
    x->send_seq = seq;
    x->send_crc = copied;
    x->send_len = (uint32_t)len;
    clock_gettime(CLOCK_MONOTONIC, &x->send_start);
    put32(x, box, seq); /* written last: the receiver takes a new seq as a new message */
    ring(x->dev, peer, GUEST_VECTOR);
}

/* The host's message at offset 0, within the host's area, acked in this guest's own reply line. */
static void exchange_host_message(struct exchange *x)
{
    const uint8_t *mem = (const uint8_t *)x->dev->mem;
    int truncated = mem[x->host_end - 1] != 0;
    const char *prefix = truncated ? "received IRQ and truncated message: " : "received IRQ and full message: ";
    size_t prefix_len = strlen(prefix), limit = truncated ? x->host_end - 1 : x->host_end;
    const uint8_t *nul = memchr(mem, 0, limit);
    size_t len = nul ? (size_t)(nul - mem) : limit;
    memcpy(x->line, prefix, prefix_len);
    memcpy(x->line + prefix_len, mem, len);
    x->line[prefix_len + len] = '\n';
    emit(x->line, prefix_len + len + 1);
    char text[SLOT_LINE];
    snprintf(text, sizeof text, "ack %lu %zu %08x", ++x->handled, len,
             crc32_of((const uint8_t *)x->line + prefix_len, len));
    put_line(x, reply_at(x, x->own), text);
    ring(x->dev, x->host, ACK_VECTOR);
}

/* Vector 0 is the host's message; every other vector means "look at your slot": the inbox, the acks of what
 * this guest sent, the peers line and the command, each recognised by its own number, so rings that coalesce
 * lose nothing. */
static void __attribute__((noreturn)) serve_exchange(const struct ivshmem *dev, long host, unsigned guests,
                                                     unsigned own)
{
    static struct exchange x;
    exchange_init(&x, dev, host, guests, own);
    say("shmguard-guest: guest %u of %u, text room %zu bytes, slot at %zu", own, guests, x.text, slot_of(&x, own));
    char text[SLOT_LINE];
    snprintf(text, sizeof text, "ready %u", dev->own_id);
    put_line(&x, reply_at(&x, own), text);
    ring(dev, host, READY_VECTOR);
    struct pollfd *fds = calloc(dev->vectors, sizeof *fds);
    if (!fds)
        fail("out of memory", 0);
    for (unsigned v = 0; v < dev->vectors; v++)
        fds[v] = (struct pollfd){.fd = dev->eventfds[v], .events = POLLIN};
    for (;;) {
        int ready = poll(fds, dev->vectors, x.sending ? RESCAN_MS : -1);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            fail("poll", errno);
        }
        if (ready == 0) { /* a send in flight and no ring for RESCAN_MS: an interrupt may be lost under load */
            exchange_receive(&x);
            exchange_check_ack(&x);
            if (x.sending)
                ring(dev, x.send_peer, GUEST_VECTOR); /* the receiver looks again; it prints nothing twice */
            continue;
        }
        for (unsigned v = 0; v < dev->vectors; v++) {
            uint64_t count;
            if (!(fds[v].revents & POLLIN) || read(fds[v].fd, &count, sizeof count) != sizeof count)
                continue;
            if (v == 0) {
                exchange_host_message(&x);
                continue;
            }
            exchange_receive(&x);
            exchange_check_ack(&x);
            exchange_check_peers(&x);
            exchange_check_command(&x);
        }
    }
}

/* Built alone the agent is a program of its own; the built-in guest links it into /init (guest/init.c), which
 * calls it as agent_main once the device is vfio-pci's. */
#ifndef AGENT_MAIN
#define AGENT_MAIN main
#endif
int AGENT_MAIN(void);

int AGENT_MAIN(void)
{
    struct ivshmem dev = {0};
    long host = host_peer_id();
    const char *range = "a shmguard.guests= or shmguard.slot= parameter is out of range";
    long guests = param_value(GUESTS_PARAM, 1, MAX_GUESTS, range);
    long own = param_value(SLOT_PARAM, 0, MAX_GUESTS - 1, range);
    open_ivshmem(&dev);
    if (guests >= 2) {
        if (host == NO_HOST || own >= guests)
            fail("shmguard.guests= needs shmguard.host= and a shmguard.slot= below it", 0);
        serve_exchange(&dev, host, (unsigned)guests, (unsigned)own);
    }
    say("shmguard-guest: ready peer=%u vectors=%u size=%zu", dev.own_id, dev.vectors, dev.size);
    if (host != NO_HOST) {
        char reply[32];
        snprintf(reply, sizeof reply, "ready %u", dev.own_id);
        write_reply(&dev, reply);
        ring(&dev, host, READY_VECTOR);
    }
    serve(&dev, host);
    return 0;
}
