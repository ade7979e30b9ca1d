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
#define _POSIX_C_SOURCE 200809L
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FL_ABI 11
#define SQ_ENTRY 64u
#define CQ_ENTRY 32u
#define MAX_ARG_BYTES 4096u
#define MAX_TRANSFER ((uint64_t)1 << 32)
#define MAX_PLANS 256u
#define PLAN_SLOTS 512u /* power of two, twice MAX_PLANS */
#define MAX_PARAMS 512u
#define MAX_PARAM_BYTES 65536u
#define MAX_REGIONS 4096u
#define MAX_ALLOCS (1u << 20)
#define FL_GROUP 256u   /* completions one group may hold (poller.MAX_HELD) */
#define RECORD_BYTES 64u
#define FL_TAKES 8u     /* times one call may re-read sq_tail for descriptors posted meanwhile */
#define TAKE_MAX 64u    /* descriptors one such take adds at most (poller.BATCH) */

enum { OP_NOP = 0x00, OP_HTOD = 0x13, OP_DTOH = 0x14, OP_LAUNCH = 0x30, OP_FENCE = 0x40 };
enum { FLAG_IRQ = 2u };
/* why fl_run stopped */
enum { STOP_END = 0, STOP_OTHER = 1, STOP_MISS = 2, STOP_ROOM = 3, STOP_DRIVER = 4, STOP_FENCE = 5,
       STOP_SYNC_FIRST = 6, STOP_FULL = 7 };

typedef int (*fl_launch_fn)(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned shared, void *stream, void **params, void **extra);
typedef int (*fl_htod_fn)(uint64_t dst, const void *src, size_t n, void *stream);
typedef int (*fl_dtoh_fn)(void *dst, uint64_t src, size_t n, void *stream);
typedef int (*fl_sync_fn)(void);
typedef int (*fl_query_fn)(void *stream);
#define CU_NOT_READY 600   /* CUDA_ERROR_NOT_READY: fl_query_fn's "still running" */

struct fl_driver {
    fl_launch_fn launch;
    fl_htod_fn htod;   /* cuMemcpyHtoDAsync_v2 */
    fl_dtoh_fn dtoh;   /* cuMemcpyDtoHAsync_v2 */
    fl_sync_fn sync;   /* cuCtxSynchronize */
    fl_query_fn query; /* cuStreamQuery: 0 done, CU_NOT_READY running, else an error */
};

struct fl_region {      /* guest RAM [gpa, end) at host address host */
    uint64_t gpa, end, host;
    uint32_t writable, registered;
};

struct fl_alloc { uint64_t start, size; };

struct fl_plan {
    uint64_t key[4];
    uint64_t hash;
    uint32_t blob_len, nparams, checked, shared;
    uint32_t dims[6];
    void *func, *stream;
    uint8_t *blob;
    uint8_t *params;
    void **ptrs;
};

struct fl_ctx {
    struct fl_driver drv;
    struct fl_plan *slots[PLAN_SLOTS];
    uint32_t nplans;
    struct fl_region *regions;
    uint32_t nregions;
    struct fl_alloc *allocs;
    uint32_t nallocs;
    void *copy_stream;
    uint32_t copies;        /* copies enabled (a stream of the session's own) */
    uint64_t record;        /* host address of the mapped fault record (0: none to read) */
    uint32_t fences;        /* FENCE handled here (the record, if any, is readable in place) */
    uint32_t record_busy;   /* spin lock over record/fences: fl_fence's read vs fl_set_fence */
    uint32_t stop;          /* fl_poll: return at the next step (fl_halt, fl_quiesce; fl_resume clears) */
    uint32_t busy;          /* fl_poll: in guest memory or the tables now (see fl_quiesce) */
    uint32_t elsewhere;     /* fl_poll: work since the last wait may be outside the copy stream */
    uint32_t polling;       /* fl_poll runs: fl_run ends at the next descriptor once `stop` is set */
};

