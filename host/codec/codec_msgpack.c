#include "codec/codec_msgpack.h"

#include <lauxlib.h>
#include <math.h>
#include <msgpack.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define MAX_DEPTH 100

/* ---- bounds check ----------------------------------------------------------
 * msgpack-c allocates an array's elements when it reads the header, before
 * it knows the elements are there. Every element takes at least one byte, so
 * a count above the bytes left is malformed: reject it before unpacking. */

static uint32_t be(const uint8_t *p, int n)
{
    uint32_t v = 0;
    for (int i = 0; i < n; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

static int check(const uint8_t **pp, const uint8_t *end, int depth)
{
    const uint8_t *p = *pp;
    if (p >= end || depth > MAX_DEPTH) {
        return -1;
    }
    uint8_t b = *p++;
    uint64_t skip = 0, items = 0;
    static const uint8_t fixed[] = { /* 0xc0..0xdf: payload bytes after the type byte */
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 8, 1, 2, 4, 8,
        1, 2, 4, 8, 2, 3, 5, 9, 17, 0, 0, 0, 0, 0, 0, 0,
    };
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
        skip = 0;
    } else if (b <= 0x8f) {
        items = 2u * (b & 0x0f);
    } else if (b <= 0x9f) {
        items = b & 0x0f;
    } else if (b <= 0xbf) {
        skip = b & 0x1f;
    } else if (b == 0xc1) {
        return -1;
    } else if (b >= 0xc4 && b <= 0xc9) { /* bin 8/16/32, ext 8/16/32 */
        int n = 1 << ((b - 0xc4) % 3);
        if (end - p < n) {
            return -1;
        }
        skip = be(p, n) + (b >= 0xc7 ? 1 : 0);
        p += n;
    } else if (b >= 0xd9 && b <= 0xdb) { /* str 8/16/32 */
        int n = 1 << (b - 0xd9);
        if (end - p < n) {
            return -1;
        }
        skip = be(p, n);
        p += n;
    } else if (b >= 0xdc) { /* array 16/32, map 16/32 */
        int n = b == 0xdc || b == 0xde ? 2 : 4;
        if (end - p < n) {
            return -1;
        }
        items = (uint64_t)be(p, n) * (b >= 0xde ? 2 : 1);
        p += n;
    } else {
        skip = fixed[b - 0xc0];
    }
    if (skip > (uint64_t)(end - p) || items > (uint64_t)(end - p)) {
        return -1;
    }
    p += skip;
    for (uint64_t i = 0; i < items; i++) {
        if (check(&p, end, depth + 1) != 0) {
            return -1;
        }
    }
    *pp = p;
    return 0;
}

/* ---- msgpack -> Lua --------------------------------------------------------- */

static int to_lua(lua_State *L, const msgpack_object *o)
{
    switch (o->type) {
    case MSGPACK_OBJECT_NIL:
        lua_pushlightuserdata(L, NULL); /* cjson.null */
        return 0;
    case MSGPACK_OBJECT_BOOLEAN:
        lua_pushboolean(L, o->via.boolean);
        return 0;
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        lua_pushnumber(L, (lua_Number)o->via.u64);
        return 0;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        lua_pushnumber(L, (lua_Number)o->via.i64);
        return 0;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        lua_pushnumber(L, o->via.f64);
        return 0;
    case MSGPACK_OBJECT_STR:
        lua_pushlstring(L, o->via.str.ptr, o->via.str.size);
        return 0;
    case MSGPACK_OBJECT_BIN:
        lua_pushlstring(L, o->via.bin.ptr, o->via.bin.size);
        return 0;
    case MSGPACK_OBJECT_ARRAY:
        lua_createtable(L, (int)o->via.array.size, 0);
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            if (to_lua(L, &o->via.array.ptr[i]) != 0) {
                return -1;
            }
            lua_rawseti(L, -2, (int)i + 1);
        }
        return 0;
    case MSGPACK_OBJECT_MAP:
        lua_createtable(L, 0, (int)o->via.map.size);
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object_kv *kv = &o->via.map.ptr[i];
            if (kv->key.type == MSGPACK_OBJECT_NIL || to_lua(L, &kv->key) != 0 ||
                (lua_type(L, -1) == LUA_TNUMBER && isnan(lua_tonumber(L, -1))) ||
                to_lua(L, &kv->val) != 0) {
                return -1;
            }
            lua_rawset(L, -3);
        }
        return 0;
    default:
        return -1; /* ext types */
    }
}

