/* ws_load: a neutral WebSocket JSON-RPC load generator for scripts/bench.
 *
 *   ws_load HOST PORT PATH CALLS INFLIGHT
 *
 * One connection, INFLIGHT calls of add(i, 1) kept in flight until CALLS
 * replies came back; prints "calls=N errors=E seconds=S rate=R". The same
 * program drives every contender (osara, node's ws), so the figures differ
 * only by the server. Framing by wslay (as osara's), plain poll(2) loop. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <wslay/wslay.h>

static int fd;
static long calls, inflight, sent, replies, errors;
static uint64_t mask_state = 0x9E3779B97F4A7C15ull;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static ssize_t on_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags, void *ud)
{
    (void)flags;
    (void)ud;
    ssize_t n = recv(fd, buf, len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    if (n <= 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return n;
}

static ssize_t on_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
                       void *ud)
{
    (void)flags;
    (void)ud;
    ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    if (n < 0) {
        wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
        return -1;
    }
    return n;
}

static int genmask(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *ud)
{
    (void)ctx;
    (void)ud;
    for (size_t i = 0; i < len; i++) {
        mask_state ^= mask_state << 13;
        mask_state ^= mask_state >> 7;
        mask_state ^= mask_state << 17;
        buf[i] = (uint8_t)mask_state;
    }
    return 0;
}

static void queue_call(wslay_event_context_ptr ctx)
{
    char text[128];
    sent++;
    int n = snprintf(text, sizeof(text),
                     "{\"jsonrpc\":\"2.0\",\"id\":%ld,\"method\":\"add\",\"params\":[%ld,1]}", sent,
                     sent);
    struct wslay_event_msg msg = {WSLAY_TEXT_FRAME, (const uint8_t *)text, (size_t)n};
    wslay_event_queue_msg(ctx, &msg);
}

static void on_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
                   void *ud)
{
    (void)ud;
    if (arg->opcode != WSLAY_TEXT_FRAME) {
        return;
    }
    replies++;
    if (memmem(arg->msg, arg->msg_length, "\"result\"", 8) == NULL) {
        errors++;
    }
    if (sent < calls) {
        queue_call(ctx);
    }
}

/* Connects and performs the opening handshake (a fixed key: this is a load
 * generator, not a client to trust). */
static int open_ws(const char *host, const char *port, const char *path)
{
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    if (getaddrinfo(host, port, &hints, &res) != 0) {
        return -1;
    }
    fd = socket(res->ai_family, SOCK_STREAM, 0);
    int rc = connect(fd, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    if (rc != 0) {
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    char req[512];
    int n = snprintf(req, sizeof(req),
                     "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n", path, host, port);
    if (send(fd, req, (size_t)n, 0) != n) {
        return -1;
    }
    /* Read the response head byte by byte: nothing of the frames after it
     * may be consumed here (the server sends none before a call anyway). */
    char head[4096];
    size_t len = 0;
    while (len < sizeof(head) - 1) {
        if (recv(fd, head + len, 1, 0) != 1) {
            return -1;
        }
        len++;
        if (len >= 4 && memcmp(head + len - 4, "\r\n\r\n", 4) == 0) {
            break;
        }
    }
    head[len] = '\0';
    if (strncmp(head, "HTTP/1.1 101", 12) != 0) {
        fprintf(stderr, "ws_load: handshake refused: %.80s\n", head);
        return -1;
    }
    return fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: ws_load HOST PORT PATH CALLS INFLIGHT\n");
        return 2;
    }
    calls = atol(argv[4]);
    inflight = atol(argv[5]);
    if (open_ws(argv[1], argv[2], argv[3]) != 0) {
        fprintf(stderr, "ws_load: cannot open ws://%s:%s%s\n", argv[1], argv[2], argv[3]);
        return 1;
    }
    struct wslay_event_callbacks cb = {.recv_callback = on_recv, .send_callback = on_send,
                                       .genmask_callback = genmask, .on_msg_recv_callback = on_msg};
    wslay_event_context_ptr ctx;
    wslay_event_context_client_init(&ctx, &cb, NULL);
    double t0 = now();
    for (long i = 0; i < inflight && sent < calls; i++) {
        queue_call(ctx);
    }
    while (replies < calls) {
        struct pollfd p = {.fd = fd, .events = POLLIN | (wslay_event_want_write(ctx) ? POLLOUT : 0)};
        if (poll(&p, 1, 10000) <= 0) {
            fprintf(stderr, "ws_load: stalled after %ld replies\n", replies);
            return 1;
        }
        if (((p.revents & POLLIN) && wslay_event_recv(ctx) != 0) ||
            ((p.revents & POLLOUT) && wslay_event_send(ctx) != 0) ||
            (p.revents & (POLLERR | POLLHUP))) {
            fprintf(stderr, "ws_load: connection failed after %ld replies\n", replies);
            return 1;
        }
        if (wslay_event_want_write(ctx) && wslay_event_send(ctx) != 0) {
            return 1;
        }
    }
    double secs = now() - t0;
    printf("calls=%ld errors=%ld seconds=%.3f rate=%.0f\n", replies, errors, secs,
           (double)replies / secs);
    wslay_event_context_free(ctx);
    close(fd);
    return errors == 0 ? 0 : 1;
}
