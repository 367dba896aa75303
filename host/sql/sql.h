/* sql.h - SQL databases for handlers: SQLite (embedded, the default) and
 * PostgreSQL (libpq's asynchronous API on the worker's loop).
 *
 * The C half gives connection pools and leases; lua/osara/sql.lua gives
 * the public surface (osara.sql, db:query/exec/tx, the table helper,
 * migrations). A pool is a worker shared resource keyed by driver, target
 * and size, so it survives reloads; each Lua handle holds a reference and
 * the pool is freed when the worker dropped it and no handle or lease is
 * left. docs/sql.md describes the API, the type mapping and what blocks. */
#ifndef OSARA_SQL_H
#define OSARA_SQL_H

#include <lua.h>

/* Lua binding `osara.sql_c`: pool(driver, target, size, timeout) -> pool;
 * pool:acquire() -> lease | nil, err (may yield); lease:run(sql, mode,
 * ...) -> results (may yield); lease:release(); listdir(path). */
int osara_sql_open(lua_State *L);

/* `osara sql migrate SCRIPT_OR_URL DIR`: applies DIR's migrations and
 * returns the process exit code (0 applied or nothing to do, 1 failed,
 * 2 usage). */
int osara_sql_main(int argc, char **argv);

#endif
