/* Fused reads of factored EM votes (capsnet.routing.em, FactoredVotes), float32, CPU.
 *
 * EM routing touches the votes only through three maps of the centred votes
 *     X[i, b, j d] = sum_p poses[g, k B + b, p] * transforms[g, p, j d] - centre[b, j d] + offsets[i, d]
 * (child i = g per_group + k, b the bmm row ("B L" in routing's names), j the parent type, d the
 * pose element; N = rows J parents):
 *     moments:   m1[n, d] = sum_i r[i, n] X[i, n, d],  m2[n, d] = sum_i r[i, n] X[i, n, d]^2,  m0[n] = sum_i r[i, n]
 *     quadratic: q[i, n] = u0[n] + sum_d X[i, n, d] (u1[n, d] + X[i, n, d] u2[n, d])
 *     gradient:  G[i, n, d] = sum_k L_k[i, n] R1_k[n, d] + 2 X[i, n, d] sum_k L_k[i, n] R2_k[n, d]
 * Each kernel multiplies a vote row out into a small buffer and uses it at once, so the votes
 * never exist in memory and each read is one pass. The eager version of every map is
 * capsnet.routing.em._VoteReader; the tests hold the two together.
 *
 * The rows are split between `threads` OpenMP threads. Built with -fopenmp, this library links
 * libgomp.so.1 by its soname, so inside PyTorch it shares the runtime (and the threads) that
 * PyTorch loaded: no second pool spins against PyTorch's. All arrays are C-contiguous float32.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    const float *poses;      /* (G, per_group rows, P) */
    const float *transforms; /* (G, P, J D) */
    const float *centre;     /* (rows, J D) */
    const float *offsets;    /* (I, D) or NULL */
    const float *matrices;   /* (G, J, 4, 4) the 4x4 transforms behind `transforms`, or NULL */
    const float *doubled;    /* (G, J, 4, 8): every row of `matrices` twice (with matrices) */
    int64_t slots;           /* I */
    int64_t rows;            /* B L */
    int64_t types;           /* J */
    int64_t dim;             /* D */
    int64_t inner;           /* P */
    int64_t per_group;       /* I / G */
} capsnet_votes;

/* Rows handled together: their accumulators and the transforms of one child stay in cache. */
#define ROW_BLOCK 16
/* Longest vote row J D a kernel buffers on the stack (64 parent types of 4x4 poses). */
#define MAX_ROW 1024

int capsnet_max_row(void) { return MAX_ROW; }

typedef float v4 __attribute__((vector_size(16)));

