/*
 * shmguard guest agent: drives QEMU's ivshmem-doorbell device (PCI 1af4:1110) from user space
 * through vfio-pci, prints every message the host rings in, and answers in the reply area.
 *
 * Region layout (shmguard/layout.py): offset 0 holds the host's NUL-terminated message; the last
 * REPLY_SIZE bytes are the reply area where this agent writes "ready <id>" once its MSI-X vectors
 * are live (then rings the host on READY_VECTOR) and "ack <n> <len> <crc32>" after each message
 * (then rings ACK_VECTOR). The host's peer id comes from the kernel parameter shmguard.host=<id>.
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

static long host_peer_id(void)
{
    char cmdline[4096];
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, cmdline, sizeof cmdline - 1);
    if (fd >= 0)
        close(fd);
    if (n <= 0)
        return NO_HOST;
    cmdline[n] = 0;
    for (char *word = strtok(cmdline, " \n"); word; word = strtok(NULL, " \n")) {
        if (strncmp(word, HOST_PARAM, strlen(HOST_PARAM)) != 0)
            continue;
        char *end;
        long id = strtol(word + strlen(HOST_PARAM), &end, 10);
        if (*end || end == word + strlen(HOST_PARAM) || id < 0 || id > 0xffff)
            fail("shmguard.host= must be a peer id 0..65535", 0);
        return id;
    }
    return NO_HOST;
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

int main(void)
{
    struct ivshmem dev = {0};
    long host = host_peer_id();
    open_ivshmem(&dev);
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
