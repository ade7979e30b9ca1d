/* The accelerator's native fast lane: the common success path of the device model in C.
 *
 * The Python device model (vfio_server/xpu) stays the reference. This file only takes a
 * descriptor off the submission ring when it can complete it successfully on its own:
 *
 *   NOP, LAUNCH through a launch plan Python made, MEM_COPY_HTOD / MEM_COPY_DTOH with one inline
 *   scatter-gather entry in registered guest RAM and a device range inside one allocation of
 *   the session, and FENCE (fl_fence: a wait the caller makes without the guest-RAM lock).
 *
 * On anything else it stops *before* that descriptor and says why; Python then runs it with the
 * ordinary code. A failed driver call has no effect, so Python redoing it is sound.
 *
 * Nothing here trusts guest memory: each descriptor is copied once into a local, every length,
 * address and handle is checked with overflow-safe arithmetic against tables Python pushed
 * (guest RAM regions, allocations, plans), and the rings are addressed only as
 * base + (index & mask) * entry size inside the ring Python validated. Driver entry points are
 * function pointers handed in at fl_new (libcuda's, or a test's fakes): no link to libcuda, no
 * Python API. Not thread-safe: one caller at a time (the poller, under GuestRam.lock, except
 * fl_fence, which touches no table), except that fl_set_fence may come from any thread while
 * fl_fence waits: the backend withdraws its fault record through it before freeing it (the
 * claim word is read under record_busy, so never after fl_set_fence(c, 0, 0) has returned). The only guest words read more than once are sq_tail
 * (re-read for descriptors posted meanwhile, and validated each time) and nothing else.
 */
#include "fastlane.h"

int fl_abi(void) { return FL_ABI; }
size_t fl_batch_size(void) { return sizeof(struct fl_batch); }

static void plan_free(struct fl_plan *p) {
    if (!p) return;
    free(p->blob);
    free(p->params);
    free(p->ptrs);
    free(p);
}

void fl_plans_clear(struct fl_ctx *c) {
    if (!c) return;
    for (uint32_t i = 0; i < PLAN_SLOTS; i++) {
        plan_free(c->slots[i]);
        c->slots[i] = NULL;
    }
    c->nplans = 0;
}

struct fl_ctx *fl_new(const struct fl_driver *drv) {
    if (!drv || !drv->launch || !drv->htod || !drv->dtoh || !drv->sync || !drv->query) return NULL;
    struct fl_ctx *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->drv = *drv;
    return c;
}

void fl_free(struct fl_ctx *c) {
    if (!c) return;
    fl_plans_clear(c);
    free(c->regions);
    free(c->allocs);
    free(c);
}

