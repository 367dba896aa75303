#include "sys/process.h"

#include <errno.h>
#include <lauxlib.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "core/err.h"
#include "core/lvm.h"
#include "core/mem.h"
#include "core/sched.h"
#include "core/worker.h"

#define PROC_MT "osara.process"
#define MAX_LINES 20000

enum { WAIT_NONE = 0, WAIT_LINE, WAIT_EXPECT };

typedef struct {
    uv_process_t proc;
    uv_pipe_t out, err, in;
    int open_handles;
    int exited;
    int64_t exit_status;
    int term_signal;
    int pid;
    char partial[2][8192]; /* unfinished line per stream */
    size_t partial_len[2];
    int eof[2];
    char **lines;          /* queue of complete lines not yet consumed */
    size_t head, count, cap;
    char *all;             /* everything read, for :output() */
    size_t all_len, all_cap;
    osara_sched_waiter_t waiter; /* the one coroutine waiting for output */
    osara_sched_future_t exit;   /* completed once, when the child exits */
    int wait_kind;
    char *pattern;
    osara_own_t *own;
    osara_vm_t *vm;
    int ud_alive;          /* userdata not yet collected */
    int closing;
} proc_t;

typedef struct {
    proc_t *p;
} proc_ud_t;

static void maybe_free(proc_t *p)
{
    if (p->open_handles == 0 && !p->ud_alive) {
        for (size_t i = 0; i < p->count; i++) {
            free(p->lines[(p->head + i) % p->cap]);
        }
        free(p->lines);
        free(p->all);
        free(p->pattern);
        free(p);
    }
}

static void handle_closed(uv_handle_t *h)
{
    proc_t *p = h->data;
    p->open_handles--;
    maybe_free(p);
}

static void push_line(proc_t *p, const char *s, size_t n)
{
    if (p->count == MAX_LINES) { /* drop the oldest: bounded memory */
        free(p->lines[p->head]);
        p->head = (p->head + 1) % p->cap;
        p->count--;
    }
    if (p->count == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 64;
        char **nl = osara_xmalloc(cap * sizeof(*nl));
        for (size_t i = 0; i < p->count; i++) {
            nl[i] = p->lines[(p->head + i) % p->cap];
        }
        free(p->lines);
        p->lines = nl;
        p->head = 0;
        p->cap = cap;
    }
    char *line = osara_xmalloc(n + 1);
    memcpy(line, s, n);
    line[n] = '\0';
    p->lines[(p->head + p->count) % p->cap] = line;
    p->count++;
}

static char *pop_line(proc_t *p)
{
    if (p->count == 0) {
        return NULL;
    }
    char *line = p->lines[p->head];
    p->head = (p->head + 1) % p->cap;
    p->count--;
    return line;
}

static int all_eof(proc_t *p)
{
    return p->eof[0] && p->eof[1];
}

/* Tries to satisfy the waiting coroutine; resumes it when it can. */
static void serve_waiter(proc_t *p)
{
    osara_co_t *co = osara_sched_waiter_current(&p->waiter);
    if (co == NULL) {
        return;
    }
    lua_State *T = osara_co_thread(co);
    int n = 0;
    if (p->wait_kind == WAIT_LINE || p->wait_kind == WAIT_EXPECT) {
        char *line;
        while ((line = pop_line(p)) != NULL) {
            if (p->wait_kind == WAIT_LINE || strstr(line, p->pattern)) {
                lua_pushstring(T, line);
                free(line);
                n = 1;
                break;
            }
            free(line);
        }
        if (n == 0 && all_eof(p)) {
            lua_pushnil(T);
            lua_pushliteral(T, "eof");
            n = 2;
        }
    }
    if (n == 0) {
        return;
    }
    p->waiter.co = NULL;
    p->wait_kind = WAIT_NONE;
    osara_sched_resume(co, n);
}

static void append_all(proc_t *p, const char *s, size_t n)
{
    if (p->all_len + n > p->all_cap) {
        size_t cap = p->all_cap ? p->all_cap * 2 : 4096;
        while (cap < p->all_len + n) {
            cap *= 2;
        }
        p->all = osara_xrealloc(p->all, cap);
        p->all_cap = cap;
    }
    memcpy(p->all + p->all_len, s, n);
    p->all_len += n;
    if (p->all_len > (8u << 20)) { /* keep the last 4 MiB */
        size_t drop = p->all_len - (4u << 20);
        memmove(p->all, p->all + drop, p->all_len - drop);
        p->all_len -= drop;
    }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    proc_t *p = s->data;
    int idx = s == (uv_stream_t *)&p->err;
    if (nread < 0) {
        if (p->partial_len[idx] > 0) {
            push_line(p, p->partial[idx], p->partial_len[idx]);
            p->partial_len[idx] = 0;
        }
        p->eof[idx] = 1;
        uv_read_stop(s);
    } else {
        append_all(p, buf->base, (size_t)nread);
        for (ssize_t i = 0; i < nread; i++) {
            char c = buf->base[i];
            if (c == '\n' || p->partial_len[idx] == sizeof(p->partial[0]) - 1) {
                push_line(p, p->partial[idx], p->partial_len[idx]);
                p->partial_len[idx] = 0;
                if (c == '\n') {
                    continue;
                }
            }
            p->partial[idx][p->partial_len[idx]++] = c;
        }
    }
    free(buf->base);
    serve_waiter(p);
}

