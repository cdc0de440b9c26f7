/* ConvFirst block kernels (Lavin 2024): y = x + project(act(expand(gconv(x)))), deploy form, fp32, NHWC.
 *
 *   gconv:   k x k grouped conv, C -> C channels, groups of gw channels, stride 1, zero padding k/2, bias
 *   expand:  1x1, C -> E, bias, then ReLU (or exact GELU)
 *   project: 1x1, E -> C, bias, plus the residual x
 *
 * NHWC, so one pixel's channels are contiguous: both 1x1 convs are then a matrix product of a block
 * of pixels (rows) with a weight matrix, and the grouped conv of one pixel reads C contiguous floats
 * per tap.
 *
 * Two paths with the same arithmetic (same micro-kernels, same summation order per output, so they
 * agree bit for bit):
 *   fused   (cf_block(fused=1)): the output is cut into tiles of `tile` consecutive pixels (row-major,
 *            a tile may straddle rows). Per tile a thread computes the grouped conv into t[tile][C],
 *            the expansion into h[tile][E], and the projection plus residual straight into y. t and h
 *            are per-thread buffers sized to stay in L1/L2; the full-size intermediates never exist.
 *   unfused (fused=0): layer by layer over the whole batch: T = gconv(x) (N*H*W*C floats written to
 *            memory), Hd = act(expand(T)) (N*H*W*E floats), y = project(Hd) + x. Isolates the effect
 *            of fusion: same FLOPs, more memory traffic.
 *
 * Portable C11 + OpenMP with GCC/Clang generic vectors (AVX2 FMAs with -march=native on x86, NEON on
 * ARM), like runtimes/blockffn/kernels.c.
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
#define INLINE static inline __attribute__((always_inline))

enum { ACT_RELU = 0, ACT_GELU = 1 };

#if defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));

#define MR 6        /* pixels per register tile: 6 x 2 vector accumulators + 2 weight vectors + 1 broadcast <= 16 regs */
#define NR (2 * VL) /* output channels per register tile */
#define ROWS_PER_ITEM (8 * MR) /* pixels per work item in the unfused layer-by-layer matrix products */

static inline vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline float act1(float v, int act) {
    return act == ACT_RELU ? (v > 0.0f ? v : 0.0f) : 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}

static inline vf actv(vf v, int act) {
    if (act == ACT_RELU) {
        const vf z = {0};
        return (vf)((vi)v & (v > z)); /* the comparison is all-ones where v > 0 */
    }
    for (int i = 0; i < VL; i++) v[i] = act1(v[i], act);
    return v;
}

/* ---- 1x1 conv as a matrix product over a block of pixels ------------------------------------------
 * out[m, n] = epilogue(bias[n] + sum_k a[m, k] * b[k, n]) for m < rows, n < N; a: rows x K (stride lda).
 * b is the weight transposed (K x N) and packed once in Python into column panels: N / NR panels of
 * K x NR floats, each contiguous, then the K x (N % NR) rest. A panel read with row stride N would map
 * its K lines onto a few L1 sets (N = 512: every 2 KiB) and be evicted before the next pixels reuse it.
 * Epilogue: activation (act >= 0) or + res[m, n] (res != NULL). Every output sums bias first, then k = 0..K-1 in order, whatever the
 * blocking: that is what makes the fused and unfused paths agree exactly. */
INLINE void tile_rows(int mr, int K, const float *a, size_t lda, const float *b, size_t ldb, const float *bias,
                      float *out, size_t ldo, const float *res, size_t ldr, int act) {
    vf acc[MR][2];
    const vf c0 = ld(bias), c1 = ld(bias + VL);
    for (int r = 0; r < mr; r++) acc[r][0] = c0, acc[r][1] = c1;
    for (int k = 0; k < K; k++) {
        const vf w0 = ld(b + (size_t)k * ldb), w1 = ld(b + (size_t)k * ldb + VL);
        for (int r = 0; r < mr; r++) {
            const float s = a[r * lda + k];
            acc[r][0] += s * w0;
            acc[r][1] += s * w1;
        }
    }
    for (int r = 0; r < mr; r++) {
        vf v0 = acc[r][0], v1 = acc[r][1];
        if (act >= 0) v0 = actv(v0, act), v1 = actv(v1, act);
        if (res) v0 += ld(res + r * ldr), v1 += ld(res + r * ldr + VL);
        st(out + r * ldo, v0);
        st(out + r * ldo + VL, v1);
    }
}

/* columns N % NR at the end: scalar, same order */
static void tail_cols(int rows, int n0, int N, int K, const float *a, size_t lda, const float *b, const float *bias,
                      float *out, size_t ldo, const float *res, size_t ldr, int act) {
    const float *bt = b + (size_t)n0 * K; /* the rest block, K x (N - n0) */
    for (int r = 0; r < rows; r++)
        for (int n = n0; n < N; n++) {
            float s = bias[n];
            for (int k = 0; k < K; k++) s += a[(size_t)r * lda + k] * bt[(size_t)k * (N - n0) + (n - n0)];
            if (act >= 0) s = act1(s, act);
            if (res) s += res[(size_t)r * ldr + n];
            out[(size_t)r * ldo + n] = s;
        }
}

