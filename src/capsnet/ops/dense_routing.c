/* Routing by agreement of a dense capsule layer without gradients (inference), float32, CPU.
 *
 * Sabour et al. 2017, Procedure 1 over the votes of DenseCaps (capsnet.routing.dense):
 *     u_hat[j, i, :] = W_ij u_i (+ bias_j)                     the votes of Eq. 2
 *     c[:, i] = softmax_j(b[:, i])    (leaky: an orphan parent with logit 0 joins the softmax)  Eq. 3
 *     s_j = sum_i c[j, i] u_hat[j, i, :],  v_j = squash(s_j)   Eqs. 2 and 1
 *     b[j, i] += u_hat[j, i, :] . v_j                           the agreement
 * from b = 0, as capsnet.routing.dynamic._route does on the whole batch. Here a thread takes
 * GROUP images at a time: their votes are made in a per-thread buffer that stays in cache
 * (J I D floats per image, 720 KB for the MNIST model), each block of W_ij is read once per
 * group, and routing then reads that buffer only. The (B, J, I, D) votes never exist in memory;
 * the eager path writes them (90 MB at batch 128 for the MNIST model), copies them between
 * layouts and reads them five times. The buffer is laid out (J, D, I), so every inner loop runs
 * over the children i, contiguous, in vector lanes: the agreement, the softmax over parents
 * (with the exponential below) and the weighted sums.
 *
 * capsnet_dense_votes writes the votes in the (B, J, I, D) layout that training's routing keeps
 * for its backward pass, without the eager path's copy between layouts.
 *
 * Each image's result is computed by one thread in a fixed order, so it does not depend on the
 * number of threads. Arrays are C-contiguous float32: u (B, I, E); w (J, I' / LANES, E, D, LANES), the
 * W_ij rearranged (make_votes); bias (J, D) or NULL; out: poses (B, J, D), coupling and logits (B, J, I). Returns
 * 0, or 1 if a thread could not allocate its buffer.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Images per thread task: the weights are read once per group. */
#ifndef GROUP
#define GROUP 4
#endif
/* Children per row of sums in the votes' product: one AVX-512 register (two AVX2 ones). */
#define LANES 16

/* e^x for x <= 0 (the softmax's shifted logits), within 2 ulp, written so that a loop over it
 * vectorises: x = k ln 2 + r, |r| <= ln 2 / 2, e^r by Cephes' expf polynomial, 2^k through the
 * exponent bits. k is rounded by adding and subtracting 1.5 * 2^23 (floorf would not vectorise
 * without -fno-trapping-math) and clamped before the conversion to int, so a NaN or huge x stays
 * defined. Below -87.3 the result is 0 (expf gives subnormals there); a NaN x gives NaN. */
static inline float exp_nonpositive(float x) {
    const float lo = -87.33654f, round = 12582912.0f; /* 1.5 * 2^23 */
    float k = (x * 1.44269504f + round) - round;
    k = k > -127.0f ? k : -127.0f; /* also a NaN k */
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { uint32_t i; float f; } scale = {.i = (uint32_t)((int32_t)k + 127) << 23};
    return x < lo ? 0.0f : p * scale.f;
}

/* v = |s|^2 / (1 + |s|^2) s / |s| (Eq. 1) with eps added to |s|^2 under the root; 0 at s = 0.
 * In double: no overflow for any float32 s. */
static void squash_row(const float *s, float *v, int64_t dim, double eps) {
    double sq = 0.0;
    for (int64_t d = 0; d < dim; d++) sq += (double)s[d] * s[d];
    double r2 = sq + eps;
    double scale = r2 > 0.0 ? sq / ((1.0 + sq) * sqrt(r2)) : 0.0;
    for (int64_t d = 0; d < dim; d++) v[d] = (float)(scale * s[d]);
}

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

static inline float lane_sum(vec v) {
    float sum = 0.0f;
    for (int l = 0; l < LANES; l++) sum += v[l];
    return sum;
}

/* The votes of `count` images into their (J, D, I') buffers `x[g]`, I' = n_in rounded up to LANES.
 * w is (J, I' / LANES, E, D, LANES): one contiguous block of E D LANES weights per parent and
 * LANES children (8 KB for the MNIST model), zero past n_in; the votes past n_in are zero. The rows of sums are vectors over
 * LANES children, eight pose elements d at a time. */
