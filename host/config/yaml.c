/* yaml.c - YAML documents to Lua values on libyaml's event parser.
 *
 * A small binding of our own rather than Debian's lua-yaml (lyaml): it is
 * built for the system Lua and sets a global when required, which the
 * strict script environment rejects, and we need one function. Scalars are
 * typed as YAML 1.1 (PyYAML, hence kata) does. */
#include "config/config.h"

#include <errno.h>
#include <lauxlib.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

#define MAX_DEPTH 200

typedef struct {
    lua_State *L;
    yaml_parser_t parser;
    const char *name;
    int anchors; /* stack index of the anchor -> value table */
    char err[512];
} ycx_t;

static int fail_at(ycx_t *cx, yaml_mark_t mark, const char *problem)
{
    snprintf(cx->err, sizeof(cx->err), "%s:%zu:%zu: %s", cx->name, mark.line + 1,
             mark.column + 1, problem);
    return -1;
}

static int next_event(ycx_t *cx, yaml_event_t *ev)
{
    if (yaml_parser_parse(&cx->parser, ev)) {
        return 0;
    }
    yaml_parser_t *p = &cx->parser;
    char problem[400];
    snprintf(problem, sizeof(problem), "%s", p->problem ? p->problem : "invalid YAML");
    if (p->context) { /* where the unfinished construct began */
        size_t n = strlen(problem);
        snprintf(problem + n, sizeof(problem) - n, " %s at line %zu, column %zu", p->context,
                 p->context_mark.line + 1, p->context_mark.column + 1);
    }
    return fail_at(cx, p->problem_mark, problem);
}

/* ---- scalars ------------------------------------------------------------------ */

static int is_one_of(const char *s, const char *const *words)
{
    for (; *words; words++) {
        if (strcmp(s, *words) == 0) {
            return 1;
        }
    }
    return 0;
}

/* A YAML 1.1 integer (decimal, 0x, 0o, leading-0 octal; '_' allowed). */
static int parse_int(const char *s, double *out)
{
    char buf[80];
    size_t n = 0;
    for (const char *p = s; *p && n < sizeof(buf) - 1; p++) {
        if (*p != '_') {
            buf[n++] = *p;
        }
    }
    buf[n] = '\0';
    const char *d = buf + (buf[0] == '-' || buf[0] == '+');
    if (*d < '0' || *d > '9') {
        return 0;
    }
    int base = 10;
    if (d[0] == '0' && (d[1] == 'x' || d[1] == 'X')) {
        base = 16;
    } else if (d[0] == '0' && d[1] == 'o') {
        base = 8;
        memmove((char *)d + 1, d + 2, strlen(d + 2) + 1); /* "0o17" -> "017" */
    } else if (d[0] == '0' && d[1] != '\0') {
        base = 8;
    }
    char *end;
    errno = 0;
    long long v = strtoll(buf, &end, base);
    if (*end != '\0' || errno != 0) {
        return 0;
    }
    *out = (double)v;
    return 1;
}

static int parse_float(const char *s, double *out)
{
    static const char *const inf[] = {".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", NULL};
    static const char *const ninf[] = {"-.inf", "-.Inf", "-.INF", NULL};
    static const char *const nan[] = {".nan", ".NaN", ".NAN", NULL};
    if (is_one_of(s, inf)) {
        *out = HUGE_VAL;
        return 1;
    }
    if (is_one_of(s, ninf)) {
        *out = -HUGE_VAL;
        return 1;
    }
    if (is_one_of(s, nan)) {
        *out = NAN;
        return 1;
    }
    /* digits with a '.' or an exponent; strtod alone would take "0x1p3", "inf" */
    const char *p = s + (*s == '-' || *s == '+');
    if (!((*p >= '0' && *p <= '9') || (*p == '.' && p[1] >= '0' && p[1] <= '9'))) {
        return 0;
    }
    if (strpbrk(p, "xXiInN") != NULL) {
        return 0;
    }
    char *end;
    *out = strtod(s, &end);
    return *end == '\0';
}

