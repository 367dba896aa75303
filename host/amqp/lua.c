/* lua.c - the `osara.amqp_c` module: client(), the client userdata and its
 * methods, and the message table a handler gets. lua/osara/amqp.lua is the
 * public surface built on it (docs/amqp.md). */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqp/amqp.h"
#include "amqp/amqp_int.h"
#include "core/err.h"
#include "core/lvm.h"
#include "core/mem.h"

/* Headers a retried copy carries: where the message was first published. */
#define ORIGIN_EXCHANGE "osara-exchange"
#define ORIGIN_KEY "osara-routing-key"

/* ---- AMQP field tables <-> Lua --------------------------------------------- */

static void push_table(lua_State *L, const amqp_table_t *t);

static void push_array(lua_State *L, const amqp_array_t *a);

/* Pushes one field value (nil for kinds Lua has no use for). */
static void push_value(lua_State *L, const amqp_field_value_t *v)
{
    switch (v->kind) {
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES:
        lua_pushlstring(L, v->value.bytes.bytes, v->value.bytes.len);
        break;
    case AMQP_FIELD_KIND_BOOLEAN:
        lua_pushboolean(L, v->value.boolean);
        break;
    case AMQP_FIELD_KIND_I8: lua_pushnumber(L, v->value.i8); break;
    case AMQP_FIELD_KIND_U8: lua_pushnumber(L, v->value.u8); break;
    case AMQP_FIELD_KIND_I16: lua_pushnumber(L, v->value.i16); break;
    case AMQP_FIELD_KIND_U16: lua_pushnumber(L, v->value.u16); break;
    case AMQP_FIELD_KIND_I32: lua_pushnumber(L, v->value.i32); break;
    case AMQP_FIELD_KIND_U32: lua_pushnumber(L, v->value.u32); break;
    case AMQP_FIELD_KIND_I64: lua_pushnumber(L, (lua_Number)v->value.i64); break;
    case AMQP_FIELD_KIND_U64:
    case AMQP_FIELD_KIND_TIMESTAMP: lua_pushnumber(L, (lua_Number)v->value.u64); break;
    case AMQP_FIELD_KIND_F32: lua_pushnumber(L, v->value.f32); break;
    case AMQP_FIELD_KIND_F64: lua_pushnumber(L, v->value.f64); break;
    case AMQP_FIELD_KIND_TABLE: push_table(L, &v->value.table); break;
    case AMQP_FIELD_KIND_ARRAY: push_array(L, &v->value.array); break;
    default: lua_pushnil(L); break;
    }
}

static void push_table(lua_State *L, const amqp_table_t *t)
{
    lua_createtable(L, 0, t->num_entries);
    for (int i = 0; i < t->num_entries; i++) {
        lua_pushlstring(L, t->entries[i].key.bytes, t->entries[i].key.len);
        push_value(L, &t->entries[i].value); /* [t, key, value] */
        lua_rawset(L, -3);
    }
}

static void push_array(lua_State *L, const amqp_array_t *a)
{
    lua_createtable(L, a->num_entries, 0);
    for (int i = 0; i < a->num_entries; i++) {
        push_value(L, &a->entries[i]);
        lua_rawseti(L, -2, i + 1);
    }
}

static int bytes_eq(amqp_bytes_t b, const char *s, size_t n)
{
    return b.len == n && memcmp(b.bytes, s, n) == 0;
}

static const amqp_field_value_t *table_get(const amqp_table_t *t, const char *key)
{
    for (int i = 0; i < t->num_entries; i++) {
        if (bytes_eq(t->entries[i].key, key, strlen(key))) {
            return &t->entries[i].value;
        }
    }
    return NULL;
}

/* 1 + how often the broker expired m out of its queue's retry queue
 * (x-death entries, counted by RabbitMQ per queue and reason). */
