#include "codec/codec_avro.h"

#include <avro.h>
#include <errno.h>
#include <lauxlib.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/lvm.h"

#define AVRO_MT "osara.avro.schema"

typedef struct {
    avro_schema_t schema;
    avro_value_iface_t *iface;
    avro_value_t value;   /* reused for every message: reset, not reallocated */
    int has_value;
} avro_ud_t;

typedef struct {
    char msg[256];
} aerr_t;

static int fail(aerr_t *e, const char *fmt, const char *a)
{
    snprintf(e->msg, sizeof(e->msg), fmt, a);
    return -1;
}

/* ---- bounds check before libavro reads ------------------------------------------
 * libavro allocates a string's buffer from the length prefix before it knows the
 * bytes are there, and leaks it when the read then fails: random bytes claiming
 * a 4 GiB string cost 4 GiB of address space each. This walk checks every
 * length, count and index against the input first and allocates nothing. */

typedef struct {
    const unsigned char *p, *end;
    int64_t items; /* total array/map items seen: bounds zero-width element loops */
} cursor_t;

static int read_varlong(cursor_t *c, int64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (c->p >= c->end) return -1;
        unsigned char b = *c->p++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = (int64_t)(v >> 1) ^ -(int64_t)(v & 1);
            return 0;
        }
    }
    return -1;
}

static int skip_bytes(cursor_t *c, int64_t n)
{
    if (n < 0 || n > c->end - c->p) return -1;
    c->p += n;
    return 0;
}

static int check_value(cursor_t *c, avro_schema_t s, int depth);

static int check_blocks(cursor_t *c, avro_schema_t items, int is_map, int depth)
{
    for (;;) {
        int64_t count, size;
        if (read_varlong(c, &count) != 0) return -1;
        if (count == 0) return 0;
        if (count < 0) {
            if (count == INT64_MIN || read_varlong(c, &size) != 0 || size < 0) return -1;
            count = -count;
        }
        /* compared before adding: a count near INT64_MAX must not overflow */
        if (count > (c->end - c->p) + 1000000 - c->items) return -1;
        c->items += count;
        for (int64_t i = 0; i < count; i++) {
            if (is_map) {
                int64_t klen;
                if (read_varlong(c, &klen) != 0 || skip_bytes(c, klen) != 0) return -1;
            }
            if (check_value(c, items, depth + 1) != 0) return -1;
        }
    }
}

static int check_value(cursor_t *c, avro_schema_t s, int depth)
{
    int64_t n;
    if (depth > 64) return -1;
    switch (avro_typeof(s)) {
    case AVRO_NULL: return 0;
    case AVRO_BOOLEAN: return skip_bytes(c, 1);
    case AVRO_INT32:
    case AVRO_INT64: return read_varlong(c, &n);
    case AVRO_FLOAT: return skip_bytes(c, 4);
    case AVRO_DOUBLE: return skip_bytes(c, 8);
    case AVRO_STRING:
    case AVRO_BYTES: return read_varlong(c, &n) != 0 ? -1 : skip_bytes(c, n);
    case AVRO_FIXED: return skip_bytes(c, avro_schema_fixed_size(s));
    case AVRO_ENUM:
        if (read_varlong(c, &n) != 0) return -1;
        return n >= 0 && n < avro_schema_enum_number_of_symbols(s) ? 0 : -1;
    case AVRO_UNION:
        if (read_varlong(c, &n) != 0 || n < 0 || (size_t)n >= avro_schema_union_size(s)) return -1;
        return check_value(c, avro_schema_union_branch(s, (int)n), depth + 1);
    case AVRO_RECORD:
        for (size_t i = 0; i < avro_schema_record_size(s); i++) {
            if (check_value(c, avro_schema_record_field_get_by_index(s, (int)i), depth + 1) != 0) return -1;
        }
        return 0;
    case AVRO_ARRAY: return check_blocks(c, avro_schema_array_items(s), 0, depth);
    case AVRO_MAP: return check_blocks(c, avro_schema_map_values(s), 1, depth);
    case AVRO_LINK: return check_value(c, avro_schema_link_target(s), depth + 1);
    }
    return -1;
}

/* ---- Avro value -> Lua ------------------------------------------------------ */

