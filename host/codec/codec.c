#include "codec/codec.h"

#include <lauxlib.h>

/* Returns the length of the invalid-free prefix. */
static size_t utf8_prefix(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n;
        unsigned min;
        if ((c & 0xE0) == 0xC0) {
            n = 2, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            n = 3, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            n = 4, min = 0x10000;
        } else {
            return i;
        }
        if (i + n > len) {
            return i;
        }
        unsigned cp = c & (0xFF >> (n + 1));
        for (size_t k = 1; k < n; k++) {
            if ((s[i + k] & 0xC0) != 0x80) {
                return i;
            }
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
            return i;
        }
        i += n;
    }
    return len;
}

int osara_utf8_valid(const unsigned char *s, size_t len)
{
    return utf8_prefix(s, len) == len;
}

static int l_codec_utf8_valid(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    size_t ok = utf8_prefix((const unsigned char *)s, len);
    lua_pushboolean(L, ok == len);
    if (ok == len) {
        return 1;
    }
    lua_pushinteger(L, (lua_Integer)ok + 1);
    return 2;
}

int osara_codec_open(lua_State *L)
{
    lua_newtable(L);
    lua_pushcfunction(L, l_codec_utf8_valid);
    lua_setfield(L, -2, "utf8_valid");
    return 1;
}
