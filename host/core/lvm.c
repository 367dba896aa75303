#include "core/lvm.h"

#include <errno.h>
#include <lauxlib.h>
#include <luajit.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/embedded.h"
#include "core/err.h"
#include "core/log.h"
#include "core/mem.h"
#include "core/metrics.h"
#include "core/runaway.h"
#include "core/sched.h"

/* Registry key of the VM pointer (address of this variable). */
static const char vm_key = 0;

#define OSARA_MODULE(name, fn) int fn(lua_State *L);
#include "core/modules.h"
#undef OSARA_MODULE

static const struct {
    const char *name;
    lua_CFunction open;
} c_modules[] = {
#define OSARA_MODULE(name, fn) {name, fn},
#include "core/modules.h"
#undef OSARA_MODULE
};

osara_vm_t *osara_vm_from_L(lua_State *L)
{
    lua_pushlightuserdata(L, (void *)&vm_key);
    lua_rawget(L, LUA_REGISTRYINDEX);
    osara_vm_t *vm = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return vm;
}

const char *osara_vm_where(lua_State *L, int level, char *buf, size_t cap)
{
    lua_Debug ar;
    snprintf(buf, cap, "?");
    /* Skip C frames: the user's location is the first Lua frame. */
    for (int l = level; lua_getstack(L, l, &ar); l++) {
        lua_getinfo(L, "Sl", &ar);
        if (ar.currentline > 0) {
            const char *src = ar.source[0] == '@' ? ar.source + 1 : ar.short_src;
            snprintf(buf, cap, "%s:%d", src, ar.currentline);
            break;
        }
    }
    return buf;
}

/* package.preload loader for embedded bytecode: upvalue 1 is the index. */
static int load_embedded(lua_State *L)
{
    int i = (int)lua_tointeger(L, lua_upvalueindex(1));
    const osara_embedded_t *m = &osara_embedded[i];
    const char *dev = getenv("OSARA_LUA_DIR");
    int rc;
    if (dev && *dev) {
        /* Development: load lua/ from the source tree instead. */
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", dev, m->file);
        rc = luaL_loadfile(L, path);
    } else {
        char chunk[256];
        snprintf(chunk, sizeof(chunk), "@%s", m->file);
        rc = luaL_loadbuffer(L, (const char *)m->bytes, m->size, chunk);
    }
    if (rc != 0) {
        return lua_error(L);
    }
    lua_pushstring(L, m->name);
    lua_call(L, 1, 1);
    return 1;
}

static void install_preload(lua_State *L)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload"); /* [package, preload] */
    for (size_t i = 0; i < sizeof(c_modules) / sizeof(c_modules[0]); i++) {
        lua_pushcfunction(L, c_modules[i].open);
        lua_setfield(L, -2, c_modules[i].name);
    }
    for (int i = 0; osara_embedded[i].name; i++) {
        lua_pushinteger(L, i);
        lua_pushcclosure(L, load_embedded, 1);
        lua_setfield(L, -2, osara_embedded[i].name);
    }
    lua_pop(L, 2);
}

/* The default search path with ";;" in the user's LUA_PATH (LUA_CPATH)
 * standing for it, as the standalone interpreter does: modules installed
 * with luarocks or kept in a shared folder are found. */
static void push_search_path(lua_State *L, const char *env_name,
                             const char *defaults)
{
    const char *user = getenv(env_name);
    if (!user || !*user) {
        lua_pushstring(L, defaults);
        return;
    }
    lua_pushstring(L, user);
    lua_pushstring(L, ";;");
    lua_pushfstring(L, ";%s;", defaults);
    luaL_gsub(L, lua_tostring(L, -3), ";;", lua_tostring(L, -1));
    lua_replace(L, -4);
    lua_pop(L, 2);
}

/* Rooted at the script folder first; then LUA_PATH, or Debian's Lua 5.1
 * paths (busted, cjson, lua-messagepack live there). */