static inline v4 load4(const float *p) {
    v4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store4(float *p, v4 v) { memcpy(p, &v, sizeof v); }

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

/* A child's 4x4 vote for one parent, centred, two rows at a time in 8 lanes: rows (2h, 2h + 1) of
 * V = M W are sum_m (M[2h, m] x4 | M[2h + 1, m] x4) * (W[m] | W[m]): 4 multiply-adds per element
 * (the (16, J 16) block transforms spend 16, three quarters on zeros). */
typedef struct {
    v8 p[2][4]; /* p[h][m] = (M[2h, m] x4 | M[2h + 1, m] x4) */
    v8 off[2];
    const float *w, *c; /* doubled transforms of the child's group; the row's centre */
} child_row8;

static inline void child_row8_at(const capsnet_votes *v, int64_t i, int64_t b, child_row8 *cr) {
    const int64_t g = i / v->per_group, k = i % v->per_group;
    const float *p = v->poses + ((g * v->per_group + k) * v->rows + b) * 16;
    for (int h = 0; h < 2; ++h) {
        for (int m = 0; m < 4; ++m) {
            const float a = p[8 * h + m], z = p[8 * h + 4 + m];
            cr->p[h][m] = (v8){a, a, a, a, z, z, z, z};
        }
        cr->off[h] = v->offsets ? load8(v->offsets + i * 16 + 8 * h) : (v8){0, 0, 0, 0, 0, 0, 0, 0};
    }
    cr->w = v->doubled + g * v->types * 32;
    cr->c = v->centre + b * v->types * 16;
}

static inline void vote8(const child_row8 *cr, int64_t j, v8 x[2]) {
    const float *w = cr->w + 32 * j;
    const v8 w0 = load8(w), w1 = load8(w + 8), w2 = load8(w + 16), w3 = load8(w + 24);
    for (int h = 0; h < 2; ++h)
        x[h] = cr->off[h] - load8(cr->c + 16 * j + 8 * h) + cr->p[h][0] * w0 + cr->p[h][1] * w1 + cr->p[h][2] * w2 +
               cr->p[h][3] * w3;
}

/* x[0 : J 16] = X[i, b, :] for 4x4 poses. */
static inline void vote_row_4x4(const capsnet_votes *v, int64_t i, int64_t b, float *restrict x) {
    child_row8 cr;
    child_row8_at(v, i, b, &cr);
    for (int64_t j = 0; j < v->types; ++j) {
        v8 rows[2];
        vote8(&cr, j, rows);
        store8(x + 16 * j, rows[0]);
        store8(x + 16 * j + 8, rows[1]);
    }
}

/* x[0 : J D] = X[i, b, :] */
static inline void vote_row(const capsnet_votes *v, int64_t i, int64_t b, float *restrict x) {
    if (v->matrices) {
        vote_row_4x4(v, i, b, x);
        return;
    }
    const int64_t jd = v->types * v->dim, g = i / v->per_group, k = i % v->per_group;
    const float *restrict p = v->poses + ((g * v->per_group + k) * v->rows + b) * v->inner;
    const float *restrict w = v->transforms + g * v->inner * jd;
    const float *restrict c = v->centre + b * jd;
#pragma omp simd
    for (int64_t e = 0; e < jd; ++e) x[e] = -c[e];
    for (int64_t q = 0; q < v->inner; ++q) {
        const float s = p[q];
        const float *restrict wq = w + q * jd;
#pragma omp simd
        for (int64_t e = 0; e < jd; ++e) x[e] += s * wq[e];
    }
    if (v->offsets) {
        const float *restrict o = v->offsets + i * v->dim;
        for (int64_t j = 0; j < v->types; ++j) {
#pragma omp simd
            for (int64_t d = 0; d < v->dim; ++d) x[j * v->dim + d] += o[d];
        }
    }
}

/* m1, m2: (rows J, D); m0: (rows J); r: (I, rows J). */
void capsnet_moments(const capsnet_votes *v, const float *r, float *m1, float *m2, float *m0, int threads) {
    const int64_t jd = v->types * v->dim, n = v->rows * v->types;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b0 = 0; b0 < v->rows; b0 += ROW_BLOCK) {
        const int64_t b1 = b0 + ROW_BLOCK < v->rows ? b0 + ROW_BLOCK : v->rows;
        float x[MAX_ROW];
        memset(m1 + b0 * jd, 0, (size_t)((b1 - b0) * jd) * sizeof(float));
        memset(m2 + b0 * jd, 0, (size_t)((b1 - b0) * jd) * sizeof(float));
        memset(m0 + b0 * v->types, 0, (size_t)((b1 - b0) * v->types) * sizeof(float));
        for (int64_t i = 0; i < v->slots; ++i) {
            for (int64_t b = b0; b < b1; ++b) {
                const float *ri = r + i * n + b * v->types;
                float *mass = m0 + b * v->types;
                for (int64_t j = 0; j < v->types; ++j) mass[j] += ri[j];
                if (v->matrices) { /* votes in registers, no row buffer */
                    child_row8 cr;
                    child_row8_at(v, i, b, &cr);
                    float *a1 = m1 + b * jd, *a2 = m2 + b * jd;
                    for (int64_t j = 0; j < v->types; ++j) {
                        v8 xr[2];
                        vote8(&cr, j, xr);
                        for (int h = 0; h < 2; ++h) {
                            const v8 wx = ri[j] * xr[h];
                            float *s1 = a1 + 16 * j + 8 * h, *s2 = a2 + 16 * j + 8 * h;
                            store8(s1, load8(s1) + wx);
                            store8(s2, load8(s2) + wx * xr[h]);
                        }
                    }
                    continue;
                }
                vote_row(v, i, b, x);
                float *restrict a1 = m1 + b * jd, *restrict a2 = m2 + b * jd;
                for (int64_t j = 0; j < v->types; ++j) {
                    const float w = ri[j];
                    const float *restrict xj = x + j * v->dim;
                    float *restrict s1 = a1 + j * v->dim, *restrict s2 = a2 + j * v->dim;
#pragma omp simd
                    for (int64_t d = 0; d < v->dim; ++d) {
                        const float wx = w * xj[d];
                        s1[d] += wx;
                        s2[d] += wx * xj[d];
                    }
                }
            }
        }
    }
}

