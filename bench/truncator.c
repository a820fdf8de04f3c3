/* The attacker of bench_repair.py: one ftruncate(fd, 0) of the region per line read on stdin, timed in C so that
 * the clock reads around the call cost about a microsecond, then a spin until the region is back.
 *
 *     truncator PATH SIZE LAST_PAGE
 *
 * At the start it reads the page at LAST_PAGE (the last one that is not all NULs: the guard writes front to back)
 * as the region holds it, then measures the cost of its clock reads with no call between them (the least of 1000
 * tries). Each round, on a line from stdin: the thread's CPU clock, CLOCK_MONOTONIC (started), ftruncate(fd, 0), the
 * CPU clock again; then it spins on fstat and pread until the size is SIZE and that page holds its bytes again.
 * It prints one line per round:
 *
 *     STARTED_NS CPU_NS WAITED_NS WALL_NS SEEN_NS PREEMPTED
 *
 * CPU_NS: the CPU time the thread spent from before the call to after it, less the clock reads' own cost: the call's
 * end is STARTED_NS + CPU_NS unless the thread waited for the CPU inside the call (then it is earlier, and the
 * window from it reads longer than it was, never shorter). WAITED_NS: the thread's run-queue wait
 * (/proc/thread-self/schedstat) from before the call until after it returned. WALL_NS: from started to the
 * thread running again after the call. SEEN_NS: from then to the spin seeing the region back. PREEMPTED: 1 if the
 * thread was switched out involuntarily between before the call and the end of the spin.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static long long ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long run_delay(int schedstat) {
    char buf[128];
    ssize_t got = pread(schedstat, buf, sizeof buf - 1, 0);
    if (got <= 0)
        return 0;
    buf[got] = 0;
    char *space = strchr(buf, ' ');
    return space ? atoll(space + 1) : 0;
}

static long involuntary(void) {
    struct rusage usage;
    getrusage(RUSAGE_THREAD, &usage);
    return usage.ru_nivcsw;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: truncator PATH SIZE LAST_PAGE\n");
        return 2;
    }
    off_t size = atoll(argv[2]), at = atoll(argv[3]);
    int fd = open(argv[1], O_RDWR | O_CLOEXEC);
    int schedstat = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || schedstat < 0) {
        perror("truncator: open");
        return 1;
    }
    static char tail[PAGE], seen[PAGE];
    ssize_t length = pread(fd, tail, PAGE, at);
    if (length <= 0) {
        perror("truncator: pread");
        return 1;
    }
    long long overhead = -1;
    for (int i = 0; i < 1000; i++) {
        long long cpu = ns(CLOCK_THREAD_CPUTIME_ID);
        ns(CLOCK_MONOTONIC);
        long long spent = ns(CLOCK_THREAD_CPUTIME_ID) - cpu;
        if (overhead < 0 || spent < overhead)
            overhead = spent;
    }
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        long switches = involuntary();
        long long waited = run_delay(schedstat);
        long long cpu = ns(CLOCK_THREAD_CPUTIME_ID);
        long long started = ns(CLOCK_MONOTONIC);
        if (ftruncate(fd, 0) != 0) {
            perror("truncator: ftruncate");
            return 1;
        }
        long long spent = ns(CLOCK_THREAD_CPUTIME_ID) - cpu - overhead;
        long long returned = ns(CLOCK_MONOTONIC);
        waited = run_delay(schedstat) - waited;
        struct stat st;
        for (;;) {
            if (fstat(fd, &st) == 0 && st.st_size == size && pread(fd, seen, length, at) == length
                    && memcmp(seen, tail, length) == 0)
                break;
        }
        long long restored = ns(CLOCK_MONOTONIC);
        printf("%lld %lld %lld %lld %lld %d\n", started, spent < 0 ? 0 : spent, waited, returned - started,
               restored - returned, involuntary() != switches);
    }
    return 0;
}
