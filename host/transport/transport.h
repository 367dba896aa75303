/* transport.h - what every broker shares: lanes of deliveries in flight.
 *
 * A broker (Kafka, NATS core, JetStream, later AMQP) turns what it consumes
 * into deliveries and pushes them onto lanes. A lane is the unit of order
 * and of flow control: a Kafka partition (ordered, one handler at a time),
 * a NATS subscription (unordered, up to a bound at once), an AMQP consumer
 * (prefetch). The lane does the work every broker used to repeat:
 *
 *   - queues deliveries and starts them in coroutines of the handler's
 *     current VM (the registry entry it is given, which adopt() updates);
 *   - bounds what is held: over `max_held` it asks the broker to pause,
 *     at half it asks it to resume;
 *   - counts outputs sent for a delivery, and settles the delivery only
 *     when its handler finished and every output was acknowledged;
 *   - formats the handler's label once per entry, not per message.
 *
 * The broker implements osara_transport_t: how to build the Lua message,
 * how to settle (ack / retry later / give up), how to pause. Retry,
 * dead-letter, schemas and codecs sit above, in lua/osara/dispatch.lua,
 * written once for every broker.
 *
 * Everything here runs on the worker's loop thread.
 *
 * Refinements made while implementing it (Kafka was the first user):
 *   - `finished` in the vtable: the handler returned or failed while its
 *     outputs may still be pending; Kafka frees the message payload there
 *     (a held rd_kafka_message_t pins its whole fetch buffer) and counts.
 *   - `hold` and osara_lane_requeue(): a broker that retries in process
 *     (Kafka, until the delivery issue's policy) puts the failed delivery
 *     back at the head and holds the lane while its backoff runs, so an
 *     ordered lane starts nothing behind it.
 *   - `paused` is the lane's own request (held over max_held, until half).
 *     A broker with a further bound of its own (Kafka's per-client
 *     max_inflight) decides in pause() whether to act on a resume.
 *   - CANCELLED is reported when the handler's VM was closing (reload grace
 *     or shutdown cancelled the coroutine); RETRY when it raised or an
 *     output failed. Either way only once outputs_pending is 0, so no
 *     acknowledgement of an earlier attempt arrives after a retry began.
 *   - settle() is the last thing the lane does with d, and the lane itself
 *     is still touched afterwards (pump): a broker frees lanes later, never
 *     from inside settle(). */
#ifndef OSARA_TRANSPORT_H
#define OSARA_TRANSPORT_H

#include <lua.h>
#include <stddef.h>

#include "transport/offsets.h"

struct osara_reg_entry_s;
struct osara_co_s;

typedef struct osara_lane_s osara_lane_t;
typedef struct osara_delivery_s osara_delivery_t;

/* How a finished delivery is settled with its broker. */
typedef enum {
    OSARA_SETTLE_ACK = 0,   /* handled and every output acknowledged */
    OSARA_SETTLE_RETRY,     /* failed; the broker redelivers it later
                             * (NATS nak, Kafka seek back, AMQP requeue) */
    OSARA_SETTLE_CANCELLED, /* never finished (shutdown, reload grace):
                             * not acknowledged, consumed again later */
} osara_settle_t;

/* The vtable a broker implements. Static storage, one per broker kind. */
typedef struct osara_transport_s {
    const char *name; /* "kafka", "nats", "jetstream", "amqp": metrics label */
    /* Pushes the message table of d onto T (one value). */
    void (*push_message)(lua_State *T, osara_delivery_t *d);
    /* The handler returned (ok=1) or raised / was cancelled (ok=0); its
     * outputs may still be pending. Optional. */
    void (*finished)(osara_delivery_t *d, int ok);
    /* The delivery is over: tell the broker, release its message. d may
     * be reused by the broker afterwards; the lane no longer holds it
     * (unless the broker requeues it). */
    void (*settle)(osara_delivery_t *d, osara_settle_t how);
    /* Flow control toward the broker (optional: NULL when the broker's own
     * bound does it, as nats.c's pending limits do). */
    void (*pause)(osara_lane_t *lane, int pause);
    /* The lane used its share of the loop turn (OSARA_LANE_STARTS_PER_PUMP
     * starts, or OSARA_LANE_TURN_MS of the turn) and more wait: call osara_lane_pump on a later loop turn, so a long
     * queue (a backlog after a reload's handover) does not hold one turn.
     * Optional: without it a pump starts everything it may. */
    void (*defer)(osara_lane_t *lane);
} osara_transport_t;

