/* The fast lane's poll loop: whole cycles of lane-only work without Python.
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
#include "fastlane.h"

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
 * clear; the FENCE taken behind it (p->fence) goes with it when no work is left to wait for. 0 when posted; PR_GROUP when it stays open for Python: the wait surfaced something
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
    uint32_t n = b->group;
    if (p->fence && !b->queued) {           /* the FENCE behind it waits for nothing: one cq_tail store */
        uint8_t *slot = (uint8_t *)(uintptr_t)b->cq + (size_t)((p->cq_tail + n) & b->cq_mask) * CQ_ENTRY;
        uint64_t words[4] = {b->stop_tag, 0, 0, 0};
        memcpy(slot, words, sizeof words);
        n++;
        p->forced |= b->stop_flags & FLAG_IRQ;
        p->c_fences++;
        p->fence = 0;
    }
    publish(b, p, n);
    trace(p, TR_POSTED, n);
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
    if (!b->sq || !b->cq || !b->hdr) return p->reason = PR_INDEX;
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
                if (done < 0 || __atomic_load_n(&c->stop, __ATOMIC_SEQ_CST) || now_ns() - start >= p->run_ns)
                    break;                      /* the blocking wait (then PR_GROUP / PR_BUDGET) */
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
            why = post_group(c, b, p);          /* (with the FENCE when it has nothing to wait for) */
            if (!why && p->fence) {
                if (p->irq && p->posted && b->queued)
                    why = PR_GROUP;             /* the interrupt first, then the FENCE's wait (Python's) */
                else
                    why = fence(c, b, p);
            }
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
