/* BlockFFN sparse FFN kernels for end-side CPUs: router, and experts with fp32 or int8 weights.
 *
 * Portable C11 + OpenMP, no intrinsics: the register tiles use GCC/Clang generic vectors, which
 * compile to AVX2 FMAs on x86 (-march=native) and to NEON FMLAs on ARM (-mcpu=cortex-a55), so an
 * ARM build is a compiler flag, not a rewrite.
 *
 * Layout (row per neuron, so one expert's weights are contiguous):
 *   up, down: (E, B, d); up_bias: (E, B); out_bias: (d); int8 weights carry a float scale per row.
 *   h[t,e,j] = act(up[e,j,:] . x[t] + up_bias[e,j]);  y[t] = sum_e scores[t,e] * sum_j h[t,e,j] down[e,j,:] + out_bias
 *
 * A call handles a chunk of L tokens (L = 1 is decoding). It reads only the union of experts
 * active (score != 0) for some token, each active expert's rows once, and a token computes only
 * its own experts:
 *   phase 1 (up):   work items (active expert, tile of rows) shared dynamically between threads;
 *                   a block of 4 rows stays in L1 while every token active for the expert is dotted
 *                   with it; writes g[pair, j] = act(...) * score (* down row scale for int8).
 *   phase 2 (down): each thread owns a slice of the d output columns for all tokens: no reduction,
 *                   and every output element is summed in the same order whatever the thread count.
 * int8 weights (one float scale per row) are converted to float in the register tiles when one or
 * two tokens use them (decoding), else widened to float four rows at a time into a per-thread
 * buffer and run through the fp32 tiles, so the conversion is paid once per weight, not per token.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define EK_API __attribute__((visibility("default")))

enum { ACT_RELU = 0, ACT_SILU = 1, ACT_GELU = 2 };
enum { W_F32 = 0, W_I8 = 1 };

#define UP_TILE 32   /* rows per phase-1 work item */
#define COL_ALIGN 16 /* phase-2 column slices start on a 64-byte boundary */
#define BLOCK 512    /* columns per block when several tokens reuse a block of 4 rows */
#define SERIAL_WORK 65536 /* multiply-adds per phase below which a call runs on one thread */

/* ---- vectors: 8 floats (one AVX register) on x86 with AVX, 4 (one NEON / SSE register) elsewhere */
#if defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));

static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}
/* VL int8 weights as floats: gcc turns this initializer into one vpmovsxbd + vcvtdq2ps with AVX2
 * (but into scalar byte loads for NEON, where int8 rows are widened in blocks instead, see FUSED_I8) */
static inline vf ldq(const int8_t *p) {
#if VL == 8
    const vi i = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
#else
    const vi i = {p[0], p[1], p[2], p[3]};
#endif
    return __builtin_convertvector(i, vf);
}
#define FUSED_I8 (VL == 8)

static inline float activate(float v, int act) {
    switch (act) {
    case ACT_RELU: return v > 0.0f ? v : 0.0f;
    case ACT_SILU: return v / (1.0f + expf(-v));
    default: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); /* exact (erf) gelu */
    }
}

/* ---- micro-kernels, one set per weight type T with its vector load LD --------------------------
 * up:   dot products of 4 rows (stride ldw) with 1 or 2 tokens over n columns; R*K vector
 *       accumulators, so each weight vector is loaded (and converted) once for both tokens.
 * down: y[t, 0:n] += sum over 4 rows of g[row, t] * w[row, 0:n]. */