/* q: (I, rows J); u1, u2: (rows J, D); u0: (rows J). */
void capsnet_quadratic(const capsnet_votes *v, const float *u1, const float *u2, const float *u0, float *q,
                       int threads) {
    const int64_t jd = v->types * v->dim, n = v->rows * v->types;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b0 = 0; b0 < v->rows; b0 += ROW_BLOCK) {
        const int64_t b1 = b0 + ROW_BLOCK < v->rows ? b0 + ROW_BLOCK : v->rows;
        float x[MAX_ROW];
        for (int64_t i = 0; i < v->slots; ++i) {
            for (int64_t b = b0; b < b1; ++b) {
                const float *restrict c1 = u1 + b * jd, *restrict c2 = u2 + b * jd;
                float *qi = q + i * n + b * v->types;
                if (v->matrices) { /* votes in registers, no row buffer */
                    child_row8 cr;
                    child_row8_at(v, i, b, &cr);
                    for (int64_t j = 0; j < v->types; ++j) {
                        v8 xr[2];
                        vote8(&cr, j, xr);
                        v8 acc = xr[0] * (load8(c1 + 16 * j) + xr[0] * load8(c2 + 16 * j));
                        acc += xr[1] * (load8(c1 + 16 * j + 8) + xr[1] * load8(c2 + 16 * j + 8));
                        qi[j] = u0[b * v->types + j] +
                                (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
                    }
                    continue;
                }
                vote_row(v, i, b, x);
                for (int64_t j = 0; j < v->types; ++j) {
                    const int64_t o = j * v->dim;
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int64_t d = 0; d < v->dim; ++d) s += x[o + d] * (c1[o + d] + x[o + d] * c2[o + d]);
                    qi[j] = u0[b * v->types + j] + s;
                }
            }
        }
    }
}

/* out: (i1 - i0, rows J, D), the gradient of children [i0, i1).
 * left[k]: (I, rows J); right1[k], right2[k]: (rows J, D); k < terms. */
void capsnet_gradient(const capsnet_votes *v, int64_t terms, const float *const *left, const float *const *right1,
                      const float *const *right2, int64_t i0, int64_t i1, float *out, int threads) {
    const int64_t jd = v->types * v->dim, n = v->rows * v->types;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < v->rows; ++b) {
        float x[MAX_ROW], g2[MAX_ROW];
        for (int64_t i = i0; i < i1; ++i) {
            vote_row(v, i, b, x);
            float *restrict g1 = out + ((i - i0) * v->rows + b) * jd;
            for (int64_t j = 0; j < v->types; ++j) {
                const int64_t o = j * v->dim, col = i * n + b * v->types + j;
                const float w = left[0][col];
                const float *restrict a = right1[0] + b * jd + o, *restrict c = right2[0] + b * jd + o;
#pragma omp simd
                for (int64_t d = 0; d < v->dim; ++d) {
                    g1[o + d] = w * a[d];
                    g2[o + d] = w * c[d];
                }
                for (int64_t k = 1; k < terms; ++k) {
                    const float wk = left[k][col];
                    const float *restrict ak = right1[k] + b * jd + o, *restrict ck = right2[k] + b * jd + o;
#pragma omp simd
                    for (int64_t d = 0; d < v->dim; ++d) {
                        g1[o + d] += wk * ak[d];
                        g2[o + d] += wk * ck[d];
                    }
                }
            }
#pragma omp simd
            for (int64_t e = 0; e < jd; ++e) g1[e] += 2.0f * x[e] * g2[e];
        }
    }
}

/* The gradient for 4x4 poses, straight to the factors: no vote-sized tensor, the terms of a row
 * read once for all children. With G the gradient of X (as in capsnet_gradient), V = M W:
 *     grad_poses[g, k rows + b] = sum_j G[i, b, j] W_ij^T           (4x4 each)
 *     grad_matrices[g, j]      += sum over children k of group g, rows b: M_i(b)^T G[i, b, j]
 * grad_poses: (G, per_group rows, 16) or NULL; partial: (threads, G, J, 16) zeros, one slab per
 * thread (the caller sums them), or NULL; transposed: (G, J, 4, 4) the W^T. */