static uint64_t fnv(uint64_t h, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static uint64_t plan_hash(const uint64_t key[4], const uint8_t *blob, uint32_t len) {
    uint64_t h = fnv(0xcbf29ce484222325ULL, (const uint8_t *)key, 4 * sizeof(uint64_t));
    return fnv(h, blob, len);
}

/* Add a plan: the LAUNCH key (kernel handle, three dims words), its argument bytes, and what
 * the driver takes (function, stream, grid/block/shared, the fully packed parameter buffer and
 * each parameter's offset in it). Returns 0, -1 for a refused shape, -2 when the table is full
 * (clear it and add again), -3 out of memory. */
int fl_plan_add(struct fl_ctx *c, const uint64_t key[4], const uint8_t *blob, uint32_t blob_len, void *func,
                void *stream, const uint32_t dims[7], const uint8_t *params, uint32_t params_len,
                const uint32_t *offsets, uint32_t nparams, uint32_t checked) {
    if (!c || !key || !dims || blob_len > MAX_ARG_BYTES || (blob_len && !blob) || nparams > MAX_PARAMS ||
        params_len > MAX_PARAM_BYTES || (nparams && (!offsets || !params)))
        return -1;
    for (uint32_t i = 0; i < nparams; i++)
        if (offsets[i] >= params_len) return -1;
    if (c->nplans >= MAX_PLANS) return -2;
    uint64_t h = plan_hash(key, blob, blob_len);
    uint32_t slot = (uint32_t)h & (PLAN_SLOTS - 1);
    for (uint32_t probe = 0; probe < PLAN_SLOTS; probe++, slot = (slot + 1) & (PLAN_SLOTS - 1)) {
        struct fl_plan *q = c->slots[slot];
        if (!q) break;
        if (q->hash == h && q->blob_len == blob_len && !memcmp(q->key, key, sizeof q->key) &&
            !memcmp(q->blob, blob, blob_len)) {        /* the same key again: replace it */
            plan_free(q);
            c->slots[slot] = NULL;
            c->nplans--;
            break;
        }
    }
    struct fl_plan *p = calloc(1, sizeof *p);
    if (!p) return -3;
    p->blob = malloc(blob_len ? blob_len : 1);
    p->params = calloc(1, (size_t)params_len + 16);      /* slack past the last parameter, zeroed */
    p->ptrs = calloc(nparams ? nparams : 1, sizeof(void *));
    if (!p->blob || !p->params || !p->ptrs) {
        plan_free(p);
        return -3;
    }
    memcpy(p->key, key, sizeof p->key);
    if (blob_len) memcpy(p->blob, blob, blob_len);
    if (params_len) memcpy(p->params, params, params_len);
    for (uint32_t i = 0; i < nparams; i++) p->ptrs[i] = p->params + offsets[i];
    p->hash = h;
    p->blob_len = blob_len;
    p->nparams = nparams;
    p->checked = checked ? 1 : 0;
    memcpy(p->dims, dims, sizeof p->dims);
    p->shared = dims[6];
    p->func = func;
    p->stream = stream;
    slot = (uint32_t)h & (PLAN_SLOTS - 1);
    while (c->slots[slot]) slot = (slot + 1) & (PLAN_SLOTS - 1);   /* < PLAN_SLOTS used: a slot is free */
    c->slots[slot] = p;
    c->nplans++;
    return 0;
}

uint32_t fl_plan_count(const struct fl_ctx *c) { return c ? c->nplans : 0; }

static const struct fl_plan *plan_find(const struct fl_ctx *c, const uint64_t key[4], const uint8_t *blob,
                                       uint32_t len) {
    if (!c->nplans) return NULL;
    uint64_t h = plan_hash(key, blob, len);
    uint32_t slot = (uint32_t)h & (PLAN_SLOTS - 1);
    for (uint32_t probe = 0; probe < PLAN_SLOTS; probe++, slot = (slot + 1) & (PLAN_SLOTS - 1)) {
        const struct fl_plan *p = c->slots[slot];
        if (!p) return NULL;
        if (p->hash == h && p->blob_len == len && !memcmp(p->key, key, sizeof p->key) &&
            !memcmp(p->blob, blob, len))
            return p;
    }
    return NULL;
}

/* Replace the guest RAM table: sorted by gpa, non-overlapping, each gpa < end. Returns 0, or -1
 * (the table is then empty: every guest range misses). */
int fl_set_regions(struct fl_ctx *c, const struct fl_region *r, uint32_t n) {
    if (!c) return -1;
    free(c->regions);
    c->regions = NULL;
    c->nregions = 0;
    if (n == 0) return 0;
    if (!r || n > MAX_REGIONS) return -1;
    for (uint32_t i = 0; i < n; i++) {
        if (r[i].gpa >= r[i].end || (i && r[i].gpa < r[i - 1].end)) return -1;
        if (r[i].host > UINT64_MAX - (r[i].end - r[i].gpa)) return -1;
    }
    c->regions = malloc((size_t)n * sizeof *r);
    if (!c->regions) return -1;
    memcpy(c->regions, r, (size_t)n * sizeof *r);
    c->nregions = n;
    return 0;
}

/* Replace the session's allocation table: sorted by start, non-overlapping, size > 0. */
int fl_set_allocs(struct fl_ctx *c, const struct fl_alloc *a, uint32_t n) {
    if (!c) return -1;
    free(c->allocs);
    c->allocs = NULL;
    c->nallocs = 0;
    if (n == 0) return 0;
    if (!a || n > MAX_ALLOCS) return -1;
    for (uint32_t i = 0; i < n; i++) {
        if (!a[i].size || a[i].size > UINT64_MAX - a[i].start) return -1;
        if (i && a[i].start < a[i - 1].start + a[i - 1].size) return -1;
    }
    c->allocs = malloc((size_t)n * sizeof *a);
    if (!c->allocs) return -1;
    memcpy(c->allocs, a, (size_t)n * sizeof *a);
    c->nallocs = n;
    return 0;
}

/* The stream copies go to (enabled != 0). */
void fl_set_copy_stream(struct fl_ctx *c, void *stream, uint32_t enabled) {
    if (!c) return;
    c->copy_stream = stream;
    c->copies = enabled ? 1 : 0;
}

/* FENCE: handled here when enabled; after its wait it reads the claim word of the mapped fault
 * record at host (0: there is no record, nothing to read). */

/* Any thread, also while fl_fence waits in another: once this returns, fl_fence reads nothing
 * at the old address (fl_set_fence(c, 0, 0) before the record is freed). */
void fl_set_fence(struct fl_ctx *c, uint32_t enabled, uint64_t host) {
    if (!c) return;
    record_lock(c);
    c->fences = enabled ? 1 : 0;
    c->record = host;
    record_unlock(c);
}


/* The host address of guest [addr, addr + len), len > 0, inside one region (writable when
 * write; registered when registered); 0 when there is none. */
static uint64_t guest_host(const struct fl_ctx *c, uint64_t addr, uint64_t len, int write, int registered) {
    uint32_t lo = 0, hi = c->nregions;
    if (!len) return 0;
    while (lo < hi) {                       /* the first region with gpa > addr */
        uint32_t mid = lo + (hi - lo) / 2;
        if (c->regions[mid].gpa <= addr) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0) return 0;
    const struct fl_region *r = &c->regions[lo - 1];
    if (addr >= r->end || len > r->end - addr) return 0;
    if ((write && !r->writable) || (registered && !r->registered)) return 0;
    return r->host + (addr - r->gpa);
}

/* Is device [addr, addr + len), len > 0, inside one allocation? */
static int device_range(const struct fl_ctx *c, uint64_t addr, uint64_t len) {
    uint32_t lo = 0, hi = c->nallocs;
    if (!len) return 0;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (c->allocs[mid].start <= addr) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0) return 0;
    const struct fl_alloc *a = &c->allocs[lo - 1];
    uint64_t off = addr - a->start;
    return off < a->size && len <= a->size - off;
}

