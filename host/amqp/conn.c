/* conn.c - the connection thread: the only code that calls librabbitmq.
 *
 * It connects (blocking, here, never on the loop), opens the three
 * channels, declares and consumes what the loop asked for, then waits in
 * poll() on the socket and on the eventfd the loop writes after queuing a
 * command. Frames are read without blocking until none is left; a
 * delivery's content frames follow its method frame at once, so reading
 * them (amqp_read_message) waits only for bytes already on their way. On
 * any connection error it tears the connection down, waits (100 ms,
 * doubling to 5 s) and connects again, restoring consumers and sending the
 * unconfirmed publishes again. */
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "amqp/amqp_int.h"
#include "core/log.h"
#include "core/mem.h"

#define FRAMES_PER_ROUND 512

/* Why the last RPC failed, as one line. */
static void rpc_error(amqp_connection_state_t conn, const char *what, char *buf, size_t n)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply(conn);
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
        snprintf(buf, n, "%s: %s", what, amqp_error_string2(r.library_error));
    } else if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION &&
               r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        amqp_channel_close_t *m = r.reply.decoded;
        snprintf(buf, n, "%s: %.*s", what, (int)m->reply_text.len, (char *)m->reply_text.bytes);
    } else if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION &&
               r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        amqp_connection_close_t *m = r.reply.decoded;
        snprintf(buf, n, "%s: %.*s", what, (int)m->reply_text.len, (char *)m->reply_text.bytes);
    } else {
        snprintf(buf, n, "%s failed", what);
    }
}

/* 1 when the last RPC failed because the broker closed channel ch (the
 * channel is then reopened: close-ok, open). -1: the connection is gone. */
static int channel_refused(amqp_connection_state_t conn, amqp_channel_t ch)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply(conn);
    if (r.reply_type != AMQP_RESPONSE_SERVER_EXCEPTION || r.reply.id != AMQP_CHANNEL_CLOSE_METHOD) {
        return -1;
    }
    amqp_channel_close_ok_t ok = {0};
    if (amqp_send_method(conn, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok) != AMQP_STATUS_OK) {
        return -1;
    }
    if (amqp_channel_open(conn, ch) == NULL) {
        return -1;
    }
    return 1;
}

static int rpc_ok(amqp_connection_state_t conn)
{
    return amqp_get_rpc_reply(conn).reply_type == AMQP_RESPONSE_NORMAL;
}

/* ---- connecting ----------------------------------------------------------- */

static int open_connection(aclient_t *c, char *err, size_t n)
{
    char *url = osara_xstrdup(c->url_full);
    struct amqp_connection_info ci;
    amqp_default_connection_info(&ci);
    if (amqp_parse_url(url, &ci) != AMQP_STATUS_OK) {
        snprintf(err, n, "invalid URL");
        free(url);
        return -1;
    }
    if (ci.vhost == NULL || ci.vhost[0] == 0) {
        ci.vhost = "/"; /* "amqp://host/" means the default vhost, as for pika */
    }
    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    struct timeval tv = {5, 0};
    int rc = sock ? amqp_socket_open_noblock(sock, ci.host, ci.port, &tv) : AMQP_STATUS_NO_MEMORY;
    if (rc != AMQP_STATUS_OK) {
        snprintf(err, n, "connect to %s:%d: %s", ci.host, ci.port, amqp_error_string2(rc));
        amqp_destroy_connection(conn);
        free(url);
        return -1;
    }
    amqp_set_rpc_timeout(conn, &(struct timeval){15, 0});
    amqp_rpc_reply_t r = amqp_login(conn, ci.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN,
                                    ci.user, ci.password);
    free(url);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        rpc_error(conn, "login", err, n);
        amqp_destroy_connection(conn);
        return -1;
    }
    int ok = amqp_channel_open(conn, CH_CONSUME) && amqp_channel_open(conn, CH_PUBLISH) &&
             amqp_channel_open(conn, CH_DECLARE) && amqp_confirm_select(conn, CH_PUBLISH);
    if (!ok) {
        rpc_error(conn, "opening channels", err, n);
        amqp_destroy_connection(conn);
        return -1;
    }
    c->t.conn = conn;
    c->t.gen++;
    c->t.next_seq = 0;
    return 0;
}

