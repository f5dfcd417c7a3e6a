/* Decode attention over a paged KV cache, reading each cached block where it lies.

   One query token per sequence. For sequence s, kv head h: the queries of the heads that
   share h (a group of G) are scored against the sequence's first lengths[s] positions, whose
   keys and values sit in the blocks block_tables[s, :] of the cache ([blocks, block_size,
   kv_heads, head_dim]); softmax in float32; the values summed with those weights. Keys and
   values are read once for all the heads that share them and never copied. A task is a part
   of a sequence's positions (all its kv heads: whole cache rows read in order), flash-decoding
   style: each part's softmax numerators and weighted values, merged per sequence once every
   part is done. Parts depend on a sequence's length alone (part_size), so a sequence's result
   is computed the same whatever else is in the batch, and both threads share one sequence.

   Built at first use by paged_attention.py with the system C compiler (GCC's vector
   extensions); the inner loops are compiled for AVX-512, AVX2 and plain x86-64 and the CPU
   picks at run time. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* glibc's vector expf (libmvec), as <math.h> declares it under -ffast-math: the softmax's
   exponentials then run 16 (AVX-512) or 8 (AVX2) at a time, with IEEE semantics kept. */
__attribute__((simd("notinbranch"))) float expf(float);

/* How sequences are split into parts (part_size): parts of at most LONGEST_PART positions,
   MAX_PARTS at most (longer parts past that). */
#define LONGEST_PART 256
#define MAX_PARTS 8

typedef struct {
    int64_t sequences, heads, kv_heads, head_dim, block_size, table_width;
    float scale;
} Shape;

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

#ifndef TARGETS
#define TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
/* inlined into each clone, so compiled for its instruction set */
#define INLINE static inline __attribute__((always_inline))

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

#ifdef __clang__
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (i16){__VA_ARGS__})
#endif

/* The lane sums of 16 vectors as one vector (out[i] = x[i]'s 16 lanes summed): pairs of
   vectors are interleaved and added, halving the vectors and doubling the rows each holds,
   four times. 15 such steps for 16 sums; reducing each vector alone took 15 dependent adds,
   and those were most of a score's time. */