/* One consumed message in flight. The broker embeds it in its own
 * per-message struct (first member, or found with container_of). */
struct osara_delivery_s {
    osara_lane_t *lane;
    osara_input_t in;       /* offsets, handler_done, outputs_pending */
    int failed;             /* the handler raised, or an output failed */
    int cancelled;          /* its VM closed while the handler waited */
    int taken;              /* returned, but the failure policy took a
                             * failure (counted failed, settled as done) */
    int attempt;            /* 1-based */
    const char *output_error; /* why an output failed (static text), kept
                               * for the next attempt; the broker clears it */
    osara_delivery_t *next; /* lane's run queue */
};

struct osara_lane_s {
    const osara_transport_t *tp;
    void *owner;                      /* the broker's partition/subscription */
    struct osara_reg_entry_s *entry;  /* handler now; NULL: keep queued */
    const char *name;                 /* topic or subject, for the label */
    int ordered;                      /* 1: one handler at a time, in order */
    int max_running;                  /* unordered lanes: handlers at once */
    int max_held;                     /* pause above, resume at half */
    int held;                         /* pushed and not yet settled */
    int running;                      /* handlers running now */
    int paused;                       /* the lane asked the broker to pause */
    int hold;                         /* broker's retry backoff: start nothing */
    int stopped;                      /* closing: start nothing more */
    int force;                        /* start even while the VM takes no new
                                       * entries (draining at shutdown) */
    int pumping;                      /* pump() is on the stack */
    osara_delivery_t *head, *tail;    /* waiting to start */
    char label[192];                  /* "<tp> handler <name> (<where>)" */
    const struct osara_reg_entry_s *label_entry;
};

/* Prepares a lane; nothing is allocated. */
void osara_lane_init(osara_lane_t *lane, const osara_transport_t *tp,
                     void *owner, const char *name, int ordered,
                     int max_running, int max_held);

/* Queues d (its `in.offset` set by the broker) and starts what the lane's
 * bounds allow. Pauses the lane when it now holds max_held. */
void osara_lane_push(osara_lane_t *lane, osara_delivery_t *d);

/* What one pump starts at most when the transport can defer: this many
 * deliveries, or until the loop turn has run this long. */
#define OSARA_LANE_STARTS_PER_PUMP 256
#define OSARA_LANE_TURN_MS 20

/* Starts queued deliveries while the bounds allow: after an adopt (the
 * new entry), after a resume, after a reload's VM swap. */
void osara_lane_pump(osara_lane_t *lane);

/* Puts d (settled RETRY or CANCELLED a moment ago) back at the head of the
 * queue as a new attempt: it counts as held again and starts before
 * anything pushed after it. Does not pump (the broker may set hold). */
void osara_lane_requeue(osara_lane_t *lane, osara_delivery_t *d);

/* Sets the handler entry (start or adopt) and pumps. NULL stops starting
 * new deliveries; what is queued stays queued. */
void osara_lane_set_entry(osara_lane_t *lane, struct osara_reg_entry_s *e);

/* The delivery whose handler runs in co (set by the lane for the handler's
 * lifetime), or NULL: outputs sent from a handler count against it. */
osara_delivery_t *osara_delivery_of(struct osara_co_s *co);

/* An output was sent for d / was acknowledged (ok=1) or failed (ok=0).
 * A failed output fails its delivery: it is settled RETRY, never ACK. */
void osara_delivery_output_begin(osara_delivery_t *d);
void osara_delivery_output_end(osara_delivery_t *d, int ok);

/* Settles every queued (not started) delivery as CANCELLED and marks the
 * lane stopped; running ones settle when their coroutines end. */
void osara_lane_stop(osara_lane_t *lane);

#endif
