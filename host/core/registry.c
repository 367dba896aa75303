#include "core/registry.h"

#include <lauxlib.h>
#include <lua.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "core/err.h"
#include "core/log.h"
#include "core/lvm.h"
#include "core/mem.h"

#define MAX_KINDS 32

/* Process-wide: every worker's VMs register the same kinds when they open
 * their modules, from their own threads. */
static const osara_reg_kind_t *kinds[MAX_KINDS];
static int nkinds;
static uv_mutex_t kinds_mu;
static uv_once_t kinds_once = UV_ONCE_INIT;

static void kinds_init(void)
{
    uv_mutex_init(&kinds_mu);
}

static const osara_reg_kind_t *find_kind_locked(const char *name)
{
    for (int i = 0; i < nkinds; i++) {
        if (strcmp(kinds[i]->name, name) == 0) {
            return kinds[i];
        }
    }
    return NULL;
}

void osara_registry_kind(const osara_reg_kind_t *kind)
{
    uv_once(&kinds_once, kinds_init);
    uv_mutex_lock(&kinds_mu);
    if (find_kind_locked(kind->name) == NULL && nkinds < MAX_KINDS) {
        kinds[nkinds++] = kind;
    }
    uv_mutex_unlock(&kinds_mu);
}

const osara_reg_kind_t *osara_registry_find_kind(const char *name)
{
    uv_once(&kinds_once, kinds_init);
    uv_mutex_lock(&kinds_mu);
    const osara_reg_kind_t *kind = find_kind_locked(name);
    uv_mutex_unlock(&kinds_mu);
    return kind;
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

typedef struct {
    osara_reg_entry_t *e;
    int rc;
} start_call_t;

static int start_unprotected(lua_State *L)
{
    start_call_t *call = lua_touserdata(L, 1);
    call->rc = call->e->kind->start(call->e);
    return 0;
}

/* A kind's start may raise a Lua error on its VM's state (a bad option
 * found late): caught here, it fails that entry instead of the process. */
static int start_protected(osara_reg_entry_t *e)
{
    if (e->kind->start == NULL) {
        return 0;
    }
    if (e->vm == NULL) {
        return e->kind->start(e);
    }
    start_call_t call = {e, 0};
    lua_State *L = e->vm->L;
    if (lua_cpcall(L, start_unprotected, &call) != 0) {
        const char *msg = lua_tostring(L, -1);
        call.rc = osara_err_set(OSARA_EINVAL, "%s", msg ? msg : "error in start");
        lua_pop(L, 1);
    }
    return call.rc;
}

/* Starts e; on failure the message names the entry (osara_err_msg). */
static int start(osara_reg_entry_t *e)
{
    int rc = start_protected(e);
    if (rc == 0) {
        e->active = 1;
        return 0;
    }
    char msg[1024];
    snprintf(msg, sizeof(msg), "%s", osara_err_msg());
    return osara_err_set(rc, "cannot start %s '%s' (%s): %s", e->kind->name,
                         e->key, e->where, msg);
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
        if (rc != 0) {
            OSARA_ERROR("%s", osara_err_msg());
            first = first ? first : rc;
        }
    }
    return first;
}

/* What apply did to an entry, so that a failed apply can be undone. */
enum { UNDO_NONE = 0, UNDO_STOPPED, UNDO_ADOPTED, UNDO_STARTED };

static void adopt(osara_reg_entry_t *to, osara_reg_entry_t *from)
{
    if (to->kind->adopt) {
        to->kind->adopt(to, from);
    }
    from->active = 0;
    to->active = 1;
}

/* Serves old again: new entries stop first (nothing runs twice side by
 * side), adopted resources go back, stopped old entries start again. */
static void rollback(osara_registry_t *old, osara_registry_t *neu)
{
    for (osara_reg_entry_t *n = neu->head; n; n = n->next) {
        if (n->undo == UNDO_ADOPTED) {
            adopt(find(old, n->kind, n->key), n);
        } else if (n->undo == UNDO_STARTED) {
            stop(n);
        }
        n->undo = UNDO_NONE;
    }
    for (osara_reg_entry_t *o = old->head; o; o = o->next) {
        if (o->undo == UNDO_STOPPED && start(o) != 0) {
            OSARA_ERROR("rolling back: %s", osara_err_msg());
        }
        o->undo = UNDO_NONE;
    }
}

/* Same signature up to its options part: the running resource is kept. */
static int same_resource(const char *a, const char *b)
{
    size_t n = strcspn(a, OSARA_REG_SIG_OPTIONS);
    return n == strcspn(b, OSARA_REG_SIG_OPTIONS) && strncmp(a, b, n) == 0;
}

/* Names an entry in the report: "; added route GET /x". */
static void note(osara_reg_diff_t *d, const char *how, const osara_reg_entry_t *e)
{
    size_t n = strlen(d->what);
    if (n + 4 < sizeof(d->what)) {
        snprintf(d->what + n, sizeof(d->what) - n, "; %s %s %s", how, e->kind->name, e->key);
    }
}

int osara_registry_apply(osara_registry_t *old, osara_registry_t *neu,
                         osara_reg_diff_t *diff)
{
    osara_reg_diff_t d = {0};
    /* Stop what disappeared or changed first, so a restarted entry never
     * runs twice side by side. */
    for (osara_reg_entry_t *o = old->head; o; o = o->next) {
        osara_reg_entry_t *n = find(neu, o->kind, o->key);
        o->undo = UNDO_NONE;
        if (n == NULL || !same_resource(n->sig, o->sig)) {
            if (o->active) {
                n ? d.restarted++ : d.stopped++;
                note(&d, n ? "restarted" : "removed", o);
                o->undo = UNDO_STOPPED;
            }
            stop(o);
        }
    }
    for (osara_reg_entry_t *n = neu->head; n; n = n->next) {
        osara_reg_entry_t *o = find(old, n->kind, n->key);
        if (o != NULL && o->active && same_resource(n->sig, o->sig)) {
            adopt(n, o);
            n->undo = UNDO_ADOPTED;
            if (strcmp(n->sig, o->sig) == 0) {
                d.kept++;
            } else {
                d.updated++;
                note(&d, "updated", n);
            }
            continue;
        }
        int rc = start(n);
        if (rc != 0) {
            char msg[1024];
            snprintf(msg, sizeof(msg), "%s", osara_err_msg());
            rollback(old, neu);
            return osara_err_set(rc, "%s", msg);
        }
        n->undo = UNDO_STARTED;
        if (o == NULL) {
            d.started++;
            note(&d, "added", n);
        }
    }
    if (diff) {
        *diff = d;
    }
    return 0;
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
