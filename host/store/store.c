#include "store/store.h"

#include <errno.h>
#include <lauxlib.h>
#include <lmdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/err.h"
#include "core/log.h"
#include "core/mem.h"
#include "core/lvm.h"
#include "core/metrics.h"
#include "core/worker.h"

#define DB_MT "osara.store.db"
#define HDR 8                      /* value header: expiry, ms since epoch (0: none) */
#define INITIAL_MAP (64u << 20)
#define MAX_MAP ((size_t)64 << 30)

typedef struct {
    MDB_env *env;
    char *dir;
    size_t mapsize;
} senv_t;

typedef struct {
    senv_t *env;
    MDB_dbi dbi;
    char *name;
} sdb_t;

static osara_metric_t *m_grow;

static void env_close(void *ptr)
{
    senv_t *e = ptr;
    mdb_env_close(e->env);
    free(e->dir);
    free(e);
}

static int env_open(osara_worker_t *w, const char *dir, senv_t **out)
{
    char key[4200];
    snprintf(key, sizeof(key), "store:%s", dir);
    senv_t *e = osara_worker_shared_get(w, key);
    if (e) {
        *out = e;
        return 0;
    }
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        return osara_err_set(-errno, "store: cannot create %s: %s", dir, strerror(errno));
    }
    e = osara_xcalloc(1, sizeof(*e));
    e->mapsize = INITIAL_MAP;
    int rc = mdb_env_create(&e->env);
    if (rc == 0) rc = mdb_env_set_maxdbs(e->env, 128);
    if (rc == 0) rc = mdb_env_set_mapsize(e->env, e->mapsize);
    if (rc == 0) rc = mdb_env_open(e->env, dir, MDB_NOTLS, 0644);
    MDB_envinfo info;
    if (rc == 0) rc = mdb_env_info(e->env, &info);
    if (rc != 0) {
        mdb_env_close(e->env);
        free(e);
        return osara_err_set(OSARA_EINVAL, "store: cannot open %s: %s%s", dir, mdb_strerror(rc),
                             rc == MDB_INVALID || rc == MDB_VERSION_MISMATCH
                                 ? " (not an osara/LMDB data folder?)" : "");
    }
    e->mapsize = info.me_mapsize;
    e->dir = osara_xstrdup(dir);
    osara_worker_shared_put(w, key, e, env_close);
    *out = e;
    return 0;
}

/* Doubles the map when a write hit MDB_MAP_FULL (no transaction is open:
 * every transaction here is short and synchronous on the loop thread). */
static int grow(senv_t *e)
{
    if (e->mapsize >= MAX_MAP) {
        return osara_err_set(OSARA_EINVAL, "store: the data file reached %zu MiB "
                             "(the maximum; delete data or raise MAX_MAP)", e->mapsize >> 20);
    }
    size_t size = e->mapsize * 2;
    int rc = mdb_env_set_mapsize(e->env, size);
    if (rc != 0) {
        return osara_err_set(OSARA_EINVAL, "store: cannot grow the map: %s", mdb_strerror(rc));
    }
    e->mapsize = size;
    if (m_grow == NULL) {
        m_grow = osara_metrics_counter("osara_store_map_grows_total", "LMDB map size doublings", NULL);
    }
    osara_metric_add(m_grow, 1);
    OSARA_INFO("store: map grown to %zu MiB", size >> 20);
    return 0;
}

static double now_ms(void)
{
    return osara_now() * 1000.0;
}

static int expired(const MDB_val *v, double now)
{
    if (v->mv_size < HDR) {
        return 0;
    }
    double exp;
    memcpy(&exp, v->mv_data, sizeof(exp));
    return exp > 0 && exp <= now;
}

static sdb_t *check_db(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, DB_MT);
}

static int push_mdb_error(lua_State *L, const char *what, int rc)
{
    lua_pushnil(L);
    lua_pushfstring(L, "store: %s: %s", what, mdb_strerror(rc));
    return 2;
}

