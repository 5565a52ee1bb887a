/* neve_tune: the fused per-neuron comparison behind VelocityMonitor's CPU hot path.
 *
 * A hooked output `a` and its stored previous response `b` (same shape and layout, walked in memory order
 * as (outer, C, inner) with neurons on C: inner == 1 for Linear/LayerNorm and channels_last convs) are read
 * exactly once, and per neuron c it accumulates, in double:
 *
 *     cur[c]  += sum a^2
 *     diff[c] += sum (a - s[c] * b)^2
 *
 * and overwrites b with a in the same pass (the in-place-safety copy).
 *
 * Products of two floats are exact in double and the sums carry 53 bits, so the finalisation
 * (||a - s b||^2 - (|a| - s|b|)^2) / (2 |a| s|b|) keeps ~1e-9 relative accuracy even at s = 1 and
 * velocities near zero. Work is cut into chunks of rows that depend only on the shape, never on the
 * thread count, and the chunks' partial sums are added in a fixed order: results are reproducible.
 * Non-finite inputs propagate into the sums (the caller reports the neuron as NaN, never zero).
 *
 * Compiled at first use by neve_tune/kernel.py; when no C compiler is available the same numbers come
 * from PyTorch ops instead.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

/* dst <- src with non-temporal stores where available: the snapshot is not read again before the next
 * measurement, so its lines go straight to memory instead of evicting what the next layer needs. */
static void neve_copy_f32(float *dst, const float *src, int64_t n) {
    int64_t i = 0;
#if defined(__AVX__)
    for (; i < n && ((uintptr_t)(dst + i) & 31) != 0; ++i) dst[i] = src[i];
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
    for (; i < n; ++i) dst[i] = src[i];
}

static void neve_copy_f64(double *dst, const double *src, int64_t n) {
    int64_t i = 0;
#if defined(__AVX__)
    for (; i < n && ((uintptr_t)(dst + i) & 31) != 0; ++i) dst[i] = src[i];
    for (; i + 4 <= n; i += 4) _mm256_stream_pd(dst + i, _mm256_loadu_pd(src + i));
#endif
    for (; i < n; ++i) dst[i] = src[i];
}

#define NEVE_MIN_CHUNK ((int64_t)1 << 16) /* elements per chunk, at least */
#define NEVE_MAX_CHUNKS 32

static int64_t neve_chunks(int64_t outer, int64_t row) {
    int64_t k = outer * row / NEVE_MIN_CHUNK;
    if (k > NEVE_MAX_CHUNKS) k = NEVE_MAX_CHUNKS;
    if (k > outer) k = outer;
    return k < 1 ? 1 : k;
}

/* The optional second set of sums is for a BatchNorm (in eval mode) that takes this output as its input.
 * From its running statistics and affine parameters (bn_weight/bn_bias may be NULL), per neuron
 *     alpha = bn_weight / sqrt(bn_var + eps),   beta = bn_bias - bn_mean * alpha
 * are written to affine[0][c], affine[1][c] (rows `astride` apart); rows 2 and 3 hold the previous
 * measurement's alpha', beta'. Its outputs are y = alpha*a + beta now and y' = alpha'*b + beta' before, so
 *     cur2[c] += sum y^2,   diff2[c] += sum (y - y')^2
 * come from the same pass, and that BatchNorm needs no snapshot of its own. */
/* Neurons innermost (Linear, LayerNorm, channels_last convs): rows r0..r1 of C values each, columns
 * c0..c0+w (w <= NEVE_W). The sums of one column tile stay in registers while the rows stream past; called
 * with w == NEVE_W (a constant after inlining) for full tiles and once more for the tail. */