static int handled(uint16_t op) {
    return op == OP_NOP || op == OP_LAUNCH || op == OP_HTOD || op == OP_DTOH || op == OP_FENCE;
}

static void read_desc(const struct fl_batch *b, uint32_t i, struct desc *d) {
    const uint8_t *sq = (const uint8_t *)(uintptr_t)b->sq;
    memcpy(d, sq + (size_t)((b->sq_head + i) & b->sq_mask) * SQ_ENTRY, sizeof *d);
}

static void stop_at(struct fl_batch *b, uint32_t i, uint32_t why, const struct desc *d) {
    b->stop = why;
    b->stop_tag = d->tag;
    b->stop_flags = d->flags;
    uint32_t run = 0;
    if (why == STOP_OTHER || why == STOP_MISS || why == STOP_ROOM || why == STOP_DRIVER) {
        run = 1;                            /* Python takes this one, and the others after it that */
        for (uint32_t j = i + 1; j < b->max; j++) {      /* this lane would not take either */
            struct desc e;
            read_desc(b, j, &e);
            if (handled(e.opcode)) break;
            run++;
        }
    }
    b->python_run = run;
}

static void complete(struct fl_batch *b, const struct desc *d) {
    uint8_t *cq = (uint8_t *)(uintptr_t)b->cq;
    uint8_t *slot = cq + (size_t)((b->cq_index + b->group) & b->cq_mask) * CQ_ENTRY;
    uint64_t words[4] = {d->tag, 0, 0, 0};   /* tag, result, result2, status 0 + reserved 0 */
    memcpy(slot, words, sizeof words);
    b->tags[b->group] = d->tag;
    b->ops[b->group] = d->opcode;
    b->flags[b->group] = d->flags;
    b->irq |= d->flags & FLAG_IRQ;
    b->g_launches += d->opcode == OP_LAUNCH;
    b->g_nops += d->opcode == OP_NOP;
    b->g_htods += d->opcode == OP_HTOD;
    b->g_dtohs += d->opcode == OP_DTOH;
    b->group++;
}

