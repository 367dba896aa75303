/* lua.c - the Lua binding `osara.kafka_c` and the "kafka" registry kind. */

#include <lauxlib.h>

#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "kafka/kafka.h"
#include "kafka/kafka_int.h"

#define CLIENT_MT "osara.kafka.client"
#define RECEIPT_MT "osara.kafka.receipt"

/* A client userdata: NULL in check mode (nothing connected). */
typedef struct {
    kclient_t *c;
} client_ud_t;

/* ---- registry kind "kafka" ---------------------------------------------- */

/* Runs outside any protected call (the registry starts entries from C):
 * reads its options without raising; errors go to osara_err_set. */
static int kind_start(osara_reg_entry_t *e)
{
    lua_State *L = e->vm->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, e->optsref); /* [opts] */
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return osara_err_set(OSARA_EINVAL, "kafka handler: no options");
    }
    lua_getfield(L, -1, "client");
    lua_getfield(L, -2, "topic"); /* [opts, client, topic] */
    client_ud_t *ud = luaL_testudata(L, -2, CLIENT_MT);
    const char *topic = lua_tostring(L, -1);
    int rc;
    if (ud == NULL || ud->c == NULL) {
        rc = osara_err_set(OSARA_EINVAL, "kafka handler: no connected client");
    } else if (topic == NULL) {
        rc = osara_err_set(OSARA_EINVAL, "kafka handler: no topic");
    } else {
        rc = osara__kafka_handler_add(ud->c, e, topic);
    }
    lua_pop(L, 3);
    return rc;
}

static void kind_adopt(osara_reg_entry_t *e, osara_reg_entry_t *old)
{
    khandler_t *h = old->impl;
    old->impl = NULL;
    h->entry = e;
    e->impl = h;
    osara__kafka_refresh_entries(h->client); /* inputs that waited for the new VM start */
}

static void kind_stop(osara_reg_entry_t *e)
{
    if (e->impl) {
        osara__kafka_handler_remove(e->impl);
        e->impl = NULL;
    }
}

static const osara_reg_kind_t kafka_kind = {
    .name = "kafka", .start = kind_start, .adopt = kind_adopt, .stop = kind_stop,
};

/* ---- Lua binding -------------------------------------------------------- */


typedef struct {
    kout_t *o; /* holds a reference of the output's future */
} receipt_ud_t;

static kclient_t *check_client_at(lua_State *L, int idx)
{
    client_ud_t *ud = luaL_checkudata(L, idx, CLIENT_MT);
    return ud->c;
}

/* Reads the conf table at idx into name/value pairs; validates each with
 * librdkafka so an unknown or invalid property fails at load. */
static int read_conf(lua_State *L, int idx, kclient_t *c, char *errstr, size_t cap)
{
    rd_kafka_conf_t *probe = rd_kafka_conf_new();
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        const char *k = lua_tostring(L, -2);
        const char *v = lua_tostring(L, -1);
        if (lua_type(L, -1) == LUA_TBOOLEAN) {
            v = lua_toboolean(L, -1) ? "true" : "false";
        }
        if (k == NULL || v == NULL) {
            lua_pop(L, 2);
            rd_kafka_conf_destroy(probe);
            snprintf(errstr, cap, "configuration names and values must be strings or numbers");
            return -1;
        }
        if (strcmp(k, "bootstrap.servers") == 0) {
            free(c->bootstrap);
            c->bootstrap = osara_xstrdup(v);
        } else if (strncmp(k, "osara.", 6) == 0) {
            /* osara's own settings; not librdkafka's */
        } else if (rd_kafka_conf_set(probe, k, v, errstr, cap) != RD_KAFKA_CONF_OK) {
            lua_pop(L, 2);
            rd_kafka_conf_destroy(probe);
            return -1;
        } else {
            c->conf = osara_xrealloc(c->conf, sizeof(char *) * (size_t)(2 * c->nconf + 2));
            c->conf[2 * c->nconf] = osara_xstrdup(k);
            c->conf[2 * c->nconf + 1] = osara_xstrdup(v);
            c->nconf++;
            if (strcmp(k, "group.id") == 0) {
                free(c->group);
                c->group = osara_xstrdup(v);
            }
        }
        lua_pop(L, 1);
    }
    rd_kafka_conf_destroy(probe);
    return 0;
}

/* osara's own settings from the table at idx (numbers, checked in Lua);
 * returns how many brokers an embedded cluster gets. */