/* The exit future's results: status, signal. */
static int push_exit(lua_State *L, void *ud)
{
    proc_t *p = ud;
    lua_pushinteger(L, (lua_Integer)p->exit_status);
    lua_pushinteger(L, p->term_signal);
    return 2;
}

static void on_child_exit(uv_process_t *proc, int64_t status, int sig)
{
    proc_t *p = proc->data;
    p->exited = 1;
    p->exit_status = status;
    p->term_signal = sig;
    osara_sched_future_complete(&p->exit, push_exit, p);
    serve_waiter(p);
}

static void close_handles(proc_t *p)
{
    if (p->closing) {
        return;
    }
    p->closing = 1;
    uv_handle_t *hs[] = {(uv_handle_t *)&p->proc, (uv_handle_t *)&p->out,
                         (uv_handle_t *)&p->err, (uv_handle_t *)&p->in};
    for (int i = 0; i < 4; i++) {
        if (!uv_is_closing(hs[i])) {
            uv_close(hs[i], handle_closed);
        }
    }
}

/* VM close: kill a child that is still running, release everything. */
static void proc_vm_close(void *ptr)
{
    proc_t *p = ptr;
    p->own = NULL;
    if (!p->exited) {
        (void)uv_process_kill(&p->proc, SIGKILL); /* ESRCH: it just exited */
    }
    p->waiter.co = NULL;
    close_handles(p);
}

/* spawn{argv={...}, env={K=V}, cwd=} -> proc | nil, err */
static int l_process_spawn(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    osara_vm_t *vm = osara_vm_from_L(L);
    lua_getfield(L, 1, "argv");
    luaL_checktype(L, -1, LUA_TTABLE);
    int argc = (int)lua_objlen(L, -1);
    if (argc < 1) {
        return luaL_error(L, "process.spawn: argv is empty");
    }
    char **argv = osara_xcalloc((size_t)argc + 1, sizeof(char *));
    for (int i = 0; i < argc; i++) {
        lua_rawgeti(L, -1, i + 1);
        argv[i] = (char *)luaL_checkstring(L, -1);
        lua_pop(L, 1);
    }
    /* env: the parent's environment with the given keys overridden. */
    char **env = NULL;
    int nenv = 0;
    lua_getfield(L, 1, "env");
    if (lua_istable(L, -1)) {
        extern char **environ;
        int base = 0;
        while (environ[base]) {
            base++;
        }
        env = osara_xcalloc((size_t)base + 256, sizeof(char *));
        lua_pushnil(L);
        while (lua_next(L, -2) != 0 && nenv < 255) {
            const char *k = lua_tostring(L, -2), *v = lua_tostring(L, -1);
            size_t need = strlen(k) + strlen(v) + 2;
            env[nenv] = osara_xmalloc(need);
            snprintf(env[nenv++], need, "%s=%s", k, v);
            lua_pop(L, 1);
        }
        int given = nenv;
        for (int i = 0; i < base; i++) {
            size_t kl = strcspn(environ[i], "=");
            int overridden = 0;
            for (int j = 0; j < given; j++) {
                if (strncmp(env[j], environ[i], kl + 1) == 0) {
                    overridden = 1;
                }
            }
            if (!overridden) {
                env[nenv++] = osara_xstrdup(environ[i]);
            }
        }
    }
    lua_getfield(L, 1, "cwd");
    const char *cwd = lua_tostring(L, -1);

    proc_t *p = osara_xcalloc(1, sizeof(*p));
    osara_sched_future_init(&p->exit, NULL); /* freed with p (maybe_free) */
    p->vm = vm;
    uv_loop_t *loop = &vm->w->loop;
    OSARA_UV_MUST(uv_pipe_init(loop, &p->out, 0));
    OSARA_UV_MUST(uv_pipe_init(loop, &p->err, 0));
    OSARA_UV_MUST(uv_pipe_init(loop, &p->in, 0));
    p->out.data = p->err.data = p->in.data = p->proc.data = p;
    uv_stdio_container_t stdio[3] = {
        {.flags = UV_CREATE_PIPE | UV_READABLE_PIPE, .data.stream = (uv_stream_t *)&p->in},
        {.flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE, .data.stream = (uv_stream_t *)&p->out},
        {.flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE, .data.stream = (uv_stream_t *)&p->err},
    };
    uv_process_options_t opts = {
        .exit_cb = on_child_exit, .file = argv[0], .args = argv, .env = env,
        .cwd = cwd, .stdio_count = 3, .stdio = stdio,
    };
    int rc = uv_spawn(loop, &p->proc, &opts);
    char what[256];
    snprintf(what, sizeof(what), "%s", argv[0]); /* for the error below */
    free(argv);
    for (int i = 0; i < nenv; i++) {
        free(env[i]);
    }
    free(env);
    p->open_handles = 4;
    if (rc != 0) {
        p->exited = 1;
        close_handles(p);
        lua_pushnil(L);
        lua_pushfstring(L, "cannot start %s: %s", what, uv_strerror(rc));
        return 2;
    }
    p->pid = p->proc.pid;
    OSARA_UV_MUST(uv_read_start((uv_stream_t *)&p->out, osara_uv_alloc, on_read));
    OSARA_UV_MUST(uv_read_start((uv_stream_t *)&p->err, osara_uv_alloc, on_read));
    p->own = osara_vm_own(vm, proc_vm_close, p);
    p->ud_alive = 1;
    proc_ud_t *ud = osara_lua_newobject(L, sizeof(*ud), PROC_MT);
    ud->p = p;
    return 1;
}

