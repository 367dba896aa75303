#include "transport/offsets.h"

#include <stddef.h>

void osara_offsets_push(osara_offsets_t *o, osara_input_t *in)
{
    in->next = NULL;
    if (o->tail) {
        o->tail->next = in;
    } else {
        o->head = in;
    }
    o->tail = in;
    o->count++;
}

int osara_input_done(const osara_input_t *in)
{
    return in->handler_done && in->outputs_pending == 0 && !in->blocked;
}

int osara_offsets_advance(osara_offsets_t *o, void (*release)(osara_input_t *))
{
    int moved = 0;
    while (o->head && osara_input_done(o->head)) {
        osara_input_t *in = o->head;
        o->head = in->next;
        if (o->head == NULL) {
            o->tail = NULL;
        }
        o->count--;
        o->committable = in->offset + 1;
        moved = 1;
        if (release) {
            release(in);
        }
    }
    return moved;
}
