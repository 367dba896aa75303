/* codec_avro.h - binary Avro through Debian's libavro (avro-c).
 *
 * A schema (JSON text) is compiled once into a generic value that is reset
 * and reused for every message. Records, arrays, maps, unions, enums,
 * fixed, bytes and the primitives map to Lua tables, strings, numbers,
 * booleans and cjson.null. Bad input returns nil, "avro: ...". */
#ifndef OSARA_CODEC_AVRO_H
#define OSARA_CODEC_AVRO_H

#include <lua.h>

/* Lua binding `osara.avro_c`: schema(json), decode(s, bytes), encode(s, v). */
int osara_avro_open(lua_State *L);

#endif