/* One call's geometry and results; Python owns it (a ctypes Structure of the same layout). */
struct fl_batch {
    /* in */
    uint64_t sq, cq;        /* host addresses of the validated rings */
    uint32_t sq_mask, cq_mask;
    uint32_t sq_head;       /* the first descriptor to read */
    uint32_t cq_index;      /* the ring index of the group's first completion */
    uint32_t max;           /* descriptors to take at most */
    uint32_t depth;         /* the queue depth quota */
    /* in/out */
    uint32_t pending;       /* the session queue's operations since its last wait */
    uint32_t queued;        /* the executor's operations since its last synchronize */
    uint32_t group;         /* completions written in this group so far */
    uint32_t syncs;         /* of them, copies that wait for one synchronization */
    uint32_t launches, checked, nops, htods, dtohs, irq;   /* this call (launches .. dtohs, bytes), group (irq) */
    uint32_t g_launches, g_nops, g_htods, g_dtohs;         /* completions of the group, by opcode */
    uint64_t bytes_htod, bytes_dtoh;
    /* out */
    uint32_t consumed;      /* descriptors taken by this call */
    uint32_t stop;          /* STOP_* */
    int32_t driver_error;   /* the driver's error when stop == STOP_DRIVER */
    uint32_t python_run;    /* descriptors from the stop on that this lane does not take */
    uint64_t stop_tag;      /* the descriptor at the stop (FENCE: its tag and flags) */
    uint32_t stop_flags, pad;
    /* taking what the guest posts meanwhile (in: reread != 0 allows it) */
    uint64_t hdr;           /* host address of the queue header (sq_tail at offset 0) */
    uint32_t sq_entries;    /* the submission ring's entries (a valid sq_tail is at most this ahead) */
    uint32_t cq_room;       /* free completion slots the caller validated, besides the group's */
    uint32_t reread;
    uint32_t start;         /* in: the first call of a group (its counters start from zero) */
    uint32_t pad2;
    uint32_t ntakes;        /* out: how many re-reads took more, and how many each */
    uint32_t takes[FL_TAKES];
    uint64_t tags[FL_GROUP];
    uint16_t ops[FL_GROUP];
    uint16_t flags[FL_GROUP];
};

struct desc {
    uint16_t opcode, flags;
    uint32_t sg_count;
    uint64_t tag;
    uint64_t a[4];
    uint64_t sg_addr, sg_len;
};

_Static_assert(sizeof(struct desc) == SQ_ENTRY, "descriptor layout");

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
static void record_lock(struct fl_ctx *c) {
    while (__atomic_exchange_n(&c->record_busy, 1u, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(&c->record_busy, __ATOMIC_RELAXED)) { }
    }
}

static void record_unlock(struct fl_ctx *c) { __atomic_store_n(&c->record_busy, 0u, __ATOMIC_RELEASE); }

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

/* ---- the poll loop: whole cycles of lane-only work without Python ----------------------------
 *
 * fl_poll spins on sq_tail in place of the Python poller's idle spin and runs what arrives the
 * way Poller._cycle would with this lane: validate the indices, take a batch (fl_run), take what
 * is posted meanwhile while copies wait, wait once for them, publish the group with one cq_tail
 * store, and wait for a FENCE and complete it. It returns to Python, with everything Python must
 * account in struct fl_poll, as soon as anything else is due: a descriptor the lane does not
 * take (PR_HANDOFF, or PR_GROUP when its open group still waits for copies), an index that does
 * not validate (PR_INDEX: Python re-reads it and decides), a wait that surfaced something
 * (PR_GROUP), a posted group while interrupts are on (PR_POSTED), nothing to do for the idle
 * limit (PR_IDLE), the run limit (PR_BUDGET), or a stop request (PR_QUIESCE).
 *
 * Python holds no lock while this runs. The serve loop's changes to guest memory and to the
 * tables (an unmap, a reset, bus mastering off) first call fl_quiesce: it sets `stop` and waits
 * until `busy` is clear. This loop sets `busy` (sequentially consistent, as `stop` is) before
 * each step that touches guest memory or a table and re-checks `stop` after it, so either the
 * quiescer sees `busy` and waits for the step to end, or this loop sees `stop` and returns
 * without touching anything. Device waits run with `busy` clear: an unmap never waits for a
 * kernel. fl_resume clears `stop`; the poller calls it under GuestRam.lock, where the loop's
 * quiescers hold it, right before a poll. */

