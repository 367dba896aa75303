/* pg.c - the PostgreSQL driver: libpq's asynchronous API with the
 * connection's socket in a uv_poll_t on the worker's loop.
 *
 * Connecting runs PQconnectPoll from the poll callback. A query sends
 * (PQsendPrepare once per statement and connection, then
 * PQsendQueryPrepared), flushes without blocking, yields the coroutine and
 * reads results as the socket becomes readable (PQconsumeInput, PQisBusy,
 * PQgetResult); the last result resumes the coroutine. An idle socket stays
 * watched so a server that goes away is noticed before the next query. A
 * host name is resolved on libuv's thread pool first (libpq's own lookup
 * would block). */
#include <arpa/inet.h>
#include <lauxlib.h>
#include <libpq-fe.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "core/mem.h"
#include "sql/sql_int.h"

enum { STAGE_PREPARE = 1, STAGE_DESCRIBE = 2, STAGE_EXECUTE = 3 };

/* A prepared statement's parameter types (sql_stmt_t.handle), learnt
 * once: bytea parameters go in binary format, so any bytes round-trip. */
typedef struct {
    int n;
    Oid types[];
} pg_params_t;

typedef struct sql_op_s {
    sql_mode_t mode;
    int stage;
    char *sql;      /* kept for the execute after a prepare */
    int nparams;
    char **values;  /* copies: the Lua stack is gone once we yield */
    int *lengths;
    int *formats;   /* 1 (binary) for bytea parameters */
    char errmsg[128]; /* an error found before sending */
    int replanned;    /* prepared again after a stale cached plan */
    PGresult *result; /* the last result */
    PGresult *error;  /* the first error */
} sql_op_t;

static void on_poll(uv_poll_t *h, int status, int events);

static void op_free(sql_op_t *op)
{
    for (int i = 0; i < op->nparams; i++) {
        free(op->values[i]);
    }
    free(op->values);
    free(op->lengths);
    free(op->formats);
    free(op->sql);
    PQclear(op->result);
    PQclear(op->error);
    free(op);
}

static void handle_closed(uv_handle_t *h) { free(h); }

static void close_poll(sql_conn_t *conn)
{
    if (conn->poll) {
        uv_close((uv_handle_t *)conn->poll, handle_closed);
        conn->poll = NULL;
        conn->fd = -1;
    }
}

/* Watches the connection's current socket for `events`. */
static void watch(sql_conn_t *conn, int events)
{
    int fd = PQsocket(conn->db);
    if (fd != conn->fd) {
        close_poll(conn); /* libpq moved to another socket (next host) */
        conn->poll = osara_xmalloc(sizeof(*conn->poll));
        uv_poll_init(&conn->pool->w->loop, conn->poll, fd);
        conn->poll->data = conn;
        conn->fd = fd;
        conn->events = 0;
    }
    if (events != conn->events) { /* each uv_poll_start costs an epoll_ctl */
        uv_poll_start(conn->poll, events, on_poll);
        conn->events = events;
    }
}

/* libpq's message on one line: whitespace runs (its "\n\t") become one space. */
static void copy_error(char *buf, size_t cap, const char *msg)
{
    size_t n = 0;
    int space = 0;
    for (const char *p = msg && *msg ? msg : "unknown error"; *p && n + 1 < cap; p++) {
        if (*p == '\n' || *p == '\t' || *p == ' ') {
            space = n > 0;
            continue;
        }
        if (space && n + 2 < cap) {
            buf[n++] = ' ';
        }
        space = 0;
        buf[n++] = *p;
    }
    buf[n] = '\0';
}

void osara__sql_pg_close(sql_conn_t *conn)
{
    for (int b = 0; b < SQL_STMT_BUCKETS; b++) {
        for (sql_stmt_t *st = conn->stmts[b]; st; st = st->next) {
            free(st->handle);
        }
    }
    close_poll(conn);
    if (conn->op) {
        op_free(conn->op);
        conn->op = NULL;
    }
    PQfinish(conn->db);
    osara__sql_conn_free(conn);
}

/* ---- connecting -------------------------------------------------------------- */