#define KERNELS(SFX, T, LD)                                                                           \
    static void up4x2_##SFX(const void *wv, size_t ldw, size_t n, const float *restrict xa,           \
                            const float *restrict xb, float *restrict s) {                           \
        const T *w = wv, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;                         \
        vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};            \
        size_t c = 0;                                                                                 \
        for (; c + VL <= n; c += VL) {                                                                \
            const vf u = ld(xa + c), v = ld(xb + c);                                                  \
            const vf r0 = LD(w + c), r1 = LD(w1 + c), r2 = LD(w2 + c), r3 = LD(w3 + c);               \
            a0 += r0 * u; a1 += r1 * u; a2 += r2 * u; a3 += r3 * u;                                   \
            b0 += r0 * v; b1 += r1 * v; b2 += r2 * v; b3 += r3 * v;                                   \
        }                                                                                             \
        float t[8] = {hsum(a0), hsum(b0), hsum(a1), hsum(b1), hsum(a2), hsum(b2), hsum(a3), hsum(b3)}; \
        for (; c < n; c++) {                                                                          \
            const float r[4] = {(float)w[c], (float)w1[c], (float)w2[c], (float)w3[c]};               \
            for (int i = 0; i < 4; i++) { t[2 * i] += r[i] * xa[c]; t[2 * i + 1] += r[i] * xb[c]; }   \
        }                                                                                             \
        memcpy(s, t, sizeof t);                                                                       \
    }                                                                                                 \
    /* one token: two column vectors a step, 8 independent FMA chains */                             \
    static void up4x1_##SFX(const void *wv, size_t ldw, size_t n, const float *restrict xa, float *restrict s) { \
        const T *w = wv, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;                         \
        vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};            \
        size_t c = 0;                                                                                 \
        for (; c + 2 * VL <= n; c += 2 * VL) {                                                        \
            const vf u = ld(xa + c), v = ld(xa + c + VL);                                             \
            a0 += LD(w + c) * u; a1 += LD(w1 + c) * u; a2 += LD(w2 + c) * u; a3 += LD(w3 + c) * u;    \
            b0 += LD(w + c + VL) * v; b1 += LD(w1 + c + VL) * v;                                      \
            b2 += LD(w2 + c + VL) * v; b3 += LD(w3 + c + VL) * v;                                     \
        }                                                                                             \
        for (; c + VL <= n; c += VL) {                                                                \
            const vf u = ld(xa + c);                                                                  \
            a0 += LD(w + c) * u; a1 += LD(w1 + c) * u; a2 += LD(w2 + c) * u; a3 += LD(w3 + c) * u;    \
        }                                                                                             \
        float t[4] = {hsum(a0 + b0), hsum(a1 + b1), hsum(a2 + b2), hsum(a3 + b3)};                    \
        for (; c < n; c++) {                                                                          \
            t[0] += (float)w[c] * xa[c]; t[1] += (float)w1[c] * xa[c];                                \
            t[2] += (float)w2[c] * xa[c]; t[3] += (float)w3[c] * xa[c];                               \
        }                                                                                             \
        memcpy(s, t, sizeof t);                                                                       \
    }                                                                                                 \
    static float up1x1_##SFX(const void *wv, size_t n, const float *restrict xa) {                    \
        const T *w = wv;                                                                              \
        vf a = {0};                                                                                   \
        size_t c = 0;                                                                                 \
        for (; c + VL <= n; c += VL) a += LD(w + c) * ld(xa + c);                                     \
        float t = hsum(a);                                                                            \
        for (; c < n; c++) t += (float)w[c] * xa[c];                                                  \
        return t;                                                                                     \
    }                                                                                                 \
    static void down4x2_##SFX(const void *wv, size_t ldw, size_t n, const float *g, float *restrict ya, \
                              float *restrict yb) {                                                  \
        const T *w = wv, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;                         \
        const float a0 = g[0], b0 = g[1], a1 = g[2], b1 = g[3], a2 = g[4], b2 = g[5], a3 = g[6], b3 = g[7]; \
        size_t c = 0;                                                                                 \
        for (; c + VL <= n; c += VL) {                                                                \
            const vf r0 = LD(w + c), r1 = LD(w1 + c), r2 = LD(w2 + c), r3 = LD(w3 + c);               \
            st(ya + c, ld(ya + c) + r0 * a0 + r1 * a1 + r2 * a2 + r3 * a3);                           \
            st(yb + c, ld(yb + c) + r0 * b0 + r1 * b1 + r2 * b2 + r3 * b3);                           \
        }                                                                                             \
        for (; c < n; c++) {                                                                          \
            const float r0 = (float)w[c], r1 = (float)w1[c], r2 = (float)w2[c], r3 = (float)w3[c];    \
            ya[c] += r0 * a0 + r1 * a1 + r2 * a2 + r3 * a3;                                           \
            yb[c] += r0 * b0 + r1 * b1 + r2 * b2 + r3 * b3;                                           \
        }                                                                                             \
    }                                                                                                 \
    static void down4x1_##SFX(const void *wv, size_t ldw, size_t n, const float *g, float *restrict ya) { \
        const T *w = wv, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;                         \
        const float a0 = g[0], a1 = g[1], a2 = g[2], a3 = g[3];                                       \
        size_t c = 0;                                                                                 \
        for (; c + VL <= n; c += VL)                                                                  \
            st(ya + c, ld(ya + c) + LD(w + c) * a0 + LD(w1 + c) * a1 + LD(w2 + c) * a2 + LD(w3 + c) * a3); \
        for (; c < n; c++)                                                                            \
            ya[c] += (float)w[c] * a0 + (float)w1[c] * a1 + (float)w2[c] * a2 + (float)w3[c] * a3;    \
    }                                                                                                 \
    static void down1x1_##SFX(const void *wv, size_t n, float a, float *restrict ya) {                \
        const T *w = wv;                                                                              \
        size_t c = 0;                                                                                 \
        for (; c + VL <= n; c += VL) st(ya + c, ld(ya + c) + LD(w + c) * a);                          \
        for (; c < n; c++) ya[c] += (float)w[c] * a;                                                  \
    }                                                                                                 \
    static const kernels_t K_##SFX = {up4x2_##SFX, up4x1_##SFX, up1x1_##SFX, down4x2_##SFX, down4x1_##SFX, down1x1_##SFX};

