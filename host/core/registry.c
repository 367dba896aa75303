#include "core/registry.h"

#include <lauxlib.h>
#include <lua.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "core/mem.h"

#define MAX_KINDS 32

static const osara_reg_kind_t *kinds[MAX_KINDS];
static int nkinds;

void osara_registry_kind(const osara_reg_kind_t *kind)
{
    if (osara_registry_find_kind(kind->name) == NULL && nkinds < MAX_KINDS) {
        kinds[nkinds++] = kind;
    }
}

const osara_reg_kind_t *osara_registry_find_kind(const char *name)
{
    for (int i = 0; i < nkinds; i++) {
        if (strcmp(kinds[i]->name, name) == 0) {
            return kinds[i];
        }
    }
    return NULL;
}

static char *dup_or_empty(const char *s)
{
    return osara_xstrdup(s ? s : "");
}

static osara_reg_entry_t *find(osara_registry_t *reg,
                               const osara_reg_kind_t *kind, const char *key)
{
    for (osara_reg_entry_t *e = reg->head; e; e = e->next) {
        if (e->kind == kind && strcmp(e->key, key) == 0) {
            return e;
        }
    }
    return NULL;
}

osara_reg_entry_t *osara_registry_add(osara_registry_t *reg,
                                      const osara_reg_kind_t *kind,
                                      const char *key, const char *sig,
                                      const char *where, const char *detail,
                                      struct osara_vm_s *vm, int fnref,
                                      int optsref)
{
    osara_reg_entry_t *dup = find(reg, kind, key);
    if (dup != NULL) {
        osara_err_set(OSARA_EINVAL, "%s '%s' is already registered at %s",
                      kind->name, key, dup->where);
        return NULL;
    }
    osara_reg_entry_t *e = osara_xcalloc(1, sizeof(*e));
    e->kind = kind;
    e->key = dup_or_empty(key);
    e->sig = dup_or_empty(sig);
    e->where = dup_or_empty(where);
    e->detail = dup_or_empty(detail);
    e->vm = vm;
    e->fnref = fnref;
    e->optsref = optsref;
    if (reg->tail) {
        reg->tail->next = e;
    } else {
        reg->head = e;
    }
    reg->tail = e;
    reg->n++;
    return e;
}

static int start(osara_reg_entry_t *e)
{
    int rc = e->kind->start ? e->kind->start(e) : 0;
    if (rc == 0) {
        e->active = 1;
    } else {
        OSARA_ERROR("cannot start %s '%s' (%s): %s", e->kind->name, e->key,
                    e->where, osara_err_msg());
    }
    return rc;
}

static void stop(osara_reg_entry_t *e)
{
    if (e->active && e->kind->stop) {
        e->kind->stop(e);
    }
    e->active = 0;
}

int osara_registry_start_all(osara_registry_t *reg)
{
    int first = 0;
    for (osara_reg_entry_t *e = reg->head; e; e = e->next) {
        int rc = start(e);
        if (rc != 0 && first == 0) {
            first = rc;
        }
    }
    return first;
}

int osara_registry_apply(osara_registry_t *old, osara_registry_t *neu,
                         osara_reg_diff_t *diff)
{
    osara_reg_diff_t d = {0};
    int first = 0;
    /* Stop what disappeared or changed first, so a restarted entry never
     * runs twice side by side. */
    for (osara_reg_entry_t *o = old->head; o; o = o->next) {
        osara_reg_entry_t *n = find(neu, o->kind, o->key);
        if (n == NULL || strcmp(n->sig, o->sig) != 0) {
            if (o->active) {
                n ? d.restarted++ : d.stopped++;
            }
            stop(o);
        }
    }
    for (osara_reg_entry_t *n = neu->head; n; n = n->next) {
        osara_reg_entry_t *o = find(old, n->kind, n->key);
        if (o != NULL && o->active && strcmp(n->sig, o->sig) == 0) {
            if (n->kind->adopt) {
                n->kind->adopt(n, o);
            }
            o->active = 0;
            n->active = 1;
            d.kept++;
            continue;
        }
        int rc = start(n);
        if (rc != 0 && first == 0) {
            first = rc;
        }
        if (o == NULL) {
            d.started++;
        }
    }
    if (diff) {
        *diff = d;
    }
    return first;
}

void osara_registry_stop_all(osara_registry_t *reg)
{
    for (osara_reg_entry_t *e = reg->head; e; e = e->next) {
        stop(e);
    }
}

void osara_registry_free(osara_registry_t *reg)
{
    osara_reg_entry_t *e = reg->head;
    while (e) {
        osara_reg_entry_t *next = e->next;
        if (e->kind->release) {
            e->kind->release(e);
        }
        free(e->key);
        free(e->sig);
        free(e->where);
        free(e->detail);
        free(e);
        e = next;
    }
    *reg = (osara_registry_t){0};
}
