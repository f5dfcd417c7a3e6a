/* Decode attention over a paged KV cache, reading each cached block where it lies.

   One query token per sequence. For sequence s, kv head h: the queries of the heads that
   share h (a group of G) are scored against the sequence's first lengths[s] positions, whose
   keys and values sit in the blocks block_tables[s, :] of the cache ([blocks, block_size,
   kv_heads, head_dim]); softmax in float32; the values summed with those weights. Keys and
   values are read once for all the heads that share them and never copied. A task is one
   sequence (all its kv heads: whole cache rows read in order), or, when there are fewer
   sequences than threads, one kv head of one; either way a sequence's result is computed
   the same, whatever else is in the batch.

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

#define TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))

/* the cache's row at element ``at``, as float32: in place, or converted into ``row`` */
TARGETS static const float *row_at(const void *cache, int bf16, int64_t at, int64_t n,
                                   float *row) {
    if (!bf16) return (const float *)cache + at;
    const uint16_t *src = (const uint16_t *)cache + at;
#pragma omp simd
    for (int64_t d = 0; d < n; d++) row[d] = bf16_to_float(src[d]);
    return row;
}

typedef float v16 __attribute__((vector_size(64)));

/* a . b over n floats, 16 lanes at a time (one AVX-512 register, two AVX2 ones), the lanes
   then summed pairwise: a compiler's reduction of a simd loop sums the 16 lanes one after
   another, and those dependent adds were most of a score's time. */
static inline float dot(const float *a, const float *b, int64_t n) {
    v16 sum = {0}, x, y;
    int64_t d = 0;
    for (; d + 16 <= n; d += 16) {
        memcpy(&x, a + d, sizeof x);
        memcpy(&y, b + d, sizeof y);
        sum += x * y;
    }
    float lanes[16];
    memcpy(lanes, &sum, sizeof lanes);
    for (int width = 8; width > 0; width /= 2)
        for (int i = 0; i < width; i++) lanes[i] += lanes[i + width];
    float total = lanes[0];
    for (; d < n; d++) total += a[d] * b[d];
    return total;
}

/* Bring a block's rows (``bytes`` from ``at``) towards the cache before they are read: the
   blocks of a sequence lie anywhere, where the CPU's own prefetching does not follow. */
static inline void prefetch(const void *at, int64_t bytes) {
    for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch((const char *)at + line);
}

/* One sequence, kv heads [first, first + count) and the query heads that share them: q and
   acc [heads, D] float32 (only those heads' rows used); scores [heads, length]. */
TARGETS static void one_task(const Shape *shape, const float *q, const void *k_cache,
                             const void *v_cache, int bf16, const int64_t *table, int64_t length,
                             int64_t first, int64_t count, float *scores, float *row,
                             float *acc) {
    const int64_t D = shape->head_dim, KV = shape->kv_heads, G = shape->heads / KV;
    const int64_t bs = shape->block_size, row_size = KV * D, element = bf16 ? 2 : 4;
    const int64_t block_bytes = bs * row_size * element, part = count * D;
    const int64_t h0 = first * G, h1 = (first + count) * G;
    for (int64_t p = 0; p < length; p++) { /* scores: each key read once */
        if (p % bs == 0 && p + bs < length)
            prefetch((const char *)k_cache + table[p / bs + 1] * block_bytes, block_bytes);
        const int64_t at = (table[p / bs] * bs + p % bs) * row_size + first * D;
        const float *keys = row_at(k_cache, bf16, at, part, row);
        for (int64_t h = h0; h < h1; h++) {
            const float *key = keys + (h / G - first) * D;
            scores[h * length + p] = dot(q + h * D, key, D) * shape->scale;
        }
    }
    for (int64_t h = h0; h < h1; h++) { /* softmax */
        float *sh = scores + h * length, top = -INFINITY, total = 0.0f;
        for (int64_t p = 0; p < length; p++) top = sh[p] > top ? sh[p] : top;
#pragma omp simd
        for (int64_t p = 0; p < length; p++) sh[p] = expf(sh[p] - top);
        for (int64_t p = 0; p < length; p++) total += sh[p];
        const float inverse = 1.0f / total;
#pragma omp simd
        for (int64_t p = 0; p < length; p++) sh[p] *= inverse;
    }
    memset(acc + h0 * D, 0, (size_t)((h1 - h0) * D) * sizeof(float));
    for (int64_t p = 0; p < length; p++) { /* weighted values: each read once */
        if (p % bs == 0 && p + bs < length)
            prefetch((const char *)v_cache + table[p / bs + 1] * block_bytes, block_bytes);
        const int64_t at = (table[p / bs] * bs + p % bs) * row_size + first * D;
        const float *values = row_at(v_cache, bf16, at, part, row);
        for (int64_t h = h0; h < h1; h++) {
            const float w = scores[h * length + p], *value = values + (h / G - first) * D;
            float *ah = acc + h * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) ah[d] += w * value[d];
        }
    }
}

