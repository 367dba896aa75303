/* rebalance.c - subscriptions, assignments and revokes. */

#include "core/err.h"
#include "core/log.h"
#include "kafka/kafka_int.h"

/* ---- subscriptions ------------------------------------------------------ */

/* A revoked partition is busy while a handler runs or an output of a
 * finished input waits for its delivery report. */
static int part_busy(const kpart_t *p)
{
    return p->lane.held > 0;
}

/* Lets go of the revoked partitions: stores what finished, commits and
 * unassigns. Their kparts retire (still-running handlers finish against
 * them, storing nothing); a later assignment gets fresh ones. */
void osara__kafka_finish_revoke(kclient_t *c)
{
    rd_kafka_topic_partition_list_t *parts = c->revoking;
    rd_kafka_topic_partition_list_t *commit = rd_kafka_topic_partition_list_new(parts->cnt);
    int busy = 0;
    c->revoking = NULL;
    if (c->revoke_timer) {
        uv_timer_stop(c->revoke_timer);
    }
    for (int i = 0; i < parts->cnt; i++) {
        kpart_t *p = osara__kafka_find_part(c, parts->elems[i].topic, parts->elems[i].partition);
        if (p == NULL) {
            continue;
        }
        osara__kafka_store_offsets(p);
        if (p->track.committable >= 0) {
            rd_kafka_topic_partition_list_add(commit, p->topic, p->partition)->offset =
                p->track.committable;
        }
        busy += part_busy(p);
        osara__kafka_set_paused(p, 0);
        p->revoking = 0;
        osara__kafka_retire_part(c, p);
    }
    osara__kafka_sweep_retired(c);
    if (busy) {
        OSARA_WARN("kafka: revoked %d partition(s) after %.0f ms with %d still busy "
                   "(over osara.revoke_timeout_ms): the new owner handles their inputs again",
                   parts->cnt, (osara_monotonic() - c->revoke_started) * 1000, busy);
    } else {
        OSARA_INFO("kafka: revoked %d partition(s) after %.0f ms", parts->cnt,
                   (osara_monotonic() - c->revoke_started) * 1000);
    }
    /* Asynchronous, with the offsets spelled out: the unassign below
     * would empty the assignment a NULL commit reads from. The result
     * reaches on_commit on the loop. */
    if (commit->cnt > 0) {
        rd_kafka_resp_err_t err = rd_kafka_commit(c->consumer, commit, 1);
        if (err) {
            OSARA_WARN("kafka: commit on revoke failed: %s (the new owner handles what "
                       "finished since the last auto-commit again)", rd_kafka_err2str(err));
        }
    }
    rd_kafka_topic_partition_list_destroy(commit);
    rd_kafka_topic_partition_list_destroy(parts);
    rd_kafka_resp_err_t err = rd_kafka_assign(c->consumer, NULL);
    if (err) {
        OSARA_WARN("kafka: cannot unassign the revoked partitions: %s", rd_kafka_err2str(err));
    }
}

static void check_revoke(kclient_t *c)
{
    if (c->revoking == NULL) {
        return;
    }
    int busy = 0;
    for (int i = 0; i < c->revoking->cnt && !busy; i++) {
        kpart_t *p = osara__kafka_find_part(c, c->revoking->elems[i].topic, c->revoking->elems[i].partition);
        busy = p && part_busy(p);
    }
    if (!busy || osara_monotonic() - c->revoke_started > c->revoke_timeout_ms / 1000.0) {
        osara__kafka_finish_revoke(c);
    }
}

static void on_revoke_tick(uv_timer_t *t)
{
    check_revoke(t->data);
}

