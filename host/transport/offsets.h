/* offsets.h - per-partition tracking of inputs in flight.
 *
 * Inputs enter in offset order. An input is done when its handler finished
 * and its outputs were acknowledged; the committable position is one past
 * the last input of the contiguous done prefix. The Kafka client stores it
 * with rd_kafka_offsets_store; the store subsystem can instead read it and
 * commit it inside its own transaction. */
#ifndef OSARA_OFFSETS_H
#define OSARA_OFFSETS_H

#include <stdint.h>

typedef struct osara_input_s {
    int64_t offset;
    int handler_done;       /* the handler returned */
    int outputs_pending;    /* sent, not yet acknowledged */
    int blocked;            /* an output failed: never committable */
    void *owner;            /* the transport's per-message data */
    struct osara_input_s *next;
} osara_input_t;

typedef struct {
    osara_input_t *head, *tail; /* in offset order */
    int count;
    int64_t committable;        /* next offset to commit, -1 if none yet */
} osara_offsets_t;

/* Appends an input (offsets must increase). */
void osara_offsets_push(osara_offsets_t *o, osara_input_t *in);

/* Pops the done prefix; calls release(in) for each popped input and
 * returns 1 if the committable position moved. */
int osara_offsets_advance(osara_offsets_t *o, void (*release)(osara_input_t *));

/* Input is done when its handler finished and no output is pending. */
int osara_input_done(const osara_input_t *in);

#endif