/* Frees the connection (after the close handshake, or without it when
 * the connection failed): unacknowledged deliveries go back to their
 * queues on the broker either way. */
static void drop_connection(aclient_t *c)
{
    if (c->t.reading) {
        osara__amqp_msg_free(c->t.reading);
        c->t.reading = NULL;
    }
    if (c->t.conn) {
        amqp_destroy_connection(c->t.conn);
        c->t.conn = NULL;
    }
    for (int i = 0; i < c->t.ndeclared; i++) {
        free(c->t.declared[i]);
    }
    free(c->t.declared);
    c->t.declared = NULL;
    c->t.ndeclared = 0;
}

/* ---- declaring and consuming --------------------------------------------- */

static amqp_table_t args_table(amqp_table_entry_t *e, int n)
{
    return (amqp_table_t){.num_entries = n, .entries = e};
}

static amqp_table_entry_t str_entry(const char *k, const char *v)
{
    amqp_table_entry_t e = {.key = amqp_cstring_bytes(k)};
    e.value.kind = AMQP_FIELD_KIND_UTF8;
    e.value.value.bytes = amqp_cstring_bytes(v);
    return e;
}

/* Declares k's exchange, queue, binding, retry queue and dead-letter
 * queue on channel 3. 0; 1 refused (why in err; channel 3 reopened);
 * -1 the connection failed. */
static int declare(aclient_t *c, tcons_t *k, char *err, size_t n)
{
    amqp_connection_state_t conn = c->t.conn;
    if (k->exchange[0]) {
        amqp_exchange_declare(conn, CH_DECLARE, amqp_cstring_bytes(k->exchange),
                              amqp_cstring_bytes(k->type), 0, k->durable, 0, 0,
                              amqp_empty_table);
        if (!rpc_ok(conn)) {
            rpc_error(conn, "declaring the exchange", err, n);
            return channel_refused(conn, CH_DECLARE);
        }
    }
    int named = k->queue != NULL;
    amqp_queue_declare_ok_t *q = amqp_queue_declare(
        conn, CH_DECLARE, named ? amqp_cstring_bytes(k->queue) : amqp_empty_bytes, 0,
        named && k->durable, !named, !named, amqp_empty_table);
    if (q == NULL) {
        rpc_error(conn, "declaring the queue", err, n);
        return channel_refused(conn, CH_DECLARE);
    }
    snprintf(k->actual, sizeof(k->actual), "%.*s", (int)q->queue.len, (char *)q->queue.bytes);
    if (k->exchange[0]) {
        amqp_queue_bind(conn, CH_DECLARE, amqp_cstring_bytes(k->actual),
                        amqp_cstring_bytes(k->exchange), amqp_cstring_bytes(k->routing_key),
                        amqp_empty_table);
        if (!rpc_ok(conn)) {
            rpc_error(conn, "binding the queue", err, n);
            return channel_refused(conn, CH_DECLARE);
        }
    }
    if (k->retry) {
        /* <queue>.retry: a failed message waits there for its per-message
         * TTL, then the broker dead-letters it straight back to <queue>
         * (through the default exchange: no other binding sees it again). */
        char rq[300];
        osara__amqp_retry_name(k->actual, strlen(k->actual), rq, sizeof(rq));
        amqp_table_entry_t e[2] = {str_entry("x-dead-letter-exchange", ""),
                                   str_entry("x-dead-letter-routing-key", k->actual)};
        amqp_queue_declare(conn, CH_DECLARE, amqp_cstring_bytes(rq), 0, named && k->durable,
                           !named, 0, args_table(e, 2));
        if (!rpc_ok(conn)) {
            rpc_error(conn, "declaring the retry queue", err, n);
            return channel_refused(conn, CH_DECLARE);
        }
    }
    if (k->dlq) {
        amqp_queue_declare(conn, CH_DECLARE, amqp_cstring_bytes(k->dlq), 0, 1, 0, 0,
                           amqp_empty_table);
        if (!rpc_ok(conn)) {
            rpc_error(conn, "declaring the dead-letter queue", err, n);
            return channel_refused(conn, CH_DECLARE);
        }
    }
    return 0;
}