/* Pushes a plain scalar typed as YAML 1.1 resolves it. */
static void push_plain(lua_State *L, const char *s, size_t len)
{
    static const char *const nulls[] = {"", "~", "null", "Null", "NULL", NULL};
    static const char *const trues[] = {"true", "True", "TRUE", "yes", "Yes", "YES",
                                        "on", "On", "ON", NULL};
    static const char *const falses[] = {"false", "False", "FALSE", "no", "No", "NO",
                                         "off", "Off", "OFF", NULL};
    double d;
    if (is_one_of(s, nulls)) {
        lua_pushnil(L);
    } else if (is_one_of(s, trues)) {
        lua_pushboolean(L, 1);
    } else if (is_one_of(s, falses)) {
        lua_pushboolean(L, 0);
    } else if (parse_int(s, &d) || parse_float(s, &d)) {
        lua_pushnumber(L, d);
    } else {
        lua_pushlstring(L, s, len);
    }
}

static void push_scalar(lua_State *L, const yaml_event_t *ev)
{
    const char *s = (const char *)ev->data.scalar.value;
    size_t len = ev->data.scalar.length;
    const char *tag = (const char *)ev->data.scalar.tag;
    if (tag && strcmp(tag, YAML_STR_TAG) == 0) {
        lua_pushlstring(L, s, len);
    } else if (tag || ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE) {
        push_plain(L, s, len); /* !!int, !!float, !!bool, !!null or untagged */
    } else {
        lua_pushlstring(L, s, len); /* quoted, literal, folded */
    }
}

/* ---- nodes --------------------------------------------------------------------- */

static int parse_node(ycx_t *cx, yaml_event_t *ev, int depth);

static void remember_anchor(ycx_t *cx, const yaml_char_t *anchor)
{
    if (anchor) {
        lua_pushstring(cx->L, (const char *)anchor); /* [..., v, name] */
        lua_pushvalue(cx->L, -2);
        lua_rawset(cx->L, cx->anchors);
    }
}

/* `<<: *base` (or a list of them): copies keys the mapping lacks. */
static void merge_into(lua_State *L, int map, int src)
{
    if (lua_type(L, src) != LUA_TTABLE) {
        return;
    }
    if (lua_objlen(L, src) > 0) { /* a list of mappings */
        for (int i = 1; i <= (int)lua_objlen(L, src); i++) {
            lua_rawgeti(L, src, i);
            merge_into(L, map, lua_gettop(L));
            lua_pop(L, 1);
        }
        return;
    }
    lua_pushnil(L);
    while (lua_next(L, src)) { /* [..., k, v] */
        lua_pushvalue(L, -2);
        lua_rawget(L, map);
        int absent = lua_isnil(L, -1);
        lua_pop(L, 1);
        if (absent) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2); /* [..., k, k, v] */
            lua_rawset(L, map);
        } else {
            lua_pop(L, 1);
        }
    }
}

static int parse_mapping(ycx_t *cx, int depth)
{
    lua_State *L = cx->L;
    int map = lua_gettop(L);
    for (;;) {
        yaml_event_t ev;
        if (next_event(cx, &ev) != 0) {
            return -1;
        }
        if (ev.type == YAML_MAPPING_END_EVENT) {
            yaml_event_delete(&ev);
            return 0;
        }
        int merge = ev.type == YAML_SCALAR_EVENT &&
                    ev.data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
                    strcmp((const char *)ev.data.scalar.value, "<<") == 0;
        yaml_mark_t mark = ev.start_mark;
        if (parse_node(cx, &ev, depth + 1) != 0) { /* [..., map, key] */
            return -1;
        }
        if (next_event(cx, &ev) != 0 || parse_node(cx, &ev, depth + 1) != 0) {
            return -1; /* [..., map, key, value] */
        }
        if (merge) {
            merge_into(L, map, lua_gettop(L));
            lua_pop(L, 2);
        } else if (lua_isnil(L, -2)) {
            lua_pop(L, 2);
            return fail_at(cx, mark, "a mapping key is null");
        } else {
            lua_rawset(L, map);
        }
    }
}