static proc_t *check_proc(lua_State *L)
{
    proc_ud_t *ud = luaL_checkudata(L, 1, PROC_MT);
    if (ud->p == NULL) {
        luaL_error(L, "process already released");
    }
    return ud->p;
}

static void wait_cleanup(void *data)
{
    proc_t *p = data;
    p->waiter.co = NULL;
    p->wait_kind = WAIT_NONE;
}

/* Waits for serve_waiter (or the timeout) with the handle at index 1
 * anchored: a process waited on is never collected mid-wait. */
static int begin_wait(lua_State *L, proc_t *p, int kind, double timeout)
{
    if (osara_sched_waiter_current(&p->waiter) != NULL) {
        return luaL_error(L, "process: another coroutine is already waiting");
    }
    if (osara_sched_waiter_set(&p->waiter, L) != 0) {
        return luaL_error(L, "process: cannot wait here: only inside a "
                             "handler, timer, task or spec");
    }
    p->wait_kind = kind;
    return osara_sched_wait_for(L, 1, timeout, wait_cleanup, p, NULL);
}

/* Returns a line at once when one is queued and satisfies the wait. */
static int immediate_line(lua_State *L, proc_t *p, const char *pattern)
{
    char *line;
    while ((line = pop_line(p)) != NULL) {
        if (pattern == NULL || strstr(line, pattern)) {
            lua_pushstring(L, line);
            free(line);
            return 1;
        }
        free(line);
    }
    if (all_eof(p)) {
        lua_pushnil(L);
        lua_pushliteral(L, "eof");
        return 2;
    }
    return 0;
}

/* proc:line([timeout]) -> next output line (stdout or stderr)
 * | nil, "timeout" | nil, "eof" */
static int l_proc_line(lua_State *L)
{
    proc_t *p = check_proc(L);
    int n = immediate_line(L, p, NULL);
    if (n) {
        return n;
    }
    return begin_wait(L, p, WAIT_LINE, luaL_optnumber(L, 2, -1));
}

/* proc:expect(text, [timeout]) -> the first line containing text (plain
 * substring), consuming lines before it | nil, "timeout" | nil, "eof" */
static int l_proc_expect(lua_State *L)
{
    proc_t *p = check_proc(L);
    const char *text = luaL_checkstring(L, 2);
    int n = immediate_line(L, p, text);
    if (n) {
        return n;
    }
    free(p->pattern);
    p->pattern = osara_xstrdup(text);
    return begin_wait(L, p, WAIT_EXPECT, luaL_optnumber(L, 3, -1));
}

/* proc:output() -> everything the child wrote so far (both streams) */
static int l_proc_output(lua_State *L)
{
    proc_t *p = check_proc(L);
    lua_pushlstring(L, p->all ? p->all : "", p->all_len);
    return 1;
}

static void write_done(uv_write_t *req, int status)
{
    (void)status;
    free(req->data);
    free(req);
}

