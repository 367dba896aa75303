/* sql_int.h - what pool.c, pg.c and lite.c share (not an interface).
 *
 * A pool owns its connections. A connection is idle (in the pool's idle
 * list), leased (a Lua lease userdata holds it) or connecting (Postgres
 * only). A lease returns its connection on release() or __gc; a
 * connection that is broken, busy or inside a transaction at that point
 * is closed instead (the server rolls the transaction back), so a
 * cancelled coroutine never hands a dirty connection to the next caller. */
#ifndef OSARA_SQL_INT_H
#define OSARA_SQL_INT_H

#include <lua.h>
#include <uv.h>

#include "core/sched.h"
#include "core/worker.h"

typedef enum { SQL_SQLITE = 0, SQL_PG = 1 } sql_driver_t;

/* What lease:run returns: rows, or affected + last id, or true. */
typedef enum { SQL_ROWS = 0, SQL_EXEC = 1, SQL_SCRIPT = 2 } sql_mode_t;

/* Statements prepared on one connection, by SQL text. */
typedef struct sql_stmt_s {
    char *sql;
    void *handle; /* sqlite3_stmt*, or NULL for Postgres (named "s<id>") */
    unsigned id;
    struct sql_stmt_s *next;
} sql_stmt_t;

enum { SQL_STMT_BUCKETS = 64, SQL_STMT_MAX = 256 };

typedef struct sql_pool_s sql_pool_t;

typedef struct sql_conn_s {
    sql_pool_t *pool;
    void *db;              /* sqlite3* or PGconn* */
    uv_poll_t *poll;       /* Postgres: the socket on the loop */
    int fd;
    int events;            /* what poll watches now (UV_READABLE...) */
    int leased, broken, busy, connecting;
    osara_sched_waiter_t waiter; /* the coroutine waiting on this conn's op */
    struct sql_op_s *op;         /* Postgres: the operation in flight */
    struct sql_ckpt_s *ckpt;     /* SQLite: the checkpoint running off the loop */
    int ckpt_pages;              /* SQLite: pages in the log when it started */
    sql_stmt_t *stmts[SQL_STMT_BUCKETS];
    unsigned nstmts, next_stmt_id;
    struct sql_conn_s *next_idle;
} sql_conn_t;

typedef struct sql_wait_s {
    osara_sched_waiter_t waiter;
    sql_pool_t *pool;
    struct sql_wait_s *prev, *next;
} sql_wait_t;

struct sql_pool_s {
    sql_driver_t driver;
    char *target;     /* file path or libpq conninfo */
    char *label;      /* for logs: the URL without its password */
    int size;
    double timeout;   /* pool_timeout: seconds a caller waits for a conn */
    osara_worker_t *w;
    int refs;         /* Lua handles + leases + the worker's shared entry */
    int nopen;        /* connections open or connecting */
    int down;         /* the last connect failed and nothing is open */
    char last_err[256];
    double backoff;   /* seconds before the next reconnect attempt */
    uv_timer_t *reconnect;
    uv_idle_t *dispatcher; /* hands released connections to waiters */
    int dispatch_posted;
    unsigned long checkpoints; /* SQLite WAL checkpoints done off the loop */
    struct osara_metric_s *m_acquires, *m_waits, *m_timeouts, *m_lost, *m_connect_failures,
        *m_checkpoints; /* osara_sql_*_total{db="<label>"} */
    sql_conn_t *idle;
    sql_wait_t *waits, *waits_tail;
};

/* ---- pool.c: called by the drivers ---------------------------------------- */

/* A connection finished connecting (ok) or failed (err set in pool). */
void osara__sql_conn_ready(sql_conn_t *conn, int ok, const char *err);
/* The connection is unusable (server gone): close it unless leased, in
 * which case release closes it. Schedules a reconnect. */
void osara__sql_conn_broken(sql_conn_t *conn, const char *why);
/* Frees the connection's memory (the driver closed its handle). */
void osara__sql_conn_free(sql_conn_t *conn);

sql_stmt_t *osara__sql_stmt_find(sql_conn_t *conn, const char *sql);
/* Forgets a statement; returns its handle for the driver to free (or NULL). */
void *osara__sql_stmt_remove(sql_conn_t *conn, const char *sql);
/* Adds a statement; NULL when the connection caches SQL_STMT_MAX already. */
sql_stmt_t *osara__sql_stmt_add(sql_conn_t *conn, const char *sql, void *handle);

/* Pushes a Lua value for an integer result: a number up to 2^53 in
 * magnitude, else its decimal text (exact). */
void osara__sql_push_int(lua_State *L, long long v, const char *text);

/* Converts parameter `idx` of L to text for Postgres or checks it for
 * SQLite: raises on tables, functions and the like (misuse). */
const char *osara__sql_param_text(lua_State *L, int idx, char *buf, size_t cap,
                                  size_t *len);

/* ---- drivers --------------------------------------------------------------- */

/* Starts connecting; calls osara__sql_conn_ready now or later. */
void osara__sql_pg_connect(sql_conn_t *conn);
void osara__sql_lite_connect(sql_conn_t *conn);

/* lease:run on this connection: pushes results and returns their count,
 * or starts the operation and yields (Postgres). */
int osara__sql_pg_run(lua_State *L, sql_conn_t *conn, const char *sql,
                      sql_mode_t mode, int first_param, int nparams, int anchor);
int osara__sql_lite_run(lua_State *L, sql_conn_t *conn, const char *sql,
                        sql_mode_t mode, int first_param, int nparams);

/* Whether the connection may go back to the pool (idle, no transaction). */
int osara__sql_pg_reusable(sql_conn_t *conn);
int osara__sql_lite_reusable(sql_conn_t *conn);

/* Closes the handle and frees the connection (maybe from a close callback). */
void osara__sql_pg_close(sql_conn_t *conn);
void osara__sql_lite_close(sql_conn_t *conn);

#endif