typedef struct {
    void (*up4x2)(const void *, size_t, size_t, const float *, const float *, float *);
    void (*up4x1)(const void *, size_t, size_t, const float *, float *);
    float (*up1x1)(const void *, size_t, const float *);
    void (*down4x2)(const void *, size_t, size_t, const float *, float *, float *);
    void (*down4x1)(const void *, size_t, size_t, const float *, float *);
    void (*down1x1)(const void *, size_t, float, float *);
} kernels_t;

KERNELS(f32, float, ld)
KERNELS(i8, int8_t, ldq)

static void widen(const int8_t *restrict q, float *restrict out, size_t n) {
    size_t c = 0;
#if FUSED_I8
    for (; c + VL <= n; c += VL) st(out + c, ldq(q + c));
#else
#pragma omp simd
    for (size_t i = 0; i < n; i++) out[i] = (float)q[i];
    c = n;
#endif
    for (; c < n; c++) out[c] = (float)q[c];
}

/* ---- the plan of one call: which experts are active, for which tokens ------------------------ */
typedef struct {
    int L, d, E, B, wtype, act;
    const float *x, *up_scale, *up_bias, *down_scale, *out_bias;
    const void *up, *down;
    float *y;
    size_t ldx;   /* stride of the tokens in x and y (padded for chunks, see ek_experts) */
    int n_act;    /* experts active for some token of the chunk */
    int *expert;  /* [n_act] their ids, ascending */
    int *off;     /* [n_act + 1] start of each expert's (token) pairs */
    size_t *tok;  /* [pairs] token of each pair */
    float *score; /* [pairs] its score */
    float *g;     /* [pairs * B] expert a's block at off[a]*B, (row j, pair k) at j*n_a + k */
} plan_t;

/* How an expert with n active tokens reads a matrix: fp32 rows in place; int8 rows in place with
 * the converting kernels when one or two tokens use each weight (decoding), else widened to fp32
 * (the conversion is then paid once for all the expert's tokens). */
typedef struct {
    const kernels_t *k;
    int widen;    /* int8 rows go through the fp32 buffer */
    size_t esize; /* bytes per weight as the kernels read it */
    size_t step;  /* columns per block */
} access_t;

static access_t access_for(const plan_t *p, int n, size_t cols) {
    access_t a = {&K_f32, 0, 4, cols};
    if (p->wtype == W_I8) {
        if (FUSED_I8 && n <= 2) a.k = &K_i8, a.esize = 1;
        else a.widen = 1;
    }
    /* blocks of columns keep 4 rows and the tokens' rows in L1 while several tokens use them */
    if (n > 2 && cols > BLOCK) a.step = BLOCK;
    return a;
}

/* Columns [c0, c0+cols) of `rows` rows from `row` on, for the kernels: in place (stride d), or int8
 * widened into buf (stride cols). The widening walks each row's columns in one run: short int8
 * pieces, interleaved, would defeat the hardware prefetchers. */