#define NEVE_W 16
#define NEVE_TILE_ELEMS 2048 /* rows per block: a block of a and b stays in L1 across its column tiles */
#define NEVE_TILE_MAX_C 32    /* wider rows are summed row by row, into per-neuron arrays */
#define NEVE_DEFINE_TILE(TILE, T)                                                                  \
    static inline __attribute__((always_inline)) void TILE(                                      \
        const T *a, const T *b, int64_t C, int64_t r0, int64_t r1, int64_t c0, int64_t w,          \
        const double *s, const double *affine, int64_t astride, double *pc, double *pd,            \
        double *pc2, double *pd2) {                                                                \
        double sc[NEVE_W], al[NEVE_W], be[NEVE_W], alp[NEVE_W], bep[NEVE_W];                       \
        double sa[NEVE_W] = {0}, sd[NEVE_W] = {0}, sa2[NEVE_W] = {0}, sd2[NEVE_W] = {0};           \
        for (int64_t j = 0; j < w; ++j) sc[j] = s[c0 + j];                                         \
        if (affine != NULL) {                                                                      \
            for (int64_t j = 0; j < w; ++j) {                                                      \
                al[j] = affine[c0 + j];                                                            \
                be[j] = affine[astride + c0 + j];                                                  \
                alp[j] = affine[2 * astride + c0 + j];                                             \
                bep[j] = affine[3 * astride + c0 + j];                                             \
            }                                                                                      \
            for (int64_t r = r0; r < r1; ++r) {                                                    \
                const T *ap = a + r * C + c0, *bp = b + r * C + c0;                                \
                _Pragma("omp simd")                                                                \
                for (int64_t j = 0; j < w; ++j) {                                                  \
                    double x = (double)ap[j], y = (double)bp[j], d = x - sc[j] * y;                \
                    double u = al[j] * x + be[j], e = u - (alp[j] * y + bep[j]);                   \
                    sa[j] += x * x;                                                                \
                    sd[j] += d * d;                                                                \
                    sa2[j] += u * u;                                                               \
                    sd2[j] += e * e;                                                               \
                }                                                                                  \
            }                                                                                      \
            for (int64_t j = 0; j < w; ++j) {                                                      \
                pc2[c0 + j] += sa2[j];                                                             \
                pd2[c0 + j] += sd2[j];                                                             \
            }                                                                                      \
        } else {                                                                                   \
            for (int64_t r = r0; r < r1; ++r) {                                                    \
                const T *ap = a + r * C + c0, *bp = b + r * C + c0;                                \
                _Pragma("omp simd")                                                                \
                for (int64_t j = 0; j < w; ++j) {                                                  \
                    double x = (double)ap[j], d = x - sc[j] * (double)bp[j];                       \
                    sa[j] += x * x;                                                                \
                    sd[j] += d * d;                                                                \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int64_t j = 0; j < w; ++j) {                                                          \
            pc[c0 + j] += sa[j];                                                                   \
            pd[c0 + j] += sd[j];                                                                   \
        }                                                                                          \
    }

#define NEVE_DEFINE(NAME, TILE, T, COPY)                                                           \
    int NAME(const T *a, T *b, int64_t outer, int64_t C, int64_t inner, const double *s,           \
             double *cur, double *diff, const T *bn_mean, const T *bn_var, const T *bn_weight,     \
             const T *bn_bias, double eps, double *affine, int64_t astride, double *cur2,          \
             double *diff2, int threads) {                                                         \
        int paired = affine != NULL;                                                               \
        int64_t k = neve_chunks(outer, C * inner), width = paired ? 4 * C : 2 * C;                 \
        if (paired) {                                                                              \
            for (int64_t c = 0; c < C; ++c) {                                                      \
                double al = 1.0 / sqrt((double)bn_var[c] + eps);                                   \
                if (bn_weight != NULL) al *= (double)bn_weight[c];                                 \
                affine[c] = al;                                                                    \
                affine[astride + c] = (bn_bias != NULL ? (double)bn_bias[c] : 0.0) - (double)bn_mean[c] * al; \
            }                                                                                      \
        }                                                                                          \
        double *part = (double *)calloc((size_t)(k * width), sizeof(double));                      \
        if (part == NULL) return -1;                                                               \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                         \
        for (int64_t j = 0; j < k; ++j) {                                                          \
            double *pc = part + j * width, *pd = pc + C, *pc2 = pd + C, *pd2 = pc2 + C;            \
            int64_t o0 = outer * j / k, o1 = outer * (j + 1) / k;                                  \
            if (inner == 1 && C <= NEVE_TILE_MAX_C) {                                              \
                int64_t rows = NEVE_TILE_ELEMS / C > 0 ? NEVE_TILE_ELEMS / C : 1;                  \
                for (int64_t r0 = o0; r0 < o1; r0 += rows) {                                       \
                    int64_t r1 = r0 + rows < o1 ? r0 + rows : o1, c0 = 0;                          \
                    for (; c0 + NEVE_W <= C; c0 += NEVE_W)                                         \
                        TILE(a, b, C, r0, r1, c0, NEVE_W, s, affine, astride, pc, pd, pc2, pd2);   \
                    if (c0 < C)                                                                    \
                        TILE(a, b, C, r0, r1, c0, C - c0, s, affine, astride, pc, pd, pc2, pd2);   \
                    COPY(b + r0 * C, a + r0 * C, (r1 - r0) * C);                                   \
                }                                                                                  \
                NEVE_FENCE();                                                                      \
                continue;                                                                          \
            }                                                                                      \
            for (int64_t o = o0; o < o1; ++o) {                                                    \
                const T *ar = a + o * C * inner;                                                   \
                T *br = b + o * C * inner;                                                         \
                if (inner == 1) { /* wide rows (Linear, LayerNorm): vectorise across the neurons */  \
                    _Pragma("omp simd")                                                            \
                    for (int64_t c = 0; c < C; ++c) {                                              \
                        double x = (double)ar[c], y = (double)br[c], d = x - s[c] * y;             \
                        pc[c] += x * x;                                                            \
                        pd[c] += d * d;                                                            \
                        if (paired) {                                                              \
                            double u = affine[c] * x + affine[astride + c];                        \
                            double e = u - (affine[2 * astride + c] * y + affine[3 * astride + c]); \
                            pc2[c] += u * u;                                                       \
                            pd2[c] += e * e;                                                       \
                        }                                                                          \
                    }                                                                              \
                    COPY(br, ar, C);                                                               \
                    continue;                                                                      \
                }                                                                                  \
                for (int64_t c = 0; c < C; ++c) {                                                  \
                    const T *ap = ar + c * inner;                                                  \
                    T *bp = br + c * inner;                                                        \
                    double sc = s[c], sa = 0.0, sd = 0.0;                                          \
                    if (paired) {                                                                  \
                        double al = affine[c], be = affine[astride + c];                           \
                        double alp = affine[2 * astride + c], bep = affine[3 * astride + c];       \
                        double sa2 = 0.0, sd2 = 0.0;                                               \
                        _Pragma("omp simd reduction(+ : sa, sd, sa2, sd2)")                        \
                        for (int64_t i = 0; i < inner; ++i) {                                      \
                            double x = (double)ap[i], y = (double)bp[i], d = x - sc * y;           \
                            double u = al * x + be, e = u - (alp * y + bep);                       \
                            sa += x * x;                                                           \
                            sd += d * d;                                                           \
                            sa2 += u * u;                                                          \
                            sd2 += e * e;                                                          \
                        }                                                                          \
                        pc2[c] += sa2;                                                             \
                        pd2[c] += sd2;                                                             \
                    } else {                                                                       \
                        _Pragma("omp simd reduction(+ : sa, sd)")                                  \
                        for (int64_t i = 0; i < inner; ++i) {                                      \
                            double x = (double)ap[i], d = x - sc * (double)bp[i];                  \
                            sa += x * x;                                                           \
                            sd += d * d;                                                           \
                        }                                                                          \
                    }                                                                              \
                    COPY(bp, ap, inner);                                                           \
                    pc[c] += sa;                                                                   \
                    pd[c] += sd;                                                                   \
                }                                                                                  \
            }                                                                                      \
            NEVE_FENCE(); /* this thread's streaming stores are visible before the barrier */      \
        }                                                                                          \
        for (int64_t j = 0; j < k; ++j) {                                                          \
            const double *pc = part + j * width, *pd = pc + C, *pc2 = pd + C, *pd2 = pc2 + C;      \
            for (int64_t c = 0; c < C; ++c) {                                                      \
                cur[c] += pc[c];                                                                   \
                diff[c] += pd[c];                                                                  \
                if (paired) {                                                                      \
                    cur2[c] += pc2[c];                                                             \
                    diff2[c] += pd2[c];                                                            \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        free(part);                                                                                \
        return 0;                                                                                  \
    }

#if defined(__AVX__)
#define NEVE_FENCE() _mm_sfence()
#else
#define NEVE_FENCE() ((void)0)
#endif

NEVE_DEFINE_TILE(neve_tile_f32, float)
NEVE_DEFINE_TILE(neve_tile_f64, double)
NEVE_DEFINE(neve_compare_f32, neve_tile_f32, float, neve_copy_f32)
NEVE_DEFINE(neve_compare_f64, neve_tile_f64, double, neve_copy_f64)

/* Lets the loader check that the library it found matches the Python side. */
int neve_abi_version(void) { return 5; }