/* The rows x N product, column panel by column panel: a K x NR panel of b (K*NR*4 bytes, 32 KiB for
 * K = 512 with AVX) is reused by every pixel of the block before the next panel is read. */
static void matmul(int rows, int N, int K, const float *a, const float *b, const float *bias, float *out,
                   size_t ldo, const float *res, int act) {
    const size_t lda = (size_t)K;
    int n0 = 0;
    for (; n0 + NR <= N; n0 += NR) {
        const float *bp = b + (size_t)n0 * K, *cp = bias + n0;
        int m = 0;
        for (; m + MR <= rows; m += MR)
            tile_rows(MR, K, a + m * lda, lda, bp, NR, cp, out + m * ldo + n0, ldo, res ? res + m * ldo + n0 : NULL, ldo, act);
        float *o = out + m * ldo + n0;
        const float *am = a + m * lda, *rm = res ? res + m * ldo + n0 : NULL;
        switch (rows - m) { /* constant row counts, so each inlined copy keeps its accumulators in registers */
        case 5: tile_rows(5, K, am, lda, bp, NR, cp, o, ldo, rm, ldo, act); break;
        case 4: tile_rows(4, K, am, lda, bp, NR, cp, o, ldo, rm, ldo, act); break;
        case 3: tile_rows(3, K, am, lda, bp, NR, cp, o, ldo, rm, ldo, act); break;
        case 2: tile_rows(2, K, am, lda, bp, NR, cp, o, ldo, rm, ldo, act); break;
        case 1: tile_rows(1, K, am, lda, bp, NR, cp, o, ldo, rm, ldo, act); break;
        default: break;
        }
    }
    if (n0 < N) tail_cols(rows, n0, N, K, a, lda, b, bias, out, ldo, res, ldo, act);
}

/* ---- grouped k x k conv of pixels [p0, p0 + np) of one image into t[np][C] -------------------------
 * w: [G][k*k][gw (in)][gw (out)], so a group's weights are contiguous and each input channel's gw
 * output weights are one or a few vectors. A group's gw outputs stay in registers over all its taps. */
INLINE void gconv_vec(int nv, const float *x, int H, int W, int C, int k, int gw, const float *w, const float *bias,
                      int p0, int np, float *t) {
    const int pad = k / 2, G = C / gw;
    for (int p = p0; p < p0 + np; p++) {
        const int h = p / W, wc = p % W;
        float *o = t + (size_t)(p - p0) * C;
        for (int g = 0; g < G; g++) {
            vf acc[4];
            for (int v = 0; v < nv; v++) acc[v] = ld(bias + g * gw + v * VL);
            const float *wg = w + (size_t)g * k * k * gw * gw;
            for (int ky = 0; ky < k; ky++) {
                const int iy = h + ky - pad;
                if (iy < 0 || iy >= H) continue;
                for (int kx = 0; kx < k; kx++) {
                    const int ix = wc + kx - pad;
                    if (ix < 0 || ix >= W) continue;
                    const float *xp = x + ((size_t)iy * W + ix) * C + g * gw;
                    const float *wt = wg + (size_t)(ky * k + kx) * gw * gw;
                    for (int i = 0; i < gw; i++)
                        for (int v = 0; v < nv; v++) acc[v] += xp[i] * ld(wt + i * gw + v * VL);
                }
            }
            for (int v = 0; v < nv; v++) st(o + g * gw + v * VL, acc[v]);
        }
    }
}

/* any group width: scalar, the same order (bias, then taps row-major, then input channels) */
static void gconv_scalar(const float *x, int H, int W, int C, int k, int gw, const float *w, const float *bias,
                         int p0, int np, float *t) {
    const int pad = k / 2;
    for (int p = p0; p < p0 + np; p++) {
        const int h = p / W, wc = p % W;
        for (int c = 0; c < C; c++) {
            const int g = c / gw, oc = c % gw;
            float s = bias[c];
            for (int ky = 0; ky < k; ky++) {
                const int iy = h + ky - pad;
                if (iy < 0 || iy >= H) continue;
                for (int kx = 0; kx < k; kx++) {
                    const int ix = wc + kx - pad;
                    if (ix < 0 || ix >= W) continue;
                    const float *xp = x + ((size_t)iy * W + ix) * C + g * gw;
                    const float *wt = w + ((size_t)g * k * k + ky * k + kx) * gw * gw + oc;
                    for (int i = 0; i < gw; i++) s += xp[i] * wt[i * gw];
                }
            }
            t[(size_t)(p - p0) * C + c] = s;
        }
    }
}