/* open(dir, name) -> db | raises */
static int l_store_open(lua_State *L)
{
    const char *dir = luaL_checkstring(L, 1);
    const char *name = luaL_checkstring(L, 2);
    osara_worker_t *w = osara_vm_from_L(L)->w;
    senv_t *e;
    if (env_open(w, dir, &e) != 0) {
        return luaL_error(L, "%s", osara_err_msg());
    }
    MDB_txn *txn;
    MDB_dbi dbi;
    int rc = mdb_txn_begin(e->env, NULL, 0, &txn);
    if (rc == 0) {
        rc = mdb_dbi_open(txn, name, MDB_CREATE, &dbi);
        rc = rc == 0 ? mdb_txn_commit(txn) : (mdb_txn_abort(txn), rc);
    }
    if (rc == MDB_DBS_FULL) {
        return luaL_error(L, "store: cannot open '%s' in %s: a data folder holds at most 128 "
                          "stores (osara's own included)", name, dir);
    }
    if (rc != 0) {
        return luaL_error(L, "store: cannot open '%s' in %s: %s", name, dir, mdb_strerror(rc));
    }
    sdb_t *db = lua_newuserdata(L, sizeof(*db));
    db->env = e;
    db->dbi = dbi;
    luaL_getmetatable(L, DB_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static int check_key(lua_State *L, sdb_t *db, int idx, MDB_val *k)
{
    size_t len;
    const char *key = luaL_checklstring(L, idx, &len);
    if (len == 0 || (int)len > mdb_env_get_maxkeysize(db->env->env)) {
        return luaL_error(L, "store: key of %d bytes (keys are 1 to %d bytes)", (int)len,
                          mdb_env_get_maxkeysize(db->env->env));
    }
    k->mv_data = (void *)key;
    k->mv_size = len;
    return 0;
}

/* db:get(key) -> bytes | nil (expired keys are invisible) */
static int l_db_get(lua_State *L)
{
    sdb_t *db = check_db(L, 1);
    MDB_val k, v;
    check_key(L, db, 2, &k);
    MDB_txn *txn;
    int rc = mdb_txn_begin(db->env->env, NULL, MDB_RDONLY, &txn);
    if (rc != 0) {
        return push_mdb_error(L, "get", rc);
    }
    rc = mdb_get(txn, db->dbi, &k, &v);
    if (rc == 0 && !expired(&v, now_ms()) && v.mv_size >= HDR) {
        lua_pushlstring(L, (const char *)v.mv_data + HDR, v.mv_size - HDR);
    } else {
        lua_pushnil(L);
    }
    mdb_txn_abort(txn);
    return 1;
}

/* Applies ops (a list of {key, bytes|false, expiry_ms}) in one write txn.
 * Also takes an optional second db and its ops (offsets saved with state). */
static int apply_ops(lua_State *L, sdb_t *db, int idx, MDB_txn *txn)
{
    int n = (int)lua_objlen(L, idx);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i);      /* [op] */
        lua_rawgeti(L, -1, 1);
        lua_rawgeti(L, -2, 2);
        lua_rawgeti(L, -3, 3);       /* [op, key, bytes|false, expiry] */
        size_t klen, vlen = 0;
        const char *key = lua_tolstring(L, -3, &klen);
        MDB_val k = {klen, (void *)key};
        int rc;
        if (lua_isstring(L, -2)) {
            const char *bytes = lua_tolstring(L, -2, &vlen);
            double exp = lua_tonumber(L, -1);
            MDB_val v = {vlen + HDR, NULL};
            rc = mdb_put(txn, db->dbi, &k, &v, MDB_RESERVE);
            if (rc == 0) {
                memcpy(v.mv_data, &exp, HDR);
                memcpy((char *)v.mv_data + HDR, bytes, vlen);
            }
        } else {
            rc = mdb_del(txn, db->dbi, &k, NULL);
            if (rc == MDB_NOTFOUND) {
                rc = 0;
            }
        }
        lua_pop(L, 4);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

/* commit(db, ops [, db2, ops2]) -> true | nil, err
 * One durable LMDB write transaction; grows the map and retries on
 * MDB_MAP_FULL. */
static int l_store_commit(lua_State *L)
{
    sdb_t *db = check_db(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    sdb_t *db2 = lua_isnoneornil(L, 3) ? NULL : check_db(L, 3);
    for (int attempt = 0; attempt < 12; attempt++) {
        MDB_txn *txn;
        int rc = mdb_txn_begin(db->env->env, NULL, 0, &txn);
        if (rc != 0) {
            return push_mdb_error(L, "commit", rc);
        }
        rc = apply_ops(L, db, 2, txn);
        if (rc == 0 && db2) {
            rc = apply_ops(L, db2, 4, txn);
        }
        if (rc == 0) {
            rc = mdb_txn_commit(txn);
        } else {
            mdb_txn_abort(txn);
        }
        if (rc == MDB_MAP_FULL) {
            if (grow(db->env) != 0) {
                lua_pushnil(L);
                lua_pushstring(L, osara_err_msg());
                return 2;
            }
            continue;
        }
        if (rc != 0) {
            return push_mdb_error(L, "commit", rc);
        }
        lua_pushboolean(L, 1);
        return 1;
    }
    lua_pushnil(L);
    lua_pushliteral(L, "store: commit failed after growing the map");
    return 2;
}

/* range(db, prefix, after|nil, limit) -> {k1, v1, k2, v2, ...}
 * Live keys with the prefix in key order, after `after`; bounded so no
 * read transaction stays open across a yield. */
static int l_store_range(lua_State *L)
{
    sdb_t *db = check_db(L, 1);
    size_t plen, alen = 0;
    const char *prefix = luaL_optlstring(L, 2, "", &plen);
    const char *after = luaL_optlstring(L, 3, NULL, &alen);
    int limit = (int)luaL_optinteger(L, 4, 256);
    int keys_only = lua_toboolean(L, 5);
    MDB_txn *txn;
    MDB_cursor *cur;
    int rc = mdb_txn_begin(db->env->env, NULL, MDB_RDONLY, &txn);
    if (rc != 0) {
        return push_mdb_error(L, "range", rc);
    }
    rc = mdb_cursor_open(txn, db->dbi, &cur);
    if (rc != 0) {
        mdb_txn_abort(txn);
        return push_mdb_error(L, "range", rc);
    }
    MDB_val k, v;
    if (after) {
        k.mv_data = (void *)after;
        k.mv_size = alen;
    } else {
        k.mv_data = (void *)prefix;
        k.mv_size = plen;
    }
    rc = k.mv_size ? mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE) : mdb_cursor_get(cur, &k, &v, MDB_FIRST);
    if (rc == 0 && after && k.mv_size == alen && memcmp(k.mv_data, after, alen) == 0) {
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    lua_createtable(L, limit * 2, 0);
    int n = 0;
    double now = now_ms();
    while (rc == 0 && n < limit) {
        if (k.mv_size < plen || memcmp(k.mv_data, prefix, plen) != 0) {
            break;
        }
        if (!expired(&v, now) && v.mv_size >= HDR) {
            lua_pushlstring(L, k.mv_data, k.mv_size);
            lua_rawseti(L, -2, 2 * n + 1);
            if (keys_only) {
                lua_pushboolean(L, 1);
            } else {
                lua_pushlstring(L, (const char *)v.mv_data + HDR, v.mv_size - HDR);
            }
            lua_rawseti(L, -2, 2 * n + 2);
            n++;
        }
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
    }
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    return 1;
}

/* sweep(db, limit) -> removed: deletes up to limit expired keys */
static int l_store_sweep(lua_State *L)
{
    sdb_t *db = check_db(L, 1);
    int limit = (int)luaL_optinteger(L, 2, 10000);
    MDB_txn *txn;
    MDB_cursor *cur;
    int rc = mdb_txn_begin(db->env->env, NULL, 0, &txn);
    if (rc != 0) {
        return push_mdb_error(L, "sweep", rc);
    }
    rc = mdb_cursor_open(txn, db->dbi, &cur);
    if (rc != 0) {
        mdb_txn_abort(txn);
        return push_mdb_error(L, "sweep", rc);
    }
    MDB_val k, v;
    int removed = 0;
    double now = now_ms();
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0 && removed < limit;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        if (expired(&v, now) && mdb_cursor_del(cur, 0) == 0) {
            removed++;
        }
    }
    mdb_cursor_close(cur);
    rc = mdb_txn_commit(txn);
    if (rc != 0) {
        return push_mdb_error(L, "sweep", rc);
    }
    lua_pushinteger(L, removed);
    return 1;
}

/* stats(db) -> {entries=, mapsize=} */
static int l_store_stats(lua_State *L)
{
    sdb_t *db = check_db(L, 1);
    MDB_txn *txn;
    MDB_stat st = {0};
    if (mdb_txn_begin(db->env->env, NULL, MDB_RDONLY, &txn) == 0) {
        mdb_stat(txn, db->dbi, &st);
        mdb_txn_abort(txn);
    }
    lua_createtable(L, 0, 2);
    lua_pushnumber(L, (double)st.ms_entries);
    lua_setfield(L, -2, "entries");
    lua_pushnumber(L, (double)db->env->mapsize);
    lua_setfield(L, -2, "mapsize");
    return 1;
}

int osara_store_open(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"open", l_store_open},   {"get", l_db_get},     {"commit", l_store_commit},
        {"range", l_store_range}, {"sweep", l_store_sweep}, {"stats", l_store_stats},
        {NULL, NULL},
    };
    luaL_newmetatable(L, DB_MT);
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}