/* Declares and starts consuming k. 0, 1 refused (reported), -1 lost. */
static int consume(aclient_t *c, tcons_t *k)
{
    char err[256];
    int rc = declare(c, k, err, sizeof(err));
    if (rc != 0) {
        if (rc > 0) {
            osara__amqp_on_cons_failed(c, k->id, err);
        }
        return rc;
    }
    amqp_connection_state_t conn = c->t.conn;
    char tag[32];
    snprintf(tag, sizeof(tag), "osara-%d", k->id);
    /* Per consumer (global = 0): it bounds this consumer's unacked. */
    amqp_basic_qos(conn, CH_CONSUME, 0, (uint16_t)k->prefetch, 0);
    if (rpc_ok(conn)) {
        amqp_basic_consume(conn, CH_CONSUME, amqp_cstring_bytes(k->actual),
                           amqp_cstring_bytes(tag), 0, 0, 0, amqp_empty_table);
    }
    if (!rpc_ok(conn)) {
        return -1; /* channel 1 closed: start over with a new connection */
    }
    osara__amqp_on_consuming(c, k->id, k->actual);
    return 0;
}

static tcons_t **cons_find(aclient_t *c, int id)
{
    tcons_t **p = &c->t.cons;
    while (*p && (*p)->id != id) {
        p = &(*p)->next;
    }
    return p;
}

/* ---- publishing ------------------------------------------------------------ */

static int declared(aclient_t *c, const char *exchange)
{
    for (int i = 0; i < c->t.ndeclared; i++) {
        if (strcmp(c->t.declared[i], exchange) == 0) {
            return 1;
        }
    }
    return 0;
}

/* Declares p's exchange once per connection (Producer's behaviour: a
 * publish to a service's exchange works before anyone consumes it). */
static int declare_for(aclient_t *c, apub_t *p)
{
    if (p->declare_type == NULL || p->exchange[0] == 0 || declared(c, p->exchange)) {
        return 0;
    }
    amqp_exchange_declare(c->t.conn, CH_DECLARE, amqp_cstring_bytes(p->exchange),
                          amqp_cstring_bytes(p->declare_type), 0, 1, 0, 0, amqp_empty_table);
    if (!rpc_ok(c->t.conn)) {
        char err[200];
        rpc_error(c->t.conn, "declaring the exchange", err, sizeof(err));
        if (channel_refused(c->t.conn, CH_DECLARE) < 0) {
            return -1;
        }
        OSARA_WARN("amqp: exchange %s: %s (publishing to it as it is)", p->exchange, err);
    }
    c->t.declared = osara_xrealloc(c->t.declared, sizeof(char *) * (size_t)(c->t.ndeclared + 1));
    c->t.declared[c->t.ndeclared++] = osara_xstrdup(p->exchange);
    return 0;
}

/* Sends p on channel 2; it waits in `pending` for its confirm. */
static int send_pub(aclient_t *c, apub_t *p)
{
    if (declare_for(c, p) != 0) {
        return -1;
    }
    p->seq = ++c->t.next_seq;
    return amqp_basic_publish(c->t.conn, CH_PUBLISH, amqp_cstring_bytes(p->exchange),
                              amqp_cstring_bytes(p->routing_key), 0, 0, &p->props, p->body) ==
                   AMQP_STATUS_OK
               ? 0
               : -1;
}

static void pending_add(aclient_t *c, apub_t *p)
{
    p->next = NULL;
    if (c->t.pending_tail) {
        c->t.pending_tail->next = p;
    } else {
        c->t.pending = p;
    }
    c->t.pending_tail = p;
}

