/* store.h - durable named stores on LMDB.
 *
 * One MDB_env per data folder (a worker shared resource, so it survives
 * reloads), one named database per store. Values carry an 8-byte expiry
 * header (TTL); expired keys are invisible to reads at once and removed by
 * a sweep. Writes are applied in short, synchronous write transactions on
 * the loop thread (lua/osara/store.lua buffers a transaction's writes and
 * commits them at the end), so a yielding handler never holds an LMDB
 * transaction. A commit can include a second database's operations: the
 * Kafka offsets of the inputs whose state it commits (exactly-once state).
 * The map grows (doubling) on MDB_MAP_FULL instead of failing. */
#ifndef OSARA_STORE_H
#define OSARA_STORE_H

#include <lua.h>

/* Lua binding `osara.store_c`: open, get, commit, range, sweep, stats. */
int osara_store_open(lua_State *L);

/* `osara store DIR dump NAME [PREFIX]` / `osara store DIR get NAME KEY`. */
int osara_store_main(int argc, char **argv);

#endif