static void set_paths(lua_State *L, const char *dir)
{
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;", dir, dir);
    push_search_path(L, "LUA_PATH",
                     "/usr/local/share/lua/5.1/?.lua;"
                     "/usr/local/share/lua/5.1/?/init.lua;"
                     "/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua");
    lua_concat(L, 2);
    lua_setfield(L, -2, "path");
    push_search_path(L, "LUA_CPATH",
                     "/usr/local/lib/lua/5.1/?.so;"
                     "/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;"
                     "/usr/lib/lua/5.1/?.so");
    lua_setfield(L, -2, "cpath");
    lua_pop(L, 1);
}

osara_vm_t *osara_vm_new(const osara_vm_host_t *host, unsigned gen)
{
    osara_vm_t *vm = osara_xcalloc(1, sizeof(*vm));
    vm->host = host;
    vm->w = host->w;
    vm->loop = host->loop;
    vm->inbox = host->inbox;
    vm->gen = gen;
    vm->accepting = 1;
    vm->runaway_timeout = OSARA_RUNAWAY_DEFAULT_S;
    vm->slow_warning = OSARA_SLOW_HANDLER_DEFAULT_S;
    vm->L = luaL_newstate();
    if (vm->L == NULL) {
        free(vm);
        osara_err_set(-ENOMEM, "cannot create a Lua state");
        return NULL;
    }
    lua_State *L = vm->L;
    lua_pushlightuserdata(L, (void *)&vm_key);
    lua_pushlightuserdata(L, vm);
    lua_rawset(L, LUA_REGISTRYINDEX);
    luaL_openlibs(L);
    install_preload(L);
    set_paths(L, host->script_dir);
    /* The boot module wires require, strict globals and the osara module. */
    lua_getglobal(L, "require");
    lua_pushliteral(L, "osara.boot");
    if (lua_pcall(L, 1, 0, 0) != 0) {
        osara_err_set(OSARA_ESCRIPT, "cannot start the Lua runtime: %s",
                      lua_tostring(L, -1));
        lua_close(L);
        free(vm);
        return NULL;
    }
    return vm;
}

static double monotonic(void)
{
    return (double)uv_hrtime() / 1e9;
}

static void load_hook(lua_State *L, lua_Debug *ar)
{
    (void)ar;
    osara_vm_t *vm = osara_vm_from_L(L);
    if (monotonic() > vm->load_deadline) {
        char at[256];
        lua_sethook(L, NULL, 0, 0);
        /* In a hook, level 0 is the Lua function that was running. */
        luaL_error(L, "%s: script did not finish loading within %gs (an "
                      "endless loop at load time? raise --load-timeout)",
                   osara_vm_where(L, 0, at, sizeof(at)), vm->load_timeout);
    }
}

static int traceback_msg(lua_State *L)
{
    /* Keep the message one line; the traceback goes to the debug log. */
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        msg = "(error object is not a string)";
    }
    if (osara_log_enabled(OSARA_LOG_DEBUG)) {
        luaL_traceback(L, L, msg, 1);
        OSARA_DEBUG("%s", lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    lua_pushstring(L, msg);
    return 1;
}

int osara_vm_load_script(osara_vm_t *vm, const char *path, double timeout)
{
    lua_State *L = vm->L;
    lua_pushcfunction(L, traceback_msg);
    int errfn = lua_gettop(L);
    lua_getglobal(L, "require");
    lua_pushliteral(L, "osara.boot");
    lua_call(L, 1, 1);               /* [errfn, boot] */
    lua_getfield(L, -1, "load_script");
    lua_remove(L, -2);               /* [errfn, load_script] */
    lua_pushstring(L, path);
    vm->loading = 1;
    vm->load_timeout = timeout;
    vm->load_deadline = monotonic() + timeout;
    /* Hooks do not fire in compiled traces: interpret while loading. */
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_OFF);
    lua_sethook(L, load_hook, LUA_MASKCOUNT, 10000);
    int rc = lua_pcall(L, 1, 0, errfn);
    lua_sethook(L, NULL, 0, 0);
    luaJIT_setmode(L, 0, LUAJIT_MODE_ENGINE | LUAJIT_MODE_ON);
    vm->loading = 0;
    if (rc != 0) {
        const char *msg = lua_tostring(L, -1);
        osara_err_set(OSARA_ESCRIPT, "%s", msg ? msg : "script failed to load");
        lua_settop(L, 0);
        return OSARA_ESCRIPT;
    }
    lua_settop(L, 0);
    return 0;
}

