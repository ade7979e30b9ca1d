/* The fast lane's shared definitions: limits, the tables (struct fl_ctx), the batch Python
 * owns (struct fl_batch, a ctypes Structure of the same layout) and the descriptor as read from
 * the ring. fastlane.c holds the tables and one run (fl_run, fl_fence); fastpoll.c the poll loop
 * (fl_poll) that runs whole cycles of them without Python. */
#ifndef VXPU_FASTLANE_H
#define VXPU_FASTLANE_H
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

/* the spin lock over record/fences: fl_fence's read of the claim word vs fl_set_fence */
static inline void record_lock(struct fl_ctx *c) {
    while (__atomic_exchange_n(&c->record_busy, 1u, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(&c->record_busy, __ATOMIC_RELAXED)) { }
    }
}

static inline void record_unlock(struct fl_ctx *c) { __atomic_store_n(&c->record_busy, 0u, __ATOMIC_RELEASE); }

uint32_t fl_run(struct fl_ctx *c, struct fl_batch *b);
int fl_fence(struct fl_ctx *c);

#endif