void osara__kafka_on_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    kclient_t *c = opaque;
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        rd_kafka_resp_err_t aerr = rd_kafka_assign(rk, parts);
        if (aerr) {
            OSARA_ERROR("kafka: cannot take %d assigned partition(s): %s", parts->cnt,
                        rd_kafka_err2str(aerr));
        } else {
            c->assigned = 1;
            OSARA_INFO("kafka: assigned %d partition(s)", parts->cnt);
        }
        return;
    }
    /* Revoked: inputs that had not started are dropped (the new owner
     * consumes them from the committed position); running handlers and
     * pending outputs get up to osara.revoke_timeout_ms to finish, so their
     * work is committed here instead of done twice. librdkafka waits for
     * the unassign, which finish_revoke makes from the loop. */
    c->assigned = 0;
    if (c->revoking) {
        osara__kafka_finish_revoke(c);
    }
    for (int i = 0; i < parts->cnt; i++) {
        kpart_t *p = osara__kafka_find_part(c, parts->elems[i].topic, parts->elems[i].partition);
        if (p == NULL) {
            continue;
        }
        p->revoking = 1;
        osara_lane_stop(&p->lane); /* queued inputs settle CANCELLED: let go */
        osara__kafka_set_paused(p, 1);
    }
    c->revoking = rd_kafka_topic_partition_list_copy(parts);
    c->revoke_started = osara_monotonic();
    if (c->closing) {
        osara__kafka_finish_revoke(c);
        return;
    }
    if (c->revoke_timer == NULL) {
        c->revoke_timer = osara_xmalloc(sizeof(*c->revoke_timer));
        uv_timer_init(&c->w->loop, c->revoke_timer);
        c->revoke_timer->data = c;
    }
    uv_timer_start(c->revoke_timer, on_revoke_tick, 0, 5);
}

static int reset_to_end(kclient_t *c)
{
    for (int i = 0; i < c->nconf; i++) {
        if (strcmp(c->conf[2 * i], "auto.offset.reset") == 0) {
            const char *v = c->conf[2 * i + 1];
            return strcmp(v, "latest") == 0 || strcmp(v, "largest") == 0 || strcmp(v, "end") == 0;
        }
    }
    return 0;
}

/* Embedded: no group join (the mock's initial rebalance takes ~3 s), so
 * assign every partition of the handled topics, resuming from committed
 * offsets. Metadata and committed offsets are asked on libuv's pool (each
 * may wait up to 5 s); the assignment is made on the loop. */
typedef struct {
    uv_work_t req;
    kclient_t *c;
    unsigned gen;
    double t0;
    rd_kafka_topic_partition_list_t *all; /* every partition, committed offsets */
} assign_job_t;

static void assign_work(uv_work_t *req)
{
    assign_job_t *job = req->data;
    rd_kafka_t *rk = job->c->consumer;
    const struct rd_kafka_metadata *md = NULL;
    /* Asked through the consumer: its cache then knows every leader, so the
     * assigned partitions start fetching at once instead of on a refresh. */
    if (rd_kafka_metadata(rk, 1, NULL, &md, 5000) != RD_KAFKA_RESP_ERR_NO_ERROR) {
        return;
    }
    for (int i = 0; i < md->topic_cnt; i++) {
        for (int j = 0; j < md->topics[i].partition_cnt; j++) {
            rd_kafka_topic_partition_list_add(job->all, md->topics[i].topic,
                                              md->topics[i].partitions[j].id);
        }
    }
    rd_kafka_metadata_destroy(md);
    if (job->all->cnt > 0) {
        rd_kafka_committed(rk, job->all, 5000); /* failed: offsets stay invalid */
    }
}

/* Resume from the group's committed position. Without one, start at 0:
 * the embedded cluster lives in this process, so every log starts at 0,
 * and asking the broker (auto.offset.reset) costs a second at start-up
 * while the consumer's connection comes up. */
static void assign_handled(kclient_t *c, const rd_kafka_topic_partition_list_t *all, double t0)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(all->cnt);
    int64_t start = reset_to_end(c) ? RD_KAFKA_OFFSET_END : 0;
    for (int i = 0; i < all->cnt; i++) {
        if (osara__kafka_handler_for(c, all->elems[i].topic)) {
            rd_kafka_topic_partition_list_add(l, all->elems[i].topic, all->elems[i].partition)
                ->offset = all->elems[i].offset < 0 ? start : all->elems[i].offset;
        }
    }
    rd_kafka_resp_err_t err = rd_kafka_assign(c->consumer, l);
    if (err) {
        OSARA_ERROR("kafka: cannot assign %d partition(s): %s", l->cnt, rd_kafka_err2str(err));
    } else {
        c->assigned = 1;
        OSARA_DEBUG("kafka: embedded mode assigned %d partition(s) in %.1f ms", l->cnt,
                    (osara_monotonic() - t0) * 1000);
    }
    rd_kafka_topic_partition_list_destroy(l);
}