osara_own_t *osara_vm_own(osara_vm_t *vm, void (*close)(void *), void *ptr)
{
    osara_own_t *own = osara_xcalloc(1, sizeof(*own));
    own->close = close;
    own->ptr = ptr;
    own->next = vm->owned;
    if (vm->owned) {
        vm->owned->prev = own;
    }
    vm->owned = own;
    return own;
}

void osara_vm_disown(osara_vm_t *vm, osara_own_t *own)
{
    if (own->prev) {
        own->prev->next = own->next;
    } else {
        vm->owned = own->next;
    }
    if (own->next) {
        own->next->prev = own->prev;
    }
    free(own);
}

void osara_vm_own_late(osara_vm_t *vm, void (*close)(void *), void *ptr)
{
    osara_own_t *own = osara_xcalloc(1, sizeof(*own));
    own->close = close;
    own->ptr = ptr;
    own->next = vm->owned_late;
    vm->owned_late = own;
}

int osara_vm_owns_late(osara_vm_t *vm, void (*close)(void *), void *ptr)
{
    for (osara_own_t *own = vm->owned_late; own; own = own->next) {
        if (own->close == close && own->ptr == ptr) {
            return 1;
        }
    }
    return 0;
}

/* Runs and frees every record of a list, newest first. */
static void close_owned(osara_own_t **list)
{
    while (*list) {
        osara_own_t *own = *list;
        *list = own->next;
        own->close(own->ptr);
        free(own);
    }
}

static void grace_closed(uv_handle_t *h)
{
    free(h);
}

void osara_vm_close(osara_vm_t *vm)
{
    if (vm->closing) {
        return;
    }
    vm->closing = 1;
    vm->accepting = 0;
    if (vm->on_close) {
        vm->on_close(vm); /* the worker forgets it */
    }
    if (vm->grace_timer) {
        uv_close((uv_handle_t *)vm->grace_timer, grace_closed);
        vm->grace_timer = NULL;
    }
    osara_sched_cancel_all(vm);
    close_owned(&vm->owned);
    osara_registry_stop_all(&vm->reg);
    osara_registry_free(&vm->reg);
    lua_close(vm->L);
    close_owned(&vm->owned_late);
    osara_sched_free(vm);
    for (int i = 0; i < vm->nfiles; i++) {
        free(vm->files[i]);
    }
    free(vm->files);
    free(vm->file_hashes);
    free(vm);
}

static void on_grace(uv_timer_t *t)
{
    osara_vm_t *vm = t->data;
    OSARA_WARN("reload: %d coroutine(s) of the previous script still running "
               "after the grace period; cancelling them",
               vm->inflight);
    osara_vm_close(vm);
}

int osara_vm_retire(osara_vm_t *vm, double grace)
{
    vm->accepting = 0;
    osara_sched_cancel_load_tasks(vm);
    if (vm->inflight == 0) {
        osara_vm_close(vm);
        return 1;
    }
    vm->grace_timer = osara_xmalloc(sizeof(*vm->grace_timer));
    OSARA_UV_MUST(uv_timer_init(vm->loop, vm->grace_timer));
    vm->grace_timer->data = vm;
    OSARA_UV_MUST(uv_timer_start(vm->grace_timer, on_grace, (uint64_t)(grace * 1000), 0));
    return 0;
}

/* FNV-1a over a file's bytes; 0 if unreadable. */
static unsigned long long hash_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return 0;
    }
    unsigned long long h = 1469598103934665603ULL;
    char buf[8192];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0) {
        for (size_t i = 0; i < n; i++) {
            h = (h ^ (unsigned char)buf[i]) * 1099511628211ULL;
        }
    }
    fclose(f);
    return h ? h : 1;
}