/* Accessors return EINVAL without writing when a value lacks them: every
 * out-variable starts initialised. */
static void to_lua(lua_State *L, avro_value_t *v)
{
    switch (avro_value_get_type(v)) {
    case AVRO_STRING: {
        const char *s = "";
        size_t n = 0;
        avro_value_get_string(v, &s, &n);
        lua_pushlstring(L, s, n ? n - 1 : 0); /* size counts the NUL */
        return;
    }
    case AVRO_BYTES: {
        const void *p = "";
        size_t n = 0;
        avro_value_get_bytes(v, &p, &n);
        lua_pushlstring(L, p, n);
        return;
    }
    case AVRO_FIXED: {
        const void *p = "";
        size_t n = 0;
        avro_value_get_fixed(v, &p, &n);
        lua_pushlstring(L, p, n);
        return;
    }
    case AVRO_INT32: {
        int32_t x = 0;
        avro_value_get_int(v, &x);
        lua_pushnumber(L, x);
        return;
    }
    case AVRO_INT64: {
        int64_t x = 0;
        avro_value_get_long(v, &x);
        if (x > (INT64_C(1) << 53) || x < -(INT64_C(1) << 53)) {
            /* past 2^53 a double is not exact: the digits, as a string */
            char digits[24];
            snprintf(digits, sizeof(digits), "%lld", (long long)x);
            lua_pushstring(L, digits);
            return;
        }
        lua_pushnumber(L, (double)x);
        return;
    }
    case AVRO_FLOAT: {
        float x = 0;
        avro_value_get_float(v, &x);
        lua_pushnumber(L, x);
        return;
    }
    case AVRO_DOUBLE: {
        double x = 0;
        avro_value_get_double(v, &x);
        lua_pushnumber(L, x);
        return;
    }
    case AVRO_BOOLEAN: {
        int x = 0;
        avro_value_get_boolean(v, &x);
        lua_pushboolean(L, x);
        return;
    }
    case AVRO_NULL:
        lua_pushlightuserdata(L, NULL); /* cjson.null */
        return;
    case AVRO_ENUM: {
        int x = 0;
        avro_value_get_enum(v, &x);
        lua_pushstring(L, avro_schema_enum_get(avro_value_get_schema(v), x));
        return;
    }
    case AVRO_UNION: {
        avro_value_t branch;
        avro_value_get_current_branch(v, &branch);
        to_lua(L, &branch);
        return;
    }
    case AVRO_RECORD:
    case AVRO_MAP:
    case AVRO_ARRAY: {
        size_t n = 0;
        avro_value_get_size(v, &n);
        int is_array = avro_value_get_type(v) == AVRO_ARRAY;
        lua_createtable(L, is_array ? (int)n : 0, is_array ? 0 : (int)n);
        for (size_t i = 0; i < n; i++) {
            avro_value_t child;
            const char *name = NULL;
            avro_value_get_by_index(v, i, &child, &name);
            to_lua(L, &child);
            if (is_array) {
                lua_rawseti(L, -2, (int)i + 1);
            } else {
                lua_setfield(L, -2, name);
            }
        }
        return;
    }
    default:
        lua_pushnil(L);
    }
}

/* ---- Lua -> Avro value -------------------------------------------------------- */

static int from_lua(lua_State *L, int idx, avro_value_t *v, aerr_t *e);

/* Picks the union branch that fits the Lua value at idx. */
static int union_branch(lua_State *L, int idx, avro_schema_t u)
{
    int t = lua_type(L, idx);
    size_t n = avro_schema_union_size(u);
    for (size_t i = 0; i < n; i++) {
        avro_type_t bt = avro_typeof(avro_schema_union_branch(u, (int)i));
        int fits = 0;
        switch (t) {
        case LUA_TNIL: fits = bt == AVRO_NULL; break;
        case LUA_TLIGHTUSERDATA: fits = bt == AVRO_NULL && lua_touserdata(L, idx) == NULL; break;
        case LUA_TBOOLEAN: fits = bt == AVRO_BOOLEAN; break;
        case LUA_TSTRING: fits = bt == AVRO_STRING || bt == AVRO_BYTES || bt == AVRO_ENUM; break;
        case LUA_TNUMBER: {
            double d = lua_tonumber(L, idx);
            fits = bt == AVRO_DOUBLE || bt == AVRO_FLOAT ||
                   ((bt == AVRO_INT32 || bt == AVRO_INT64) && d == floor(d));
            break;
        }
        case LUA_TTABLE: fits = bt == AVRO_RECORD || bt == AVRO_MAP || bt == AVRO_ARRAY; break;
        }
        if (fits) {
            return (int)i;
        }
    }
    return -1;
}

