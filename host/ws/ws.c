/* ws.c - the Lua module osara.ws_c and the "rpc" registry kind. */
#include "ws/ws.h"
#include "ws/ws_int.h"

#include <lauxlib.h>

#include "core/registry.h"

/* Registry kind "rpc": exposed functions live in Lua (lua/osara/rpc.lua);
 * the kind makes `osara check` list them and reloads report them. */
static int rpc_start(osara_reg_entry_t *e)
{
    (void)e;
    return 0;
}

static const osara_reg_kind_t rpc_kind = {.name = "rpc", .start = rpc_start};

int osara_ws_open(lua_State *L)
{
    osara_registry_kind(&rpc_kind);
    static const luaL_Reg fns[] = {
        {"serve", osara__ws_l_serve}, {"connect", osara__ws_l_connect}, {NULL, NULL},
    };
    osara__ws_client_metatable(L);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
