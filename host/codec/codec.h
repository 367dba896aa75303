/* codec.h - C helpers for the codecs in lua/osara/codec.lua. */
#ifndef OSARA_CODEC_H
#define OSARA_CODEC_H

#include <lua.h>
#include <stddef.h>

/* 1 if s[0..len) is valid UTF-8 (no overlongs, surrogates or > U+10FFFF). */
int osara_utf8_valid(const unsigned char *s, size_t len);

/* Lua binding `osara.codec_c`: utf8_valid(s) -> boolean, offset of the
 * first invalid byte. */
int osara_codec_open(lua_State *L);

#endif