enum { PR_IDLE = 0, PR_QUIESCE = 1, PR_INDEX = 2, PR_POSTED = 3, PR_HANDOFF = 4, PR_GROUP = 5,
       PR_BUDGET = 6 };
#define QH_SQ_TAIL 0x00u
#define QH_CQ_HEAD 0x04u
#define QH_SQ_HEAD 0x40u
#define QH_CQ_TAIL 0x44u
#define QH_COMPLETED 0x50u
#define STOPS 8u

/* One poll's limits (in), the device's indices (in/out: Python's Rings mirror them) and what
 * Python must account afterwards (out); a ctypes Structure of the same layout. */
struct fl_poll {
    uint64_t first_ns;      /* in: the first idle stretch ends after this long */
    uint64_t spin_ns;       /* in: later ones after this long without work */
    uint64_t run_ns;        /* in: return after this long in all (PR_BUDGET) */
    uint32_t cq_entries;    /* in */
    uint32_t irq;           /* in: return after each posted group (interrupts are on) */
    uint32_t cq_tail, cq_head;   /* in/out */
    uint64_t completed;     /* in/out: QH_COMPLETED */
    uint32_t reason;        /* out: PR_* */
    uint32_t posted;        /* completions published */
    uint32_t forced;        /* DescFlags.IRQ among them */
    uint32_t batches, max_batch, depth, max_depth;   /* as DeviceStats.batch counts them */
    uint32_t waits;         /* device waits that surfaced nothing (Session.note_native_sync) */
    uint32_t checked_after; /* checked launches after the last of them (or all, without one) */
    uint32_t launches, checked;
    uint32_t c_launches, c_nops, c_htods, c_dtohs, c_fences;   /* posted, by opcode */
    uint32_t runs, taken;
    uint32_t fence;         /* PR_GROUP: the FENCE at the stop is taken (tag, flags in the batch) */
    uint32_t pad;
    uint64_t bytes_htod, bytes_dtoh;
    uint64_t busy_ns;       /* time spent on batches (not spinning) */
    uint64_t idle_ns;       /* how long nothing had arrived when it returned */
    uint32_t stops[STOPS];  /* fl_run's stops, by STOP_* */
    uint64_t trace;         /* in: 0, or a buffer of trace_cap {u64 CLOCK_MONOTONIC ns, u32 what, u32 n} */
    uint32_t trace_cap;     /* in */
    uint32_t trace_len;     /* in/out: entries written (none once full) */
};

/* what a trace entry marks (VXPU_FASTLANE_TRACE, a diagnostic): */
enum { TR_TAKE = 1, TR_RUN = 2, TR_WAIT = 3, TR_WAITED = 4, TR_POSTED = 5, TR_FENCE = 6, TR_FENCED = 7,
       TR_QUERY = 8 };

size_t fl_poll_size(void) { return sizeof(struct fl_poll); }

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void trace(struct fl_poll *p, uint32_t what, uint32_t n) {
    if (!p->trace || p->trace_len >= p->trace_cap) return;
    uint64_t *e = (uint64_t *)(uintptr_t)p->trace + 2 * (size_t)p->trace_len++;
    e[0] = now_ns();
    e[1] = (uint64_t)what | (uint64_t)n << 32;
}

static void relax(uint32_t i) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
    if ((i & 63u) == 63u) sched_yield();    /* let a submitter that shares this core run */
}

/* Any thread: the poll returns at its next step (no wait). */
void fl_halt(struct fl_ctx *c) {
    if (c) __atomic_store_n(&c->stop, 1u, __ATOMIC_SEQ_CST);
}

/* Any thread: fl_halt, then wait until the poll is out of guest memory and the tables; until
 * fl_resume it touches neither (device waits in progress go on: they touch neither). */