/* ---- osara store DIR dump NAME | get NAME KEY --------------------------- */

static void print_escaped(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '\\') {
            putchar(p[i]);
        } else {
            printf("\\x%02x", p[i]);
        }
    }
}

/* Prints "no store named X (stores: a, b)" from the names in the
 * environment's main database (LMDB keeps named databases there). */
static void print_no_such_store(MDB_env *env, const char *dir, const char *name)
{
    fprintf(stderr, "osara store: no store named '%s' in %s (stores:", name, dir);
    MDB_txn *txn;
    MDB_dbi main_dbi;
    MDB_cursor *cur;
    int n = 0;
    if (mdb_txn_begin(env, NULL, MDB_RDONLY, &txn) == 0) {
        if (mdb_dbi_open(txn, NULL, 0, &main_dbi) == 0 &&
            mdb_cursor_open(txn, main_dbi, &cur) == 0) {
            MDB_val k, v;
            for (int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
                 rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
                if (k.mv_size >= 2 && memcmp(k.mv_data, "__", 2) == 0) {
                    continue; /* osara's own (__osara_offsets) */
                }
                fprintf(stderr, "%s %.*s", n++ ? "," : "", (int)k.mv_size, (char *)k.mv_data);
            }
            mdb_cursor_close(cur);
        }
        mdb_txn_abort(txn);
    }
    fprintf(stderr, "%s)\n", n ? "" : " none");
}

