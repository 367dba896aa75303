/* codec_msgpack.h - MessagePack through Debian's libmsgpack (msgpack-c).
 *
 * Tables that are sequences 1..n encode as arrays, other tables as maps
 * (an empty table as an empty map); integral numbers as the smallest
 * integer, others as doubles; strings as str; cjson.null as nil, which
 * decodes back to cjson.null, as in the json codec. Input is checked
 * against its own length before libmsgpack allocates anything, so a
 * garbage length prefix costs nothing. Bad input returns nil, "msgpack: ...". */
#ifndef OSARA_CODEC_MSGPACK_H
#define OSARA_CODEC_MSGPACK_H

#include <lua.h>

/* Lua binding `osara.msgpack_c`: encode(value), decode(bytes). */
int osara_msgpack_open(lua_State *L);

#endif