void fl_quiesce(struct fl_ctx *c) {
    if (!c) return;
    __atomic_store_n(&c->stop, 1u, __ATOMIC_SEQ_CST);
    for (uint32_t i = 0; __atomic_load_n(&c->busy, __ATOMIC_SEQ_CST); i++) relax(i);
}

/* The poller, under GuestRam.lock, right before fl_poll. */
void fl_resume(struct fl_ctx *c) {
    if (c) __atomic_store_n(&c->stop, 0u, __ATOMIC_SEQ_CST);
}

static int enter(struct fl_ctx *c) {       /* 1: guest memory and the tables may be touched */
    __atomic_store_n(&c->busy, 1u, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&c->stop, __ATOMIC_SEQ_CST)) return 1;
    __atomic_store_n(&c->busy, 0u, __ATOMIC_SEQ_CST);
    return 0;
}

static void leave(struct fl_ctx *c) { __atomic_store_n(&c->busy, 0u, __ATOMIC_SEQ_CST); }

static uint32_t *hdr_word(const struct fl_batch *b, uint32_t off) {
    return (uint32_t *)(uintptr_t)(b->hdr + off);
}

static void publish(const struct fl_batch *b, struct fl_poll *p, uint32_t n) {
    p->cq_tail += n;
    p->completed += n;
    p->posted += n;
    __atomic_store_n(hdr_word(b, QH_CQ_TAIL), p->cq_tail, __ATOMIC_RELEASE);
    __atomic_store_n((uint64_t *)(uintptr_t)(b->hdr + QH_COMPLETED), p->completed, __ATOMIC_RELEASE);
}

/* A device wait surfaced nothing: what Python's synchronize would reset. */
static void waited(struct fl_ctx *c, struct fl_batch *b, struct fl_poll *p) {
    c->elsewhere = 0;
    b->pending = b->queued = 0;
    b->syncs = 0;
    p->waits++;
    p->checked_after = 0;
}

/* Sum one fl_run into the poll's counters. */
static void account_run(const struct fl_batch *b, struct fl_poll *p) {
    p->runs++;
    p->taken += b->consumed;
    p->batches += b->ntakes;                /* each take of posted-meanwhile ones is a batch */
    p->launches += b->launches;
    p->checked += b->checked;
    p->checked_after += b->checked;
    p->bytes_htod += b->bytes_htod;
    p->bytes_dtoh += b->bytes_dtoh;
    if (b->stop < STOPS) p->stops[b->stop]++;
    __atomic_store_n(hdr_word(b, QH_SQ_HEAD), b->sq_head, __ATOMIC_RELEASE);
}

/* A validated batch size at the current indices (guest memory entered): 0 when nothing is
 * pending or the completion ring is full, -1 when sq_tail or cq_head does not validate.
 * `held`: unposted completions of the open group. */
static int64_t available(const struct fl_batch *b, struct fl_poll *p, uint32_t held, uint32_t *room) {
    uint32_t tail = __atomic_load_n(hdr_word(b, QH_SQ_TAIL), __ATOMIC_ACQUIRE);
    uint32_t pend = tail - b->sq_head;
    if (pend > b->sq_entries) return -1;
    if (!pend) return 0;
    uint32_t head = __atomic_load_n(hdr_word(b, QH_CQ_HEAD), __ATOMIC_ACQUIRE);
    if (head - p->cq_head > p->cq_tail - p->cq_head) return -1;
    p->cq_head = head;
    uint32_t used = p->cq_tail - head;
    uint32_t free = p->cq_entries > used ? p->cq_entries - used : 0;
    free = free > held ? free - held : 0;
    *room = free;
    uint32_t n = pend < free ? pend : free;
    return n < TAKE_MAX ? n : TAKE_MAX;
}

/* Has all work since the last wait finished, with nothing surfaced (guest memory entered)? 1
 * yes (the copy stream, which then holds all of it, is done and the fault record unclaimed),
 * 0 not yet, -1 unknown or an error (the blocking wait decides and reports). */