void capsnet_gradient_4x4(const capsnet_votes *v, int64_t terms, const float *const *left, const float *const *right1,
                          const float *const *right2, const float *transposed, float *grad_poses, float *partial,
                          int threads) {
    const int64_t jd = v->types * 16, n = v->rows * v->types, groups = v->slots / v->per_group;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
        float *mine = partial ? partial + (int64_t)tid * groups * jd : NULL;
        float g[MAX_ROW];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < v->rows; ++b) {
            for (int64_t i = 0; i < v->slots; ++i) {
                const int64_t grp = i / v->per_group, k = i % v->per_group;
                child_row8 cr;
                child_row8_at(v, i, b, &cr);
                /* g = sum_k L_k R1_k + 2 x sum_k L_k R2_k for this (child, row) */
                for (int64_t j = 0; j < v->types; ++j) {
                    const int64_t o = j * 16, col = i * n + b * v->types + j;
                    v8 xr[2], a[2] = {{0}}, c[2] = {{0}};
                    vote8(&cr, j, xr);
                    for (int64_t t = 0; t < terms; ++t) {
                        const float w = left[t][col];
                        const float *r1 = right1[t] + b * jd + o, *r2 = right2[t] + b * jd + o;
                        for (int h = 0; h < 2; ++h) {
                            a[h] += w * load8(r1 + 8 * h);
                            c[h] += w * load8(r2 + 8 * h);
                        }
                    }
                    for (int h = 0; h < 2; ++h) store8(g + o + 8 * h, a[h] + 2.0f * xr[h] * c[h]);
                }
                const float *p = v->poses + ((grp * v->per_group + k) * v->rows + b) * 16;
                if (grad_poses) {
                    v4 dp[4] = {{0}};
                    const float *wt = transposed + grp * jd;
                    for (int64_t j = 0; j < v->types; ++j) {
                        const v4 t0 = load4(wt + j * 16), t1 = load4(wt + j * 16 + 4), t2 = load4(wt + j * 16 + 8),
                                 t3 = load4(wt + j * 16 + 12);
                        for (int r = 0; r < 4; ++r) {
                            const float *gr = g + j * 16 + 4 * r;
                            dp[r] += gr[0] * t0 + gr[1] * t1 + gr[2] * t2 + gr[3] * t3;
                        }
                    }
                    float *out = grad_poses + ((grp * v->per_group + k) * v->rows + b) * 16;
                    for (int r = 0; r < 4; ++r) store4(out + 4 * r, dp[r]);
                }
                if (mine) {
                    float *dw = mine + grp * jd;
                    for (int64_t j = 0; j < v->types; ++j) {
                        const v4 g0 = load4(g + j * 16), g1 = load4(g + j * 16 + 4), g2 = load4(g + j * 16 + 8),
                                 g3 = load4(g + j * 16 + 12);
                        for (int m = 0; m < 4; ++m) {
                            float *d = dw + j * 16 + 4 * m;
                            store4(d, load4(d) + p[m] * g0 + p[4 + m] * g1 + p[8 + m] * g2 + p[12 + m] * g3);
                        }
                    }
                }
            }
        }
    }
}

/* The M-step on the moments and the E-step inputs of its Gaussians, one pass per parent
 * (capsnet.routing.em_steps.m_step and e_step; the logarithm and everything per parent only,
 * (B, L, J), stay in PyTorch). For parent n and pose element d, with m = mass[n] + eps:
 *     mu = (m1 - eps c) / m,   q = (m2 - 2 mu m1 + mu^2 mass) / m,   var = max(q, 0) + floor,
 *     u1 = 2 mu / (2 var),     u2 = -1 / (2 var),                    quad[n] = sum_d mu^2 / (2 var). */
void capsnet_m_step(int64_t n, int64_t dim, const float *restrict m1, const float *restrict m2, const float *restrict mass, const float *restrict centre,
                    float eps, float var_floor, float *restrict mu, float *restrict var, float *restrict u1, float *restrict u2, float *restrict quad, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < n; ++p) {
        const int64_t o = p * dim;
        const float ms = mass[p], den = ms + eps;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < dim; ++d) {
            const float a = m1[o + d];
            const float u = (a - eps * centre[o + d]) / den;
            const float q = (m2[o + d] - 2.0f * u * a + u * u * ms) / den;
            const float v = (q > 0.0f ? q : 0.0f) + var_floor;
            const float h = 0.5f / v;
            mu[o + d] = u;
            var[o + d] = v;
            u1[o + d] = 2.0f * u * h;
            u2[o + d] = -h;
            acc += u * u * h;
        }
        quad[p] = acc;
    }
}