static int attempt_of(const amsg_t *m)
{
    const amqp_field_value_t *xd = m->has_headers ? table_get(&m->headers, "x-death") : NULL;
    if (xd == NULL || xd->kind != AMQP_FIELD_KIND_ARRAY) {
        return 1;
    }
    char rq[300];
    osara__amqp_retry_name(m->queue.bytes ? m->queue.bytes : "", m->queue.len, rq, sizeof(rq));
    size_t n = strlen(rq);
    int64_t count = 0;
    for (int i = 0; i < xd->value.array.num_entries; i++) {
        const amqp_field_value_t *e = &xd->value.array.entries[i];
        if (e->kind != AMQP_FIELD_KIND_TABLE) {
            continue;
        }
        const amqp_field_value_t *q = table_get(&e->value.table, "queue");
        const amqp_field_value_t *cnt = table_get(&e->value.table, "count");
        if (q && (q->kind == AMQP_FIELD_KIND_UTF8 || q->kind == AMQP_FIELD_KIND_BYTES) &&
            bytes_eq(q->value.bytes, rq, n) && cnt) {
            count += cnt->kind == AMQP_FIELD_KIND_I64 ? cnt->value.i64 : 1;
        }
    }
    return (int)(1 + count);
}

static void set_bytes(lua_State *T, const char *name, amqp_bytes_t b)
{
    if (b.bytes) {
        lua_pushlstring(T, b.bytes, b.len);
        lua_setfield(T, -2, name);
    }
}

/* {exchange=, routing_key=, queue=, raw=, headers=, redelivered=,
 *  attempt=, content_type=, correlation_id=, reply_to=, message_id=} */
/* A retried copy came back through the default exchange: its exchange and
 * routing key are the ones it was first published with. */
static void restore_origin(amsg_t *m)
{
    const amqp_field_value_t *ex = m->has_headers ? table_get(&m->headers, ORIGIN_EXCHANGE) : NULL;
    const amqp_field_value_t *rk = m->has_headers ? table_get(&m->headers, ORIGIN_KEY) : NULL;
    if (ex && rk && ex->kind == AMQP_FIELD_KIND_UTF8 && rk->kind == AMQP_FIELD_KIND_UTF8) {
        m->exchange = ex->value.bytes;
        m->routing_key = rk->value.bytes;
    }
}

void osara__amqp_push_msg(lua_State *T, amsg_t *m)
{
    restore_origin(m);
    lua_createtable(T, 0, 12);
    lua_pushlstring(T, m->exchange.bytes ? m->exchange.bytes : "", m->exchange.len);
    lua_setfield(T, -2, "exchange");
    lua_pushlstring(T, m->routing_key.bytes ? m->routing_key.bytes : "", m->routing_key.len);
    lua_setfield(T, -2, "routing_key");
    set_bytes(T, "queue", m->queue);
    lua_pushlstring(T, m->body.bytes ? m->body.bytes : "", m->body.len);
    lua_setfield(T, -2, "raw");
    if (m->has_headers) {
        push_table(T, &m->headers);
    } else {
        lua_createtable(T, 0, 0);
    }
    lua_setfield(T, -2, "headers");
    lua_pushboolean(T, m->redelivered);
    lua_setfield(T, -2, "redelivered");
    lua_pushinteger(T, attempt_of(m));
    lua_setfield(T, -2, "attempt");
    set_bytes(T, "content_type", m->content_type);
    set_bytes(T, "correlation_id", m->correlation_id);
    set_bytes(T, "reply_to", m->reply_to);
    set_bytes(T, "message_id", m->message_id);
}

static amqp_bytes_t pool_bytes(amqp_pool_t *pool, const char *s, size_t n)
{
    amqp_bytes_t b = {.len = n, .bytes = n ? amqp_pool_alloc(pool, n) : NULL};
    if (n) {
        memcpy(b.bytes, s, n);
    }
    return b;
}

/* The Lua table at idx as AMQP headers (strings, numbers, booleans);
 * raises on another type. Allocated from pool. */