static const char *rows_at(const plan_t *p, const access_t *a, const void *base, size_t row, int rows, size_t c0,
                           size_t cols, float *buf, size_t *ldw) {
    const size_t d = (size_t)p->d;
    if (!a->widen) {
        *ldw = d;
        return (const char *)base + (row * d + c0) * a->esize;
    }
    for (int r = 0; r < rows; r++) widen((const int8_t *)base + (row + r) * d + c0, buf + r * cols, cols);
    *ldw = cols;
    return (const char *)buf;
}

/* Phase 1 for rows [j0, j1) of active expert a. */
static void up_tile(const plan_t *p, int a, int j0, int j1, float *buf) {
    const int e = p->expert[a], n = p->off[a + 1] - p->off[a], B = p->B;
    const size_t d = (size_t)p->d;
    const access_t acc = access_for(p, n, d);
    const kernels_t *K = acc.k;
    const size_t *tok = p->tok + p->off[a];
    const float *score = p->score + p->off[a];
    float *g = p->g + (size_t)p->off[a] * B;
    float s[8];
    for (int j = j0; j < j1;) {
        const int rows = j + 4 <= j1 ? 4 : 1;
        memset(g + (size_t)j * n, 0, (size_t)rows * n * sizeof(float));
        size_t ldw;
        const char *rw = rows_at(p, &acc, p->up, (size_t)e * B + j, rows, 0, d, buf, &ldw);
        for (size_t c0 = 0; c0 < d; c0 += acc.step) {
            const size_t len = c0 + acc.step < d ? acc.step : d - c0;
            const void *w = rw + c0 * acc.esize;
            if (rows == 1) {
                for (int k = 0; k < n; k++) g[(size_t)j * n + k] += K->up1x1(w, len, p->x + tok[k] * p->ldx + c0);
                continue;
            }
            int k = 0;
            for (; k + 1 < n; k += 2) {
                K->up4x2(w, ldw, len, p->x + tok[k] * p->ldx + c0, p->x + tok[k + 1] * p->ldx + c0, s);
                for (int r = 0; r < 4; r++) {
                    g[(size_t)(j + r) * n + k] += s[2 * r];
                    g[(size_t)(j + r) * n + k + 1] += s[2 * r + 1];
                }
            }
            if (k < n) {
                K->up4x1(w, ldw, len, p->x + tok[k] * p->ldx + c0, s);
                for (int r = 0; r < 4; r++) g[(size_t)(j + r) * n + k] += s[r];
            }
        }
        /* bias, activation, the token's score and (int8) the down row's scale, folded into g */
        for (int r = 0; r < rows; r++) {
            const size_t row = (size_t)e * B + j + r;
            const float us = p->up_scale ? p->up_scale[row] : 1.0f;
            const float ub = p->up_bias ? p->up_bias[row] : 0.0f;
            const float ds = p->down_scale ? p->down_scale[row] : 1.0f;
            float *gr = g + (size_t)(j + r) * n;
            for (int k = 0; k < n; k++) gr[k] = activate(gr[k] * us + ub, p->act) * score[k] * ds;
        }
        j += rows;
    }
}

/* Phase 2 for output columns [c0, c1) of every token. */
static void down_slice(const plan_t *p, int c0, int c1, float *buf) {
    const size_t cols = (size_t)(c1 - c0);
    const int B = p->B;
    for (int t = 0; t < p->L; t++) {
        float *yt = p->y + t * p->ldx + c0;
        if (p->out_bias) memcpy(yt, p->out_bias + c0, cols * sizeof(float));
        else memset(yt, 0, cols * sizeof(float));
    }
    for (int a = 0; a < p->n_act; a++) {
        const int e = p->expert[a], n = p->off[a + 1] - p->off[a];
        const access_t acc = access_for(p, n, cols);
        const kernels_t *K = acc.k;
        const size_t *tok = p->tok + p->off[a];
        const float *g = p->g + (size_t)p->off[a] * B;
        for (int j = 0; j < B;) {
            const int rows = j + 4 <= B ? 4 : 1;
            const float *gj = g + (size_t)j * n;
            size_t ldw;
            const char *rw = rows_at(p, &acc, p->down, (size_t)e * B + j, rows, (size_t)c0, cols, buf, &ldw);
            for (size_t b0 = 0; b0 < cols; b0 += acc.step) {
                const size_t len = b0 + acc.step < cols ? acc.step : cols - b0, col = (size_t)c0 + b0;
                const void *w = rw + b0 * acc.esize;
                if (rows == 1) {
                    for (int k = 0; k < n; k++) K->down1x1(w, len, gj[k], p->y + tok[k] * p->ldx + col);
                    continue;
                }
                int k = 0;
                for (; k + 1 < n; k += 2) {
                    const float gg[8] = {gj[k], gj[k + 1], gj[n + k], gj[n + k + 1],
                                         gj[2 * n + k], gj[2 * n + k + 1], gj[3 * n + k], gj[3 * n + k + 1]};
                    K->down4x2(w, ldw, len, gg, p->y + tok[k] * p->ldx + col, p->y + tok[k + 1] * p->ldx + col);
                }
                if (k < n) {
                    const float gg[4] = {gj[k], gj[n + k], gj[2 * n + k], gj[3 * n + k]};
                    K->down4x1(w, ldw, len, gg, p->y + tok[k] * p->ldx + col);
                }
            }
            j += rows;
        }
    }
}