static int from_table(lua_State *L, int idx, avro_value_t *v, aerr_t *e)
{
    if (lua_type(L, idx) != LUA_TTABLE) {
        return fail(e, "expected a table, got %s", luaL_typename(L, idx));
    }
    avro_value_t child;
    switch (avro_value_get_type(v)) {
    case AVRO_RECORD: {
        size_t n = 0;
        avro_value_get_size(v, &n);
        for (size_t i = 0; i < n; i++) {
            const char *name = "";
            avro_value_get_by_index(v, i, &child, &name);
            lua_getfield(L, idx, name);
            int rc = from_lua(L, lua_gettop(L), &child, e);
            lua_pop(L, 1);
            if (rc != 0) {
                if (strncmp(e->msg, "field ", 6) != 0) {
                    char inner[sizeof(e->msg)];
                    memcpy(inner, e->msg, sizeof(inner));
                    int k = snprintf(e->msg, sizeof(e->msg), "field %.60s: ", name);
                    if (k > 0 && (size_t)k < sizeof(e->msg)) {
                        snprintf(e->msg + k, sizeof(e->msg) - (size_t)k, "%.*s",
                                 (int)(sizeof(e->msg) - (size_t)k - 1), inner);
                    }
                }
                return -1;
            }
        }
        return 0;
    }
    case AVRO_ARRAY: {
        size_t n = lua_objlen(L, idx);
        for (size_t i = 1; i <= n; i++) {
            avro_value_append(v, &child, NULL);
            lua_rawgeti(L, idx, (int)i);
            int rc = from_lua(L, lua_gettop(L), &child, e);
            lua_pop(L, 1);
            if (rc != 0) {
                return -1;
            }
        }
        return 0;
    }
    case AVRO_MAP: {
        lua_pushnil(L);
        while (lua_next(L, idx) != 0) {
            if (lua_type(L, -2) != LUA_TSTRING) {
                lua_pop(L, 2);
                return fail(e, "map keys must be strings%s", "");
            }
            avro_value_add(v, lua_tostring(L, -2), &child, NULL, NULL);
            int rc = from_lua(L, lua_gettop(L), &child, e);
            lua_pop(L, 1);
            if (rc != 0) {
                lua_pop(L, 1);
                return -1;
            }
        }
        return 0;
    }
    default:
        return fail(e, "unexpected table%s", "");
    }
}

