/* config.h - YAML for osara.config (lua/osara/config.lua), on libyaml.
 *
 * Lua binding `osara.yaml_c`:
 *   load(text, name) -> value | nil, "name:line:column: problem"
 *     One document. Mappings become tables, sequences arrays, plain
 *     scalars are typed as YAML 1.1 does (null/~/empty -> nil, true/false/
 *     yes/no/on/off, integers in decimal/0x/0o, floats, .inf, .nan);
 *     quoted scalars and those tagged !!str stay strings. Anchors and
 *     aliases are resolved (an alias shares the anchored table). Line and
 *     column are 1-based. */
#ifndef OSARA_CONFIG_H
#define OSARA_CONFIG_H

#include <lua.h>

/* Opens `osara.yaml_c`: pushes the module table, returns 1. */
int osara_yaml_open(lua_State *L);

#endif