/* decode(bytes) -> value | nil, err */
static int l_decode(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    const uint8_t *p = (const uint8_t *)s;
    if (check(&p, p + len, 0) != 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "msgpack: truncated, malformed or too deeply nested data");
        return 2;
    }
    if (p != (const uint8_t *)s + len) {
        lua_pushnil(L);
        lua_pushliteral(L, "msgpack: trailing bytes after the value");
        return 2;
    }
    msgpack_unpacked result;
    msgpack_unpacked_init(&result);
    size_t off = 0;
    int ok = msgpack_unpack_next(&result, s, len, &off) == MSGPACK_UNPACK_SUCCESS;
    int top = lua_gettop(L);
    if (ok && to_lua(L, &result.data) != 0) {
        lua_settop(L, top);
        ok = 0;
    }
    msgpack_unpacked_destroy(&result);
    if (!ok) {
        lua_pushnil(L);
        lua_pushliteral(L, "msgpack: unsupported or malformed value (ext types, nil or NaN keys)");
        return 2;
    }
    return 1;
}

/* ---- Lua -> msgpack --------------------------------------------------------- */

/* Length n if the table at idx is a sequence 1..n with nothing else, else -1. */
static int sequence_length(lua_State *L, int idx)
{
    int n = (int)lua_objlen(L, idx), count = 0;
    if (n == 0) {
        return -1; /* empty: a map, as cjson encodes {} */
    }
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        lua_pop(L, 1);
        double k = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
        if (k < 1 || k > n || k != floor(k)) {
            lua_pop(L, 1);
            return -1;
        }
        count++;
    }
    return count == n ? n : -1;
}

static const char *pack(lua_State *L, msgpack_packer *pk, int idx, int depth)
{
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        msgpack_pack_nil(pk);
        return NULL;
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) { /* cjson.null */
            msgpack_pack_nil(pk);
            return NULL;
        }
        return "cannot encode a userdata";
    case LUA_TBOOLEAN:
        lua_toboolean(L, idx) ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
        return NULL;
    case LUA_TNUMBER: {
        double d = lua_tonumber(L, idx);
        if (d == floor(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0) {
            msgpack_pack_int64(pk, (int64_t)d);
        } else {
            msgpack_pack_double(pk, d);
        }
        return NULL;
    }
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        msgpack_pack_str(pk, len);
        msgpack_pack_str_body(pk, s, len);
        return NULL;
    }
    case LUA_TTABLE:
        break;
    default: {
        static char msg[64]; /* not pushed: the stack is mid-iteration */
        snprintf(msg, sizeof(msg), "cannot encode a %s", luaL_typename(L, idx));
        return msg;
    }
    }
    if (depth > MAX_DEPTH) {
        return "too deeply nested (or a cycle)";
    }
    if (idx < 0) {
        idx = lua_gettop(L) + idx + 1;
    }
    luaL_checkstack(L, 4, "msgpack");
    int n = sequence_length(L, idx);
    if (n >= 0) {
        msgpack_pack_array(pk, (size_t)n);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            const char *err = pack(L, pk, -1, depth + 1);
            lua_pop(L, 1);
            if (err) {
                return err;
            }
        }
        return NULL;
    }
    size_t pairs = 0;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        lua_pop(L, 1);
        pairs++;
    }
    msgpack_pack_map(pk, pairs);
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        const char *err = pack(L, pk, -2, depth + 1);
        if (err == NULL) {
            err = pack(L, pk, -1, depth + 1);
        }
        lua_pop(L, 1);
        if (err) {
            lua_pop(L, 1);
            return err;
        }
    }
    return NULL;
}

/* encode(value) -> bytes | nil, err. One buffer, reused: the loop thread is
 * the only caller and nothing inside calls back into Lua. */
static int l_encode(lua_State *L)
{
    static msgpack_sbuffer buf;
    static int ready;
    if (!ready) {
        msgpack_sbuffer_init(&buf);
        ready = 1;
    }
    msgpack_sbuffer_clear(&buf);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &buf, msgpack_sbuffer_write);
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    const char *err = pack(L, &pk, 1, 0);
    if (err) {
        lua_pushnil(L);
        lua_pushfstring(L, "msgpack: %s", err);
        return 2;
    }
    lua_pushlstring(L, buf.data, buf.size);
    if (buf.alloc > 1 << 20) { /* one large value must not pin its buffer */
        msgpack_sbuffer_destroy(&buf);
        ready = 0;
    }
    return 1;
}

int osara_msgpack_open(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"encode", l_encode}, {"decode", l_decode}, {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