static int resolve_threads(int threads) {
#ifdef _OPENMP
    return threads > 0 ? threads : omp_get_max_threads();
#else
    (void)threads;
    return 1;
#endif
}

/* y (L, d) = experts(x (L, d), scores (L, E)); up/down are float* (wtype 0) or int8_t* with
 * per-row scales (wtype 1). Returns 0, or -1 when out of memory. */
EK_API int ek_experts(int L, int d, int E, int B, const float *x, const float *scores, const void *up,
                      const float *up_scale, const float *up_bias, const void *down, const float *down_scale,
                      const float *out_bias, int wtype, int act, int threads, float *y) {
    if (L <= 0 || d <= 0) return 0;
    plan_t p = {L, d, E, B, wtype, act, x, up_scale, up_bias, down_scale, out_bias, up, down, y, (size_t)d,
                0, NULL, NULL, NULL, NULL, NULL};
    /* Rows d floats apart share L1 sets when 4*d is a multiple of 4 KiB (d = 2048: 8 KiB), so a
     * chunk's tokens are copied to a stride 1 KiB off that grid; the weights are not copied. */
    if (L > 1 && d >= 256) p.ldx += (size_t)((1280 - d % 1024) % 1024);
    size_t pairs = 0;
    for (size_t i = 0; i < (size_t)L * E; i++) pairs += scores[i] != 0.0f;
    /* waking a second thread costs microseconds: not worth it for a few small experts */
    const int nt = pairs * (size_t)B * (size_t)d < SERIAL_WORK ? 1 : resolve_threads(threads);
    /* one allocation, 64-byte aligned parts: expert, off | tok | score | g | padded x | padded y |
     * a buffer of 4 widened int8 rows per thread */
    const size_t padded = p.ldx != (size_t)d ? L * p.ldx * sizeof(float) : 0;
    const size_t part[7] = {((size_t)2 * E + 1) * sizeof(int), pairs * sizeof(size_t), pairs * sizeof(float),
                            pairs * B * sizeof(float), padded, padded,
                            wtype == W_I8 ? (size_t)nt * 4 * d * sizeof(float) : 0};
    size_t at[7], total = 0;
    for (int i = 0; i < 7; i++) { at[i] = total; total += (part[i] + 63) / 64 * 64; }
    char *mem = malloc(total + 64);
    if (!mem) return -1;
    char *base = mem + (64 - (uintptr_t)mem % 64) % 64;
    p.expert = (int *)(base + at[0]);
    p.off = p.expert + E;
    p.tok = (size_t *)(base + at[1]);
    p.score = (float *)(base + at[2]);
    p.g = (float *)(base + at[3]);
    if (p.ldx != (size_t)d) {
        float *xp = (float *)(base + at[4]);
        for (int t = 0; t < L; t++) memcpy(xp + t * p.ldx, x + (size_t)t * d, (size_t)d * sizeof(float));
        p.x = xp;
        p.y = (float *)(base + at[5]);
    }
    /* union compaction: for each expert, the tokens it is active for */
    size_t k = 0;
    p.off[0] = 0;
    for (int e = 0; e < E; e++) {
        const size_t start = k;
        for (int t = 0; t < L; t++) {
            const float s = scores[(size_t)t * E + e];
            if (s != 0.0f) { p.tok[k] = (size_t)t; p.score[k] = s; k++; }
        }
        if (k > start) { p.expert[p.n_act] = e; p.off[++p.n_act] = (int)k; }
    }
    const int tiles = (B + UP_TILE - 1) / UP_TILE, items = p.n_act * tiles;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), count = omp_get_num_threads();
