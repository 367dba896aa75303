/* natsio.h - NATS clients, subscriptions, publish and request on nats.c.
 *
 * (Named natsio, not nats, so it never shadows nats.c's own <nats.h>.)
 * A client is a worker shared resource keyed by its configuration, so it
 * survives reloads. nats.c delivers messages on its own threads; they reach
 * the loop only through the worker's inbox (host/loop.h), drained in
 * batches. Each message runs in its own pooled coroutine, bounded per
 * subscription; over the bound messages wait in a queue, and nats.c's
 * pending limits report slow consumers instead of growing without bound.
 * Requests share one wildcard inbox subscription per client. With
 * servers = "embedded" (the default) a nats-server child with JetStream is
 * started on a free loopback port and stopped with the client.
 * The files of host/nats and what they share: natsio_int.h. */
#ifndef OSARA_NATSIO_H
#define OSARA_NATSIO_H

#include <lua.h>

/* Lua binding `osara.natsio_c`: client, publish, reply, request, flush and
 * the "nats" registry kind. */
int osara_natsio_open(lua_State *L);

/* Waits for nats.c's threads to stop and frees closed clients; call once
 * after the worker finished. */
void osara_natsio_shutdown(void);

#endif