/* Server notices (NOTICE: table exists, skipping) go to the debug log,
 * not to stderr as libpq's default does. */
static void on_notice(void *arg, const char *message)
{
    sql_conn_t *conn = arg;
    char msg[256];
    copy_error(msg, sizeof(msg), message);
    OSARA_DEBUG("sql: %s: %s", conn->pool->label, msg);
}

static void connect_failed(sql_conn_t *conn)
{
    char err[256];
    copy_error(err, sizeof(err), conn->db ? PQerrorMessage(conn->db) : "out of memory");
    close_poll(conn);
    PQfinish(conn->db);
    conn->db = NULL;
    osara__sql_conn_ready(conn, 0, err);
}

static void connect_step(sql_conn_t *conn)
{
    switch (PQconnectPoll(conn->db)) {
    case PGRES_POLLING_READING:
        watch(conn, UV_READABLE);
        break;
    case PGRES_POLLING_WRITING:
        watch(conn, UV_WRITABLE);
        break;
    case PGRES_POLLING_OK:
        PQsetnonblocking(conn->db, 1);
        PQsetNoticeProcessor(conn->db, on_notice, conn);
        watch(conn, UV_READABLE); /* notice a server that goes away */
        osara__sql_conn_ready(conn, 1, NULL);
        break;
    default:
        connect_failed(conn);
        break;
    }
}

static void connect_begin(sql_conn_t *conn)
{
    if (conn->db == NULL || PQstatus(conn->db) == CONNECTION_BAD) {
        connect_failed(conn);
        return;
    }
    watch(conn, UV_WRITABLE);
}

/* ---- host names: resolved on libuv's thread pool ----------------------------
 *
 * PQconnectStart resolves a host name with a blocking getaddrinfo. A single
 * host name (not an IP address, a socket folder or a list) is resolved with
 * uv_getaddrinfo first and passed as hostaddr, so connecting never blocks. */

typedef struct {
    uv_getaddrinfo_t req;
    sql_conn_t *conn;
    PQconninfoOption *opts; /* the URL's settings (only those it gives) */
} pg_lookup_t;

static const char *option(const PQconninfoOption *opts, const char *key)
{
    for (; opts->keyword; opts++) {
        if (strcmp(opts->keyword, key) == 0) {
            return opts->val;
        }
    }
    return NULL;
}

static int needs_lookup(const PQconninfoOption *opts)
{
    const char *host = option(opts, "host");
    unsigned char addr[sizeof(struct in6_addr)];
    if (option(opts, "hostaddr") || host == NULL || host[0] == '\0' || host[0] == '/' ||
        host[0] == '@' || strchr(host, ',')) {
        return 0;
    }
    return inet_pton(AF_INET, host, addr) != 1 && inet_pton(AF_INET6, host, addr) != 1;
}

/* Connects with the URL's settings, host repeated once per address and
 * hostaddr listing the addresses: libpq tries them in order, as it does
 * with the addresses it resolves itself. */
static void connect_with_addrs(sql_conn_t *conn, const PQconninfoOption *opts,
                               const char *hosts, const char *addrs)
{
    size_t n = 0;
    for (const PQconninfoOption *o = opts; o->keyword; o++) {
        n++;
    }
    const char **keys = osara_xcalloc(n + 2, sizeof(char *));
    const char **vals = osara_xcalloc(n + 2, sizeof(char *));
    size_t k = 0;
    for (const PQconninfoOption *o = opts; o->keyword; o++) {
        if (o->val) {
            keys[k] = o->keyword;
            vals[k++] = strcmp(o->keyword, "host") == 0 ? hosts : o->val;
        }
    }
    keys[k] = "hostaddr";
    vals[k] = addrs;
    conn->db = PQconnectStartParams(keys, vals, 0);
    free(keys);
    free(vals);
    connect_begin(conn);
}