/* The broker confirmed (ok) or refused publishes up to tag (multiple) or
 * exactly tag. `pending` is in publication order, as the tags are. */
static void confirm(aclient_t *c, uint64_t tag, int multiple, int ok)
{
    apub_t **link = &c->t.pending, *kept = NULL;
    while (*link && (*link)->seq <= tag) {
        apub_t *p = *link;
        if (!multiple && p->seq != tag) {
            kept = p;
            link = &p->next;
            continue;
        }
        *link = p->next;
        p->ok = ok;
        if (!ok) {
            snprintf(p->err, sizeof(p->err), "the broker refused the message (basic.nack)");
        }
        osara__amqp_on_confirmed(c, p);
    }
    if (*link == NULL) {
        c->t.pending_tail = kept;
    }
}

/* Channel 2 was closed by the broker (a publish to a missing exchange):
 * what waits for a confirm fails with the reason; the channel reopens. */
static int publish_channel_closed(aclient_t *c, amqp_channel_close_t *m)
{
    char why[160];
    snprintf(why, sizeof(why), "%.*s", (int)m->reply_text.len, (char *)m->reply_text.bytes);
    OSARA_WARN("amqp: the broker closed the publishing channel: %s", why);
    while (c->t.pending) {
        apub_t *p = c->t.pending;
        c->t.pending = p->next;
        p->ok = 0;
        snprintf(p->err, sizeof(p->err), "%s", why);
        osara__amqp_on_confirmed(c, p);
    }
    c->t.pending_tail = NULL;
    amqp_channel_close_ok_t ok = {0};
    if (amqp_send_method(c->t.conn, CH_PUBLISH, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok) != 0 ||
        !amqp_channel_open(c->t.conn, CH_PUBLISH) || !amqp_confirm_select(c->t.conn, CH_PUBLISH)) {
        return -1;
    }
    c->t.next_seq = 0;
    return 0;
}

/* ---- commands ---------------------------------------------------------------- */

static acmd_t *take_commands(aclient_t *c)
{
    uint64_t v;
    ssize_t r = read(c->efd, &v, sizeof(v)); /* clears it; EAGAIN when 0 */
    (void)r;
    uv_mutex_lock(&c->mu);
    acmd_t *cmds = c->cmds;
    c->cmds = c->cmds_tail = NULL;
    uv_mutex_unlock(&c->mu);
    return cmds;
}

/* Runs one command; -1 when the connection failed. Disconnected, a
 * consumer is kept for the next connection, a publish waits for it, and
 * acks are dropped (their deliveries are redelivered anyway). */
static int run_command(aclient_t *c, acmd_t *cmd)
{
    amqp_connection_state_t conn = c->t.conn;
    int rc = 0;
    switch (cmd->type) {
    case CMD_CONSUME: /* a refused one was reported; it is tried again on reconnect */
        cmd->cons->next = c->t.cons;
        c->t.cons = cmd->cons;
        rc = conn && consume(c, cmd->cons) < 0 ? -1 : 0;
        break;
    case CMD_CANCEL: {
        tcons_t **p = cons_find(c, cmd->id);
        tcons_t *k = *p;
        if (k == NULL) {
            break;
        }
        *p = k->next;
        if (conn) {
            char tag[32];
            snprintf(tag, sizeof(tag), "osara-%d", k->id);
            /* nowait: no round trip on the consuming channel, whose
             * deliveries keep coming meanwhile (librabbitmq queues frames
             * that arrive during an RPC, and a delivery split by it has
             * been seen to lose its content frames). */
            amqp_basic_cancel_t cancel = {.consumer_tag = amqp_cstring_bytes(tag), .nowait = 1};
            rc = amqp_send_method(conn, CH_CONSUME, AMQP_BASIC_CANCEL_METHOD, &cancel) ==
                         AMQP_STATUS_OK
                     ? 0
                     : -1;
        }
        osara__amqp_cons_free(k);
        break;
    }
    case CMD_ACK:
        if (conn && cmd->gen == c->t.gen) {
            rc = amqp_basic_ack(conn, CH_CONSUME, cmd->tag, 0) == 0 ? 0 : -1;
        }
        break;
    case CMD_NACK:
        if (conn && cmd->gen == c->t.gen) {
            rc = amqp_basic_nack(conn, CH_CONSUME, cmd->tag, 0, 1) == 0 ? 0 : -1;
        }
        break;
    case CMD_PUBLISH:
        pending_add(c, cmd->pub);
        rc = conn ? send_pub(c, cmd->pub) : 0;
        break;
    }
    return rc;
}

