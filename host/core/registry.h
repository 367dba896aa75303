/* registry.h - what a script registered, and the diff a reload applies.
 *
 * An entry is (kind, stable key, configuration signature, handler). Loading
 * a script fills a fresh registry; osara_registry_apply() compares it with
 * the one being served: an entry with the same kind, key and signature is
 * adopted (its running resource - timer, subscription, route - moves to the
 * new entry and from then on calls the new handler, without a gap); a
 * changed or new entry is started, an entry that disappeared is stopped.
 * Kafka handlers, NATS subscriptions and HTTP routes plug in as kinds. */
#ifndef OSARA_REGISTRY_H
#define OSARA_REGISTRY_H

struct osara_vm_s;
typedef struct osara_reg_entry_s osara_reg_entry_t;

typedef struct osara_reg_kind_s {
    const char *name; /* "timer", "kafka", "nats", "route", ... */
    /* Starts serving a new entry; 0 or negative with osara_err_set. */
    int (*start)(osara_reg_entry_t *e);
    /* e takes over old's running resource (same key and signature). */
    void (*adopt)(osara_reg_entry_t *e, osara_reg_entry_t *old);
    /* Stops serving (removed by a reload, or shutdown). */
    void (*stop)(osara_reg_entry_t *e);
    /* Frees e->impl when the entry is freed (optional). */
    void (*release)(osara_reg_entry_t *e);
} osara_reg_kind_t;

struct osara_reg_entry_s {
    const osara_reg_kind_t *kind;
    char *key;    /* identity across reloads, e.g. "every 1 #1", "orders" */
    char *sig;    /* configuration; differs => restart instead of adopt.
                   * A part after OSARA_REG_SIG_OPTIONS is options the new
                   * handler applies itself: differing there only, the entry
                   * is adopted (kept running) and reported as updated */
    char *where;  /* "app.lua:12" where it was registered */
    char *detail; /* one line for `osara check` */
    struct osara_vm_s *vm;
    int fnref;    /* handler in vm's registry (LUA_NOREF if none) */
    int optsref;  /* options table in vm's registry (LUA_NOREF if none) */
    void *impl;   /* the kind's running resource */
    int active;
    int undo;     /* what the running apply did to it (registry.c) */
    osara_reg_entry_t *next;
};

typedef struct {
    osara_reg_entry_t *head, *tail;
    int n;
} osara_registry_t;

#define OSARA_REG_SIG_OPTIONS "\x1f"

typedef struct {
    int kept, started, stopped, restarted, updated;
    char what[512]; /* "added route GET /x; updated kafka orders ..." */
} osara_reg_diff_t;

/* Makes a kind known by name (for registrations from Lua). Static storage. */
void osara_registry_kind(const osara_reg_kind_t *kind);
const osara_reg_kind_t *osara_registry_find_kind(const char *name);

/* Appends an entry; strings are copied. Returns NULL (osara_err_set) if the
 * key is already registered for that kind. */
osara_reg_entry_t *osara_registry_add(osara_registry_t *reg,
                                      const osara_reg_kind_t *kind,
                                      const char *key, const char *sig,
                                      const char *where, const char *detail,
                                      struct osara_vm_s *vm, int fnref,
                                      int optsref);

/* Starts every entry of reg (first load), protected as in apply. Returns 0
 * or the first error (the other entries are still started). */
int osara_registry_start_all(osara_registry_t *reg);

/* Serves `neu` instead of `old`: adopt, start, stop as described above.
 * All or nothing: when an entry of neu fails to start, what was done is
 * undone (old is served as before, neu has nothing active) and the error
 * naming the entry is returned. Kinds' start is called protected: a Lua
 * error it raises fails the entry. */
int osara_registry_apply(osara_registry_t *old, osara_registry_t *neu,
                         osara_reg_diff_t *diff);

/* Stops every active entry (shutdown). */
void osara_registry_stop_all(osara_registry_t *reg);

/* Frees the entries (not their resources; stop or adopt them first). */
void osara_registry_free(osara_registry_t *reg);

#endif
