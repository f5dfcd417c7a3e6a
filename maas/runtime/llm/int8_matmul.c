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
   rows, each group read once for every activation row.

   Where the CPU has AVX-512 VNNI, one instruction (vpdpbusd) multiplies 64 codes and adds them
   in fours into int32, against three for 32 codes above: widening, multiplying and adding cost
   more than reading the weights did (the demo's products of a step, 3.7 against 7.0 ms on a
   2-core Intel VM whose large L3 holds them all: bench/llm_kernels.py). It multiplies unsigned
   by signed bytes, so the row is shifted into 0..255 (x + 128) and 128 times each weight row's
   sum, which the caller keeps (``sums``), subtracted: sum((x + 128) w) - 128 sum(w) = sum(x
   w). Exact too: with inputs at most 65536, sum((x + 128) w) is at most 65536 * 255 * 128 <
   2^31 in magnitude, and int32 lanes wrap, so partial sums cannot lose what the total keeps.
   Here each chunk of weights is loaded once for up to four activation rows, and a group's four
   sums are reduced together (reduce4): with rows of a few hundred inputs, four separate
   reductions cost as much as the products. */

#include <stdint.h>
#include <stdlib.h>
#if defined(__x86_64__) || defined(__i386__)
#define X86 1
#include <immintrin.h>
#endif

#define GROUP 4
/* Weights are requested this many groups ahead of the group being multiplied: a thread's groups
   lie one after the other, rows of a few hundred bytes, too short for the CPU's prefetchers to
   follow (the demo's 30 layers of one-row products, in C: 2.33 ms without, 2.07 with; four
   rows 3.5 against 2.2 ms; T1 hints or 1 or 4 groups ahead did no better). */
#define PREFETCH_GROUPS 2

typedef struct {
    const int8_t *codes; /* rows x in, as given */
    const int16_t *x;    /* rows x in, widened (levels 1 and 2) */
    const uint8_t *xu;   /* rows x in, shifted by 128 (level 3) */
    const int8_t *w;     /* out x in */
    const int32_t *sums; /* out: each weight row's sum (level 3) */
    int32_t *out;        /* rows x out */
    int64_t rows, outputs, inputs;
} Problem;

static int32_t tail(const int16_t *x, const int8_t *w, int64_t from, int64_t to) {
    int32_t sum = 0;
    for (int64_t i = from; i < to; i++) sum += (int32_t)x[i] * (int32_t)w[i];
    return sum;
}

#ifdef X86
#define ROWS_AT_ONCE 4

/* The four sums of a, b, c and d's lanes, as [a, b, c, d]: a transposing tree of adds, about
   a third of the instructions of four separate reductions, which a row of a few hundred
   inputs (nine chunks of 64) otherwise spends as much on as on its products. */