static amqp_table_t headers_from_lua(lua_State *L, int idx, amqp_pool_t *pool, int extra)
{
    int n = 0;
    for (lua_pushnil(L); lua_next(L, idx); lua_pop(L, 1)) {
        n++;
    }
    amqp_table_t t = {.num_entries = 0,
                      .entries = amqp_pool_alloc(pool, sizeof(amqp_table_entry_t) * (size_t)(n + extra + 1))};
    for (lua_pushnil(L); lua_next(L, idx); lua_pop(L, 1)) { /* [key, value] */
        size_t kl = 0, vl = 0; /* clang: luaL_error does not return, it cannot tell */
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tolstring(L, -2, &kl) : NULL;
        if (k == NULL) {
            luaL_error(L, "amqp: header names must be strings");
        }
        amqp_table_entry_t *e = &t.entries[t.num_entries++];
        e->key = pool_bytes(pool, k, kl);
        if (lua_type(L, -1) == LUA_TSTRING) {
            const char *v = lua_tolstring(L, -1, &vl);
            e->value.kind = AMQP_FIELD_KIND_UTF8;
            e->value.value.bytes = pool_bytes(pool, v, vl);
        } else if (lua_type(L, -1) == LUA_TNUMBER) {
            lua_Number x = lua_tonumber(L, -1);
            if (x == (lua_Number)(int64_t)x) {
                e->value.kind = AMQP_FIELD_KIND_I64;
                e->value.value.i64 = (int64_t)x;
            } else {
                e->value.kind = AMQP_FIELD_KIND_F64;
                e->value.value.f64 = x;
            }
        } else if (lua_type(L, -1) == LUA_TBOOLEAN) {
            e->value.kind = AMQP_FIELD_KIND_BOOLEAN;
            e->value.value.boolean = lua_toboolean(L, -1);
        } else {
            luaL_error(L, "amqp: header %s: a string, number or boolean expected, got %s", k,
                       luaL_typename(L, -1));
        }
    }
    return t;
}

/* ---- the client ------------------------------------------------------------------ */

static aclient_t *check_client(lua_State *L, int idx)
{
    aclient_ud_t *ud = luaL_checkudata(L, idx, AMQP_CLIENT_MT);
    if (ud->c == NULL) {
        luaL_error(L, "amqp: not connected (osara check mode)");
    }
    return ud->c;
}

static int push_closed(lua_State *L)
{
    lua_pushnil(L);
    lua_pushliteral(L, "amqp: the client is closed (the script's configuration changed)");
    return 2;
}

/* client(conf, key, check) -> client: conf {url=, prefetch=}. A client is
 * shared by every script version with the same key. */
