/* cache_int.h - what the files of host/cache/ share (not an interface). */
#ifndef OSARA_CACHE_INT_H
#define OSARA_CACHE_INT_H

#include <lauxlib.h>
#include <lua.h>

/* Each client file registers its metatable and sets its constructor on the
 * module table at the top of L's stack. */
void osara__redis_register(lua_State *L);
void osara__memcached_register(lua_State *L);

/* Registers a client type: metatable `mt` with `methods` as __index and
 * `gc`, and the constructor `ctor` as `name` on the module table at the
 * top of L's stack. */
void osara__cache_register(lua_State *L, const char *mt, const luaL_Reg *methods,
                           lua_CFunction gc, const char *name, lua_CFunction ctor);

/* Strings of the array at `idx` (strings or numbers), copied by pointer:
 * valid while the table is on the stack. Returns the count; raises on
 * another type, naming `what`. Caller frees *strs and *lens. */
int osara__cache_strings(lua_State *L, int idx, const char *what,
                         const char ***strs, size_t **lens);

#endif
