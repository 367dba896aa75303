/* cache.h - network cache clients for osara.cache (lua/osara/cache.lua).
 *
 * Two clients, each a shared resource of the worker keyed by its
 * configuration (it survives reloads that keep the configuration):
 *
 *  - redis: hiredis's asynchronous API on the worker's loop through
 *    hiredis's libuv adapter. A command yields the calling coroutine and
 *    resumes it with the reply; the loop keeps serving meanwhile.
 *  - memcached: libmemcached (blocking) on a thread of its own per client,
 *    with ketama consistent hashing over the hosts. A call queues a job and
 *    yields; the thread posts the result to the worker's inbox, which
 *    resumes the coroutine.
 *
 * Both return I/O failures as `nil, "message"` (never raise for them); the
 * Lua layer turns them into misses and logged failures. A client is
 * reference-counted: the worker's shared list holds one reference and each
 * Lua handle one, so a handle kept by a retiring script version never
 * points at freed memory (a closed client answers `nil, "closed"`).
 *
 * Lua binding `osara.cache_c`:
 *   redis(key, host, port, db, password, timeout) -> client
 *     client:call({cmd, arg...}) -> reply | nil, err
 *       (status -> string, integer -> number, bulk -> string, nil -> nil,
 *        array -> table with n, error reply -> nil, message)
 *     client:pipeline({{cmd...}, ...}) -> { reply... , n = } | nil, err
 *   memcached(key, {"host:port", ...}, timeout) -> client
 *     client:get({key...}) -> { [key] = bytes } [, err for the part that failed]
 *     client:set({key...}, {bytes...}, expire) -> true | nil, err
 *     client:delete({key...}) -> true | nil, err   (a missing key is not an error)
 */
#ifndef OSARA_CACHE_H
#define OSARA_CACHE_H

#include <lua.h>

/* Opens `osara.cache_c`: pushes the module table, returns 1. */
int osara_cache_open(lua_State *L);

#endif
