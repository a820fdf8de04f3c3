/* The churn client of bench/bench_join.py: join an ivshmem server, read the whole greeting with its fds, leave.
 *
 *     churn SOCKET JOINS VECTORS
 *
 * Each of JOINS joins connects and reads the whole greeting, as QEMU does: 0, its new id, -1 with the shared
 * memory, every connected peer's vectors (as many as there are: other churn clients and peers whose leave the
 * server has not seen yet count too), and last its own VECTORS vectors, each word with its fd; then it closes
 * every fd received and the socket. The same binary joins shmguard and QEMU's contrib server, so the two are
 * measured with the same client; it is written in C so that the client is not what limits the faster server.
 * Exit 0 when every join got its whole greeting, else 1 and one line on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int fail(const char *what, long join)
{
    fprintf(stderr, "churn: join %ld: %s%s%s\n", join, what, errno ? ": " : "", errno ? strerror(errno) : "");
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: churn SOCKET JOINS VECTORS\n");
        return 2;
    }
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    strncpy(address.sun_path, argv[1], sizeof(address.sun_path) - 1);
    long joins = atol(argv[2]), vectors = atol(argv[3]);

    for (long join = 0; join < joins; join++) {
        int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (sock < 0)
            return fail("socket", join);
        while (connect(sock, (struct sockaddr *)&address, sizeof(address)) < 0) {
            if (errno != EAGAIN)  /* a full backlog: try again */
                return fail("connect", join);
        }
        int64_t own_id = -1;
        long own_vectors = 0;
        for (long n = 0; own_vectors < vectors; n++) {
            int64_t word;
            union { char buffer[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
            struct iovec iov = {.iov_base = &word, .iov_len = sizeof(word)};
            struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buffer,
                                 .msg_controllen = sizeof(control.buffer)};
            errno = 0;
            ssize_t got = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
            if (got != sizeof(word))
                return fail(got == 0 ? "the server closed before the whole greeting" : "recvmsg", join);
            int fd = -1;
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                    memcpy(&fd, CMSG_DATA(c), sizeof(fd));
            errno = 0;
            if ((n == 0 && (word != 0 || fd >= 0)) || (n == 1 && (word < 0 || fd >= 0)) ||
                (n == 2 && (word != -1 || fd < 0)) || (n > 2 && (word < 0 || fd < 0)))
                return fail("not an ivshmem greeting", join);
            if (n == 1)
                own_id = word;
            else if (n > 2 && word == own_id)
                own_vectors++;
            if (fd >= 0)
                close(fd);
        }
        close(sock);
    }
    return 0;
}