static int from_lua(lua_State *L, int idx, avro_value_t *v, aerr_t *e)
{
    int t = lua_type(L, idx);
    switch (avro_value_get_type(v)) {
    case AVRO_NULL:
        if (t != LUA_TNIL && !(t == LUA_TLIGHTUSERDATA && lua_touserdata(L, idx) == NULL)) {
            return fail(e, "expected null, got %s", luaL_typename(L, idx));
        }
        return avro_value_set_null(v);
    case AVRO_BOOLEAN:
        if (t != LUA_TBOOLEAN) {
            return fail(e, "expected boolean, got %s", luaL_typename(L, idx));
        }
        return avro_value_set_boolean(v, lua_toboolean(L, idx));
    case AVRO_INT32:
    case AVRO_INT64: {
        int is_long = avro_value_get_type(v) == AVRO_INT64;
        if (is_long && t == LUA_TSTRING) { /* a long past 2^53, as decode gives it */
            char *end;
            errno = 0;
            long long x = strtoll(lua_tostring(L, idx), &end, 10);
            if (errno != 0 || *end != '\0' || end == lua_tostring(L, idx)) {
                return fail(e, "expected an integer, got the string '%s'", lua_tostring(L, idx));
            }
            return avro_value_set_long(v, x);
        }
        if (t != LUA_TNUMBER || lua_tonumber(L, idx) != floor(lua_tonumber(L, idx))) {
            return fail(e, "expected an integer, got %s", luaL_typename(L, idx));
        }
        double d = lua_tonumber(L, idx);
        /* 2^63 and 2^31 are exact doubles: compare before converting */
        if (is_long ? (d < -9223372036854775808.0 || d >= 9223372036854775808.0)
                    : (d < -2147483648.0 || d > 2147483647.0)) {
            return fail(e, "integer out of range for %s", is_long ? "long" : "int");
        }
        return is_long ? avro_value_set_long(v, (int64_t)d) : avro_value_set_int(v, (int32_t)d);
    }
    case AVRO_FLOAT:
    case AVRO_DOUBLE:
        if (t != LUA_TNUMBER) {
            return fail(e, "expected a number, got %s", luaL_typename(L, idx));
        }
        return avro_value_get_type(v) == AVRO_FLOAT ? avro_value_set_float(v, (float)lua_tonumber(L, idx))
                                                    : avro_value_set_double(v, lua_tonumber(L, idx));
    case AVRO_STRING:
    case AVRO_BYTES:
    case AVRO_FIXED: {
        if (t != LUA_TSTRING) {
            return fail(e, "expected a string, got %s", luaL_typename(L, idx));
        }
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        avro_type_t at = avro_value_get_type(v);
        return at == AVRO_STRING ? avro_value_set_string_len(v, s, n + 1)
             : at == AVRO_BYTES ? avro_value_set_bytes(v, (void *)s, n)
                                : avro_value_set_fixed(v, (void *)s, n);
    }
    case AVRO_ENUM: {
        int i = t == LUA_TSTRING ? avro_schema_enum_get_by_name(avro_value_get_schema(v), lua_tostring(L, idx)) : -1;
        if (i < 0) {
            return fail(e, "not a symbol of the enum: %s", t == LUA_TSTRING ? lua_tostring(L, idx) : luaL_typename(L, idx));
        }
        return avro_value_set_enum(v, i);
    }
    case AVRO_UNION: {
        int b = union_branch(L, idx, avro_value_get_schema(v));
        if (b < 0) {
            return fail(e, "no union branch fits a %s", luaL_typename(L, idx));
        }
        avro_value_t branch;
        avro_value_set_branch(v, b, &branch);
        return from_lua(L, idx, &branch, e);
    }
    default:
        return from_table(L, idx, v, e);
    }
}

/* ---- schema checks before libavro builds values ---------------------------------
 * libavro builds a generic value eagerly for every record field and fixed: a
 * fixed of negative size reaches memset with that size, and a record that
 * holds itself recurses until the stack ends. A type that refers to itself
 * through a union (a linked list) does build, but its values and classes
 * reference each other and are never freed (LeakSanitizer, spec/fuzz). So
 * every recursive type is refused here, naming it, as is an out-of-range
 * fixed. */

#define AVRO_FIXED_MAX (16 << 20)
#define AVRO_SCHEMA_DEPTH 64

static int check_schema(avro_schema_t s, int depth, aerr_t *e)
{
    const char *name = avro_schema_name(s) ? avro_schema_name(s) : "?";
    if (depth >= AVRO_SCHEMA_DEPTH) {
        return fail(e, "schema nested deeper than 64 levels (at '%s')", name);
    }
    size_t n = 0;
    switch (avro_typeof(s)) {
    case AVRO_FIXED:
        if (avro_schema_fixed_size(s) < 0 || avro_schema_fixed_size(s) > AVRO_FIXED_MAX) {
            return fail(e, "fixed '%s' needs a size from 0 to 16777216", name);
        }
        return 0;
    case AVRO_LINK:
        s = avro_schema_link_target(s);
        return fail(e, "type '%s' refers to itself: recursive types are not supported "
                       "(libavro never frees them)",
                    avro_schema_name(s) ? avro_schema_name(s) : "?");
    case AVRO_RECORD:
        n = avro_schema_record_size(s);
        for (size_t i = 0; i < n; i++) {
            if (check_schema(avro_schema_record_field_get_by_index(s, (int)i), depth + 1, e) != 0) {
                return -1;
            }
        }
        return 0;
    case AVRO_ARRAY:
        return check_schema(avro_schema_array_items(s), depth + 1, e);
    case AVRO_MAP:
        return check_schema(avro_schema_map_values(s), depth + 1, e);
    case AVRO_UNION:
        n = avro_schema_union_size(s);
        for (size_t i = 0; i < n; i++) {
            if (check_schema(avro_schema_union_branch(s, (int)i), depth + 1, e) != 0) {
                return -1;
            }
        }
        return 0;
    default:
        return 0;
    }
}