static void track_file(osara_vm_t *vm, const char *path)
{
    for (int i = 0; i < vm->nfiles; i++) {
        if (strcmp(vm->files[i], path) == 0) {
            return;
        }
    }
    vm->files = osara_xrealloc(vm->files, sizeof(char *) * (size_t)(vm->nfiles + 1));
    vm->file_hashes = osara_xrealloc(vm->file_hashes,
                              sizeof(unsigned long long) * (size_t)(vm->nfiles + 1));
    vm->files[vm->nfiles] = osara_xstrdup(path);
    vm->file_hashes[vm->nfiles] = hash_file(path);
    vm->nfiles++;
}

unsigned long long osara_vm_files_signature(osara_vm_t *vm)
{
    unsigned long long h = 1469598103934665603ULL;
    for (int i = 0; i < vm->nfiles; i++) {
        h = (h ^ hash_file(vm->files[i])) * 1099511628211ULL;
    }
    return h;
}

int osara_vm_files_changed(osara_vm_t *vm)
{
    for (int i = 0; i < vm->nfiles; i++) {
        if (hash_file(vm->files[i]) != vm->file_hashes[i]) {
            return 1;
        }
    }
    return 0;
}

void osara_lua_newclass(lua_State *L, const char *name, const luaL_Reg *methods,
                        lua_CFunction gc, lua_CFunction index)
{
    luaL_newmetatable(L, name);
    lua_newtable(L);
    if (methods != NULL) {
        luaL_register(L, NULL, methods); /* [mt, methods] */
    }
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "methods");
    if (index != NULL) {
        lua_pop(L, 1);
        lua_pushcfunction(L, index);
    }
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
}

void *osara_lua_newobject(lua_State *L, size_t size, const char *mt)
{
    void *ud = lua_newuserdata(L, size);
    luaL_getmetatable(L, mt);
    lua_setmetatable(L, -2); /* [..., ud] */
    return ud;
}

void osara_lua_push_stats(lua_State *L, const osara_lua_stat_t *stats, int n)
{
    lua_createtable(L, 0, n);
    for (int i = 0; i < n; i++) {
        lua_pushnumber(L, stats[i].value);
        lua_setfield(L, -2, stats[i].name);
    }
}

/* Sets the n string fields {name = value} on the table on top. */
static void set_strings(lua_State *L, const char *const (*fields)[2], int n)
{
    for (int i = 0; i < n; i++) {
        lua_pushstring(L, fields[i][1]);
        lua_setfield(L, -2, fields[i][0]);
    }
}

/* ---- Lua binding: osara.vm_c ------------------------------------------- */

static int l_vm_mode(lua_State *L)
{
    lua_pushstring(L, osara_vm_from_L(L)->host->mode);
    return 1;
}

static int l_vm_paths(lua_State *L)
{
    const osara_vm_host_t *host = osara_vm_from_L(L)->host;
    lua_createtable(L, 0, 4);
    set_strings(L, (const char *const[][2]){
        {"script", host->script_path}, {"script_dir", host->script_dir},
        {"data_dir", host->data_dir},
    }, 3);
    char exe[4096];
    size_t n = sizeof(exe);
    if (uv_exepath(exe, &n) == 0) {
        lua_pushlstring(L, exe, n);
        lua_setfield(L, -2, "exe");
    }
    return 1;
}

static int l_vm_loading(lua_State *L)
{
    lua_pushboolean(L, osara_vm_from_L(L)->loading);
    return 1;
}

static int l_vm_track(lua_State *L)
{
    track_file(osara_vm_from_L(L), luaL_checkstring(L, 1));
    return 0;
}

/* register(kind, key, sig, fn|nil, opts|nil, where, detail) -> true
 * Records a registration of a kind implemented in C. Load time only. */