__attribute__((target("avx512f,avx512bw"), always_inline)) static inline __m128i
reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd),
                                    _mm512_extracti64x4_epi64(abcd, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

/* Rows r0 .. r0 + count of the group at output n: each chunk of weights loaded once for all
   of them (``count``, at most ROWS_AT_ONCE, is a constant where it is inlined). */
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) static inline void
vnni_rows(const Problem *p, int64_t n, int64_t r0, const int count) {
    const int64_t in = p->inputs, whole = in / 64 * 64;
    const __mmask64 last = whole == in ? 0 : ~0ULL >> (64 - (in - whole));
    const int8_t *w = p->w + n * in;
    const uint8_t *x = p->xu + r0 * in;
    __m512i sums[ROWS_AT_ONCE][GROUP];
    for (int r = 0; r < count; r++)
        for (int g = 0; g < GROUP; g++) sums[r][g] = _mm512_setzero_si512();
    for (int64_t i = 0; i < whole; i += 64) {
        __m512i xs[ROWS_AT_ONCE];
        for (int r = 0; r < count; r++) xs[r] = _mm512_loadu_si512((const void *)(x + r * in + i));
        for (int g = 0; g < GROUP; g++) {
            _mm_prefetch((const char *)(w + (PREFETCH_GROUPS * GROUP + g) * in + i), _MM_HINT_T0);
            __m512i codes = _mm512_loadu_si512((const void *)(w + g * in + i));
            for (int r = 0; r < count; r++)
                sums[r][g] = _mm512_dpbusd_epi32(sums[r][g], xs[r], codes);
        }
    }
    if (last) { /* the cut chunk: masked-off lanes load as zeros and add nothing */
        __m512i xs[ROWS_AT_ONCE];
        for (int r = 0; r < count; r++) xs[r] = _mm512_maskz_loadu_epi8(last, x + r * in + whole);
        for (int g = 0; g < GROUP; g++) {
            __m512i codes = _mm512_maskz_loadu_epi8(last, w + g * in + whole);
            for (int r = 0; r < count; r++)
                sums[r][g] = _mm512_dpbusd_epi32(sums[r][g], xs[r], codes);
        }
    }
    const __m128i shift = _mm_slli_epi32(_mm_loadu_si128((const __m128i *)(p->sums + n)), 7);
    for (int r = 0; r < count; r++) {
        __m128i total = reduce4(sums[r][0], sums[r][1], sums[r][2], sums[r][3]);
        _mm_storeu_si128((__m128i *)(p->out + (r0 + r) * p->outputs + n),
                         _mm_sub_epi32(total, shift)); /* minus 128 times each row's sum */
    }
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void group_vnni(const Problem *p,
                                                                          int64_t n) {
    int64_t r = 0;
    for (; r + ROWS_AT_ONCE <= p->rows; r += ROWS_AT_ONCE) vnni_rows(p, n, r, ROWS_AT_ONCE);
    switch (p->rows - r) {
    case 3: vnni_rows(p, n, r, 3); break;
    case 2: vnni_rows(p, n, r, 2); break;
    case 1: vnni_rows(p, n, r, 1); break;
    }
}

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
        for (int64_t g = 0; g < count; g++) {
            const int8_t *x = p->codes + r * p->inputs, *w = p->w + (n + g) * p->inputs;
            int32_t sum = 0;
            for (int64_t i = 0; i < p->inputs; i++) sum += (int32_t)x[i] * (int32_t)w[i];
            p->out[r * p->outputs + n + g] = sum;
        }
}

/* The best level this CPU runs: 3 AVX-512 VNNI, 2 AVX-512BW, 1 AVX2, 0 the plain loop. */
int int8_best_level(void) {
#ifdef X86
    if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni")) return 3;
    return __builtin_cpu_supports("avx512bw") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return 0;
#endif
}

/* ``level``: -1 the best this CPU runs, else one it runs (int8_best_level or below).
   ``sums``: each weight row's sum, which level 3 reads (the others do not). Returns 0, -1
   when the widened rows cannot be allocated, -2 for a level the CPU does not run. */
int int8_row_matmul(const int8_t *x, const int8_t *w, const int32_t *sums, int32_t *out,
                    int64_t rows, int64_t outputs, int64_t inputs, int threads, int level) {
    int best = int8_best_level();
    if (level < 0) level = best;
    if (level > best) return -2;
    int16_t *wide = malloc((size_t)(rows * inputs) * sizeof(int16_t) + 1);
    if (wide == NULL) return -1;
    uint8_t *shifted = (uint8_t *)wide; /* level 3 needs bytes, the others int16 */
    for (int64_t i = 0; i < rows * inputs; i++) {
        if (level == 3)
            shifted[i] = (uint8_t)(x[i] ^ 0x80); /* x + 128, in 0..255 */
        else
            wide[i] = x[i];
    }
    Problem p = {x, wide, shifted, w, sums, out, rows, outputs, inputs};
    int64_t groups = outputs / GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
#ifdef X86
        if (level == 3)
            group_vnni(&p, g * GROUP);
        else if (level == 2)
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