/* Runs every queued command; frees them. -1 when the connection failed
 * (the commands after it still run, against no connection). */
static int run_commands(aclient_t *c)
{
    int rc = 0;
    for (acmd_t *cmd = take_commands(c), *next; cmd; cmd = next) {
        next = cmd->next;
        if (run_command(c, cmd) != 0 && rc == 0) {
            rc = -1;
            drop_connection(c);
        }
        free(cmd);
    }
    return rc;
}

/* ---- frames ------------------------------------------------------------------- */

static void copy_bytes(amqp_pool_t *pool, amqp_bytes_t *dst, amqp_bytes_t src)
{
    dst->len = src.len;
    dst->bytes = src.len ? amqp_pool_alloc(pool, src.len) : NULL;
    if (src.len) {
        memcpy(dst->bytes, src.bytes, src.len);
    }
}

static tcons_t *cons_by_tag(aclient_t *c, amqp_bytes_t tag, int *id)
{
    char buf[32];
    snprintf(buf, sizeof(buf), "%.*s", (int)tag.len, (char *)tag.bytes);
    *id = -1;
    sscanf(buf, "osara-%d", id);
    return *cons_find(c, *id);
}

/* basic.deliver: the message starts; its header and body frames follow
 * (read_frames completes it). Frames are taken in arrival order, never
 * searched by channel: librabbitmq's amqp_read_message picks a channel's
 * next frame out of its queue by dropping the frames queued before it
 * (publisher confirms among them), and blocks without a deadline. */
static int deliver(aclient_t *c, amqp_basic_deliver_t *dm)
{
    if (c->t.reading) { /* a method before the last body: a broken stream */
        return -1;
    }
    amsg_t *m = osara_xcalloc(1, sizeof(*m));
    init_amqp_pool(&m->pool, 1024);
    m->tag = dm->delivery_tag;
    m->redelivered = dm->redelivered;
    m->gen = c->t.gen;
    tcons_t *k = cons_by_tag(c, dm->consumer_tag, &m->sub_id);
    copy_bytes(&m->pool, &m->exchange, dm->exchange);
    copy_bytes(&m->pool, &m->routing_key, dm->routing_key);
    if (k) {
        copy_bytes(&m->pool, &m->queue, amqp_cstring_bytes(k->actual));
    }
    c->t.reading = m;
    c->t.have_header = 0;
    return 0;
}

/* The content header of the message being read: its properties and size. */
static void content_header(aclient_t *c, amqp_frame_t *f)
{
    amsg_t *m = c->t.reading;
    amqp_basic_properties_t *pr = f->payload.properties.decoded;
    if (pr->_flags & AMQP_BASIC_HEADERS_FLAG) {
        amqp_table_clone(&pr->headers, &m->headers, &m->pool);
        m->has_headers = 1;
    }
    if (pr->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG) {
        copy_bytes(&m->pool, &m->content_type, pr->content_type);
    }
    if (pr->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) {
        copy_bytes(&m->pool, &m->correlation_id, pr->correlation_id);
    }
    if (pr->_flags & AMQP_BASIC_REPLY_TO_FLAG) {
        copy_bytes(&m->pool, &m->reply_to, pr->reply_to);
    }
    if (pr->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
        copy_bytes(&m->pool, &m->message_id, pr->message_id);
    }
    m->body = amqp_bytes_malloc((size_t)f->payload.properties.body_size);
    m->body.len = 0;
    c->t.body_size = (size_t)f->payload.properties.body_size;
    c->t.have_header = 1;
}