#else
        const int tid = 0, count = 1;
#endif
        float *buf = (float *)(base + at[6]) + (size_t)tid * 4 * d;
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < items; it++) {
            const int a = it / tiles, j0 = (it % tiles) * UP_TILE;
            up_tile(&p, a, j0, j0 + UP_TILE < B ? j0 + UP_TILE : B, buf);
        }
        /* implicit barrier: every g is ready */
        int chunk = (d + count - 1) / count;
        chunk = (chunk + COL_ALIGN - 1) / COL_ALIGN * COL_ALIGN;
        const int c0 = tid * chunk, c1 = c0 + chunk < d ? c0 + chunk : d;
        if (c0 < c1) {
            down_slice(&p, c0, c1, buf);
            if (p.y != y)
                for (int t = 0; t < L; t++)
                    memcpy(y + (size_t)t * d + c0, p.y + t * p.ldx + c0, (size_t)(c1 - c0) * sizeof(float));
        }
    }
    free(mem);
    return 0;
}

/* scores (L, E) = rmsnorm_E(relu(x W^T + b)) * norm_w, W: (E, d). */
EK_API int ek_route(int L, int d, int E, const float *x, const float *w, const float *b, const float *norm_w,
                    float eps, int threads, float *scores) {
    if (L <= 0) return 0;
    const int blocks = (E + 3) / 4;
    const size_t dd = (size_t)d;
    const int nt = resolve_threads(threads);
    /* the router is small (E x d): threads only pay off for a large one */
#pragma omp parallel for num_threads(nt) if (nt > 1 && (size_t)L * E * d >= ((size_t)1 << 20)) schedule(static)
    for (int bi = 0; bi < blocks; bi++) {
        const int e = bi * 4;
        float s[8];
        if (e + 4 > E) {
            for (int t = 0; t < L; t++)
                for (int r = e; r < E; r++) scores[(size_t)t * E + r] = up1x1_f32(w + (size_t)r * dd, dd, x + (size_t)t * dd);
            continue;
        }
        int t = 0;
        for (; t + 1 < L; t += 2) {
            up4x2_f32(w + (size_t)e * dd, dd, dd, x + (size_t)t * dd, x + (size_t)(t + 1) * dd, s);
            for (int r = 0; r < 4; r++) {
                scores[(size_t)t * E + e + r] = s[2 * r];
                scores[(size_t)(t + 1) * E + e + r] = s[2 * r + 1];
            }
        }
        if (t < L) {
            up4x1_f32(w + (size_t)e * dd, dd, dd, x + (size_t)t * dd, s);
            for (int r = 0; r < 4; r++) scores[(size_t)t * E + e + r] = s[r];
        }
    }
    for (int t = 0; t < L; t++) {
        float *st = scores + (size_t)t * E;
        double ss = 0.0;
        for (int e = 0; e < E; e++) {
            float v = st[e] + (b ? b[e] : 0.0f);
            v = v > 0.0f ? v : 0.0f;
            st[e] = v;
            ss += (double)v * v;
        }
        const float inv = (float)(1.0 / sqrt(ss / E + (double)eps));
        for (int e = 0; e < E; e++) st[e] = st[e] * inv * (norm_w ? norm_w[e] : 1.0f);
    }
    return 0;
}

EK_API int ek_max_threads(void) { return resolve_threads(0); }

/* the widest vector extension this build was compiled for */
EK_API const char *ek_simd(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#elif defined(__AVX__)
    return "avx";
#elif defined(__SSE2__)
    return "sse2";
#elif defined(__ARM_FEATURE_SVE)
    return "sve";
#elif defined(__ARM_NEON)
    return "neon";
#else
    return "scalar";
#endif
}

EK_API int ek_openmp(void) {
#ifdef _OPENMP
    return _OPENMP;
#else
    return 0;
#endif
}