static int no_sg(const struct desc *d) { return d->sg_count == 0 && d->sg_addr == 0 && d->sg_len == 0; }

/* LAUNCH: 0 done, else the STOP_* reason. */
static uint32_t run_launch(struct fl_ctx *c, struct fl_batch *b, const struct desc *d, int *err) {
    uint8_t blob[MAX_ARG_BYTES];
    uint32_t len = 0;
    if (b->syncs) return STOP_SYNC_FIRST;   /* copies wait: never issue a kernel before their wait */
    if (d->sg_count == 1) {
        if (d->sg_len == 0 || d->sg_len > MAX_ARG_BYTES) return STOP_OTHER;
        uint64_t host = guest_host(c, d->sg_addr, d->sg_len, 0, 0);
        if (!host) return STOP_OTHER;
        len = (uint32_t)d->sg_len;
        memcpy(blob, (const void *)(uintptr_t)host, len);      /* read once */
    } else if (!no_sg(d)) {
        return STOP_OTHER;
    }
    const uint64_t key[4] = {d->a[0], d->a[1], d->a[2], d->a[3]};
    const struct fl_plan *p = plan_find(c, key, blob, len);
    if (!p) return STOP_MISS;
    if (b->pending >= b->depth) return STOP_ROOM;
    if (p->stream != c->copy_stream) c->elsewhere = 1;   /* a stream query no longer covers it all */
    int e = c->drv.launch(p->func, p->dims[0], p->dims[1], p->dims[2], p->dims[3], p->dims[4], p->dims[5],
                          p->shared, p->stream, p->ptrs, NULL);
    if (e) {
        *err = e;
        return STOP_DRIVER;
    }
    b->pending++;
    b->queued++;
    b->launches++;
    b->checked += p->checked;
    return 0;
}

/* MEM_COPY_HTOD / MEM_COPY_DTOH with one inline entry: 0 done, else the STOP_* reason. */
static uint32_t run_copy(struct fl_ctx *c, struct fl_batch *b, const struct desc *d, int *err) {
    int to_device = d->opcode == OP_HTOD;
    if (!c->copies || d->sg_count != 1 || d->sg_len == 0 || d->sg_len > MAX_TRANSFER) return STOP_OTHER;
    uint64_t host = guest_host(c, d->sg_addr, d->sg_len, !to_device, 1);
    if (!host || !device_range(c, d->a[0], d->sg_len)) return STOP_OTHER;
    uint32_t used = b->queued > b->pending ? b->queued : b->pending;
    if (used >= b->depth || used + 1 >= b->depth) return STOP_ROOM;
    int e = to_device ? c->drv.htod(d->a[0], (const void *)(uintptr_t)host, (size_t)d->sg_len, c->copy_stream)
                      : c->drv.dtoh((void *)(uintptr_t)host, d->a[0], (size_t)d->sg_len, c->copy_stream);
    if (e) {
        *err = e;
        return STOP_DRIVER;
    }
    b->pending++;
    b->queued++;
    b->syncs++;
    if (to_device) {
        b->htods++;
        b->bytes_htod += d->sg_len;
    } else {
        b->dtohs++;
        b->bytes_dtoh += d->sg_len;
    }
    return 0;
}

/* Descriptor i (from the call's sq_head) is past b->max: take the ones the guest posted
 * meanwhile, when the caller allows it, sq_tail is valid (at most sq_entries ahead: anything
 * else is left to the caller's validation), and the completion ring has room. 1 when b->max grew. */
