/* The attacking call of bench_repair.py, timed in C: compiled with gcc into a shared object at the benchmark's
 * start and called through ctypes by the benchmark's own process, which stays the attacker (it truncates, then
 * spins in Python until the region is back, as before). Only the clock reads are here: read from Python around the
 * call, those after it cost 4 to 11 us more than warm (the truncation empties the caches), and the call's end,
 * taken from them, came that much late.
 *
 * truncate_timed(fd, out): the thread's CPU clock, CLOCK_MONOTONIC (out[0], started), ftruncate(fd, 0), the CPU
 * clock again; out[1] is the CPU time the thread spent from the first read to the last, less what those reads cost
 * with no call between them (the least of 1000 tries, measured on the first call). The call's end is then out[0] +
 * out[1], exact to about a microsecond unless the thread waited for the CPU inside the call (then the end is later
 * and the window from out[0] + out[1] reads longer than it was). Returns 0, or -1 with errno set.
 */
#define _GNU_SOURCE
#include <time.h>
#include <unistd.h>

static long long ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long overhead = -1;

static void measure_overhead(void) {
    for (int i = 0; i < 1000; i++) {
        long long cpu = ns(CLOCK_THREAD_CPUTIME_ID);
        ns(CLOCK_MONOTONIC);
        long long spent = ns(CLOCK_THREAD_CPUTIME_ID) - cpu;
        if (overhead < 0 || spent < overhead)
            overhead = spent;
    }
}

int truncate_timed(int fd, long long *out) {
    if (overhead < 0)
        measure_overhead();
    long long cpu = ns(CLOCK_THREAD_CPUTIME_ID);
    long long started = ns(CLOCK_MONOTONIC);
    int result = ftruncate(fd, 0);
    long long spent = ns(CLOCK_THREAD_CPUTIME_ID) - cpu - overhead;
    out[0] = started;
    out[1] = spent < 0 ? 0 : spent;
    return result;
}
