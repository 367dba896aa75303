/* lite.c - the SQLite driver: runs on the loop thread.
 *
 * Statements are short and local (docs/sql.md gives the measurements):
 * WAL journal with synchronous=NORMAL, so a commit appends to the log
 * without an fsync. The checkpoint, which does fsync, runs off the loop:
 * auto-checkpoints are off and a commit that leaves 1000 pages in the log
 * queues a PASSIVE checkpoint on libuv's thread pool, on a connection of
 * its own (it never takes the write lock). One connection per pool (a transaction that yields
 * keeps it; others wait for it in the pool, never in SQLite's busy
 * handler). Placeholders are $1, $2, ...: SQLite reads `$1` as a named
 * parameter, so they are bound by name and the SQL text is never
 * rewritten. */
#include <ctype.h>
#include <lauxlib.h>
#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/mem.h"
#include "core/metrics.h"
#include "sql/sql_int.h"

/* Longest a statement waits on a lock held by another process (osara sql
 * migrate from a shell): bounded, since it blocks the loop meanwhile. */
enum { BUSY_TIMEOUT_MS = 250, CHECKPOINT_PAGES = 1000 };

typedef struct sql_ckpt_s {
    uv_work_t req;
    sql_conn_t *conn; /* NULL once the connection closed meanwhile */
    char *path;
} sql_ckpt_t;