static int group_done(struct fl_ctx *c) {
    if (c->elsewhere || !c->copies) return -1;
    int r = c->drv.query(c->copy_stream);
    if (r == CU_NOT_READY) return 0;
    if (r) return -1;
    int out = 1;
    record_lock(c);
    if (!c->fences) out = -1;
    else if (c->record && __atomic_load_n((const uint32_t *)(uintptr_t)c->record, __ATOMIC_ACQUIRE)) out = -1;
    record_unlock(c);
    return out;
}

/* Post the open group (guest memory entered): after its copies' one wait, made with `busy`
 * clear. 0 when posted; PR_GROUP when it stays open for Python: the wait surfaced something
 * (b->syncs still set), or a stop came during it (b->syncs clear: Python only posts it). */
static uint32_t post_group(struct fl_ctx *c, struct fl_batch *b, struct fl_poll *p) {
    if (!b->group) return 0;
    if (b->syncs) {
        trace(p, TR_WAIT, b->group);
        leave(c);
        if (fl_fence(c)) {
            enter(c);                       /* (result unused: nothing more is touched) */
            return PR_GROUP;
        }
        trace(p, TR_WAITED, 0);
        waited(c, b, p);
        if (!enter(c)) return PR_GROUP;
    }
    publish(b, p, b->group);
    trace(p, TR_POSTED, b->group);
    p->forced |= b->irq;
    p->c_launches += b->g_launches;
    p->c_nops += b->g_nops;
    p->c_htods += b->g_htods;
    p->c_dtohs += b->g_dtohs;
    b->group = 0;
    b->start = 1;
    return 0;
}

/* The FENCE fl_run stopped at, taken off the ring (guest memory entered): wait when work was
 * issued since the last wait, then complete it. 0 when posted; PR_GROUP (p->fence set) when
 * Python completes it: the wait surfaced something, or a stop came during it. */
static uint32_t fence(struct fl_ctx *c, struct fl_batch *b, struct fl_poll *p) {
    if (b->queued) {
        trace(p, TR_FENCE, b->queued);
        leave(c);
        if (fl_fence(c)) {
            enter(c);
            return PR_GROUP;
        }
        trace(p, TR_FENCED, 0);
        waited(c, b, p);
        if (!enter(c)) return PR_GROUP;
    }
    uint8_t *slot = (uint8_t *)(uintptr_t)b->cq + (size_t)(p->cq_tail & b->cq_mask) * CQ_ENTRY;
    uint64_t words[4] = {b->stop_tag, 0, 0, 0};
    memcpy(slot, words, sizeof words);
    publish(b, p, 1);
    trace(p, TR_POSTED, 1);
    p->forced |= b->stop_flags & FLAG_IRQ;
    p->c_fences++;
    p->fence = 0;
    return 0;
}

/* Poll the queue whose geometry the batch holds (sq, cq, hdr, masks, sq_entries, sq_head;
 * pending, queued and depth as start_group left them). Returns p->reason; with PR_GROUP the
 * batch holds the open group exactly as fl_run leaves it, and p->fence says whether the FENCE
 * at its stop was taken. */