/* proc:write(s) -> true | nil, err (queued, does not wait) */
static int l_proc_write(lua_State *L)
{
    proc_t *p = check_proc(L);
    size_t len;
    const char *s = luaL_checklstring(L, 2, &len);
    if (p->closing || uv_is_closing((uv_handle_t *)&p->in)) {
        lua_pushnil(L);
        lua_pushliteral(L, "stdin closed");
        return 2;
    }
    uv_write_t *req = osara_xmalloc(sizeof(*req));
    char *copy = osara_xmalloc(len ? len : 1);
    memcpy(copy, s, len);
    req->data = copy;
    uv_buf_t buf = uv_buf_init(copy, (unsigned)len);
    int rc = uv_write(req, (uv_stream_t *)&p->in, &buf, 1, write_done);
    if (rc != 0) {
        free(copy);
        free(req);
        lua_pushnil(L);
        lua_pushstring(L, uv_strerror(rc));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static void on_stdin_shutdown(uv_shutdown_t *req, int status)
{
    (void)status;
    uv_handle_t *in = (uv_handle_t *)req->handle;
    if (!uv_is_closing(in)) {
        uv_close(in, handle_closed);
    }
    free(req);
}

/* proc:close_stdin(): EOF for the child once queued writes are flushed */
static int l_proc_close_stdin(lua_State *L)
{
    proc_t *p = check_proc(L);
    if (uv_is_closing((uv_handle_t *)&p->in)) {
        return 0;
    }
    uv_shutdown_t *req = osara_xmalloc(sizeof(*req));
    if (uv_shutdown(req, (uv_stream_t *)&p->in, on_stdin_shutdown) != 0) {
        free(req);
        uv_close((uv_handle_t *)&p->in, handle_closed);
    }
    return 0;
}

static int signal_number(lua_State *L, int idx)
{
    if (lua_type(L, idx) == LUA_TNUMBER) {
        return (int)lua_tointeger(L, idx);
    }
    const char *name = luaL_optstring(L, idx, "TERM");
    static const struct { const char *n; int s; } sigs[] = {
        {"TERM", SIGTERM}, {"KILL", SIGKILL}, {"INT", SIGINT},
        {"HUP", SIGHUP},   {"STOP", SIGSTOP}, {"CONT", SIGCONT},
        {"USR1", SIGUSR1}, {"USR2", SIGUSR2},
    };
    if (strncmp(name, "SIG", 3) == 0) {
        name += 3;
    }
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
        if (strcmp(sigs[i].n, name) == 0) {
            return sigs[i].s;
        }
    }
    return luaL_argerror(L, idx, "unknown signal");
}

/* proc:kill([sig]) -> true | nil, err ("TERM" default, names or numbers) */
static int l_proc_kill(lua_State *L)
{
    proc_t *p = check_proc(L);
    int sig = signal_number(L, 2);
    if (p->exited) {
        lua_pushnil(L);
        lua_pushliteral(L, "already exited");
        return 2;
    }
    int rc = uv_process_kill(&p->proc, sig);
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushstring(L, uv_strerror(rc));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* proc:wait([timeout]) -> exit_status, term_signal | nil, "timeout" */
static int l_proc_wait(lua_State *L)
{
    proc_t *p = check_proc(L);
    return osara_sched_future_wait(L, &p->exit, 1, luaL_optnumber(L, 2, -1));
}

static int l_proc_index(lua_State *L)
{
    proc_t *p = check_proc(L);
    const char *k = luaL_checkstring(L, 2);
    if (strcmp(k, "pid") == 0) {
        lua_pushinteger(L, p->pid);
        return 1;
    }
    if (strcmp(k, "exited") == 0) {
        lua_pushboolean(L, p->exited);
        return 1;
    }
    luaL_getmetatable(L, PROC_MT);
    lua_getfield(L, -1, "methods");
    lua_getfield(L, -1, k);
    return 1;
}

static int l_proc_gc(lua_State *L)
{
    proc_ud_t *ud = luaL_checkudata(L, 1, PROC_MT);
    proc_t *p = ud->p;
    if (p) {
        ud->p = NULL;
        p->ud_alive = 0;
        if (p->own) {
            osara_vm_disown(p->vm, p->own);
            proc_vm_close(p);
        }
        maybe_free(p);
    }
    return 0;
}

int osara_process_open(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"line", l_proc_line},   {"expect", l_proc_expect},
        {"output", l_proc_output}, {"write", l_proc_write},
        {"close_stdin", l_proc_close_stdin}, {"kill", l_proc_kill},
        {"wait", l_proc_wait},   {NULL, NULL},
    };
    static const luaL_Reg fns[] = {
        {"spawn", l_process_spawn}, {NULL, NULL},
    };
    osara_lua_newclass(L, PROC_MT, methods, l_proc_gc, l_proc_index);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
