/* process.h - child processes driven from Lua without blocking the loop.
 *
 * Integration specs start the real osara binary, kcat or nats-server as
 * children and read their output line by line; the NATS module starts the
 * embedded nats-server the same way. Reads and waits yield the calling
 * coroutine. A child still running when its VM closes is killed (SIGKILL)
 * so that a failing spec never leaks processes. */
#ifndef OSARA_PROCESS_H
#define OSARA_PROCESS_H

#include <lua.h>

/* Lua binding `osara.process_c`: spawn{argv=, env=, cwd=} -> proc with
 * :line(timeout), :expect(pattern, timeout), :output(), :write(s),
 * :close_stdin(), :kill(sig), :wait(timeout), .pid */
int osara_process_open(lua_State *L);

#endif