/* The adjoint of an M-step and of the E-step inputs of its Gaussians, one pass per parent
 * (capsnet.routing._em_adjoint.m_step_backward after e_step_backward). Given the gradients of
 * the E-step inputs u1, u2 (n, dim) and const (n) (each NULL when none; times `gscale`), of mu
 * from routing's output (g_mu, or NULL), and of cost_n = (D beta_v + sum_d log(var) / 2) mass s
 * (g_cost, or NULL; bv the beta_v of each parent, sum_lv = sum_d log(var)), writes the gradients
 * of m1, m2 (n, dim) and mass (n). g_u1 and g_u2 come together: both NULL or neither. */
void capsnet_m_step_backward(int64_t n, int64_t dim, const float *restrict g_u1, const float *restrict g_u2, const float *restrict g_const,
                             float gscale, const float *restrict g_mu, const float *restrict g_cost, const float *restrict m1, const float *restrict m2,
                             const float *restrict mass, const float *restrict mu, const float *restrict var, const float *restrict bv, const float *restrict sum_lv,
                             float eps, float cost_scale, float *restrict g_m1, float *restrict g_m2, float *restrict g_mass, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < n; ++p) {
        const int64_t o = p * dim;
        const float ms = mass[p], den = ms + eps;
        const float gc = g_const ? g_const[p] : 0.0f;
        const float gcost = g_cost ? g_cost[p] : 0.0f;
        /* d const / d log var = -1/2 (times gscale); d cost / d log var = mass s / 2. */
        const float glv = -0.5f * gc * gscale + 0.5f * gcost * cost_scale * ms;
        float gmass = 0.0f, gden = 0.0f;
#pragma omp simd reduction(+ : gmass, gden)
        for (int64_t d = 0; d < dim; ++d) {
            const float u = mu[o + d], v = var[o + d], a = m1[o + d];
            const float h = 0.5f / v;
            float gmu = g_mu ? g_mu[o + d] : 0.0f, gvar = glv / v;
            if (g_u1) {
                const float gu1 = g_u1[o + d], gu2 = g_u2[o + d];
                gmu += 2.0f * h * (gu1 - gc * u) * gscale;
                gvar -= (2.0f * u * gu1 - gu2 - gc * u * u) * h / v * gscale;
            }
            const float q = (m2[o + d] - 2.0f * u * a + u * u * ms) / den;
            const float gq = (q >= 0.0f ? gvar : 0.0f) / den;
            gmu += gq * 2.0f * (u * ms - a);
            gmass += gq * u * u;
            gden -= gq * q;
            const float gmd = gmu / den;
            gden -= gmd * u;
            g_m1[o + d] = gmd - 2.0f * u * gq;
            g_m2[o + d] = gq;
        }
        g_mass[p] = gmass + gden + gcost * cost_scale * ((float)dim * bv[p] + 0.5f * sum_lv[p]);
    }
}

/* The vector of `L` floats that the *_lanes kernels below put over consecutive parent types,
 * with an unaligned load and an in-place add; defined once per lane count. */
#define LANES_VEC(L) lanes##L##_vec
#define LANES_LOAD(L) lanes##L##_load
#define LANES_ADD(L) lanes##L##_add
#define LANES_VOTE(L) lanes##L##_vote
#define LANE_HELPERS(L)                                                                                           \
    typedef float lanes##L##_vec __attribute__((vector_size(4 * L)));                                            \
    static inline lanes##L##_vec lanes##L##_load(const float *p) {                                                \
        lanes##L##_vec v;                                                                                         \
        memcpy(&v, p, sizeof v);                                                                                  \
        return v;                                                                                                 \
    }                                                                                                             \
    static inline void lanes##L##_add(float *p, lanes##L##_vec x) {                                               \
        lanes##L##_vec v;                                                                                         \
        memcpy(&v, p, sizeof v);                                                                                  \
        v += x;                                                                                                   \
        memcpy(p, &v, sizeof v);                                                                                  \
    }                                                                                                             \
    /* The centred votes of element (a, r) for LANES types from j: row a of the pose (pa), the        \
     * transposed transforms w ([m][r][type]) and the transposed centre c at e = (4 a + r) J + j. */ \
    static inline lanes##L##_vec lanes##L##_vote(const float *pa, const float *w, const float *c, int64_t types,  \
                                                  int64_t j, int r, int64_t e) {                                  \
        return pa[0] * lanes##L##_load(w + r * types + j) + pa[1] * lanes##L##_load(w + (4 + r) * types + j) +   \
               pa[2] * lanes##L##_load(w + (8 + r) * types + j) + pa[3] * lanes##L##_load(w + (12 + r) * types + j) - \
               lanes##L##_load(c + e);                                                                            \
    }