int osara_store_main(int argc, char **argv)
{
    if (argc < 5 || strcmp(argv[2], "--help") == 0) {
        fprintf(argc < 5 ? stderr : stdout,
                "usage: osara store DATA_DIR dump NAME [PREFIX]\n"
                "       osara store DATA_DIR get NAME KEY\n\n"
                "reads a store while the host runs (read-only LMDB reader); values are\n"
                "printed as stored (msgpack by default) with non-printable bytes escaped.\n");
        return argc < 5 ? 2 : 0;
    }
    const char *dir = argv[2], *cmd = argv[3], *name = argv[4];
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    int rc = mdb_env_create(&env);
    if (rc == 0) rc = mdb_env_set_maxdbs(env, 128);
    if (rc == 0) rc = mdb_env_open(env, dir, MDB_RDONLY | MDB_NOTLS, 0644);
    if (rc == 0) rc = mdb_txn_begin(env, NULL, MDB_RDONLY, &txn);
    int opened = rc == 0;
    if (rc == 0) rc = mdb_dbi_open(txn, name, 0, &dbi);
    if (rc == MDB_NOTFOUND && opened) {
        mdb_txn_abort(txn);
        print_no_such_store(env, dir, name);
        mdb_env_close(env);
        return 1;
    }
    if (rc != 0) {
        fprintf(stderr, "osara store: cannot open '%s' in %s: %s\n", name, dir, mdb_strerror(rc));
        if (opened) {
            mdb_txn_abort(txn);
        }
        mdb_env_close(env);
        return 1;
    }
    MDB_val k, v;
    double now = now_ms();
    int code = 0;
    if (strcmp(cmd, "get") == 0 && argc >= 6) {
        k.mv_data = argv[5];
        k.mv_size = strlen(argv[5]);
        if (mdb_get(txn, dbi, &k, &v) == 0 && !expired(&v, now) && v.mv_size >= HDR) {
            print_escaped((const unsigned char *)v.mv_data + HDR, v.mv_size - HDR);
            putchar('\n');
        } else {
            fprintf(stderr, "osara store: no key '%s' in '%s'\n", argv[5], name);
            code = 1;
        }
    } else if (strcmp(cmd, "dump") == 0) {
        const char *prefix = argc >= 6 ? argv[5] : "";
        size_t plen = strlen(prefix);
        MDB_cursor *cur;
        rc = mdb_cursor_open(txn, dbi, &cur);
        if (rc != 0) {
            fprintf(stderr, "osara store: cannot read '%s': %s\n", name, mdb_strerror(rc));
            mdb_txn_abort(txn);
            mdb_env_close(env);
            return 1;
        }
        k.mv_data = (void *)prefix;
        k.mv_size = plen;
        for (rc = plen ? mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE) : mdb_cursor_get(cur, &k, &v, MDB_FIRST);
             rc == 0 && k.mv_size >= plen && memcmp(k.mv_data, prefix, plen) == 0;
             rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
            if (expired(&v, now) || v.mv_size < HDR) {
                continue;
            }
            print_escaped(k.mv_data, k.mv_size);
            putchar('\t');
            print_escaped((const unsigned char *)v.mv_data + HDR, v.mv_size - HDR);
            putchar('\n');
        }
        mdb_cursor_close(cur);
    } else {
        fprintf(stderr, "osara store: unknown subcommand '%s' (dump or get)\n", cmd);
        code = 2;
    }
    mdb_txn_abort(txn);
    mdb_env_close(env);
    return code;
}