static int take_more(struct fl_batch *b, uint32_t i) {
    if (!b->reread || !b->hdr || b->ntakes >= FL_TAKES || b->group >= FL_GROUP) return 0;
    uint32_t tail = __atomic_load_n((const uint32_t *)(uintptr_t)b->hdr, __ATOMIC_ACQUIRE);
    uint32_t pend = tail - (b->sq_head + i);
    if (pend == 0 || pend > b->sq_entries) return 0;
    uint32_t room = b->cq_room > i ? b->cq_room - i : 0;
    uint32_t take = pend < room ? pend : room;
    if (take > TAKE_MAX) take = TAKE_MAX;
    if (take > FL_GROUP - b->group) take = FL_GROUP - b->group;
    if (!take) return 0;
    b->takes[b->ntakes++] = take;
    b->max += take;
    return 1;
}

/* Take descriptors from b->sq_head on, up to b->max (and those posted meanwhile, see
 * take_more), while each one fully succeeds here; write their completions from ring index
 * cq_index + group on (not published: the caller publishes the group with one cq_tail store).
 * Returns the descriptors taken (b->consumed). */
uint32_t fl_run(struct fl_ctx *c, struct fl_batch *b) {
    if (!b) return 0;
    b->consumed = 0;
    b->ntakes = 0;
    if (b->start) {                         /* a new group: pending/queued/depth are the caller's */
        b->start = 0;
        b->group = b->syncs = b->irq = 0;
        b->g_launches = b->g_nops = b->g_htods = b->g_dtohs = 0;
    }
    b->launches = b->checked = b->nops = b->htods = b->dtohs = 0;
    b->bytes_htod = b->bytes_dtoh = 0;
    b->stop = STOP_END;
    b->driver_error = 0;
    b->python_run = 0;
    if (!c || !b->sq || !b->cq) return 0;
    for (uint32_t i = 0; i < b->max || take_more(b, i); i++) {
        if (i && c->polling && __atomic_load_n(&c->stop, __ATOMIC_SEQ_CST)) break;   /* a quiescer waits */
        struct desc d;
        read_desc(b, i, &d);
        uint32_t why = 0;
        int err = 0;
        if (b->group >= FL_GROUP) why = STOP_FULL;
        else if (d.flags & ~FLAG_IRQ) why = STOP_OTHER;         /* reserved bits, SG_INDIRECT */
        else if (d.opcode == OP_NOP) why = no_sg(&d) ? 0 : STOP_OTHER;
        else if (d.opcode == OP_LAUNCH) why = run_launch(c, b, &d, &err);
        else if (d.opcode == OP_HTOD || d.opcode == OP_DTOH) why = run_copy(c, b, &d, &err);
        else if (d.opcode == OP_FENCE) why = no_sg(&d) && c->fences ? STOP_FENCE : STOP_OTHER;
        else why = STOP_OTHER;
        if (why) {
            stop_at(b, i, why, &d);
            b->driver_error = err;
            break;
        }
        if (d.opcode == OP_NOP) b->nops++;
        complete(b, &d);
        b->consumed++;
    }
    b->sq_head += b->consumed;
    return b->consumed;
}

/* FENCE's wait (call it without any lock): 0 when the device finished with no driver error and
 * the mapped fault record's claim word is clear (or there is no record); 1 otherwise (the
 * caller's Python FENCE waits again and reports what surfaced). */
int fl_fence(struct fl_ctx *c) {
    if (!c || !__atomic_load_n(&c->fences, __ATOMIC_RELAXED)) return 1;
    if (c->drv.sync()) return 1;
    int out = 0;
    record_lock(c);                         /* the record may have been withdrawn during the wait */
    if (!c->fences) out = 1;
    else if (c->record) out = __atomic_load_n((const uint32_t *)(uintptr_t)c->record, __ATOMIC_ACQUIRE) != 0;
    record_unlock(c);
    return out;
}