INLINE v16 lane_sums(const v16 x[16]) {
    v16 y[8], z[4], w[2];
    for (int i = 0; i < 8; i++)
        y[i] = SHUFFLE(x[2 * i], x[2 * i + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28,
                       14, 30) +
               SHUFFLE(x[2 * i], x[2 * i + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29,
                       15, 31);
    for (int i = 0; i < 4; i++)
        z[i] = SHUFFLE(y[2 * i], y[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13,
                       28, 29) +
               SHUFFLE(y[2 * i], y[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15,
                       30, 31);
    for (int i = 0; i < 2; i++)
        w[i] = SHUFFLE(z[2 * i], z[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25,
                       26, 27) +
               SHUFFLE(z[2 * i], z[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29,
                       30, 31);
    return SHUFFLE(w[0], w[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE(w[0], w[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}

/* ``n`` consecutive cached rows from element ``at`` (within one block), ``part`` floats of
   each: float32 rows ``*stride`` floats apart, in place or converted into ``scratch``. */
TARGETS static const float *rows_at(const void *cache, int bf16, int64_t at, int64_t n,
                                    int64_t row_size, int64_t part, float *scratch,
                                    int64_t *stride) {
    if (!bf16) {
        *stride = row_size;
        return (const float *)cache + at;
    }
    const uint16_t *src = (const uint16_t *)cache + at;
    for (int64_t i = 0; i < n; i++) {
#pragma omp simd
        for (int64_t d = 0; d < part; d++)
            scratch[i * part + d] = bf16_to_float(src[i * row_size + d]);
    }
    *stride = part;
    return scratch;
}

/* out[i] = scale * (q . key i) for the n (at most 16) keys ``stride`` floats apart: 16
   products accumulated side by side, 16 lanes of D at a time, then summed together. */
INLINE void score_rows(const float *q, const float *keys, int64_t stride, int64_t n, int64_t D,
                       float scale, float *out) {
    const float *row[16];
    v16 x[16];
    for (int i = 0; i < 16; i++) {
        row[i] = keys + (i < n ? i : n - 1) * stride; /* past n: a row again, result unused */
        x[i] = (v16){0};
    }
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
        v16 qd, k;
        memcpy(&qd, q + d, sizeof qd);
        for (int i = 0; i < 16; i++) {
            memcpy(&k, row[i] + d, sizeof k);
            x[i] += qd * k;
        }
    }
    float sums[16];
    const v16 summed = lane_sums(x);
    memcpy(sums, &summed, sizeof sums);
    for (int64_t i = 0; i < n; i++) {
        float total = sums[i];
        for (int64_t e = d; e < D; e++) total += q[e] * row[i][e];
        out[i] = total * scale;
    }
}

/* acc += sum over the n rows of w[i] * value i (rows ``stride`` floats apart), in row order. */
INLINE void add_rows(float *acc, const float *w, const float *values, int64_t stride, int64_t n,
                     int64_t D) {
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
        v16 a, v;
        memcpy(&a, acc + d, sizeof a);
        for (int64_t i = 0; i < n; i++) {
            memcpy(&v, values + i * stride + d, sizeof v);
            a += w[i] * v;
        }
        memcpy(acc + d, &a, sizeof a);
    }
    for (; d < D; d++) {
        float a = acc[d];
        for (int64_t i = 0; i < n; i++) a += w[i] * values[i * stride + d];
        acc[d] = a;
    }
}

/* Slice ``i`` of ``parts`` of the ``bytes`` at ``at`` (none if NULL) brought towards the cache
   before it is read: the blocks of a sequence lie anywhere, where the CPU's own prefetching
   does not follow. A block is requested a slice between one head's work and the next, not all
   at once: its 100-odd lines at once filled the CPU's line fill buffers and stalled there. */
static inline void prefetch_part(const char *at, int64_t bytes, int64_t i, int64_t parts) {
    if (at == NULL) return;
    const int64_t slice = ((bytes + parts - 1) / parts + 63) / 64 * 64, from = i * slice;
    for (int64_t line = from; line < from + slice && line < bytes; line += 64)
        __builtin_prefetch(at + line);
}

/* Positions in the chunk from p: at most 16, and none past its block or the sequence. */
static inline int64_t chunk_length(int64_t p, int64_t bs, int64_t length) {
    const int64_t n = bs - p % bs < 16 ? bs - p % bs : 16;
    return length - p < n ? length - p : n;
}

/* The block after the chunk [p, p + n) if the chunk ends its block and the sequence goes on. */
static inline const char *next_block(const void *cache, const int64_t *table, int64_t p,
                                     int64_t n, int64_t bs, int64_t length, int64_t block_bytes) {
    if (p + n >= length || (p + n) % bs != 0) return NULL;
    return (const char *)cache + table[(p + n) / bs] * block_bytes;
}

/* Positions [from, to) of one sequence, for every head: q [heads, D] float32; scores
   [heads, to - from]; scratch [16, kv_heads * D]. Leaves, for each head h, top[h] (its
   highest score here), total[h] (the sum of exp(score - top[h])) and acc [heads, D] (the
   values weighted by those exponentials, not yet divided by total: merge_parts does that
   once it has every part). A ``whole`` sequence's weights are divided before the values are
   summed, and its total is 1: the order of operations of the kernel before parts existed,
   so that short sequences keep their results to the bit (a greedy answer can hinge on a
   near-tie). Positions go 16 at a time (fewer at a block's or the part's end). */
TARGETS static void one_part(const Shape *shape, const float *q, const void *k_cache,
                             const void *v_cache, int bf16, const int64_t *table, int64_t from,
                             int64_t to, int whole, float *scores, float *scratch, float *acc,
                             float *top, float *total) {
    const int64_t D = shape->head_dim, KV = shape->kv_heads, H = shape->heads, G = H / KV;
    const int64_t bs = shape->block_size, row_size = KV * D, element = bf16 ? 2 : 4;
    const int64_t block_bytes = bs * row_size * element, length = to - from;
    int64_t n, stride;
    for (int64_t p = from; p < to; p += n) { /* scores: each key read once */
        n = chunk_length(p, bs, to);
        const char *next = next_block(k_cache, table, p, n, bs, to, block_bytes);
        const int64_t at = (table[p / bs] * bs + p % bs) * row_size;
        const float *keys = rows_at(k_cache, bf16, at, n, row_size, row_size, scratch, &stride);
        for (int64_t h = 0; h < H; h++) {
            prefetch_part(next, block_bytes, h, H);
            score_rows(q + h * D, keys + (h / G) * D, stride, n, D, shape->scale,
                       scores + h * length + p - from);
        }
    }
    const char *first_values =
        (const char *)v_cache + (table[from / bs] * bs + from % bs) * row_size * element;
    for (int64_t h = 0; h < H; h++) { /* softmax's numerators */
        prefetch_part(first_values, block_bytes - from % bs * row_size * element, h, H);
        float *sh = scores + h * length, high = -INFINITY;
#pragma omp simd reduction(max : high)
        for (int64_t p = 0; p < length; p++) high = sh[p] > high ? sh[p] : high;
#pragma omp simd
        for (int64_t p = 0; p < length; p++) sh[p] = expf(sh[p] - high);
        top[h] = high;
        float sum = 0.0f;
        for (int64_t p = 0; p < length; p++) sum += sh[p];
        total[h] = sum;
        if (whole) { /* normalised here, so a sequence of one part gets the bits it always had */
            const float inverse = 1.0f / sum;
#pragma omp simd
            for (int64_t p = 0; p < length; p++) sh[p] *= inverse;
            total[h] = 1.0f;
        }
    }
    memset(acc, 0, (size_t)(H * D) * sizeof(float));
    for (int64_t p = from; p < to; p += n) { /* weighted values: each read once */
        n = chunk_length(p, bs, to);
        const char *next = next_block(v_cache, table, p, n, bs, to, block_bytes);
        const int64_t at = (table[p / bs] * bs + p % bs) * row_size;
        const float *values = rows_at(v_cache, bf16, at, n, row_size, row_size, scratch, &stride);
        for (int64_t h = 0; h < H; h++) {
            prefetch_part(next, block_bytes, h, H);
            add_rows(acc + h * D, scores + h * length + p - from, values + (h / G) * D, stride,
                     n, D);
        }
    }
}

/* A sequence's attention from its ``parts`` parts (one_part's top, total and acc, part after
   part), into out [heads, D]: each part's exponentials rescaled to the highest score of all,
   summed in part order (into the first part's acc). */
static void merge_parts(int64_t parts, int64_t H, int64_t D, const float *top,
                        const float *total, float *acc, int out_bf16, void *out) {
    for (int64_t h = 0; h < H; h++) {
        float high = -INFINITY, sum = 0.0f, weight[MAX_PARTS];
        for (int64_t j = 0; j < parts; j++) high = top[j * H + h] > high ? top[j * H + h] : high;
        for (int64_t j = 0; j < parts; j++) {
            weight[j] = expf(top[j * H + h] - high);
            sum += weight[j] * total[j * H + h];
        }
        float *row = acc + h * D;
        for (int64_t d = 0; d < D; d++) row[d] *= weight[0];
        for (int64_t j = 1; j < parts; j++)
            for (int64_t d = 0; d < D; d++) row[d] += weight[j] * acc[(j * H + h) * D + d];
        const float inverse = 1.0f / sum;
        for (int64_t d = 0; d < D; d++) {
            if (out_bf16)
                ((uint16_t *)out)[h * D + d] = float_to_bf16(row[d] * inverse);
            else
                ((float *)out)[h * D + d] = row[d] * inverse;
        }
    }
}

/* Positions in each part of a sequence of ``length``: as many equal parts as LONGEST_PART-long
   pieces would cover it, MAX_PARTS at most, in whole 16-position chunks. A part is a task, so
   both threads share even a single sequence; how a sequence is split depends on its length
   alone, so its result is the same whatever else is in the batch. Parts of 32 or 96
   positions were no faster for one sequence of 190 and slower for 32 of them
   (bench/paged_attention.py); 256 keeps sequences that short in one part. */
static int64_t part_size(int64_t length) {
    int64_t parts = (length + LONGEST_PART - 1) / LONGEST_PART;
    if (parts > MAX_PARTS) parts = MAX_PARTS;
    return ((length + parts - 1) / parts + 15) / 16 * 16;
}

/* q, out: [sequences, heads, head_dim] (q_bf16 != 0: bfloat16, else float32); caches:
   [cache_blocks, block_size, kv_heads, head_dim] (cache_bf16 likewise; the two may differ:
   float32 queries over a bfloat16 cache); block_tables:
   [sequences, table_width]; lengths: [sequences]. Returns 0; -1 if memory ran out; -2 if a
   length or a block id would read outside the cache (nothing is computed). */
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                           const int64_t *block_tables, const int64_t *lengths, void *out,
                           int q_bf16, int cache_bf16, int64_t sequences, int64_t heads,
                           int64_t kv_heads,
                           int64_t head_dim, int64_t cache_blocks, int64_t block_size,
                           int64_t table_width, int threads) {
    const Shape shape = {sequences, heads, kv_heads, head_dim, block_size, table_width,
                         1.0f / sqrtf((float)head_dim)};
    const int64_t HD = heads * head_dim;
    for (int64_t s = 0; s < sequences; s++) { /* nothing is read outside the cache */
        if (lengths[s] < 1 || lengths[s] > table_width * block_size) return -2;
        for (int64_t b = 0; b < (lengths[s] + block_size - 1) / block_size; b++) {
            const int64_t block = block_tables[s * table_width + b];
            if (block < 0 || block >= cache_blocks) return -2;
        }
    }
    /* Sequence s's parts are tasks first_task[s] .. first_task[s + 1] - 1; a sequence of several
       parts keeps them in slots from first_slot[s] until its last part is done, when the
       thread that did that part merges them. */
    int64_t *first_task = malloc((size_t)(sequences + 1) * sizeof(int64_t));
    int64_t *first_slot = malloc((size_t)(sequences + 1) * sizeof(int64_t));
    int64_t *parts_done = calloc((size_t)(sequences + 1), sizeof(int64_t));
    int failed = first_task == NULL || first_slot == NULL || parts_done == NULL;
    int64_t widest = 16;
    if (!failed) {
        first_task[0] = first_slot[0] = 0;
        for (int64_t s = 0; s < sequences; s++) {
            const int64_t size = part_size(lengths[s]), parts = (lengths[s] + size - 1) / size;
            widest = size > widest ? size : widest;
            first_task[s + 1] = first_task[s] + parts;
            first_slot[s + 1] = first_slot[s] + (parts > 1 ? parts : 0);
        }
    }
    const int64_t tasks = failed ? 0 : first_task[sequences];
    const int64_t slots = failed ? 0 : first_slot[sequences];
    int64_t *task_sequence = failed ? NULL : malloc((size_t)(tasks + 1) * sizeof(int64_t));
    float *kept = failed ? NULL : malloc((size_t)(slots * (HD + 2 * heads) + 1) * sizeof(float));
    failed = failed || task_sequence == NULL || kept == NULL;
    for (int64_t s = 0; s < sequences && !failed; s++)
        for (int64_t t = first_task[s]; t < first_task[s + 1]; t++) task_sequence[t] = s;
    const int team = failed || tasks < 1 ? 1 : tasks < threads ? (int)tasks : threads;
    const int unready = failed; /* read by every thread; ``failed`` is written in the region */
#pragma omp parallel num_threads(team) if (!unready)
    {
        float *scores = malloc((size_t)(heads * widest) * sizeof(float));
        const int64_t work_floats = 2 * HD + 2 * heads + 16 * kv_heads * head_dim;
        float *work = malloc((size_t)work_floats * sizeof(float));
        const int ready = !unready && scores != NULL && work != NULL;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
        float *qf = work, *own = work + HD, *row = work + 2 * HD + 2 * heads;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (!ready) continue;
            const int64_t s = task_sequence[t], size = part_size(lengths[s]);
            const int64_t part = t - first_task[s], parts = first_task[s + 1] - first_task[s];
            const int64_t from = part * size;
            const int64_t to = from + size < lengths[s] ? from + size : lengths[s];
            if (q_bf16) {
                for (int64_t i = 0; i < HD; i++)
                    qf[i] = bf16_to_float(((const uint16_t *)q)[s * HD + i]);
            } else {
                memcpy(qf, (const float *)q + s * HD, (size_t)HD * sizeof(float));
            }
            /* a part's acc [HD], then its top and total [heads] each */
            float *base = parts > 1 ? kept + first_slot[s] * (HD + 2 * heads) : own;
            float *acc = base + part * HD, *top = base + parts * HD + part * heads;
            float *total = base + parts * (HD + heads) + part * heads;
            one_part(&shape, qf, k_cache, v_cache, cache_bf16, block_tables + s * table_width,
                     from, to, parts == 1, scores, row, acc, top, total);
            if (parts > 1 && __atomic_add_fetch(&parts_done[s], 1, __ATOMIC_ACQ_REL) < parts)
                continue; /* the sequence's last part merges */
            void *into = (char *)out + s * HD * (q_bf16 ? 2 : 4);
            merge_parts(parts, heads, head_dim, base + parts * HD, base + parts * (HD + heads),
                        base, q_bf16, into);
        }
        free(scores);
        free(work);
    }
    free(first_task);
    free(first_slot);
    free(parts_done);
    free(task_sequence);
    free(kept);
    return failed ? -1 : 0;
}