/* q, out: [sequences, heads, head_dim], of the cache's dtype (bf16 != 0: bfloat16, else
   float32); caches: [cache_blocks, block_size, kv_heads, head_dim]; block_tables:
   [sequences, table_width]; lengths: [sequences]. Returns 0; -1 if memory ran out; -2 if a
   length or a block id would read outside the cache (nothing is computed). */
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                           const int64_t *block_tables, const int64_t *lengths, void *out,
                           int bf16, int64_t sequences, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, int64_t cache_blocks, int64_t block_size,
                           int64_t table_width, int threads) {
    const Shape shape = {sequences, heads, kv_heads, head_dim, block_size, table_width,
                         1.0f / sqrtf((float)head_dim)};
    const int64_t HD = heads * head_dim;
    int64_t longest = 1;
    for (int64_t s = 0; s < sequences; s++) longest = lengths[s] > longest ? lengths[s] : longest;
    for (int64_t s = 0; s < sequences; s++) { /* nothing is read outside the cache */
        if (lengths[s] < 1 || lengths[s] > table_width * block_size) return -2;
        for (int64_t b = 0; b < (lengths[s] + block_size - 1) / block_size; b++) {
            const int64_t block = block_tables[s * table_width + b];
            if (block < 0 || block >= cache_blocks) return -2;
        }
    }
    /* whole sequences while there are enough of them to keep every thread busy */
    const int64_t parts = sequences >= threads ? 1 : kv_heads, tasks = sequences * parts;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc((size_t)(heads * longest) * sizeof(float));
        float *work = malloc((size_t)(2 * HD + kv_heads * head_dim) * sizeof(float));
        const int ready = scores != NULL && work != NULL;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
        float *qf = work, *acc = work + HD, *row = work + 2 * HD;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            if (!ready) continue;
            const int64_t s = task / parts, first = (task % parts) * (kv_heads / parts);
            const int64_t count = kv_heads / parts, h0 = first * (heads / kv_heads);
            const int64_t from = s * HD + h0 * head_dim, n = count * (heads / kv_heads) * head_dim;
            if (bf16) {
                for (int64_t i = 0; i < n; i++)
                    qf[h0 * head_dim + i] = bf16_to_float(((const uint16_t *)q)[from + i]);
            } else {
                memcpy(qf + h0 * head_dim, (const float *)q + from, (size_t)n * sizeof(float));
            }
            one_task(&shape, qf, k_cache, v_cache, bf16, block_tables + s * table_width,
                     lengths[s], first, count, scores, row, acc);
            for (int64_t i = 0; i < n; i++) {
                if (bf16)
                    ((uint16_t *)out)[from + i] = float_to_bf16(acc[h0 * head_dim + i]);
                else
                    ((float *)out)[from + i] = acc[h0 * head_dim + i];
            }
        }
        free(scores);
        free(work);
    }
    return failed ? -1 : 0;
}
