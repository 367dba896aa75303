/* lua.c - the `osara.cache_c` module: the clients' constructors. */
#include "cache/cache.h"

#include <lauxlib.h>
#include <stdlib.h>

#include "cache/cache_int.h"
#include "core/lvm.h"
#include "core/mem.h"

int osara__cache_strings(lua_State *L, int idx, const char *what,
                         const char ***strs, size_t **lens)
{
    luaL_checktype(L, idx, LUA_TTABLE);
    int n = (int)lua_objlen(L, idx);
    *strs = osara_xcalloc(n ? n : 1, sizeof(**strs));
    *lens = osara_xcalloc(n ? n : 1, sizeof(**lens));
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, idx, i + 1); /* [..., s] */
        int t = lua_type(L, -1);
        if (t != LUA_TSTRING && t != LUA_TNUMBER) {
            free(*strs);
            free(*lens);
            return luaL_error(L, "%s: item %d is a %s, expected a string", what,
                              i + 1, lua_typename(L, t));
        }
        /* The string stays alive: it is (or was converted in) the table. */
        lua_pushvalue(L, -1);
        (*strs)[i] = lua_tolstring(L, -1, &(*lens)[i]);
        lua_rawseti(L, idx, i + 1);
        lua_pop(L, 1);
    }
    return n;
}

void osara__cache_register(lua_State *L, const char *mt, const luaL_Reg *methods,
                           lua_CFunction gc, const char *name, lua_CFunction ctor)
{
    osara_lua_newclass(L, mt, methods, gc, NULL);
    lua_pushcfunction(L, ctor); /* [mod, ctor] */
    lua_setfield(L, -2, name);
}

int osara_cache_open(lua_State *L)
{
    lua_newtable(L);
    osara__redis_register(L);
    osara__memcached_register(L);
    return 1;
}