uint32_t fl_poll(struct fl_ctx *c, struct fl_batch *b, struct fl_poll *p) {
    if (!c || !b || !p) return PR_INDEX;
    uint32_t stops[STOPS] = {0};
    memcpy(p->stops, stops, sizeof stops);
    p->reason = PR_IDLE;
    p->posted = p->forced = p->batches = p->max_batch = p->depth = p->max_depth = p->waits = 0;
    p->checked_after = p->launches = p->checked = 0;
    p->c_launches = p->c_nops = p->c_htods = p->c_dtohs = p->c_fences = p->runs = p->taken = p->fence = 0;
    p->bytes_htod = p->bytes_dtoh = p->busy_ns = p->idle_ns = 0;
    b->group = 0;
    b->start = 1;
    c->elsewhere = b->queued != 0;          /* Python issued work since its last wait */
    if (!b->sq || !b->cq || !b->hdr) return PR_INDEX;
    c->polling = 1;
    uint64_t start = now_ns(), last = start, limit = p->first_ns;
    uint32_t spins = 0;
    for (;;) {
        if (!enter(c)) {
            p->reason = PR_QUIESCE;
            break;
        }
        uint32_t room = 0;
        int64_t n = available(b, p, 0, &room);
        if (n <= 0) {
            leave(c);
            if (n < 0) {
                p->reason = PR_INDEX;
                break;
            }
            uint64_t t = now_ns();
            if (t - last >= limit) {
                p->reason = PR_IDLE;
                p->idle_ns = t - last;
                break;
            }
            if (t - start >= p->run_ns) {
                p->reason = PR_BUDGET;
                p->idle_ns = t - last;
                break;
            }
            relax(spins++);
            continue;
        }
        uint64_t t0 = now_ns();
        uint32_t depth = b->sq_head + (uint32_t)n - p->cq_tail;
        p->batches++;
        if ((uint32_t)n > p->max_batch) p->max_batch = (uint32_t)n;
        p->depth = depth;
        if (depth > p->max_depth) p->max_depth = depth;
        b->start = 1;
        b->cq_index = p->cq_tail;
        b->max = (uint32_t)n;
        b->cq_room = room;
        b->reread = 1;
        trace(p, TR_TAKE, (uint32_t)n);
        fl_run(c, b);
        trace(p, TR_RUN, b->consumed);
        account_run(b, p);
        /* While copies wait for their one wait, take what is posted meanwhile into the group,
         * and while nothing is, ask the device whether they are done: the guest may still be
         * posting copies, and a blocking wait now would drain the device's queue between them. */
        uint32_t quiet = 0;
        while (b->stop == STOP_END && b->syncs && !__atomic_load_n(&c->stop, __ATOMIC_SEQ_CST)) {
            int64_t more = b->group < FL_GROUP ? available(b, p, b->group, &room) : 0;
            if (more < 0) break;                /* (the blocking wait, then PR_INDEX) */
            if (more == 0) {
                int done = group_done(c);
                if (!quiet || done) trace(p, TR_QUERY, (uint32_t)(done + 1));
                if (done > 0) {
                    waited(c, b, p);            /* post_group publishes at once */
                    break;
                }
                if (done < 0 || __atomic_load_n(&c->stop, __ATOMIC_SEQ_CST)) break;   /* the blocking wait */
                relax(quiet++);
                continue;
            }
            quiet = 0;
            if (more > FL_GROUP - b->group) more = FL_GROUP - b->group;
            uint32_t d = b->sq_head + (uint32_t)more - p->cq_tail;
            p->batches++;
            if ((uint32_t)more > p->max_batch) p->max_batch = (uint32_t)more;
            p->depth = d;
            if (d > p->max_depth) p->max_depth = d;
            b->max = (uint32_t)more;
            b->cq_room = room;
            trace(p, TR_TAKE, (uint32_t)more);
            fl_run(c, b);
            trace(p, TR_RUN, b->consumed);
            account_run(b, p);
        }
        uint32_t why = 0, stop = b->stop;
        if (stop == STOP_FENCE) {
            b->sq_head++;                       /* the FENCE: waited for after the group */
            __atomic_store_n(hdr_word(b, QH_SQ_HEAD), b->sq_head, __ATOMIC_RELEASE);
            p->fence = 1;
            why = post_group(c, b, p);
            if (!why) why = fence(c, b, p);
        } else if (stop == STOP_END || stop == STOP_SYNC_FIRST || stop == STOP_FULL) {
            why = post_group(c, b, p);
        } else if (!b->syncs) {                 /* a descriptor for Python, nothing waits: post */
            why = post_group(c, b, p);
            if (!why) why = PR_HANDOFF;
        } else {
            why = PR_GROUP;                     /* Python joins its descriptors to the open group */
        }
        leave(c);
        uint64_t t1 = now_ns();
        p->busy_ns += t1 - t0;
        last = t1;
        limit = p->spin_ns;
        if (why) {
            p->reason = why;
            break;
        }
        if (p->irq && p->posted) {
            p->reason = PR_POSTED;
            break;
        }
        if (t1 - start >= p->run_ns) {
            p->reason = PR_BUDGET;
            break;
        }
    }
    c->polling = 0;
    return p->reason;
}