static int read_settings(lua_State *L, int idx, kclient_t *c)
{
    lua_getfield(L, idx, "brokers");
    lua_getfield(L, idx, "partitions");
    lua_getfield(L, idx, "max_per_partition");
    lua_getfield(L, idx, "max_inflight");
    lua_getfield(L, idx, "revoke_timeout_ms"); /* [brokers, ..., revoke_timeout_ms] */
    int brokers = (int)lua_tointeger(L, -5);
    c->partitions = lua_isnumber(L, -4) ? (int)lua_tointeger(L, -4) : 4;
    c->max_per_partition = lua_isnumber(L, -3) ? (int)lua_tointeger(L, -3) : 1000;
    c->max_inflight = lua_isnumber(L, -2) ? (int)lua_tointeger(L, -2) : 10000;
    c->revoke_timeout_ms = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : 10000;
    lua_pop(L, 5);
    return brokers > 0 ? brokers : 1;
}

/* A client for conf (idx) and settings (idx + 2), started unless checking;
 * NULL with errstr set. */
static kclient_t *client_new(lua_State *L, osara_worker_t *w, const char *skey, int checking,
                             char *errstr, size_t cap)
{
    kclient_t *c = osara_xcalloc(1, sizeof(*c));
    c->w = w;
    c->key = osara_xstrdup(skey);
    c->bootstrap = osara_xstrdup("embedded");
    if (read_conf(L, 1, c, errstr, cap) != 0) {
        osara__kafka_client_close(c);
        return NULL;
    }
    int brokers = read_settings(L, 3, c);
    c->embedded = strcmp(c->bootstrap, "embedded") == 0 || c->bootstrap[0] == '\0' ? brokers : 0;
    if (checking) {
        return c;
    }
    errstr[0] = '\0';
    if (osara__kafka_start_producer(c, errstr, cap) != 0) {
        if (errstr[0] == '\0') {
            snprintf(errstr, cap, "%s", osara_err_msg());
        }
        osara__kafka_client_close(c);
        return NULL;
    }
    if (c->embedded) {
        OSARA_INFO("kafka: embedded broker (in memory, for development and tests) at %s",
                   c->bootstrap);
    }
    return c;
}

/* client(conf, key, settings) -> client | raises with librdkafka's message.
 * key identifies the configuration (shared across reloads). settings:
 * {brokers=, partitions=, max_per_partition=, max_inflight=,
 * revoke_timeout_ms=, check=}. In check mode the configuration is
 * validated and nothing connects (the userdata holds NULL). */