LANE_HELPERS(8)
#ifdef __AVX512F__
LANE_HELPERS(16)
#endif

/* The quadratic read of 4x4 votes with the vector lanes over parent types (`LANES` consecutive
 * types j) instead of over pose elements, so no (child, row, type) ends in a horizontal sum:
 *     X[a r][j..] = sum_m M_i(b)[a, m] W^T[m, r][j..] - c[b][a r][j..] + offsets[i, a r]
 *     q[i, b, j..] = u0[b, j..] + sum_(a r) X (u1t[b][a r][j..] + X u2t[b][a r][j..])
 * wt: (G, 4 m, 4 r, J), the 4x4 transforms transposed to [m][r][type]; ct, u1t, u2t: (rows, 16, J),
 * the centre and the E-step's inputs transposed to [element][type]; u0: (rows, J); q: (I, rows J).
 * J must be a multiple of LANES. Rows are blocked as in capsnet_quadratic, so a child's
 * transforms stay in L1 across the block. */
#define QUADRATIC_LANES(NAME, LANES)                                                                                \
    void NAME(const capsnet_votes *v, const float *wt, const float *ct, const float *u1t, const float *u2t,     \
              const float *u0, float *q, int threads) {                                                           \
        const int64_t types = v->types, n = v->rows * types;                                                      \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                         \
        for (int64_t b0 = 0; b0 < v->rows; b0 += ROW_BLOCK) {                                                    \
            const int64_t b1 = b0 + ROW_BLOCK < v->rows ? b0 + ROW_BLOCK : v->rows;                             \
            for (int64_t i = 0; i < v->slots; ++i) {                                                              \
                const int64_t g = i / v->per_group, k = i % v->per_group;                                         \
                const float *w = wt + g * 16 * types, *off = v->offsets ? v->offsets + i * 16 : NULL;             \
                for (int64_t b = b0; b < b1; ++b) {                                                               \
                    const float *p = v->poses + ((g * v->per_group + k) * v->rows + b) * 16;                     \
                    const float *c = ct + b * 16 * types, *c1 = u1t + b * 16 * types, *c2 = u2t + b * 16 * types; \
                    for (int64_t j = 0; j < types; j += LANES) {                                                  \
                        LANES_VEC(LANES) acc = LANES_LOAD(LANES)(u0 + b * types + j);                                         \
                        for (int a = 0; a < 4; ++a) {                                                             \
                            for (int r = 0; r < 4; ++r) {                                                         \
                                const int64_t e = (4 * a + r) * types + j;                                        \
                                LANES_VEC(LANES) x = LANES_VOTE(LANES)(p + 4 * a, w, c, types, j, r, e);                    \
                                if (off) x += off[4 * a + r];                                                     \
                                acc += x * (LANES_LOAD(LANES)(c1 + e) + x * LANES_LOAD(LANES)(c2 + e));                       \
                            }                                                                                     \
                        }                                                                                         \
                        memcpy(q + i * n + b * types + j, &acc, sizeof acc);                                      \
                    }                                                                                             \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
    }

QUADRATIC_LANES(capsnet_quadratic_lanes8, 8)
#ifdef __AVX512F__
QUADRATIC_LANES(capsnet_quadratic_lanes16, 16) /* one AVX-512 register; built only where the CPU has them */
#endif

/* The widest capsnet_quadratic_lanes<L> this build has (16 where the CPU has AVX-512). */
int capsnet_type_lanes(void) {
#ifdef __AVX512F__
    return 16;
#else
    return 8;
#endif
}

/* The moments read with the lanes over parent types (see capsnet_quadratic_lanes8): with X as there,
 *     m1t[b][a r][j..] = sum_i r[i, b, j..] X,   m2t[b][a r][j..] = sum_i r[i, b, j..] X^2,   m0[b, j..] = sum_i r[i, b, j..]
 * m1t, m2t: (rows, 16, J), transposed back by the caller; m0: (rows, J); r: (I, rows J). */
#define MOMENTS_LANES(NAME, LANES)                                                                                \
    void NAME(const capsnet_votes *v, const float *wt, const float *ct, const float *r, float *m1t, float *m2t,  \
              float *m0, int threads) {                                                                           \
        const int64_t types = v->types, n = v->rows * types;                                                      \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                         \
        for (int64_t b0 = 0; b0 < v->rows; b0 += ROW_BLOCK) {                                                    \
            const int64_t b1 = b0 + ROW_BLOCK < v->rows ? b0 + ROW_BLOCK : v->rows;                             \
            memset(m1t + b0 * 16 * types, 0, (size_t)((b1 - b0) * 16 * types) * sizeof(float));                  \
            memset(m2t + b0 * 16 * types, 0, (size_t)((b1 - b0) * 16 * types) * sizeof(float));                  \
            memset(m0 + b0 * types, 0, (size_t)((b1 - b0) * types) * sizeof(float));                             \
            for (int64_t i = 0; i < v->slots; ++i) {                                                              \
                const int64_t g = i / v->per_group, k = i % v->per_group;                                         \
                const float *w = wt + g * 16 * types, *off = v->offsets ? v->offsets + i * 16 : NULL;             \
                for (int64_t b = b0; b < b1; ++b) {                                                               \
                    const float *p = v->poses + ((g * v->per_group + k) * v->rows + b) * 16;                     \
                    const float *c = ct + b * 16 * types;                                                         \
                    float *s1 = m1t + b * 16 * types, *s2 = m2t + b * 16 * types;                                 \
                    for (int64_t j = 0; j < types; j += LANES) {                                                  \
                        const LANES_VEC(LANES) rv = LANES_LOAD(LANES)(r + i * n + b * types + j);                             \
                        LANES_ADD(LANES)(m0 + b * types + j, rv);                                                       \
                        for (int a = 0; a < 4; ++a) {                                                             \
                            for (int q = 0; q < 4; ++q) {                                                         \
                                const int64_t e = (4 * a + q) * types + j;                                        \
                                LANES_VEC(LANES) x = LANES_VOTE(LANES)(p + 4 * a, w, c, types, j, q, e);                    \
                                if (off) x += off[4 * a + q];                                                     \
                                const LANES_VEC(LANES) rx = rv * x;                                                     \
                                LANES_ADD(LANES)(s1 + e, rx);                                                           \
                                LANES_ADD(LANES)(s2 + e, rx * x);                                                       \
                            }                                                                                     \
                        }                                                                                         \
                    }                                                                                             \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
    }

MOMENTS_LANES(capsnet_moments_lanes8, 8)
#ifdef __AVX512F__
MOMENTS_LANES(capsnet_moments_lanes16, 16)
#endif

/* capsnet_gradient_4x4 with the lanes over parent types: G[a r][j..] = sum_t L_t[i, b, j..] R1t_t[b][a r][j..]
 * + 2 X[a r][j..] sum_t L_t[i, b, j..] R2t_t[b][a r][j..] (X as in capsnet_quadratic_lanes8), then
 *     grad_poses[i, b][a, m]   = sum_j sum_r G[a r][j] W_j[m, r]      (one horizontal sum per element and (i, b))
 *     partial[tid][g][m][r][j..] += sum_a M_i(b)[a, m] G[a r][j..]   (vertical; the caller sums the threads'
 *                                                                    slabs and transposes to (G, J, 4, 4))
 * r1t, r2t: (rows, 16, J) per term; left: (I, rows J) per term; at most MAX_TERMS terms. */
#define MAX_TERMS 8
#define GRADIENT_LANES(NAME, LANES)                                                                                \
    void NAME(const capsnet_votes *v, int64_t terms, const float *const *left, const float *const *r1t,          \
              const float *const *r2t, const float *wt, const float *ct, float *grad_poses, float *partial,      \
              int threads) {                                                                                      \
        const int64_t types = v->types, n = v->rows * types, groups = v->slots / v->per_group;                   \
        if (terms < 1 || terms > MAX_TERMS) return; /* the caller takes capsnet_gradient_4x4 for these */       \
        _Pragma("omp parallel num_threads(threads)") {                                                            \
            int tid = 0;                                                                                          \
            IF_OPENMP(tid = omp_get_thread_num();)                                                                \
            float *mine = partial ? partial + (int64_t)tid * groups * 16 * types : NULL;                          \
            _Pragma("omp for schedule(static)")                                                                   \
            for (int64_t b = 0; b < v->rows; ++b) {                                                               \
                for (int64_t i = 0; i < v->slots; ++i) {                                                          \
                    const int64_t g = i / v->per_group, k = i % v->per_group;                                     \
                    const float *p = v->poses + ((g * v->per_group + k) * v->rows + b) * 16;                     \
                    const float *w = wt + g * 16 * types, *off = v->offsets ? v->offsets + i * 16 : NULL;         \
                    const float *c = ct + b * 16 * types;                                                         \
                    float *dw = mine ? mine + g * 16 * types : NULL;                                              \
                    LANES_VEC(LANES) dp[16];                                                                            \
                    memset(dp, 0, sizeof dp);                                                                     \
                    for (int64_t j = 0; j < types; j += LANES) {                                                  \
                        LANES_VEC(LANES) lv[MAX_TERMS];                                                                 \
                        for (int64_t t = 0; t < terms; ++t) lv[t] = LANES_LOAD(LANES)(left[t] + i * n + b * types + j); \
                        for (int a = 0; a < 4; ++a) {                                                             \
                            const float p0 = p[4 * a], p1 = p[4 * a + 1], p2 = p[4 * a + 2], p3 = p[4 * a + 3];   \
                            for (int q = 0; q < 4; ++q) {                                                         \
                                const int64_t e = (4 * a + q) * types + j, eb = b * 16 * types + e;               \
                                const LANES_VEC(LANES) w0 = LANES_LOAD(LANES)(w + q * types + j),                             \
                                                 w1 = LANES_LOAD(LANES)(w + (4 + q) * types + j),                       \
                                                 w2 = LANES_LOAD(LANES)(w + (8 + q) * types + j),                       \
                                                 w3 = LANES_LOAD(LANES)(w + (12 + q) * types + j);                      \
                                LANES_VEC(LANES) x = p0 * w0 + p1 * w1 + p2 * w2 + p3 * w3 - LANES_LOAD(LANES)(c + e);        \
                                if (off) x += off[4 * a + q];                                                     \
                                LANES_VEC(LANES) s1 = lv[0] * LANES_LOAD(LANES)(r1t[0] + eb);                                 \
                                LANES_VEC(LANES) s2 = lv[0] * LANES_LOAD(LANES)(r2t[0] + eb);                                 \
                                for (int64_t t = 1; t < terms; ++t) {                                             \
                                    s1 += lv[t] * LANES_LOAD(LANES)(r1t[t] + eb);                                       \
                                    s2 += lv[t] * LANES_LOAD(LANES)(r2t[t] + eb);                                       \
                                }                                                                                 \
                                const LANES_VEC(LANES) gv = s1 + 2.0f * x * s2;                                         \
                                dp[4 * a] += gv * w0;                                                             \
                                dp[4 * a + 1] += gv * w1;                                                         \
                                dp[4 * a + 2] += gv * w2;                                                         \
                                dp[4 * a + 3] += gv * w3;                                                         \
                                if (dw) {                                                                         \
                                    LANES_ADD(LANES)(dw + q * types + j, p0 * gv);                                      \
                                    LANES_ADD(LANES)(dw + (4 + q) * types + j, p1 * gv);                                \
                                    LANES_ADD(LANES)(dw + (8 + q) * types + j, p2 * gv);                                \
                                    LANES_ADD(LANES)(dw + (12 + q) * types + j, p3 * gv);                               \
                                }                                                                                 \
                            }                                                                                     \
                        }                                                                                         \
                    }                                                                                             \
                    if (grad_poses) {                                                                             \
                        float *out = grad_poses + ((g * v->per_group + k) * v->rows + b) * 16;                    \
                        for (int e = 0; e < 16; ++e) {                                                            \
                            float s = 0.0f;                                                                       \
                            for (int l = 0; l < LANES; ++l) s += dp[e][l];                                        \
                            out[e] = s;                                                                           \
                        }                                                                                         \
                    }                                                                                             \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
    }

#ifdef _OPENMP
#define IF_OPENMP(x) x
#else
#define IF_OPENMP(x)
#endif

GRADIENT_LANES(capsnet_gradient_lanes8, 8)
#ifdef __AVX512F__
GRADIENT_LANES(capsnet_gradient_lanes16, 16)
#endif

int capsnet_max_terms(void) { return MAX_TERMS; }
