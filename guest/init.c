/*
 * The built-in guest's /init (PID 1): mount /proc, /sys and /dev, load the VFIO modules, hand the ivshmem
 * device to vfio-pci, then go on as the agent. No shell, no fork and no exec: /init is this file and
 * guest/agent.c linked into one static program (shmguard/guest.py builds it with -DAGENT_MAIN=agent_main), as
 * under TCG every program started costs tens of milliseconds (a second exec and C library start ~25 ms, and its
 * pages in the initrd). On failure it says why on the console and keeps the VM up (PID 1 never exits).
 *
 * /lib/modules/load-order lists the modules, dependencies first (shmguard/guest.py writes it); a module's
 * parameters come from the kernel command line as NAME.PARAM=VALUE, as modprobe would pass them. The guest's
 * own kernel has VFIO built in: its initrd has no load-order, and nothing is loaded.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LOAD_ORDER "/lib/modules/load-order"
#define PCI_DEVICES "/sys/bus/pci/devices"

int agent_main(void); /* guest/agent.c */

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
    if (write(STDOUT_FILENO, line, (size_t)n) < 0)
        return;
}

static void __attribute__((noreturn, format(printf, 1, 2))) fail(const char *fmt, ...)
{
    char what[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    say("shmguard-guest: error: %s", what);
    for (;;)
        pause();
}

/* The whole of a small file, NUL-terminated; "" when it cannot be read. */
static char *slurp(const char *path, char *buf, size_t size)
{
    buf[0] = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return buf;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    buf[n > 0 ? n : 0] = 0;
    return buf;
}

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, text, strlen(text));
    int err = errno;
    close(fd);
    errno = err;
    return n == (ssize_t)strlen(text) ? 0 : -1;
}

static void mount_or_fail(const char *type, const char *where)
{
    if (mount(type, where, type, MS_NOSUID | MS_NOEXEC, NULL) < 0 && errno != EBUSY)
        fail("cannot mount %s on %s: %s", type, where, strerror(errno));
}

/* "a=1 b=2" for module NAME from the words NAME.a=1 NAME.b=2 of the kernel command line. */
static void module_params(const char *cmdline, const char *name, char *out, size_t size)
{
    size_t len = strlen(name), used = 0;
    out[0] = 0;
    for (const char *word = cmdline; *word;) {
        size_t word_len = strcspn(word, " \n");
        if (word_len > len + 1 && strncmp(word, name, len) == 0 && word[len] == '.' &&
            memchr(word + len + 1, '=', word_len - len - 1) && used + word_len + 1 < size) {
            used += (size_t)snprintf(out + used, size - used, "%s%.*s", used ? " " : "", (int)(word_len - len - 1),
                                     word + len + 1);
        }
        word += word_len;
        word += strspn(word, " \n");
    }
}

static void load_modules(void)
{
    static char order[4096], cmdline[4096];
    if (access(LOAD_ORDER, F_OK) < 0 && errno == ENOENT)
        return; /* a kernel with everything built in */
    slurp("/proc/cmdline", cmdline, sizeof cmdline);
    if (!*slurp(LOAD_ORDER, order, sizeof order))
        fail("cannot read " LOAD_ORDER);
    for (char *name = strtok(order, "\n"); name; name = strtok(NULL, "\n")) {
        char path[PATH_MAX], params[1024];
        struct stat st;
        snprintf(path, sizeof path, "/sys/module/%s", name);
        if (stat(path, &st) == 0)
            continue; /* built in, or already loaded */
        snprintf(path, sizeof path, "/lib/modules/%s.ko", name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            fail("cannot open %s: %s", path, strerror(errno));
        module_params(cmdline, name, params, sizeof params);
        if (syscall(SYS_finit_module, fd, params, 0) < 0 && errno != EEXIST)
            fail("loading kernel module %s failed: %s", name, strerror(errno));
        close(fd);
    }
}

static unsigned long read_hex(const char *dir, const char *name)
{
    char path[PATH_MAX], text[32];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return strtoul(slurp(path, text, sizeof text), NULL, 16);
}

/* Every ivshmem device (PCI 1af4:1110) to vfio-pci: override its driver, unbind it, probe it again. */
static void bind_ivshmem(void)
{
    DIR *dir = opendir(PCI_DEVICES);
    if (!dir)
        fail("cannot list " PCI_DEVICES ": %s", strerror(errno));
    int found = 0;
    for (struct dirent *entry; (entry = readdir(dir));) {
        char dev[512], path[600];
        struct stat st;
        if (entry->d_name[0] == '.')
            continue;
        snprintf(dev, sizeof dev, PCI_DEVICES "/%s", entry->d_name);
        if (read_hex(dev, "vendor") != 0x1af4 || read_hex(dev, "device") != 0x1110)
            continue;
        found = 1;
        snprintf(path, sizeof path, "%s/iommu_group", dev);
        if (stat(path, &st) < 0)
            fail("ivshmem device %s has no IOMMU group: the VM needs -device intel-iommu,intremap=off, "
                 "the kernel intel_iommu=on", entry->d_name);
        snprintf(path, sizeof path, "%s/driver_override", dev);
        if (write_file(path, "vfio-pci") < 0)
            fail("cannot write %s: %s", path, strerror(errno));
        snprintf(path, sizeof path, "%s/driver/unbind", dev);
        write_file(path, entry->d_name); /* fails when no driver has it: nothing to undo */
        if (write_file("/sys/bus/pci/drivers_probe", entry->d_name) < 0)
            fail("probing %s failed: %s", entry->d_name, strerror(errno));
        snprintf(path, sizeof path, "%s/driver", dev);
        if (stat(path, &st) < 0)
            fail("vfio-pci did not take the ivshmem device %s", entry->d_name);
    }
    closedir(dir);
    if (!found)
        fail("no ivshmem-doorbell device (PCI 1af4:1110) found");
}

int main(void)
{
    /* The firmware may leave "Booting from ROM.." without a line end. */
    say("");
    mount_or_fail("proc", "/proc");
    mount_or_fail("sysfs", "/sys");
    mount_or_fail("devtmpfs", "/dev");
    load_modules();
    bind_ivshmem();
    return agent_main(); /* never returns: the agent serves for as long as the VM runs */
}