static int l_amqp_client(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    const char *key = luaL_checkstring(L, 2);
    osara_worker_t *w = osara_vm_from_L(L)->w;
    osara__amqp_metrics_init();
    char skey[1024];
    snprintf(skey, sizeof(skey), "amqp:%s", key);
    int checking = w->opts.mode == OSARA_MODE_CHECK || lua_toboolean(L, 3);
    aclient_t *c = checking ? NULL : osara_worker_shared_get(w, skey);
    if (c == NULL && !checking) {
        lua_getfield(L, 1, "url");
        lua_getfield(L, 1, "prefetch"); /* [conf, key, check, url, prefetch] */
        c = osara__amqp_client_new(w, luaL_checkstring(L, -2), (int)luaL_optinteger(L, -1, 256));
        lua_pop(L, 2);
        if (c == NULL) {
            return luaL_error(L, "%s", osara_err_msg());
        }
        osara_worker_shared_put(w, skey, c, osara__amqp_client_close);
    }
    aclient_ud_t *ud = lua_newuserdata(L, sizeof(*ud));
    ud->c = c;
    if (c) {
        osara__amqp_client_ref(c); /* the userdata's, until __gc */
    }
    luaL_getmetatable(L, AMQP_CLIENT_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static int l_client_gc(lua_State *L)
{
    aclient_ud_t *ud = luaL_checkudata(L, 1, AMQP_CLIENT_MT);
    if (ud->c) {
        osara__amqp_client_unref(ud->c);
        ud->c = NULL;
    }
    return 0;
}

static int l_client_url(lua_State *L)
{
    aclient_ud_t *ud = luaL_checkudata(L, 1, AMQP_CLIENT_MT);
    lua_pushstring(L, ud->c ? ud->c->url : "(check mode)");
    return 1;
}

/* Counts p against the input of the handler running on L, if any. */
static void count_output(lua_State *L, apub_t *p)
{
    osara_co_t *co = osara_sched_current(L);
    osara_delivery_t *d = co ? osara_delivery_of(co) : NULL;
    if (d) {
        p->d = d;
        osara_delivery_output_begin(d);
    }
}

/* Sends p; with confirm, inside a coroutine, waits for the broker. */
static int send_and_wait(lua_State *L, aclient_t *c, apub_t *p, int confirm, double timeout)
{
    count_output(L, p);
    osara__amqp_publish(c, p);
    if (confirm && osara_sched_current(L)) {
        return osara_sched_future_wait(L, &p->f, 0, timeout);
    }
    lua_pushboolean(L, 1);
    return 1;
}

static void set_prop(lua_State *L, int opts, const char *name, apub_t *p, amqp_bytes_t *dst,
                     amqp_flags_t flag)
{
    lua_getfield(L, opts, name);
    if (lua_isstring(L, -1)) {
        size_t n;
        const char *s = lua_tolstring(L, -1, &n);
        *dst = pool_bytes(&p->pool, s, n);
        p->props._flags |= flag;
    }
    lua_pop(L, 1);
}

/* publish(exchange, routing_key, bytes, opts) -> true | nil, err. opts:
 * headers, persistent, confirm, timeout, expiration (ms, string), declare
 * (exchange type: declared once first), content_type, correlation_id,
 * reply_to, message_id. */
static int l_client_publish(lua_State *L)
{
    aclient_t *c = check_client(L, 1);
    const char *exchange = luaL_checkstring(L, 2);
    const char *rk = luaL_checkstring(L, 3);
    size_t n;
    const char *body = luaL_checklstring(L, 4, &n);
    luaL_checktype(L, 5, LUA_TTABLE);
    if (atomic_load(&c->closing)) {
        return push_closed(L);
    }
    apub_t *p = osara__amqp_pub_new(c);
    p->exchange = osara_xstrdup(exchange);
    p->routing_key = osara_xstrdup(rk);
    p->body = amqp_bytes_malloc_dup((amqp_bytes_t){.len = n, .bytes = (void *)body});
    lua_getfield(L, 5, "persistent");
    p->props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
    p->props.delivery_mode = lua_toboolean(L, -1) ? 2 : 1;
    lua_getfield(L, 5, "headers"); /* [persistent, headers] */
    if (lua_istable(L, -1)) {
        p->props.headers = headers_from_lua(L, lua_gettop(L), &p->pool, 0);
        p->props._flags |= AMQP_BASIC_HEADERS_FLAG;
    }
    lua_getfield(L, 5, "declare");
    p->declare_type = lua_isstring(L, -1) ? osara_xstrdup(lua_tostring(L, -1)) : NULL;
    lua_getfield(L, 5, "confirm");
    int confirm = lua_toboolean(L, -1);
    lua_getfield(L, 5, "timeout");
    double timeout = luaL_optnumber(L, -1, -1);
    lua_pop(L, 5);
    set_prop(L, 5, "expiration", p, &p->props.expiration, AMQP_BASIC_EXPIRATION_FLAG);
    set_prop(L, 5, "content_type", p, &p->props.content_type, AMQP_BASIC_CONTENT_TYPE_FLAG);
    set_prop(L, 5, "correlation_id", p, &p->props.correlation_id,
             AMQP_BASIC_CORRELATION_ID_FLAG);
    set_prop(L, 5, "reply_to", p, &p->props.reply_to, AMQP_BASIC_REPLY_TO_FLAG);
    set_prop(L, 5, "message_id", p, &p->props.message_id, AMQP_BASIC_MESSAGE_ID_FLAG);
    return send_and_wait(L, c, p, confirm, timeout);
}

/* The message whose handler runs on L (raises outside an AMQP handler). */
static amsg_t *current_msg(lua_State *L)
{
    osara_co_t *co = osara_sched_current(L);
    osara_delivery_t *d = co ? osara_delivery_of(co) : NULL;
    if (d == NULL || strcmp(d->lane->tp->name, "amqp") != 0) {
        luaL_error(L, "amqp: retry outside an AMQP handler");
    }
    return (amsg_t *)d;
}

/* The headers of a retried copy: m's (x-death included, so the broker
 * keeps counting) plus where m was first published, which the copy's own
 * exchange and routing key (the default exchange, the retry queue) lose. */
static void retry_headers(const amsg_t *m, apub_t *p)
{
    int n = m->has_headers ? m->headers.num_entries : 0;
    amqp_table_entry_t *e = amqp_pool_alloc(&p->pool, sizeof(*e) * (size_t)(n + 2));
    int k = 0;
    for (int i = 0; i < n; i++) {
        amqp_bytes_t key = m->headers.entries[i].key;
        if (!bytes_eq(key, ORIGIN_EXCHANGE, strlen(ORIGIN_EXCHANGE)) &&
            !bytes_eq(key, ORIGIN_KEY, strlen(ORIGIN_KEY))) {
            e[k++] = m->headers.entries[i];
        }
    }
    e[k].key = amqp_cstring_bytes(ORIGIN_EXCHANGE);
    e[k].value.kind = AMQP_FIELD_KIND_UTF8;
    e[k++].value.value.bytes = m->exchange;
    e[k].key = amqp_cstring_bytes(ORIGIN_KEY);
    e[k].value.kind = AMQP_FIELD_KIND_UTF8;
    e[k++].value.value.bytes = m->routing_key;
    amqp_table_t t = {.num_entries = k, .entries = e};
    amqp_table_clone(&t, &p->props.headers, &p->pool); /* deep: m may go first */
    p->props._flags |= AMQP_BASIC_HEADERS_FLAG;
}

/* retry(delay_ms) -> true | nil, err: sends the message being handled,
 * its body and headers as received (x-death included, so the broker keeps
 * counting), persistent, to its queue's retry queue with a per-message TTL
 * of delay_ms, and waits for the confirm. The broker dead-letters it back
 * to the queue when the TTL runs out. */
static int l_client_retry(lua_State *L)
{
    aclient_t *c = check_client(L, 1);
    lua_Integer delay = luaL_checkinteger(L, 2);
    amsg_t *m = current_msg(L);
    if (atomic_load(&c->closing)) {
        return push_closed(L);
    }
    apub_t *p = osara__amqp_pub_new(c);
    p->exchange = osara_xstrdup("");
    char rq[300];
    osara__amqp_retry_name(m->queue.bytes ? m->queue.bytes : "", m->queue.len, rq, sizeof(rq));
    p->routing_key = osara_xstrdup(rq);
    p->body = amqp_bytes_malloc_dup(m->body);
    p->props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_EXPIRATION_FLAG;
    p->props.delivery_mode = 2;
    char ttl[32];
    snprintf(ttl, sizeof(ttl), "%lld", (long long)(delay < 0 ? 0 : delay));
    p->props.expiration = pool_bytes(&p->pool, ttl, strlen(ttl));
    retry_headers(m, p);
    if (m->content_type.bytes) {
        p->props.content_type = pool_bytes(&p->pool, m->content_type.bytes, m->content_type.len);
        p->props._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
    }
    return send_and_wait(L, c, p, 1, -1);
}

int osara_amqp_open(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"publish", l_client_publish},
        {"retry", l_client_retry},
        {"url", l_client_url},
        {NULL, NULL},
    };
    osara__amqp_registry_open();
    luaL_newmetatable(L, AMQP_CLIENT_MT);
    lua_pushcfunction(L, l_client_gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L); /* [mt, index] */
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushcfunction(L, l_amqp_client);
    lua_setfield(L, -2, "client");
    return 1;
}