static void assign_after(uv_work_t *req, int status)
{
    (void)status;
    assign_job_t *job = req->data;
    kclient_t *c = job->c;
    if (!c->closing && job->gen == c->assign_gen) { /* a newer one replaces it */
        assign_handled(c, job->all, job->t0);
    }
    rd_kafka_topic_partition_list_destroy(job->all);
    free(job);
    osara__kafka_job_done(c);
}

static void assign_embedded(kclient_t *c)
{
    assign_job_t *job = osara_xcalloc(1, sizeof(*job));
    job->c = c;
    job->gen = ++c->assign_gen;
    job->t0 = osara_monotonic();
    job->all = rd_kafka_topic_partition_list_new(16);
    job->req.data = job;
    osara__kafka_job_queue(c, &job->req, assign_work, assign_after);
}

static void resubscribe(kclient_t *c)
{
    c->subscription_dirty = 0;
    if (c->closing) {
        return;
    }
    if (c->consumer == NULL && c->handlers && osara__kafka_start_consumer(c) != 0) {
        OSARA_ERROR("%s", osara_err_msg());
        return;
    }
    if (c->consumer == NULL) {
        return;
    }
    if (c->embedded) {
        assign_embedded(c);
        return;
    }
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(4);
    for (khandler_t *h = c->handlers; h; h = h->next) {
        rd_kafka_topic_partition_list_add(l, h->topic, RD_KAFKA_PARTITION_UA);
    }
    rd_kafka_resp_err_t err = l->cnt ? rd_kafka_subscribe(c->consumer, l)
                                     : rd_kafka_unsubscribe(c->consumer);
    if (err) {
        OSARA_ERROR("kafka: cannot subscribe: %s", rd_kafka_err2str(err));
    }
    rd_kafka_topic_partition_list_destroy(l);
}

static void on_resub_timer(uv_timer_t *t)
{
    resubscribe(t->data);
}

/* Several handlers start in one reload: subscribe once, on the next turn. */
void osara__kafka_subscription_dirty(kclient_t *c)
{
    if (c->subscription_dirty) {
        return;
    }
    c->subscription_dirty = 1;
    if (c->resub_timer == NULL) {
        c->resub_timer = osara_xmalloc(sizeof(*c->resub_timer));
        uv_timer_init(&c->w->loop, c->resub_timer);
        c->resub_timer->data = c;
    }
    uv_timer_start(c->resub_timer, on_resub_timer, 0, 0);
}

/* ---- handlers ------------------------------------------------------------ */

int osara__kafka_handler_add(kclient_t *c, osara_reg_entry_t *e, const char *topic)
{
    khandler_t *h = osara_xcalloc(1, sizeof(*h));
    h->client = c;
    h->entry = e;
    h->topic = osara_xstrdup(topic);
    if (h->topic[0] == '^') {
        int rc = regcomp(&h->re, h->topic, REG_EXTENDED | REG_NOSUB);
        if (rc != 0) {
            char why[128];
            regerror(rc, &h->re, why, sizeof(why));
            osara_err_set(OSARA_EINVAL, "invalid topic regex %s: %s", h->topic, why);
            free(h->topic);
            free(h);
            return OSARA_EINVAL;
        }
        h->is_regex = 1;
    }
    h->next = c->handlers;
    c->handlers = h;
    e->impl = h;
    osara__kafka_refresh_entries(c);
    osara__kafka_subscription_dirty(c);
    return 0;
}

void osara__kafka_handler_remove(khandler_t *h)
{
    kclient_t *c = h->client;
    for (khandler_t **p = &c->handlers; *p; p = &(*p)->next) {
        if (*p == h) {
            *p = h->next;
            break;
        }
    }
    if (h->is_regex) {
        regfree(&h->re);
    }
    free(h->topic);
    free(h);
    osara__kafka_refresh_entries(c); /* no lane keeps the stopped entry */
    if (!c->closing && !c->w->stopping) {
        osara__kafka_subscription_dirty(c);
    }
}