/* ---- Lua binding ---------------------------------------------------------------- */

/* schema(json) -> compiled schema | nil, err */
static int l_avro_schema(lua_State *L)
{
    size_t n;
    const char *json = luaL_checklstring(L, 1, &n);
    avro_schema_t schema;
    if (avro_schema_from_json_length(json, n, &schema) != 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "avro: invalid schema: %s", avro_strerror());
        return 2;
    }
    aerr_t e;
    if (check_schema(schema, 0, &e) != 0) {
        avro_schema_decref(schema);
        lua_pushnil(L);
        lua_pushfstring(L, "avro: invalid schema: %s", e.msg);
        return 2;
    }
    avro_ud_t *ud = lua_newuserdata(L, sizeof(*ud));
    memset(ud, 0, sizeof(*ud));
    ud->schema = schema;
    ud->iface = avro_generic_class_from_schema(schema);
    luaL_getmetatable(L, AVRO_MT);
    lua_setmetatable(L, -2);
    if (ud->iface == NULL || avro_generic_value_new(ud->iface, &ud->value) != 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "avro: %s", avro_strerror());
        return 2;
    }
    ud->has_value = 1;
    return 1;
}

/* decode(schema, bytes) -> value | nil, err */
static int l_avro_decode(lua_State *L)
{
    avro_ud_t *ud = luaL_checkudata(L, 1, AVRO_MT);
    size_t n;
    const char *bytes = luaL_checklstring(L, 2, &n);
    cursor_t c = {(const unsigned char *)bytes, (const unsigned char *)bytes + n, 0};
    if (check_value(&c, ud->schema, 0) != 0) {
        lua_pushnil(L);
        lua_pushstring(L, "avro: cannot decode: truncated or malformed data");
        return 2;
    }
    avro_value_reset(&ud->value);
    avro_reader_t r = avro_reader_memory(bytes, (int64_t)n);
    int rc = avro_value_read(r, &ud->value);
    avro_reader_free(r);
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "avro: cannot decode: %s", avro_strerror());
        return 2;
    }
    to_lua(L, &ud->value);
    return 1;
}

/* encode(schema, value) -> bytes | nil, err */
static int l_avro_encode(lua_State *L)
{
    avro_ud_t *ud = luaL_checkudata(L, 1, AVRO_MT);
    luaL_checkany(L, 2);
    aerr_t e = {{0}};
    avro_value_reset(&ud->value);
    if (from_lua(L, 2, &ud->value, &e) != 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "avro: %s", e.msg[0] ? e.msg : avro_strerror());
        return 2;
    }
    size_t size = 0;
    avro_value_sizeof(&ud->value, &size);
    char *buf = malloc(size ? size : 1);
    avro_writer_t w = avro_writer_memory(buf, (int64_t)size);
    int rc = avro_value_write(w, &ud->value);
    avro_writer_free(w);
    if (rc != 0) {
        free(buf);
        lua_pushnil(L);
        lua_pushfstring(L, "avro: cannot encode: %s", avro_strerror());
        return 2;
    }
    lua_pushlstring(L, buf, size);
    free(buf);
    return 1;
}

static int l_avro_gc(lua_State *L)
{
    avro_ud_t *ud = luaL_checkudata(L, 1, AVRO_MT);
    if (ud->has_value) {
        avro_value_decref(&ud->value);
    }
    if (ud->iface) {
        avro_value_iface_decref(ud->iface);
    }
    if (ud->schema) {
        avro_schema_decref(ud->schema);
    }
    memset(ud, 0, sizeof(*ud));
    return 0;
}

int osara_avro_open(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"schema", l_avro_schema}, {"decode", l_avro_decode}, {"encode", l_avro_encode},
        {NULL, NULL},
    };
    osara_lua_newclass(L, AVRO_MT, NULL, l_avro_gc, NULL);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