enum { MAX_ADDRS = 8 };

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    pg_lookup_t *lk = req->data;
    const char *host = option(lk->opts, "host");
    char addrs[MAX_ADDRS * (INET6_ADDRSTRLEN + 1)] = "", hosts[2048] = "";
    int count = 0;
    for (struct addrinfo *ai = res; ai && count < MAX_ADDRS; ai = ai->ai_next) {
        char ip[INET6_ADDRSTRLEN];
        const void *a = ai->ai_family == AF_INET6
                            ? (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr
                            : (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr;
        if (inet_ntop(ai->ai_family, a, ip, sizeof(ip)) == NULL ||
            strlen(hosts) + strlen(host) + 2 > sizeof(hosts)) {
            continue;
        }
        snprintf(addrs + strlen(addrs), sizeof(addrs) - strlen(addrs), "%s%s", count ? "," : "", ip);
        snprintf(hosts + strlen(hosts), sizeof(hosts) - strlen(hosts), "%s%s", count ? "," : "", host);
        count++;
    }
    if (count > 0) {
        connect_with_addrs(lk->conn, lk->opts, hosts, addrs);
    } else {
        char err[256];
        snprintf(err, sizeof(err), "could not resolve host \"%s\": %s", host,
                 uv_strerror(status ? status : UV_EAI_NODATA));
        osara__sql_conn_ready(lk->conn, 0, err);
    }
    uv_freeaddrinfo(res);
    PQconninfoFree(lk->opts);
    free(lk);
}

void osara__sql_pg_connect(sql_conn_t *conn)
{
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(conn->pool->target, &perr);
    if (opts == NULL || !needs_lookup(opts)) {
        PQconninfoFree(opts);
        PQfreemem(perr);
        conn->db = PQconnectStart(conn->pool->target); /* reports a bad URL itself */
        connect_begin(conn);
        return;
    }
    pg_lookup_t *lk = osara_xcalloc(1, sizeof(*lk));
    lk->req.data = lk;
    lk->conn = conn;
    lk->opts = opts;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    int rc = uv_getaddrinfo(&conn->pool->w->loop, &lk->req, on_resolved, option(opts, "host"),
                            NULL, &hints);
    if (rc != 0) {
        on_resolved(&lk->req, rc, NULL);
    }
}

int osara__sql_pg_reusable(sql_conn_t *conn)
{
    return PQstatus(conn->db) == CONNECTION_OK &&
           PQtransactionStatus(conn->db) == PQTRANS_IDLE;
}

/* ---- results ------------------------------------------------------------------ */

/* Type OIDs (src/include/catalog/pg_type.dat). */
enum {
    OID_BOOL = 16, OID_BYTEA = 17, OID_INT8 = 20, OID_INT2 = 21, OID_INT4 = 23,
    OID_OID = 26, OID_FLOAT4 = 700, OID_FLOAT8 = 701,
};

static void push_value(lua_State *L, const PGresult *res, int row, int col)
{
    if (PQgetisnull(res, row, col)) {
        lua_pushlightuserdata(L, NULL); /* osara.null */
        return;
    }
    const char *v = PQgetvalue(res, row, col);
    switch (PQftype(res, col)) {
    case OID_BOOL:
        lua_pushboolean(L, v[0] == 't');
        break;
    case OID_INT2:
    case OID_INT4:
    case OID_OID:
    case OID_INT8:
        osara__sql_push_int(L, strtoll(v, NULL, 10), v);
        break;
    case OID_FLOAT4:
    case OID_FLOAT8:
        lua_pushnumber(L, strtod(v, NULL));
        break;
    case OID_BYTEA: {
        size_t n;
        unsigned char *bytes = PQunescapeBytea((const unsigned char *)v, &n);
        lua_pushlstring(L, (const char *)bytes, n);
        PQfreemem(bytes);
        break;
    }
    default: /* text, numeric (exact), dates, json, uuid...: as Postgres prints them */
        lua_pushlstring(L, v, (size_t)PQgetlength(res, row, col));
        break;
    }
}

static void push_rows(lua_State *L, const PGresult *res)
{
    int nrows = PQntuples(res), ncols = PQnfields(res);
    lua_createtable(L, nrows, 0); /* [rows] */
    for (int r = 0; r < nrows; r++) {
        lua_createtable(L, 0, ncols); /* [rows, row] */
        for (int c = 0; c < ncols; c++) {
            lua_pushstring(L, PQfname(res, c));
            push_value(L, res, r, c);
            lua_rawset(L, -3);
        }
        lua_rawseti(L, -2, r + 1);
    }
}

static int push_error(lua_State *L, sql_conn_t *conn, const PGresult *err)
{
    char msg[512];
    const char *primary = err ? PQresultErrorField(err, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    copy_error(msg, sizeof(msg), primary ? primary : PQerrorMessage(conn->db));
    lua_pushnil(L);
    lua_pushfstring(L, "postgres: %s", msg);
    const char *state = err ? PQresultErrorField(err, PG_DIAG_SQLSTATE) : NULL;
    if (state) {
        lua_pushstring(L, state);
        return 3;
    }
    return 2;
}

static int push_results(lua_State *L, sql_conn_t *conn, sql_op_t *op)
{
    const PGresult *res = op->result;
    if (op->errmsg[0]) {
        lua_pushnil(L);
        lua_pushfstring(L, "postgres: %s", op->errmsg);
        return 2;
    }
    if (op->error || res == NULL) {
        return push_error(L, conn, op->error);
    }
    if (op->mode == SQL_ROWS) {
        push_rows(L, res);
        return 1;
    }
    if (op->mode == SQL_SCRIPT) {
        lua_pushboolean(L, 1);
        return 1;
    }
    const char *affected = PQcmdTuples((PGresult *)res);
    lua_pushnumber(L, affected[0] ? strtod(affected, NULL) : 0);
    if (PQntuples(res) > 0 && PQnfields(res) > 0) {
        push_value(L, res, PQntuples(res) - 1, 0); /* RETURNING id */
    } else {
        lua_pushnil(L);
    }
    return 2;
}

/* ---- operations ------------------------------------------------------------------ */

static int flush(sql_conn_t *conn)
{
    int r = PQflush(conn->db);
    if (r >= 0) {
        watch(conn, r == 1 ? UV_READABLE | UV_WRITABLE : UV_READABLE);
    }
    return r;
}

static void op_complete(sql_conn_t *conn)
{
    sql_op_t *op = conn->op;
    conn->op = NULL;
    conn->busy = 0;
    osara_co_t *co = osara_sched_waiter_current(&conn->waiter);
    conn->waiter.co = NULL;
    if (co) {
        int n = push_results(osara_co_thread(co), conn, op);
        osara_sched_resume(co, n);
    }
    op_free(op);
}

static void stmt_name(char *buf, size_t cap, unsigned id)
{
    snprintf(buf, cap, "osara_%u", id);
}

/* Binary format for bytea parameters (any bytes); text for the rest,
 * which cannot hold a NUL byte: refused rather than cut short. Without
 * known types (statement cache full) a value with a NUL goes binary. */
static int param_formats(sql_op_t *op, const pg_params_t *types)
{
    for (int i = 0; i < op->nparams; i++) {
        int bytea = types && i < types->n && types->types[i] == OID_BYTEA;
        int nul = op->values[i] && memchr(op->values[i], 0, (size_t)op->lengths[i]);
        op->formats[i] = bytea || (nul && types == NULL);
        if (nul && types && !bytea) {
            snprintf(op->errmsg, sizeof(op->errmsg),
                     "parameter $%d contains a NUL byte (only bytea takes binary data)", i + 1);
            return -1;
        }
    }
    return 0;
}

/* Sends the execute; 1 sent, 0 libpq failed, -1 refused (op->errmsg). */
static int send_execute(sql_conn_t *conn, sql_op_t *op, const sql_stmt_t *st)
{
    op->stage = STAGE_EXECUTE;
    if (param_formats(op, st ? st->handle : NULL) != 0) {
        return -1;
    }
    const char *const *values = (const char *const *)op->values;
    if (st == NULL) { /* cache full: unnamed statement */
        return PQsendQueryParams(conn->db, op->sql, op->nparams, NULL, values, op->lengths,
                                 op->formats, 0);
    }
    char name[32];
    stmt_name(name, sizeof(name), st->id);
    return PQsendQueryPrepared(conn->db, name, op->nparams, values, op->lengths, op->formats, 0);
}

static void send_failed(sql_conn_t *conn, int sent)
{
    if (sent == 0 || flush(conn) < 0) {
        osara__sql_conn_broken(conn, PQerrorMessage(conn->db));
    }
    op_complete(conn);
}

/* The prepare finished: cache the statement and ask for its parameters. */
static void prepared(sql_conn_t *conn, sql_op_t *op)
{
    PQclear(op->result);
    op->result = NULL;
    sql_stmt_t *st = osara__sql_stmt_add(conn, op->sql, NULL);
    char name[32];
    stmt_name(name, sizeof(name), st->id);
    op->stage = STAGE_DESCRIBE;
    if (!PQsendDescribePrepared(conn->db, name) || flush(conn) < 0) {
        send_failed(conn, 0);
    }
}

/* The description arrived: keep the parameter types, send the execute. */
static void described(sql_conn_t *conn, sql_op_t *op)
{
    sql_stmt_t *st = osara__sql_stmt_find(conn, op->sql);
    int n = op->result ? PQnparams(op->result) : 0;
    pg_params_t *types = osara_xmalloc(sizeof(*types) + (size_t)n * sizeof(Oid));
    types->n = n;
    for (int i = 0; i < n; i++) {
        types->types[i] = PQparamtype(op->result, i);
    }
    st->handle = types;
    PQclear(op->result);
    op->result = NULL;
    int sent = send_execute(conn, op, st);
    if (sent != 1 || flush(conn) < 0) {
        send_failed(conn, sent);
    }
}

static void collect(sql_op_t *op, PGresult *res)
{
    ExecStatusType s = PQresultStatus(res);
    if (s == PGRES_FATAL_ERROR || s == PGRES_BAD_RESPONSE) {
        if (op->error == NULL) {
            op->error = res;
            return;
        }
    } else if (op->result == NULL || op->mode != SQL_SCRIPT || PQntuples(res) > 0) {
        PQclear(op->result);
        op->result = res;
        return;
    }
    PQclear(res);
}

static int send_op(sql_conn_t *conn, sql_op_t *op);

/* "cached plan must not change result type": a migration changed the
 * columns under a statement this connection prepared. The statement is
 * forgotten (the next run prepares it again); outside a transaction the
 * run is retried once at once, since the failed execute did nothing. */
static int stale_plan(sql_conn_t *conn, sql_op_t *op)
{
    const char *state = op->error ? PQresultErrorField(op->error, PG_DIAG_SQLSTATE) : NULL;
    if (state == NULL || strcmp(state, "0A000") != 0 || op->stage != STAGE_EXECUTE) {
        return 0;
    }
    free(osara__sql_stmt_remove(conn, op->sql));
    return !op->replanned && PQtransactionStatus(conn->db) == PQTRANS_IDLE;
}

static void replan(sql_conn_t *conn, sql_op_t *op)
{
    op->replanned = 1;
    PQclear(op->error);
    PQclear(op->result);
    op->error = op->result = NULL;
    int sent = send_op(conn, op);
    if (sent != 1 || flush(conn) < 0) {
        send_failed(conn, sent);
    }
}

/* Reads what arrived; finishes the stage when libpq has no more results. */
static void op_read(sql_conn_t *conn)
{
    sql_op_t *op = conn->op;
    if (!PQconsumeInput(conn->db)) {
        char err[256];
        copy_error(err, sizeof(err), PQerrorMessage(conn->db));
        osara__sql_conn_broken(conn, err);
        op_complete(conn);
        return;
    }
    while (!PQisBusy(conn->db)) {
        PGresult *res = PQgetResult(conn->db);
        if (res == NULL) {
            if (op->stage == STAGE_PREPARE && op->error == NULL) {
                prepared(conn, op);
            } else if (op->stage == STAGE_DESCRIBE && op->error == NULL) {
                described(conn, op);
            } else if (stale_plan(conn, op)) {
                replan(conn, op);
            } else {
                op_complete(conn);
            }
            return;
        }
        collect(op, res);
    }
}

static void idle_read(sql_conn_t *conn)
{
    if (!PQconsumeInput(conn->db) || PQstatus(conn->db) != CONNECTION_OK) {
        char err[256];
        copy_error(err, sizeof(err), PQerrorMessage(conn->db));
        osara__sql_conn_broken(conn, err);
        return;
    }
    PGnotify *n;
    while ((n = PQnotifies(conn->db)) != NULL) {
        PQfreemem(n);
    }
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    sql_conn_t *conn = h->data;
    if (conn->connecting) {
        connect_step(conn);
        return;
    }
    if (conn->op == NULL) {
        if (!conn->broken) {
            idle_read(conn);
        }
        return;
    }
    if (status < 0 || ((events & UV_WRITABLE) && flush(conn) < 0)) {
        osara__sql_conn_broken(conn, status < 0 ? uv_strerror(status)
                                                : PQerrorMessage(conn->db));
        op_complete(conn);
        return;
    }
    if (events & UV_READABLE) {
        op_read(conn);
    }
}

static sql_op_t *op_new(lua_State *L, const char *sql, sql_mode_t mode, int first,
                        int nparams)
{
    char buf[32];
    size_t len = 0;
    for (int i = 0; i < nparams; i++) { /* raises on a bad value: before allocating */
        osara__sql_param_text(L, first + i, buf, sizeof(buf), &len);
    }
    sql_op_t *op = osara_xcalloc(1, sizeof(*op));
    op->mode = mode;
    op->sql = osara_xstrdup(sql);
    op->nparams = nparams;
    op->values = osara_xcalloc((size_t)nparams + 1, sizeof(char *));
    op->lengths = osara_xcalloc((size_t)nparams + 1, sizeof(int));
    op->formats = osara_xcalloc((size_t)nparams + 1, sizeof(int));
    for (int i = 0; i < nparams; i++) {
        const char *v = osara__sql_param_text(L, first + i, buf, sizeof(buf), &len);
        if (v) {
            op->values[i] = osara_xmalloc(len + 1);
            memcpy(op->values[i], v, len);
            op->values[i][len] = '\0';
            op->lengths[i] = (int)len;
        }
    }
    return op;
}

static int send_op(sql_conn_t *conn, sql_op_t *op)
{
    if (op->mode == SQL_SCRIPT) {
        op->stage = STAGE_EXECUTE;
        return PQsendQuery(conn->db, op->sql);
    }
    const sql_stmt_t *st = osara__sql_stmt_find(conn, op->sql);
    if (st || conn->nstmts >= SQL_STMT_MAX) {
        return send_execute(conn, op, st);
    }
    char name[32];
    stmt_name(name, sizeof(name), conn->next_stmt_id + 1); /* the id stmt_add gives */
    op->stage = STAGE_PREPARE;
    return PQsendPrepare(conn->db, name, op->sql, 0, NULL);
}

int osara__sql_pg_run(lua_State *L, sql_conn_t *conn, const char *sql,
                      sql_mode_t mode, int first_param, int nparams, int anchor)
{
    if (osara_sched_current(L) == NULL) {
        return luaL_error(L, "osara.sql: a Postgres query waits for the server: only "
                             "inside a handler, timer or task (not at load time)");
    }
    sql_op_t *op = op_new(L, sql, mode, first_param, nparams);
    int sent = send_op(conn, op);
    if (sent < 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "postgres: %s", op->errmsg);
        op_free(op);
        return 2;
    }
    if (sent == 0 || flush(conn) < 0) {
        char err[256];
        copy_error(err, sizeof(err), PQerrorMessage(conn->db));
        op_free(op);
        if (PQstatus(conn->db) != CONNECTION_OK) {
            osara__sql_conn_broken(conn, err);
        }
        lua_pushnil(L);
        lua_pushfstring(L, "postgres: %s", err);
        return 2;
    }
    conn->op = op;
    conn->busy = 1;
    osara_sched_waiter_set(&conn->waiter, L);
    return osara_sched_wait(L, anchor, NULL, NULL);
}