/* A header or body frame on the consuming channel. -1: out of order. */
static int content_frame(aclient_t *c, amqp_frame_t *f)
{
    amsg_t *m = c->t.reading;
    if (m == NULL || (f->frame_type == AMQP_FRAME_HEADER) == c->t.have_header) {
        return -1;
    }
    if (f->frame_type == AMQP_FRAME_HEADER) {
        content_header(c, f);
    } else {
        amqp_bytes_t part = f->payload.body_fragment;
        if (m->body.len + part.len > c->t.body_size) {
            return -1;
        }
        memcpy((char *)m->body.bytes + m->body.len, part.bytes, part.len);
        m->body.len += part.len;
    }
    if (m->body.len == c->t.body_size) {
        c->t.reading = NULL;
        osara__amqp_on_delivery(c, m);
    }
    return 0;
}

/* One method frame outside an RPC. -1: the connection must be dropped. */
static int method_frame(aclient_t *c, amqp_frame_t *f)
{
    amqp_method_t *mt = &f->payload.method;
    switch (mt->id) {
    case AMQP_BASIC_DELIVER_METHOD:
        return deliver(c, mt->decoded);
    case AMQP_BASIC_ACK_METHOD: {
        amqp_basic_ack_t *a = mt->decoded;
        confirm(c, a->delivery_tag, a->multiple, 1);
        return 0;
    }
    case AMQP_BASIC_NACK_METHOD: {
        amqp_basic_nack_t *a = mt->decoded;
        confirm(c, a->delivery_tag, a->multiple, 0);
        return 0;
    }
    case AMQP_CHANNEL_CLOSE_METHOD:
        if (f->channel == CH_PUBLISH) {
            return publish_channel_closed(c, mt->decoded);
        }
        OSARA_WARN("amqp %s: the broker closed channel %d: %.*s", c->url, f->channel,
                   (int)((amqp_channel_close_t *)mt->decoded)->reply_text.len,
                   (char *)((amqp_channel_close_t *)mt->decoded)->reply_text.bytes);
        return -1;
    case AMQP_CONNECTION_CLOSE_METHOD:
        OSARA_WARN("amqp %s: the broker closed the connection: %.*s", c->url,
                   (int)((amqp_connection_close_t *)mt->decoded)->reply_text.len,
                   (char *)((amqp_connection_close_t *)mt->decoded)->reply_text.bytes);
        return -1;
    case AMQP_BASIC_CANCEL_METHOD:
        OSARA_WARN("amqp %s: the broker cancelled a consumer (its queue was deleted?)", c->url);
        return 0;
    default:
        return 0;
    }
}

/* Reads the frames there are, up to a bound. 1: more may wait. */
static int read_frames(aclient_t *c)
{
    for (int i = 0; i < FRAMES_PER_ROUND; i++) {
        amqp_frame_t f;
        struct timeval zero = {0, 0};
        amqp_maybe_release_buffers(c->t.conn);
        int rc = amqp_simple_wait_frame_noblock(c->t.conn, &f, &zero);
        if (rc == AMQP_STATUS_TIMEOUT) {
            return 0;
        }
        if (rc != AMQP_STATUS_OK) {
            OSARA_WARN("amqp %s: %s", c->url, amqp_error_string2(rc));
            return -1;
        }
        int bad = f.frame_type == AMQP_FRAME_METHOD ? method_frame(c, &f)
                  : (f.frame_type == AMQP_FRAME_HEADER || f.frame_type == AMQP_FRAME_BODY) &&
                          f.channel == CH_CONSUME
                      ? content_frame(c, &f)
                      : 0;
        if (bad != 0) {
            OSARA_WARN("amqp %s: unexpected frame (type %d on channel %d)", c->url,
                       f.frame_type, f.channel);
            return -1;
        }
    }
    return 1;
}

/* ---- the thread ------------------------------------------------------------- */