static int l_vm_register(lua_State *L)
{
    osara_vm_t *vm = osara_vm_from_L(L);
    const char *kname = luaL_checkstring(L, 1);
    const char *key = luaL_checkstring(L, 2);
    const char *sig = luaL_optstring(L, 3, "");
    const char *where = luaL_optstring(L, 6, "?");
    const char *detail = luaL_optstring(L, 7, "");
    const osara_reg_kind_t *kind = osara_registry_find_kind(kname);
    if (kind == NULL) {
        return luaL_error(L, "unknown registration kind '%s'", kname);
    }
    if (!vm->loading) {
        return luaL_error(L, "%s '%s' must be registered while the script "
                             "loads, not from running code", kname, key);
    }
    int fnref = LUA_NOREF, optsref = LUA_NOREF;
    if (!lua_isnoneornil(L, 4)) {
        lua_pushvalue(L, 4);
        fnref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    if (!lua_isnoneornil(L, 5)) {
        lua_pushvalue(L, 5);
        optsref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    if (osara_registry_add(&vm->reg, kind, key, sig, where, detail, vm, fnref,
                           optsref) == NULL) {
        return luaL_error(L, "%s", osara_err_msg());
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* registered() -> list of {kind=, key=, where=, detail=} in order */
static int l_vm_registered(lua_State *L)
{
    osara_vm_t *vm = osara_vm_from_L(L);
    lua_createtable(L, vm->reg.n, 0);
    int i = 1;
    for (osara_reg_entry_t *e = vm->reg.head; e; e = e->next) {
        lua_createtable(L, 0, 6);
        set_strings(L, (const char *const[][2]){
            {"kind", e->kind->name}, {"key", e->key}, {"where", e->where},
            {"detail", e->detail},
        }, 4);
        if (e->fnref != LUA_NOREF) {
            lua_rawgeti(L, LUA_REGISTRYINDEX, e->fnref);
            lua_setfield(L, -2, "fn");
        }
        if (e->optsref != LUA_NOREF) {
            lua_rawgeti(L, LUA_REGISTRYINDEX, e->optsref);
            lua_setfield(L, -2, "opts");
        }
        lua_rawseti(L, -2, i++);
    }
    return 1;
}

/* stop(code): begins the graceful stop of the worker (osara test uses it) */
static int l_vm_stop(lua_State *L)
{
    osara_vm_t *vm = osara_vm_from_L(L);
    vm->host->stop(vm->w, (int)luaL_optinteger(L, 1, 0));
    return 0;
}

/* stats() -> {generation=, reloads=, reload_failures=} */
static int l_vm_stats(lua_State *L)
{
    osara_vm_t *vm = osara_vm_from_L(L);
    double reloads, failures;
    int stopping;
    vm->host->stats(vm->w, &reloads, &failures, &stopping);
    osara_lua_push_stats(L, (osara_lua_stat_t[]){
        {"generation", vm->gen}, {"reloads", reloads}, {"reload_failures", failures},
    }, 3);
    lua_pushboolean(L, stopping || !vm->accepting);
    lua_setfield(L, -2, "stopping");
    return 1;
}

/* environ(prefix) -> {NAME=value} of the variables starting with prefix */
static int l_vm_environ(lua_State *L)
{
    extern char **environ;
    size_t plen;
    const char *prefix = luaL_optlstring(L, 1, "", &plen);
    lua_newtable(L);
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (eq == NULL || strncmp(*e, prefix, plen) != 0) {
            continue;
        }
        lua_pushlstring(L, *e, (size_t)(eq - *e));
        lua_pushstring(L, eq + 1);
        lua_rawset(L, -3);
    }
    return 1;
}

int osara_vm_open(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"mode", l_vm_mode},         {"paths", l_vm_paths},
        {"loading", l_vm_loading},   {"track", l_vm_track},
        {"register", l_vm_register}, {"registered", l_vm_registered},
        {"stop", l_vm_stop},         {"stats", l_vm_stats},
        {"environ", l_vm_environ},
        {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