static void checkpoint_work(uv_work_t *req)
{
    sql_ckpt_t *job = req->data;
    sqlite3 *db = NULL;
    if (sqlite3_open_v2(job->path, &db, SQLITE_OPEN_READWRITE, NULL) == SQLITE_OK &&
        sqlite3_exec(db, "PRAGMA schema_version", NULL, NULL, NULL) == SQLITE_OK) {
        /* (a first read opens the WAL: before it, the checkpoint is a no-op) */
        sqlite3_wal_checkpoint_v2(db, "main", SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    }
    sqlite3_close_v2(db);
}

static void checkpoint_done(uv_work_t *req, int status)
{
    (void)status;
    sql_ckpt_t *job = req->data;
    if (job->conn) {
        job->conn->ckpt = NULL;
        job->conn->pool->checkpoints++;
        osara_metric_add(job->conn->pool->m_checkpoints, 1);
    }
    free(job->path);
    free(job);
}

/* After each commit, with the pages now in the log. */
static int on_wal(void *arg, sqlite3 *db, const char *name, int pages)
{
    (void)db;
    (void)name;
    sql_conn_t *conn = arg;
    if (pages < conn->ckpt_pages) {
        conn->ckpt_pages = 0; /* the log restarted from its beginning */
    }
    /* Every 1000 new pages: a writer that outpaces the checkpoint keeps
     * the log from restarting, and must not keep the thread busy. */
    if (pages - conn->ckpt_pages < CHECKPOINT_PAGES || conn->ckpt != NULL) {
        return SQLITE_OK;
    }
    conn->ckpt_pages = pages;
    sql_ckpt_t *job = osara_xcalloc(1, sizeof(*job));
    job->req.data = job;
    job->conn = conn;
    job->path = osara_xstrdup(conn->pool->target);
    conn->ckpt = job;
    uv_queue_work(&conn->pool->w->loop, &job->req, checkpoint_work, checkpoint_done);
    return SQLITE_OK;
}

void osara__sql_lite_connect(sql_conn_t *conn)
{
    sqlite3 *db = NULL;
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
    int rc = sqlite3_open_v2(conn->pool->target, &db, flags, NULL);
    if (rc != SQLITE_OK) {
        char err[256];
        snprintf(err, sizeof(err), "sqlite: cannot open %s: %s", conn->pool->target,
                 db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
        sqlite3_close_v2(db);
        osara__sql_conn_ready(conn, 0, err);
        return;
    }
    sqlite3_busy_timeout(db, BUSY_TIMEOUT_MS);
    sqlite3_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
                     "PRAGMA foreign_keys=ON",
                 NULL, NULL, NULL);
    sqlite3_wal_hook(db, on_wal, conn); /* replaces the auto-checkpoint */
    conn->db = db;
    osara__sql_conn_ready(conn, 1, NULL);
}

int osara__sql_lite_reusable(sql_conn_t *conn)
{
    return sqlite3_get_autocommit(conn->db) != 0; /* not inside a transaction */
}

void osara__sql_lite_close(sql_conn_t *conn)
{
    if (conn->ckpt) {
        conn->ckpt->conn = NULL; /* it finishes on its own */
    }
    for (int b = 0; b < SQL_STMT_BUCKETS; b++) {
        for (sql_stmt_t *st = conn->stmts[b]; st; st = st->next) {
            sqlite3_finalize(st->handle);
        }
    }
    sqlite3_close_v2(conn->db);
    osara__sql_conn_free(conn);
}

static int push_error(lua_State *L, sqlite3 *db, const char *what)
{
    lua_pushnil(L);
    lua_pushfstring(L, "sqlite: %s", what ? what : sqlite3_errmsg(db));
    return 2;
}

static void push_column(lua_State *L, sqlite3_stmt *stmt, int col)
{
    switch (sqlite3_column_type(stmt, col)) {
    case SQLITE_INTEGER:
        osara__sql_push_int(L, sqlite3_column_int64(stmt, col), NULL);
        break;
    case SQLITE_FLOAT:
        lua_pushnumber(L, sqlite3_column_double(stmt, col));
        break;
    case SQLITE_NULL:
        lua_pushlightuserdata(L, NULL); /* osara.null */
        break;
    default: { /* TEXT and BLOB: the bytes as stored */
        const void *p = sqlite3_column_blob(stmt, col);
        lua_pushlstring(L, p ? p : "", (size_t)sqlite3_column_bytes(stmt, col));
        break;
    }
    }
}

/* The placeholder number of `$N`, or 0 for any other spelling. */
static int placeholder_number(const char *name)
{
    if (name == NULL || name[0] != '$' || !isdigit((unsigned char)name[1])) {
        return 0;
    }
    char *end;
    long n = strtol(name + 1, &end, 10);
    return *end == '\0' && n > 0 && n < 65536 ? (int)n : 0;
}

static void bind_param(lua_State *L, sqlite3_stmt *stmt, int i, int idx)
{
    size_t len;
    switch (lua_type(L, idx)) {
    case LUA_TBOOLEAN:
        sqlite3_bind_int(stmt, i, lua_toboolean(L, idx));
        return;
    case LUA_TNUMBER: {
        double d = lua_tonumber(L, idx);
        if (d == floor(d) && fabs(d) < 9.2e18) {
            sqlite3_bind_int64(stmt, i, (sqlite3_int64)d);
        } else {
            sqlite3_bind_double(stmt, i, d);
        }
        return;
    }
    case LUA_TSTRING: {
        const char *s = lua_tolstring(L, idx, &len);
        sqlite3_bind_text(stmt, i, s, (int)len, SQLITE_STATIC); /* lives on L's stack */
        return;
    }
    default: /* nil or osara.null (checked before binding) */
        sqlite3_bind_null(stmt, i);
        return;
    }
}

/* Binds $1..$n by name; returns NULL or why the statement cannot run. */
static const char *bind_all(lua_State *L, sqlite3_stmt *stmt, int first, int nparams,
                            char *err, size_t cap)
{
    int count = sqlite3_bind_parameter_count(stmt), max = 0;
    for (int i = 1; i <= count; i++) {
        int n = placeholder_number(sqlite3_bind_parameter_name(stmt, i));
        if (n == 0) {
            const char *name = sqlite3_bind_parameter_name(stmt, i);
            snprintf(err, cap, "placeholders are $1, $2, ... (got '%s')", name ? name : "?");
            return err;
        }
        max = n > max ? n : max;
    }
    if (max != nparams) {
        snprintf(err, cap, "the statement takes %d parameters, got %d", max, nparams);
        return err;
    }
    for (int i = 1; i <= count; i++) {
        int n = placeholder_number(sqlite3_bind_parameter_name(stmt, i));
        bind_param(L, stmt, i, first + n - 1);
    }
    return NULL;
}

/* The cached statement for sql, prepared now if needed; *owned is set
 * when the cache is full and the caller must finalize it. */
static sqlite3_stmt *statement(sql_conn_t *conn, const char *sql, int *owned,
                               char *err, size_t cap)
{
    sql_stmt_t *st = osara__sql_stmt_find(conn, sql);
    if (st) {
        return st->handle;
    }
    sqlite3_stmt *stmt = NULL;
    const char *tail = NULL;
    if (sqlite3_prepare_v3(conn->db, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, &tail) !=
        SQLITE_OK) {
        snprintf(err, cap, "%s", sqlite3_errmsg(conn->db));
        return NULL;
    }
    while (tail && isspace((unsigned char)*tail)) {
        tail++;
    }
    if (stmt == NULL || (tail && *tail)) {
        sqlite3_finalize(stmt);
        snprintf(err, cap, "one statement per query (migrations take scripts)");
        return NULL;
    }
    *owned = osara__sql_stmt_add(conn, sql, stmt) == NULL;
    return stmt;
}

/* INSERT or REPLACE as the first word: last_insert_rowid means something. */
static int inserts(const char *sql)
{
    while (isspace((unsigned char)*sql)) {
        sql++;
    }
    return strncasecmp(sql, "insert", 6) == 0 || strncasecmp(sql, "replace", 7) == 0;
}

static int step_all(lua_State *L, sql_conn_t *conn, sqlite3_stmt *stmt, const char *sql,
                    sql_mode_t mode)
{
    int ncols = sqlite3_column_count(stmt), nrows = 0, rc;
    lua_newtable(L); /* [rows] */
    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        lua_createtable(L, 0, ncols); /* [rows, row] */
        for (int c = 0; c < ncols; c++) {
            lua_pushstring(L, sqlite3_column_name(stmt, c));
            push_column(L, stmt, c);
            lua_rawset(L, -3);
        }
        lua_rawseti(L, -2, ++nrows);
    }
    if (rc != SQLITE_DONE) {
        lua_pop(L, 1);
        return push_error(L, conn->db, NULL);
    }
    if (mode == SQL_ROWS) {
        return 1;
    }
    lua_pushnumber(L, sqlite3_changes(conn->db)); /* [rows, affected] */
    if (nrows > 0 && ncols > 0) {
        lua_rawgeti(L, -2, nrows);
        lua_pushstring(L, sqlite3_column_name(stmt, 0));
        lua_rawget(L, -2); /* [rows, affected, lastrow, id] */
        lua_remove(L, -2);
    } else if (inserts(sql) && sqlite3_changes(conn->db) > 0) {
        osara__sql_push_int(L, sqlite3_last_insert_rowid(conn->db), NULL);
    } else {
        lua_pushnil(L);
    }
    lua_remove(L, -3); /* [affected, id] */
    return 2;
}