/* Waits for the socket (fd >= 0) or a command, up to ms. */
static void wait_io(aclient_t *c, int fd, int ms)
{
    struct pollfd p[2] = {{.fd = c->efd, .events = POLLIN}, {.fd = fd, .events = POLLIN}};
    poll(p, fd >= 0 ? 2 : 1, ms);
}

/* Restores consumers and resends the unconfirmed publishes. */
static int restore(aclient_t *c)
{
    for (tcons_t *k = c->t.cons; k; k = k->next) {
        if (consume(c, k) < 0) {
            return -1;
        }
    }
    for (apub_t *p = c->t.pending; p; p = p->next) {
        if (send_pub(c, p) != 0) {
            return -1;
        }
    }
    return 0;
}

/* The client closes: the acks and nacks the loop sent last go out, then
 * the close handshake, so the broker has processed them before the
 * connection goes (a plain socket close could lose them). Bounded: 2 s. */
static void close_gracefully(aclient_t *c)
{
    if (run_commands(c) != 0 || c->t.conn == NULL) {
        return;
    }
    amqp_set_rpc_timeout(c->t.conn, &(struct timeval){2, 0});
    amqp_connection_close(c->t.conn, AMQP_REPLY_SUCCESS);
}

/* Serves one connection until it fails or the client closes. */
static void serve(aclient_t *c)
{
    while (!atomic_load(&c->closing)) {
        if (run_commands(c) != 0) {
            return;
        }
        int more = read_frames(c);
        if (more < 0) {
            drop_connection(c);
            return;
        }
        int buffered = more || amqp_frames_enqueued(c->t.conn) || amqp_data_in_buffer(c->t.conn);
        wait_io(c, amqp_get_sockfd(c->t.conn), buffered ? 0 : 1000);
    }
    close_gracefully(c);
}

/* Fails what still waits for a confirm, frees consumers and commands. */
static void thread_end(aclient_t *c)
{
    drop_connection(c);
    for (acmd_t *cmd = take_commands(c), *next; cmd; cmd = next) {
        next = cmd->next;
        if (cmd->type == CMD_PUBLISH) {
            pending_add(c, cmd->pub);
        } else if (cmd->type == CMD_CONSUME) {
            osara__amqp_cons_free(cmd->cons);
        }
        free(cmd);
    }
    while (c->t.pending) {
        apub_t *p = c->t.pending;
        c->t.pending = p->next;
        p->ok = 0;
        snprintf(p->err, sizeof(p->err), "the client is closed");
        osara__amqp_on_confirmed(c, p);
    }
    while (c->t.cons) {
        tcons_t *k = c->t.cons;
        c->t.cons = k->next;
        osara__amqp_cons_free(k);
    }
}

void osara__amqp_thread(void *arg)
{
    aclient_t *c = arg;
    int backoff = 100, reported = 0;
    char err[256];
    while (!atomic_load(&c->closing)) {
        if (open_connection(c, err, sizeof(err)) != 0) {
            if (!reported) { /* once per outage, not per attempt */
                OSARA_WARN("amqp %s: cannot connect (retrying every %d ms up to 5 s): %s",
                           c->url, backoff, err);
                reported = 1;
            }
            wait_io(c, -1, backoff);
            backoff = backoff * 2 > 5000 ? 5000 : backoff * 2;
            continue;
        }
        backoff = 100;
        reported = 0;
        if (c->t.gen > 1) {
            osara_metric_add(osara__amqp_m.reconnects, 1);
            OSARA_INFO("amqp %s: reconnected", c->url);
        } else {
            OSARA_INFO("amqp %s: connected", c->url);
        }
        if (restore(c) == 0) {
            serve(c);
        }
        drop_connection(c);
        if (!atomic_load(&c->closing)) {
            osara_metric_add(osara__amqp_m.disconnects, 1);
            OSARA_WARN("amqp %s: disconnected; reconnecting (unacked messages are redelivered, "
                       "unconfirmed publishes sent again)", c->url);
        }
    }
    thread_end(c);
}