static void make_votes(int64_t count, int64_t n_in, int64_t n_out, int64_t dim, int64_t in_dim, const float *u,
                       const float *w, const float *bias, float *ut, float **x) {
    const int64_t padded = (n_in + LANES - 1) / LANES * LANES, chunks = padded / LANES;
    for (int64_t g = 0; g < count; g++) { /* u (I, E) of image g as (E, I'), zero past n_in */
        for (int64_t e = 0; e < in_dim; e++) {
            float *row = ut + (g * in_dim + e) * padded;
            for (int64_t i = 0; i < n_in; i++) row[i] = u[(g * n_in + i) * in_dim + e];
            for (int64_t i = n_in; i < padded; i++) row[i] = 0.0f;
        }
    }
    for (int64_t j = 0; j < n_out; j++) {
        for (int64_t chunk = 0; chunk < chunks; chunk++) {
            const float *block = w + (j * chunks + chunk) * in_dim * dim * LANES;
            for (int64_t g = 0; g < count; g++) {
                const float *uc = ut + g * in_dim * padded + chunk * LANES;
                float *xc = x[g] + j * dim * padded + chunk * LANES;
                for (int64_t d0 = 0; d0 < dim; d0 += 8) {
                    const int64_t rows = dim - d0 < 8 ? dim - d0 : 8;
                    vec acc[8];
                    for (int64_t k = 0; k < rows; k++) acc[k] = (vec){0} + (bias ? bias[j * dim + d0 + k] : 0.0f);
                    for (int64_t e = 0; e < in_dim; e++) {
                        const vec ue = load(uc + e * padded);
                        const float *wr = block + (e * dim + d0) * LANES;
                        if (rows == 8) {
                            for (int k = 0; k < 8; k++) acc[k] += ue * load(wr + k * LANES);
                        } else {
                            for (int64_t k = 0; k < rows; k++) acc[k] += ue * load(wr + k * LANES);
                        }
                    }
                    for (int64_t k = 0; k < rows; k++) store(xc + (d0 + k) * padded, acc[k]);
                    if (chunk == chunks - 1) /* the padding children: zero votes (not the bias) */
                        for (int64_t k = 0; k < rows; k++)
                            memset(x[g] + (j * dim + d0 + k) * padded + n_in, 0, (padded - n_in) * sizeof(float));
                }
            }
        }
    }
}

/* Procedure 1 on one image's votes `x`, (J, D, I'). `b` and `c` are (J, I') scratch for the
 * logits and couplings (copied into the outputs' (J, I) rows at the end), `s` J D floats, `top`
 * and `total` I' floats. Children past n_in have zero votes, so they add nothing to s. */
static void route_image(int64_t n_in, int64_t padded, int64_t n_out, int64_t dim, const float *x, int iterations,
                        int leaky, double eps, float *b, float *c, float *s, float *top, float *total, float *poses,
                        float *coupling, float *logits) {
    const float uniform = 1.0f / (float)(leaky ? n_out + 1 : n_out);
    for (int64_t j = 0; j < n_out; j++) { /* b = 0: c = 1/J, Eq. 2 is a plain sum */
        for (int64_t d = 0; d < dim; d++) {
            const float *row = x + (j * dim + d) * padded;
            vec sum = {0};
            for (int64_t i = 0; i < padded; i += LANES) sum += load(row + i);
            s[j * dim + d] = lane_sum(sum) * uniform;
        }
        squash_row(s + j * dim, poses + j * dim, dim, eps);
        for (int64_t i = 0; i < padded; i++) {
            c[j * padded + i] = uniform;
            b[j * padded + i] = 0.0f;
        }
    }
    for (int it = 1; it < iterations; it++) {
        for (int64_t i = 0; i < padded; i++) top[i] = leaky ? 0.0f : -INFINITY;
        for (int64_t j = 0; j < n_out; j++) { /* b += u_hat . v */
            const float *xj = x + j * dim * padded, *v = poses + j * dim;
            float *bj = b + j * padded;
            for (int64_t i = 0; i < padded; i += LANES) {
                vec acc = load(bj + i);
                for (int64_t d = 0; d < dim; d++) acc += load(xj + d * padded + i) * v[d];
                store(bj + i, acc);
            }
#pragma omp simd
            for (int64_t i = 0; i < padded; i++) top[i] = bj[i] > top[i] || bj[i] != bj[i] ? bj[i] : top[i];
        }
        /* c = softmax over the parents (Eq. 3), shifted by the largest logit */
#pragma omp simd
        for (int64_t i = 0; i < padded; i++) total[i] = leaky ? exp_nonpositive(-top[i]) : 0.0f;
        for (int64_t j = 0; j < n_out; j++) {
            const float *restrict bj = b + j * padded;
            float *restrict cj = c + j * padded;
#pragma omp simd
            for (int64_t i = 0; i < padded; i++) {
                cj[i] = exp_nonpositive(bj[i] - top[i]);
                total[i] += cj[i];
            }
        }
#pragma omp simd
        for (int64_t i = 0; i < padded; i++) total[i] = 1.0f / total[i];
        for (int64_t j = 0; j < n_out; j++) { /* s_j = sum_i c_ij u_hat_j|i (Eq. 2), eight rows d at a time */
            float *restrict cj = c + j * padded;
#pragma omp simd
            for (int64_t i = 0; i < padded; i++) cj[i] *= total[i];
            const float *xj = x + j * dim * padded;
            for (int64_t d0 = 0; d0 < dim; d0 += 8) {
                const int64_t rows = dim - d0 < 8 ? dim - d0 : 8;
                vec acc[8] = {{0}};
                for (int64_t i = 0; i < padded; i += LANES) {
                    const vec ci = load(cj + i);
                    for (int64_t k = 0; k < rows; k++) acc[k] += ci * load(xj + (d0 + k) * padded + i);
                }
                for (int64_t k = 0; k < rows; k++) s[j * dim + d0 + k] = lane_sum(acc[k]);
            }
            squash_row(s + j * dim, poses + j * dim, dim, eps);
        }
    }
    for (int64_t j = 0; j < n_out; j++) {
        memcpy(coupling + j * n_in, c + j * padded, n_in * sizeof(float));
        memcpy(logits + j * n_in, b + j * padded, n_in * sizeof(float));
    }
}