int osara__sql_lite_run(lua_State *L, sql_conn_t *conn, const char *sql,
                        sql_mode_t mode, int first_param, int nparams)
{
    char err[256];
    if (mode == SQL_SCRIPT) {
        char *msg = NULL;
        if (sqlite3_exec(conn->db, sql, NULL, NULL, &msg) != SQLITE_OK) {
            snprintf(err, sizeof(err), "%s", msg ? msg : sqlite3_errmsg(conn->db));
            sqlite3_free(msg);
            return push_error(L, conn->db, err);
        }
        lua_pushboolean(L, 1);
        return 1;
    }
    for (int i = 0; i < nparams; i++) { /* raises on a bad value: before binding */
        size_t len;
        osara__sql_param_text(L, first_param + i, err, sizeof(err), &len);
    }
    int owned = 0;
    sqlite3_stmt *stmt = statement(conn, sql, &owned, err, sizeof(err));
    if (stmt == NULL) {
        return push_error(L, conn->db, err);
    }
    int n;
    if (bind_all(L, stmt, first_param, nparams, err, sizeof(err)) != NULL) {
        n = push_error(L, conn->db, err);
    } else {
        n = step_all(L, conn, stmt, sql, mode);
    }
    sqlite3_reset(stmt);
    sqlite3_clear_bindings(stmt);
    if (owned) {
        sqlite3_finalize(stmt);
    }
    return n;
}