static void gconv(const float *x, int H, int W, int C, int k, int gw, const float *w, const float *bias, int p0, int np,
                  float *t) {
    switch (gw % VL ? 0 : gw / VL) {
    case 1: gconv_vec(1, x, H, W, C, k, gw, w, bias, p0, np, t); break;
    case 2: gconv_vec(2, x, H, W, C, k, gw, w, bias, p0, np, t); break;
    case 4: gconv_vec(4, x, H, W, C, k, gw, w, bias, p0, np, t); break;
    default: gconv_scalar(x, H, W, C, k, gw, w, bias, p0, np, t); break;
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

static float *aligned(size_t floats) { /* 64-byte aligned; aligned_alloc wants a multiple of the alignment */
    return aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64 + 64);
}

/* One ConvFirst block, y = x + project(act(expand(gconv(x)))), x and y (N, H, W, C) float32, y != x.
 * wc: [C/gw][k*k][gw][gw]; w1: (C, E) and w2: (E, C), packed in column panels (see matmul); biases bc (C), b1 (E), b2 (C).
 * fused = 1: tiles of `tile` pixels through all three layers; 0: layer by layer. Returns 0, or -1 when
 * out of memory. */
EK_API int cf_block(int fused, int N, int H, int W, int C, int E, int k, int gw, const float *x, const float *wc,
                    const float *bc, const float *w1, const float *b1, const float *w2, const float *b2, int act,
                    int tile, int threads, float *y) {
    const int HW = H * W;
    const int nt = resolve_threads(threads);
    if (N <= 0 || HW <= 0) return 0;
    if (fused) {
        if (tile <= 0) tile = MR;
        const int tiles = (HW + tile - 1) / tile, items = N * tiles;
        int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1 && items > 1)
        {
            float *t = aligned((size_t)tile * C), *h = aligned((size_t)tile * E);
            if (!t || !h) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp barrier
            if (!failed) {
#pragma omp for schedule(dynamic, 1) /* a thread that starts late (shared cores) takes fewer tiles */
                for (int it = 0; it < items; it++) {
                    const int n = it / tiles, p0 = (it % tiles) * tile, np = p0 + tile <= HW ? tile : HW - p0;
                    const size_t img = (size_t)n * HW * C, at = img + (size_t)p0 * C;
                    gconv(x + img, H, W, C, k, gw, wc, bc, p0, np, t);
                    matmul(np, E, C, t, w1, b1, h, (size_t)E, NULL, act);
                    matmul(np, C, E, h, w2, b2, y + at, (size_t)C, x + at, -1);
                }
            }
            free(t);
            free(h);
        }
        return failed ? -1 : 0;
    }
    /* unfused: whole-tensor intermediates, each layer finished (and written) before the next starts */
    const size_t P = (size_t)N * HW;
    float *T = aligned(P * C), *Hd = aligned(P * E);
    if (!T || !Hd) {
        free(T);
        free(Hd);
        return -1;
    }
    const int items = (int)((P + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int it = 0; it < items; it++) { /* rows of one image at a time: gconv needs the image's geometry */
            const size_t q0 = (size_t)it * ROWS_PER_ITEM, q1 = q0 + ROWS_PER_ITEM < P ? q0 + ROWS_PER_ITEM : P;
            for (size_t q = q0; q < q1;) {
                const int n = (int)(q / HW), p0 = (int)(q % HW);
                const int np = (int)((q1 - q) < (size_t)(HW - p0) ? (q1 - q) : (size_t)(HW - p0));
                gconv(x + (size_t)n * HW * C, H, W, C, k, gw, wc, bc, p0, np, T + q * C);
                q += (size_t)np;
            }
        }
#pragma omp for schedule(static)
        for (int it = 0; it < items; it++) {
            const size_t q0 = (size_t)it * ROWS_PER_ITEM;
            const int rows = (int)(q0 + ROWS_PER_ITEM < P ? ROWS_PER_ITEM : P - q0);
            matmul(rows, E, C, T + q0 * C, w1, b1, Hd + q0 * E, (size_t)E, NULL, act);
        }
#pragma omp for schedule(static)
        for (int it = 0; it < items; it++) {
            const size_t q0 = (size_t)it * ROWS_PER_ITEM;
            const int rows = (int)(q0 + ROWS_PER_ITEM < P ? ROWS_PER_ITEM : P - q0);
            matmul(rows, C, E, Hd + q0 * E, w2, b2, y + q0 * C, (size_t)C, x + q0 * C, -1);
        }
    }
    free(T);
    free(Hd);
    return 0;
}

EK_API int cf_max_threads(void) { return resolve_threads(0); }

EK_API int cf_register_tile(void) { return MR; }

/* columns per packed weight panel (NR) */
EK_API int cf_panel_width(void) { return NR; }