static int l_kafka_client(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *key = luaL_checkstring(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    osara_worker_t *w = osara_vm_from_L(L)->w;
    osara__kafka_metrics_init();
    lua_getfield(L, 3, "check");
    int checking = w->opts.mode == OSARA_MODE_CHECK || lua_toboolean(L, -1);
    lua_pop(L, 1);
    char skey[1024];
    snprintf(skey, sizeof(skey), "kafka:%s", key);
    kclient_t *c = checking ? NULL : osara_worker_shared_get(w, skey);
    if (c == NULL) {
        char errstr[512];
        c = client_new(L, w, skey, checking, errstr, sizeof(errstr));
        if (c == NULL) {
            return luaL_error(L, "kafka: %s", errstr);
        }
        if (checking) {
            osara__kafka_client_close(c); /* validated; connect nothing */
            c = NULL;
        } else {
            osara_worker_shared_put(w, skey, c, osara__kafka_client_close);
        }
    }
    client_ud_t *ud = lua_newuserdata(L, sizeof(*ud));
    ud->c = c;
    luaL_getmetatable(L, CLIENT_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static kclient_t *live_client(lua_State *L, int idx)
{
    kclient_t *c = check_client_at(L, idx);
    if (c == NULL) {
        luaL_error(L, "kafka: not connected (osara check mode)");
    }
    return c;
}

/* client:bootstrap() -> "host:port,..." (the mock cluster's when embedded) */
static int l_client_bootstrap(lua_State *L)
{
    kclient_t *c = check_client_at(L, 1);
    lua_pushstring(L, c ? c->bootstrap : "embedded");
    return 1;
}

/* client:ensure_topic(name): creates it in the embedded cluster and
 * fetches its metadata now, so the first send does not wait for the
 * producer's once-a-second scan of unknown topics. */
static int l_client_ensure_topic(lua_State *L)
{
    kclient_t *c = check_client_at(L, 1);
    const char *name = luaL_checkstring(L, 2);
    if (c == NULL || name[0] == '^') {
        return 0;
    }
    osara__kafka_ensure_topic(c, name);
    return 0;
}

/* The message's headers from the Lua table at idx (string keys and
 * values), or NULL. */
static rd_kafka_headers_t *read_headers(lua_State *L, int idx)
{
    if (!lua_istable(L, idx)) {
        return NULL;
    }
    rd_kafka_headers_t *hdrs = rd_kafka_headers_new(4);
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) { /* [k, v] */
        size_t vlen;
        const char *v = lua_tolstring(L, -1, &vlen);
        if (lua_type(L, -2) == LUA_TSTRING && v) {
            rd_kafka_header_add(hdrs, lua_tostring(L, -2), -1, v, (ssize_t)vlen);
        }
        lua_pop(L, 1);
    }
    return hdrs;
}

/* client:produce(topic, payload, key|nil, headers|nil, partition|nil, want)
 * -> receipt | true, or nil, err[, "queue full"]. Enqueues without waiting;
 * the output counts against the input being handled by the calling
 * coroutine, if any, and any refusal but a full queue fails that input. */
static int l_client_produce(lua_State *L)
{
    kclient_t *c = live_client(L, 1);
    kafka_msg_t m = {.topic = luaL_checkstring(L, 2)};
    m.payload = luaL_checklstring(L, 3, &m.len);
    m.key = lua_isnoneornil(L, 4) ? NULL : luaL_checklstring(L, 4, &m.klen);
    m.partition = lua_isnoneornil(L, 6) ? RD_KAFKA_PARTITION_UA : (int32_t)luaL_checkinteger(L, 6);
    int want = lua_toboolean(L, 7);
    m.hdrs = read_headers(L, 5);
    rd_kafka_resp_err_t err;
    kout_t *o = osara__kafka_produce(c, &m, osara_delivery_of(osara_sched_current(L)), &err);
    if (o == NULL) {
        lua_pushnil(L);
        lua_pushfstring(L, "kafka: cannot produce to %s: %s", m.topic, rd_kafka_err2str(err));
        if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL) {
            return 2;
        }
        lua_pushliteral(L, "queue full");
        return 3;
    }
    if (!want) {
        lua_pushboolean(L, 1);
        return 1;
    }
    receipt_ud_t *ud = lua_newuserdata(L, sizeof(*ud));
    ud->o = o;
    osara_sched_future_ref(&o->f); /* the receipt's */
    luaL_getmetatable(L, RECEIPT_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* client:wait_room() -> true, or false when the client closes: yields
 * until delivery reports free room in the producer's queue. */
static int l_client_wait_room(lua_State *L)
{
    return osara__kafka_wait_room(L, live_client(L, 1));
}

/* client:cluster_id() -> the cluster's identity, or nil while it is not
 * known yet (fetched in the background: ask again a moment later). */
static int l_client_cluster_id(lua_State *L)
{
    const char *id = osara__kafka_cluster_id(live_client(L, 1));
    if (id == NULL) {
        return 0;
    }
    lua_pushstring(L, id);
    return 1;
}

/* receipt:wait([timeout]) -> true | nil, err: yields until the delivery
 * report (or nil, "timeout"). The receipt stays alive while waited on. */
static int l_receipt_wait(lua_State *L)
{
    receipt_ud_t *ud = luaL_checkudata(L, 1, RECEIPT_MT);
    double timeout = luaL_optnumber(L, 2, -1);
    return osara_sched_future_wait(L, &ud->o->f, 1, timeout);
}

static int l_receipt_gc(lua_State *L)
{
    receipt_ud_t *ud = luaL_checkudata(L, 1, RECEIPT_MT);
    if (ud->o) {
        osara_sched_future_unref(&ud->o->f);
        ud->o = NULL;
    }
    return 0;
}

/* client:stats() -> {inflight=, partitions=, paused=, retired=} */
static int l_client_stats(lua_State *L)
{
    kclient_t *c = live_client(L, 1);
    int paused = 0, retired = 0;
    OSARA_KAFKA_FOR_EACH_PART (c, p) {
        paused += p->paused;
    }
    osara__kafka_sweep_retired(c);
    for (kpart_t *p = c->retired; p; p = p->next) {
        retired++;
    }
    osara_lua_push_stats(L, (osara_lua_stat_t[]){
        {"inflight", c->inflight}, {"partitions", c->nparts}, {"paused", paused},
        {"retired", retired}, /* revoked, still finishing their inputs */
    }, 4);
    return 1;
}

/* client:health() -> nil when ready, else why not (for /readyz): no
 * broker seen up yet, every broker down, or a consumer still waiting for
 * its assignment. */
static int l_client_health(lua_State *L)
{
    kclient_t *c = live_client(L, 1);
    if (c->closing) {
        lua_pushliteral(L, "closing");
    } else if (c->all_down || (c->stats_seen && c->brokers_up == 0)) {
        lua_pushfstring(L, "no broker reachable (%s)",
                        c->last_error_text[0] ? c->last_error_text : "all brokers down");
    } else if (!c->stats_seen) {
        lua_pushliteral(L, "connecting (no broker seen up yet)");
    } else if (c->handlers && !c->assigned) {
        lua_pushliteral(L, "consumer waiting for its partition assignment");
    } else {
        lua_pushnil(L);
    }
    return 1;
}

/* client:position(topic, partition) -> next offset to commit (-1: none yet)
 * and the number of inputs held for that partition. */
static int l_client_position(lua_State *L)
{
    kclient_t *c = live_client(L, 1);
    kpart_t *p = osara__kafka_find_part(c, luaL_checkstring(L, 2), (int32_t)luaL_checkinteger(L, 3));
    lua_pushnumber(L, p ? (double)p->track.committable : -1);
    lua_pushinteger(L, p ? p->track.count : 0);
    return 2;
}

/* client:mock_push_errors(api_key, count, err): makes the embedded cluster
 * fail the next `count` requests of that API (tests of retries). */
static int l_client_mock_push_errors(lua_State *L)
{
    kclient_t *c = live_client(L, 1);
    if (c->mock == NULL) {
        return luaL_error(L, "kafka: mock_push_errors needs the embedded cluster");
    }
    int16_t api = (int16_t)luaL_checkinteger(L, 2);
    lua_Integer n = luaL_checkinteger(L, 3);
    luaL_argcheck(L, n >= 0 && n <= 64, 3, "count must be 0 to 64");
    rd_kafka_resp_err_t err = (rd_kafka_resp_err_t)luaL_optinteger(
        L, 4, RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS);
    rd_kafka_resp_err_t errs[64];
    for (int i = 0; i < n; i++) {
        errs[i] = err;
    }
    rd_kafka_mock_push_request_errors_array(c->mock, api, (size_t)n, errs);
    return 0;
}

/* client:mock_broker(id, up): takes a broker of the embedded cluster down
 * (its connections close, new ones are refused) or brings it back up. */
static int l_client_mock_broker(lua_State *L)
{
    kclient_t *c = live_client(L, 1);
    if (c->mock == NULL) {
        return luaL_error(L, "kafka: mock_broker needs the embedded cluster");
    }
    int32_t id = (int32_t)luaL_checkinteger(L, 2);
    luaL_argcheck(L, id >= 1 && id <= c->embedded, 2, "no such broker");
    rd_kafka_resp_err_t err = lua_toboolean(L, 3) ? rd_kafka_mock_broker_set_up(c->mock, id)
                                                  : rd_kafka_mock_broker_set_down(c->mock, id);
    lua_pushboolean(L, err == RD_KAFKA_RESP_ERR_NO_ERROR);
    return 1;
}

int osara_kafka_open(lua_State *L)
{
    static const luaL_Reg client_methods[] = {
        {"bootstrap", l_client_bootstrap}, {"ensure_topic", l_client_ensure_topic},
        {"produce", l_client_produce},     {"stats", l_client_stats},
        {"health", l_client_health},
        {"wait_room", l_client_wait_room}, {"cluster_id", l_client_cluster_id},
        {"position", l_client_position},   {"mock_push_errors", l_client_mock_push_errors},
        {"mock_broker", l_client_mock_broker},
        {NULL, NULL},
    };
    static const luaL_Reg fns[] = {{"client", l_kafka_client}, {NULL, NULL}};
    osara_registry_kind(&kafka_kind);
    luaL_newmetatable(L, CLIENT_MT);
    lua_newtable(L);
    luaL_register(L, NULL, client_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, RECEIPT_MT);
    lua_pushcfunction(L, l_receipt_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    lua_pushcfunction(L, l_receipt_wait);
    lua_setfield(L, -2, "wait");
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