static int parse_sequence(ycx_t *cx, int depth)
{
    for (int i = 1;; i++) {
        yaml_event_t ev;
        if (next_event(cx, &ev) != 0) {
            return -1;
        }
        if (ev.type == YAML_SEQUENCE_END_EVENT) {
            yaml_event_delete(&ev);
            return 0;
        }
        if (parse_node(cx, &ev, depth + 1) != 0) { /* [..., seq, v] */
            return -1;
        }
        lua_rawseti(cx->L, -2, i);
    }
}

/* Pushes the node that starts with ev (consumed). 0 or -1 (cx->err set). */
static int parse_node(ycx_t *cx, yaml_event_t *ev, int depth)
{
    lua_State *L = cx->L;
    int rc = 0;
    if (depth > MAX_DEPTH) {
        rc = fail_at(cx, ev->start_mark, "nested too deeply");
    } else if (!lua_checkstack(L, 8)) {
        rc = fail_at(cx, ev->start_mark, "out of Lua stack");
    } else if (ev->type == YAML_SCALAR_EVENT) {
        push_scalar(L, ev);
        remember_anchor(cx, ev->data.scalar.anchor);
    } else if (ev->type == YAML_SEQUENCE_START_EVENT) {
        lua_newtable(L);
        remember_anchor(cx, ev->data.sequence_start.anchor);
        rc = parse_sequence(cx, depth);
    } else if (ev->type == YAML_MAPPING_START_EVENT) {
        lua_newtable(L);
        remember_anchor(cx, ev->data.mapping_start.anchor);
        rc = parse_mapping(cx, depth);
    } else if (ev->type == YAML_ALIAS_EVENT) {
        lua_pushstring(L, (const char *)ev->data.alias.anchor);
        lua_rawget(L, cx->anchors);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            rc = fail_at(cx, ev->start_mark, "unknown alias");
        }
    } else {
        rc = fail_at(cx, ev->start_mark, "unexpected YAML event");
    }
    yaml_event_delete(ev);
    return rc;
}

/* Pushes the first document's root (nil for an empty stream). */
static int parse_stream(ycx_t *cx)
{
    yaml_event_t ev;
    while (next_event(cx, &ev) == 0) {
        yaml_event_type_t t = ev.type;
        if (t == YAML_STREAM_END_EVENT) {
            yaml_event_delete(&ev);
            lua_pushnil(cx->L);
            return 0;
        }
        if (t == YAML_STREAM_START_EVENT || t == YAML_DOCUMENT_START_EVENT) {
            yaml_event_delete(&ev);
            continue;
        }
        return parse_node(cx, &ev, 0);
    }
    return -1;
}

/* load(text, name) -> value | nil, "name:line:column: problem" */
static int l_load(lua_State *L)
{
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len);
    ycx_t cx = {.L = L, .name = luaL_optstring(L, 2, "yaml")};
    lua_settop(L, 2);
    lua_newtable(L); /* [text, name, anchors] */
    cx.anchors = 3;
    if (!yaml_parser_initialize(&cx.parser)) {
        return luaL_error(L, "yaml: out of memory");
    }
    yaml_parser_set_input_string(&cx.parser, (const unsigned char *)text, len);
    int rc = parse_stream(&cx);
    yaml_parser_delete(&cx.parser);
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushstring(L, cx.err);
        return 2;
    }
    return 1;
}

int osara_yaml_open(lua_State *L)
{
    static const luaL_Reg fns[] = {{"load", l_load}, {NULL, NULL}};
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
