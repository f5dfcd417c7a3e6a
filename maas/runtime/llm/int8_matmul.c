/* int8 x int8 products of a few rows, for W8A8 decode steps (int8_matmul.py).

   out[r][n] = sum over i of x[r][i] * w[n][i], as int32: x holds a step's activation rows
   (one per sequence, quantised per row), w the weights [out, in], each once in memory. With
   one or two rows the product is a matrix-vector one, bound by reading w; PyTorch's
   torch._int_mm read it at about 11 GB/s on a 2-core VM where this loop reads at 19.

   Exact: codes widened to int16 multiply into products of at most 2^14, and a row of at most
   65536 inputs sums to at most 2^30 in magnitude, inside int32 (int8_matmul.py hands longer
   rows to torch._int_mm). So the result is the same integer as torch._int_mm's, whatever the
   order or the rows.

   On x86 the widening multiply-add is compiled for AVX-512BW and AVX2, and the CPU picks at
   run time (or the caller names the level, to test each); elsewhere, and on x86 CPUs without
   either, a plain loop runs. The weight rows are split between threads in groups of four
   rows, each group read once for every activation row. */

#include <stdint.h>
#include <stdlib.h>
#if defined(__x86_64__) || defined(__i386__)
#define X86 1
#include <immintrin.h>
#endif

#define GROUP 4

typedef struct {
    const int16_t *x; /* rows x in, widened */
    const int8_t *w;  /* out x in */
    int32_t *out;     /* rows x out */
    int64_t rows, outputs, inputs;
} Problem;

static int32_t tail(const int16_t *x, const int8_t *w, int64_t from, int64_t to) {
    int32_t sum = 0;
    for (int64_t i = from; i < to; i++) sum += (int32_t)x[i] * (int32_t)w[i];
    return sum;
}

#ifdef X86
__attribute__((target("avx512f,avx512bw"))) static void group_avx512(const Problem *p,
                                                                      int64_t n) {
    const int64_t in = p->inputs, whole = in / 32 * 32;
    const int8_t *w = p->w + n * in;
    for (int64_t r = 0; r < p->rows; r++) {
        const int16_t *x = p->x + r * in;
        __m512i sums[GROUP];
        for (int g = 0; g < GROUP; g++) sums[g] = _mm512_setzero_si512();
        for (int64_t i = 0; i < whole; i += 32) {
            __m512i xs = _mm512_loadu_si512((const void *)(x + i));
            for (int g = 0; g < GROUP; g++) {
                __m256i codes = _mm256_loadu_si256((const __m256i *)(w + g * in + i));
                __m512i wide = _mm512_cvtepi8_epi16(codes);
                sums[g] = _mm512_add_epi32(sums[g], _mm512_madd_epi16(wide, xs));
            }
        }
        for (int g = 0; g < GROUP; g++)
            p->out[r * p->outputs + n + g] =
                _mm512_reduce_add_epi32(sums[g]) + tail(x, w + g * in, whole, in);
    }
}

__attribute__((target("avx2"))) static void group_avx2(const Problem *p, int64_t n) {
    const int64_t in = p->inputs, whole = in / 16 * 16;
    const int8_t *w = p->w + n * in;
    for (int64_t r = 0; r < p->rows; r++) {
        const int16_t *x = p->x + r * in;
        __m256i sums[GROUP];
        for (int g = 0; g < GROUP; g++) sums[g] = _mm256_setzero_si256();
        for (int64_t i = 0; i < whole; i += 16) {
            __m256i xs = _mm256_loadu_si256((const __m256i *)(x + i));
            for (int g = 0; g < GROUP; g++) {
                __m128i codes = _mm_loadu_si128((const __m128i *)(w + g * in + i));
                __m256i wide = _mm256_cvtepi8_epi16(codes);
                sums[g] = _mm256_add_epi32(sums[g], _mm256_madd_epi16(wide, xs));
            }
        }
        for (int g = 0; g < GROUP; g++) {
            __m128i half = _mm_add_epi32(_mm256_castsi256_si128(sums[g]),
                                         _mm256_extracti128_si256(sums[g], 1));
            half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0x4e));
            half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0xb1));
            p->out[r * p->outputs + n + g] =
                _mm_cvtsi128_si32(half) + tail(x, w + g * in, whole, in);
        }
    }
}

#endif

static void group_plain(const Problem *p, int64_t n, int64_t count) {
    for (int64_t r = 0; r < p->rows; r++)
        for (int64_t g = 0; g < count; g++)
            p->out[r * p->outputs + n + g] =
                tail(p->x + r * p->inputs, p->w + (n + g) * p->inputs, 0, p->inputs);
}

/* The best level this CPU runs: 2 AVX-512BW, 1 AVX2, 0 the plain loop. */
int int8_best_level(void) {
#ifdef X86
    return __builtin_cpu_supports("avx512bw") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return 0;
#endif
}

/* ``level``: -1 the best this CPU runs, else one it runs (int8_best_level or below). Returns
   0, -1 when the widened rows cannot be allocated, -2 for a level the CPU does not run. */
int int8_row_matmul(const int8_t *x, const int8_t *w, int32_t *out, int64_t rows,
                    int64_t outputs, int64_t inputs, int threads, int level) {
    int best = int8_best_level();
    if (level < 0) level = best;
    if (level > best) return -2;
    int16_t *wide = malloc((size_t)(rows * inputs) * sizeof(int16_t) + 1);
    if (wide == NULL) return -1;
    for (int64_t i = 0; i < rows * inputs; i++) wide[i] = x[i];
    Problem p = {wide, w, out, rows, outputs, inputs};
    int64_t groups = outputs / GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
#ifdef X86
        if (level == 2)
            group_avx512(&p, g * GROUP);
        else if (level == 1)
            group_avx2(&p, g * GROUP);
        else
#endif
            group_plain(&p, g * GROUP, GROUP);
    }
    group_plain(&p, groups * GROUP, outputs - groups * GROUP); /* the last few outputs */
    free(wide);
    return 0;
}
