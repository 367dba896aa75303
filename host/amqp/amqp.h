/* amqp.h - AMQP 0-9-1 (RabbitMQ) clients on librabbitmq: consumers on
 * transport lanes, publishes with publisher confirms.
 *
 * librabbitmq is synchronous (connect, login and every declaration are
 * blocking RPCs) and a connection is not thread-safe, so each client owns
 * one connection thread that alone calls librabbitmq. The loop talks to it
 * through a command queue and an eventfd; the thread talks to the loop only
 * through the worker's inbox (host/core/loop.h). No Lua runs on the thread
 * and no librabbitmq call runs on the loop. The thread reconnects with
 * backoff and restores the declarations and consumers; publishes not yet
 * confirmed are sent again on the new connection.
 *
 * A client is a worker shared resource keyed by its configuration, so it
 * survives reloads (the registry diff adopts its consumers).
 * The files of host/amqp and what they share: amqp_int.h. */
#ifndef OSARA_AMQP_H
#define OSARA_AMQP_H

#include <lua.h>

/* Lua binding `osara.amqp_c`: client(conf, key, check), the client's
 * methods (publish, retry, url, stats) and the "amqp" registry kind. */
int osara_amqp_open(lua_State *L);

#endif