int capsnet_dense_route(int64_t batch, int64_t n_in, int64_t n_out, int64_t dim, int64_t in_dim,
                        const float *u, const float *w, const float *bias, int iterations, int leaky,
                        double eps, float *poses, float *coupling, float *logits, int threads) {
    const int64_t padded = (n_in + LANES - 1) / LANES * LANES, votes = n_out * dim * padded;
    const int64_t groups = (batch + GROUP - 1) / GROUP;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* GROUP vote buffers, the group's inputs as (E, I'), b and c (J I' each), s (J D), top and total (I' each) */
        const int64_t size = GROUP * votes + GROUP * in_dim * padded + 2 * n_out * padded + n_out * dim + 2 * padded;
        float *buffer = malloc((size_t)size * sizeof(float));
        float *x[GROUP], *ut = NULL, *b = NULL, *c = NULL, *s = NULL, *top = NULL, *total = NULL;
        if (buffer != NULL) {
            for (int g = 0; g < GROUP; g++) x[g] = buffer + g * votes;
            ut = buffer + GROUP * votes, b = ut + GROUP * in_dim * padded, c = b + n_out * padded;
            s = c + n_out * padded, top = s + n_out * dim, total = top + padded;
        }
        /* every thread reaches the worksharing loop, with or without its buffer */
#pragma omp for schedule(static)
        for (int64_t group = 0; group < groups; group++) {
            if (buffer == NULL) {
                failed = 1;
                continue;
            }
            const int64_t first = group * GROUP, count = batch - first < GROUP ? batch - first : GROUP;
            make_votes(count, n_in, n_out, dim, in_dim, u + first * n_in * in_dim, w, bias, ut, x);
            for (int64_t g = 0; g < count; g++) {
                const int64_t image = first + g;
                route_image(n_in, padded, n_out, dim, x[g], iterations, leaky, eps, b, c, s, top, total,
                            poses + image * n_out * dim, coupling + image * n_out * n_in, logits + image * n_out * n_in);
            }
        }
        free(buffer);
    }
    return failed;
}

/* The votes alone, for training: out (B, J, I, D) = W_ij u_i (+ bias_j), w_t (J, I, E, D) the W_ij
 * transposed. One task per parent j and block of VOTE_BLOCK children, whose weights (16 KB for the
 * MNIST model) stay in cache while every image's votes for them are written, D contiguous floats at
 * a time. Every vote is one thread's fixed sum over e. */
#define VOTE_BLOCK 32

static inline __attribute__((always_inline)) void votes_block(
    int64_t batch, int64_t n_in, int64_t n_out, const int64_t dim, const int64_t in_dim, int64_t j, int64_t i0,
    int64_t i1, const float *u, const float *w_t, const float *bias, float *out) {
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t i = i0; i < i1; i++) {
            const float *w = w_t + (j * n_in + i) * in_dim * dim;
            const float *ui = u + (b * n_in + i) * in_dim;
            float *o = out + ((b * n_out + j) * n_in + i) * dim;
            if (dim % LANES == 0) {
                for (int64_t d = 0; d < dim; d += LANES) {
                    vec acc = (vec){0} + 0.0f;
                    if (bias) acc = load(bias + j * dim + d);
                    for (int64_t e = 0; e < in_dim; e++) acc += ui[e] * load(w + e * dim + d);
                    store(o + d, acc);
                }
            } else {
                for (int64_t d = 0; d < dim; d++) o[d] = bias ? bias[j * dim + d] : 0.0f;
                for (int64_t e = 0; e < in_dim; e++) {
                    const float ue = ui[e];
#pragma omp simd
                    for (int64_t d = 0; d < dim; d++) o[d] += ue * w[e * dim + d];
                }
            }
        }
    }
}

void capsnet_dense_votes(int64_t batch, int64_t n_in, int64_t n_out, int64_t dim, int64_t in_dim, const float *u,
                         const float *w_t, const float *bias, float *out, int threads) {
    const int64_t blocks = (n_in + VOTE_BLOCK - 1) / VOTE_BLOCK;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t j = 0; j < n_out; j++) {
        for (int64_t block = 0; block < blocks; block++) {
            const int64_t i0 = block * VOTE_BLOCK, i1 = i0 + VOTE_BLOCK < n_in ? i0 + VOTE_BLOCK : n_in;
            if (dim == 16 && in_dim == 8) /* the MNIST model's DigitCaps */
                votes_block(batch, n_in, n_out, 16, 8, j, i0, i1, u, w_t, bias, out);
            else
                votes_block(batch, n_in, n_out, dim, in_dim, j, i0, i1, u, w_t, bias, out);
        }
    }
}
