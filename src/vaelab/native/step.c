/* vaelab's fused MLP step in C (vaelab/native/mlp.py, NativeMLPStep; the PyTorch form is
vaelab/fused.py, FusedMLPStep): the work between its matrix products, the products themselves
where the CPU has AVX-512 or AVX2, the seed's whole step in one call, and RMSprop.

Between its large matrix products the fused step runs about 45 small PyTorch operations, each a
trip through the dispatcher and through memory. These functions do the same arithmetic in a few
passes:

  bernoulli_head   the Bernoulli negative log-likelihood, its gradient and the bias' gradient
  activation_back  an activation's backward pass and the bias' gradient
  latent_forward   a narrow latent layer forward: the encoder's heads, std, z, the closed-form KL
                   and the decoder's first product (products of a few thousand multiply-adds)
  latent_backward  the same block backward, to the gradient at the encoder's last output
  reparameterize,  the latent layer alone, forward and backward, for wider latent layers (whose
  latent_back      products stay with PyTorch)
  transpose        a product's left operand made contiguous for oneDNN
  rmsprop          Keras 3's RMSprop in one pass
  sparse_rows,     the first layer's products with the input's zeros left out (MNIST's pixels
  sparse_columns,  are four-fifths zeros): the input's nonzeros by rows and by columns, and a
  sparse_product   product of such a sparse matrix with a dense one (also a weight gradient
                   behind a ReLU, over the gradient's nonzeros)
  gather_levels    the training loop's batch of grey-level images, gathered and made floats
  gemm             a dense product in register tiles (AVX-512, or AVX2 with FMA: `gemm_tiled`)
  mlp_step         the seed's form of model (one hidden ReLU layer each way), forward and
                   backward in one call: the functions above in mlp.py's order
  pool_use         on one thread under load, mlp_step's output-layer weight gradient on a
                   helper thread while the caller goes on with the rest of the step

Their loops have fixed orders, so a run's numbers do not depend on the thread count. Most are
single-threaded; `bernoulli_head`, `transpose`, `sparse_product` and `gemm` split their rows or
tiles (a column sum its columns) between the threads of PyTorch's own OpenMP runtime where
vaelab/native/__init__.py could build with it, each row, tile or column computed whole by one
thread, in the same order at any thread count (without OpenMP the pragmas are ignored). No
-ffast-math: a NaN goes through every function as it goes through PyTorch's operations, so the
trainer's NaN check still sees it. All arrays are contiguous float32 (gather_levels' source
bytes), row-major (B rows); gemm reads its left operand through its strides.
vaelab/native/__init__.py compiles this file with the machine's C compiler and loads it. */

#define _GNU_SOURCE /* sched_getcpu, pthread_setaffinity_np */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define SPARSE_AVX512 1
#endif

#define LANES 16 /* partial sums per row: vectorizable without reassociating a float sum */

/* exp(x) for x <= 0 (or NaN), without a libm call so that a loop of it vectorizes. Cephes'
   single-precision expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 polynomial,
   2^n by the exponent's bits. Relative error about 1e-7 (tested against float64). */
static inline float exp_nonpositive(float x) {
    const float lowest = -87.33654f; /* below: 0 (2^-126 is the smallest normal float) */
    float y = x < lowest ? lowest : x; /* (a NaN stays NaN: comparisons with it are false) */
    /* n = round(y / ln2) by adding and taking away 1.5 * 2^23 (floorf would not vectorize
       without -fno-trapping-math); a NaN's n is 0, and its NaN goes on through r */
    float n = ((y == y ? y : 0.0f) * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = y - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23; /* n in [-126, 0] */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    float e = p * two_n;
    return x < lowest ? 0.0f : e;
}

/* log(1 + e) for e in [0, 1], as 2 atanh(s) with s = e / (2 + e) in [0, 1/3]: the odd series
   2 (s + s^3/3 + ... + s^15/15), whose next term is below 3e-9 of the sum. Accurate relative
   to the result for tiny e as well (no 1 + e is formed). */
static inline float log1p_unit(float e) {
    float s = e / (2.0f + e);
    float s2 = s * s;
    float q = 1.0f / 15;
    q = q * s2 + 1.0f / 13;
    q = q * s2 + 1.0f / 11;
    q = q * s2 + 1.0f / 9;
    q = q * s2 + 1.0f / 7;
    q = q * s2 + 1.0f / 5;
    q = q * s2 + 1.0f / 3;
    q = q * s2 + 1.0f;
    return 2.0f * s * q;
}

/* The sum of n floats in a fixed order, in double: LANES partial sums, then those in order. */
static double row_sum(const float *v, int64_t n) {
    double lanes[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        for (int k = 0; k < LANES; k++) lanes[k] += (double)v[j + k];
    }
    double total = 0.0;
    for (int k = 0; k < LANES; k++) total += lanes[k];
    for (; j < n; j++) total += (double)v[j];
    return total;
}

/* The latent layer forward, rows of K: std = exp(log_var / 2), noise = eps * epsilon_std,
   z = mean + std * noise; returns the batch's KL(q || N(0, I)) summed,
   -0.5 sum (1 + log_var - mean^2 - std^2). Writes std, noise and z. */
double reparameterize(const float *mean, const float *log_var, const float *eps, int64_t B, int64_t K,
                      float epsilon_std, float *std, float *noise, float *z) {
    double kl = 0.0;
    for (int64_t b = 0; b < B; b++) {
        double row = 0.0;
        for (int64_t k = 0; k < K; k++) {
            int64_t i = b * K + k;
            float s = expf(0.5f * log_var[i]);
            float e = epsilon_std == 1.0f ? eps[i] : eps[i] * epsilon_std;
            std[i] = s;
            noise[i] = e;
            z[i] = mean[i] + s * e;
            row += (double)(1.0f + log_var[i] - mean[i] * mean[i] - s * s);
        }
        kl += -0.5 * row;
    }
    return kl;
}

/* One row of bernoulli_head: its dl row, and its loss summed (work: D floats of scratch). */
static double bernoulli_row(const float *l_row, const float *t_row, int64_t D, float bound, float scale,
                            float *dl_row, float *work) {
#pragma omp simd
    for (int64_t j = 0; j < D; j++) {
        float raw = l_row[j];
        float l = raw < -bound ? -bound : (raw > bound ? bound : raw);
        float e = exp_nonpositive(-fabsf(l)); /* exp(-|l|) in (0, 1] */
        float inv = 1.0f / (1.0f + e);
        float sig = l >= 0.0f ? inv : e * inv;
        float relu = l > 0.0f ? l : 0.0f;
        /* softplus(l) - t l, as (max(l, 0) - t l) + log(1 + exp(-|l|)): the first part is
           exactly 0 for t = 1 and l > 0, so no cancellation where the loss is small */
        work[j] = (relu - t_row[j] * l) + log1p_unit(e);
        float g = (sig - t_row[j]) * scale;
        dl_row[j] = (raw <= -bound || raw >= bound) ? 0.0f : g;
    }
    return row_sum(work, D);
}

/* db = the column sums of v (B rows of N), each summed over the rows in order (so at any thread
   count the same), the columns split between the threads in blocks of 64. */
static void column_sums(const float *v, int64_t B, int64_t N, float *db) {
#pragma omp parallel for schedule(static) if (B * N >= 16384)
    for (int64_t j0 = 0; j0 < N; j0 += 64) {
        int64_t j1 = j0 + 64 < N ? j0 + 64 : N;
        for (int64_t j = j0; j < j1; j++) db[j] = 0.0f;
        for (int64_t b = 0; b < B; b++) {
            const float *row = v + b * N;
#pragma omp simd
            for (int64_t j = j0; j < j1; j++) db[j] += row[j];
        }
    }
}

#define ROW_SCRATCH 4096 /* the widest row whose scratch a thread keeps on its stack */

/* The Bernoulli likelihood on logits (B rows of D), clamped to [-bound, bound] (INFINITY: no
   clamp), against targets in [0, 1]:
     returns  sum softplus(l) - t l  (the batch's negative log-likelihood, nats),
     dl = scale (sigmoid(l) - t), 0 where l <= -bound or l >= bound (hardtanh_backward's rule,
          as FusedMLPStep has it; a NaN passes),
     db = the column sums of dl.
   The rows are split between the threads; each row's loss is summed alone, and the rows' sums
   in order, so the result does not depend on the thread count. work: D floats of scratch (for
   rows wider than ROW_SCRATCH, which go one by one). */
double bernoulli_head(const float *logits, const float *target, int64_t B, int64_t D, float bound,
                      float scale, float *dl, float *db, float *work) {
    double total = 0.0;
    double *losses = D <= ROW_SCRATCH ? malloc((size_t)(B > 0 ? B : 1) * sizeof *losses) : NULL;
    if (losses != NULL) {
#pragma omp parallel for schedule(static) if (B * D >= 16384)
        for (int64_t b = 0; b < B; b++) {
            float scratch[ROW_SCRATCH];
            losses[b] = bernoulli_row(logits + b * D, target + b * D, D, bound, scale, dl + b * D, scratch);
        }
        for (int64_t b = 0; b < B; b++) total += losses[b];
        free(losses);
    } else {
        for (int64_t b = 0; b < B; b++)
            total += bernoulli_row(logits + b * D, target + b * D, D, bound, scale, dl + b * D, work);
    }
    column_sums(dl, B, D, db);
    return total;
}

/* dh <- dh * act'(a), written with the activation's output h = act(a), rows of N, in place; and
   db = the column sums of the result. act: 0 relu, 1 tanh, 2 elu (alpha 1). */
void activation_back(float *dh, const float *h, int64_t B, int64_t N, int act, float *db) {
    memset(db, 0, (size_t)N * sizeof *db);
    for (int64_t b = 0; b < B; b++) {
        float *d = dh + b * N;
        const float *o = h + b * N;
        if (act == 0) {
#pragma omp simd
            for (int64_t j = 0; j < N; j++) d[j] = o[j] <= 0.0f ? 0.0f : d[j]; /* threshold_backward */
        } else if (act == 1) {
#pragma omp simd
            for (int64_t j = 0; j < N; j++) d[j] = d[j] * (1.0f - o[j] * o[j]);
        } else {
#pragma omp simd
            for (int64_t j = 0; j < N; j++) d[j] = d[j] * (o[j] > 0.0f ? 1.0f : o[j] + 1.0f);
        }
        for (int64_t j = 0; j < N; j++) db[j] += d[j];
    }
}

/* The gradients of the latent means and log-variances, rows of K, from dz (the decoder's
   gradient at z) and the KL's closed form, kl_scale = scale * beta:
     dmean = dz + kl_scale mean
     dlog_var = dz noise std / 2 + (std^2 - 1) kl_scale / 2
   and the column sums of each (the heads' bias gradients). */
void latent_back(const float *dz, const float *mean, const float *std, const float *noise, int64_t B,
                 int64_t K, float kl_scale, float *dmean, float *dlog_var, float *dbm, float *dbv) {
    memset(dbm, 0, (size_t)K * sizeof *dbm);
    memset(dbv, 0, (size_t)K * sizeof *dbv);
    float half = kl_scale * 0.5f;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t k = 0; k < K; k++) {
            int64_t i = b * K + k;
            float s = std[i];
            float dm = dz[i] + mean[i] * kl_scale;
            float dv = dz[i] * noise[i] * s * 0.5f + (s * s - 1.0f) * half;
            dmean[i] = dm;
            dlog_var[i] = dv;
            dbm[k] += dm;
            dbv[k] += dv;
        }
    }
}

#if defined(__AVX__)
/* one 8 x 8 block in AVX registers: dst[c][r] = src[r][c], with rows ld_src and ld_dst floats apart
   (unpack pairs of rows, shuffle pairs of pairs, swap the 128-bit halves) */
static inline void transpose8(const float *src, int64_t ld_src, float *dst, int64_t ld_dst) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * ld_src);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
}
#endif

/* dst (N rows of B) = the transpose of src (B rows of N) (a oneDNN product wants its left operand
   contiguous; PyTorch's copy of a transposed view is several times slower). With AVX in 8 x 8
   blocks of registers (a seed batch's 100 x 784 in half the time of the 16 x 16-tiled loop that
   CPUs without AVX use), and the edges element by element. */
void transpose(const float *src, int64_t B, int64_t N, float *dst) {
#if defined(__AVX__)
    int64_t b8 = B / 8 * 8, n8 = N / 8 * 8;
#pragma omp parallel for schedule(static) if (B * N >= 16384)
    for (int64_t n0 = 0; n0 < n8; n0 += 8) /* (each thread writes its own rows of dst) */
        for (int64_t b = 0; b < b8; b += 8) transpose8(src + b * N + n0, N, dst + n0 * B + b, B);
    for (int64_t b = b8; b < B; b++) /* the rows below the blocks */
        for (int64_t n = 0; n < N; n++) dst[n * B + b] = src[b * N + n];
    for (int64_t n = n8; n < N; n++) /* the columns right of them */
        for (int64_t b = 0; b < b8; b++) dst[n * B + b] = src[b * N + n];
#else
    const int64_t T = 16;
    for (int64_t b0 = 0; b0 < B; b0 += T) {
        int64_t b1 = b0 + T < B ? b0 + T : B;
        for (int64_t n0 = 0; n0 < N; n0 += T) {
            int64_t n1 = n0 + T < N ? n0 + T : N;
            for (int64_t n = n0; n < n1; n++)
                for (int64_t b = b0; b < b1; b++) dst[n * B + b] = src[b * N + n];
        }
    }
#endif
}

/* Keras 3's RMSprop in one pass, as Keras writes it: v <- alpha v + (1 - alpha) g^2;
   p <- p - lr g / sqrt(v + eps). one_minus_alpha: 1 - alpha rounded from double, as Keras' is. */
void rmsprop(float *p, const float *g, float *v, int64_t n, float lr, float alpha, float one_minus_alpha,
             float eps) {
    float beta = one_minus_alpha;
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float vi = alpha * v[i] + beta * g[i] * g[i];
        v[i] = vi;
        p[i] = p[i] - lr * g[i] / sqrtf(vi + eps);
    }
}

/* --- the latent block: when the latent layer is narrow (K up to a few), its products are too
   small for a BLAS call to pay (about 5-35 us each, ten of them a step); here they are loops. --- */

/* a . b over n floats, in LANES partial sums (a fixed order, vectorizable) */
static inline float dot(const float *a, const float *b, int64_t n) {
    float lanes[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        for (int k = 0; k < LANES; k++) lanes[k] += a[j + k] * b[j + k];
    }
    float s = 0.0f;
    for (int k = 0; k < LANES; k++) s += lanes[k];
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

/* y[0:n] += alpha x[0:n] */
static inline void axpy(float *y, float alpha, const float *x, int64_t n) {
#pragma omp simd
    for (int64_t j = 0; j < n; j++) y[j] += alpha * x[j];
}

/* The encoder's heads, the latent layer and the decoder's first product, forward:
     mean = h Wm' + bm, log_var = h Wv' + bv   (h: B x H; Wm, Wv: K x H)
     std, noise, z and the KL as `reparameterize`
     a = z W3' + b3                           (W3: N x K), before the activation
   Returns the KL summed. work: K * N floats. */
double latent_forward(const float *h, int64_t B, int64_t H, int64_t K, const float *Wm, const float *bm,
                      const float *Wv, const float *bv, const float *eps, float epsilon_std,
                      const float *W3, const float *b3, int64_t N, float *mean, float *log_var,
                      float *std, float *noise, float *z, float *a, float *work) {
    for (int64_t b = 0; b < B; b++) {
        for (int64_t k = 0; k < K; k++) {
            mean[b * K + k] = dot(h + b * H, Wm + k * H, H) + bm[k];
            log_var[b * K + k] = dot(h + b * H, Wv + k * H, H) + bv[k];
        }
    }
    double kl = reparameterize(mean, log_var, eps, B, K, epsilon_std, std, noise, z);
    float *w3t = work; /* W3 transposed, K x N: rows to add */
    transpose(W3, N, K, w3t);
    for (int64_t b = 0; b < B; b++) {
        float *row = a + b * N;
        memcpy(row, b3, (size_t)N * sizeof *row);
        for (int64_t k = 0; k < K; k++) axpy(row, z[b * K + k], w3t + k * N, N);
    }
    return kl;
}

/* The same block backward, from dg, the gradient at g = act(a) (B x N; overwritten):
     da = dg act'(a) and db3 (`activation_back`), dW3 = da' z, dz = da W3,
     dmean, dlog_var and dbm, dbv (`latent_back`), dWm = dmean' h, dWv = dlog_var' h,
     dh = dmean Wm + dlog_var Wv   (B x H: the gradient at the encoder's last output)
   work: 2 K N + 3 B K floats. */
void latent_backward(float *dg, const float *g, int64_t B, int64_t N, int act, const float *z,
                     const float *W3, float *dW3, float *db3, const float *mean, const float *std,
                     const float *noise, int64_t K, float kl_scale, const float *h, int64_t H,
                     const float *Wm, const float *Wv, float *dWm, float *dbm, float *dWv, float *dbv,
                     float *dh, float *work) {
    float *w3t = work, *dw3t = work + K * N, *dz = work + 2 * K * N;
    float *dmean = dz + B * K, *dlog_var = dmean + B * K;
    activation_back(dg, g, B, N, act, db3);
    transpose(W3, N, K, w3t);
    memset(dw3t, 0, (size_t)(K * N) * sizeof *dw3t);
    for (int64_t b = 0; b < B; b++) {
        for (int64_t k = 0; k < K; k++) {
            axpy(dw3t + k * N, z[b * K + k], dg + b * N, N);
            dz[b * K + k] = dot(dg + b * N, w3t + k * N, N);
        }
    }
    transpose(dw3t, K, N, dW3);
    latent_back(dz, mean, std, noise, B, K, kl_scale, dmean, dlog_var, dbm, dbv);
    memset(dWm, 0, (size_t)(K * H) * sizeof *dWm);
    memset(dWv, 0, (size_t)(K * H) * sizeof *dWv);
    for (int64_t b = 0; b < B; b++) {
        float *row = dh + b * H;
        memset(row, 0, (size_t)H * sizeof *row);
        for (int64_t k = 0; k < K; k++) {
            axpy(dWm + k * H, dmean[b * K + k], h + b * H, H);
            axpy(dWv + k * H, dlog_var[b * K + k], h + b * H, H);
            axpy(row, dmean[b * K + k], Wm + k * H, H);
            axpy(row, dlog_var[b * K + k], Wv + k * H, H);
        }
    }
}

/* The training loop's batch: rows idx[0..B) of src (N rows of D grey levels, 0-255) as floats
   k / 255 into out (B x D), a gather and a conversion in one pass (IEEE's division, the bits of
   PyTorch's x.float().div_(255)). Returns 0, or -1 (nothing written) where an index is outside
   [0, N). */
int64_t gather_levels(const uint8_t *src, int64_t N, int64_t D, const int64_t *idx, int64_t B, float *out) {
    for (int64_t b = 0; b < B; b++)
        if (idx[b] < 0 || idx[b] >= N) return -1;
    for (int64_t b = 0; b < B; b++) {
        const uint8_t *s = src + idx[b] * D;
        float *o = out + b * D;
        if (b + 2 < B) /* the row after next on its way from memory (rows are far apart) */
            for (int64_t j = 0; j < D; j += 64) __builtin_prefetch(src + idx[b + 2] * D + j);
#pragma omp simd
        for (int64_t j = 0; j < D; j++) o[j] = (float)s[j] / 255.0f;
    }
    return 0;
}

/* --- the first layer on a sparse input: x (B x D) mostly zeros, as MNIST's pixels are (four in
   five). A dense product multiplies every zero; these take only the nonzeros:
     h = x W' + b      as sparse_product over x's rows (CSR) and W' (D x N, contiguous)
     dW' = x' da       as sparse_product over x's columns (CSC) and da (B x N)
   Each output row is its bias (or 0) plus the nonzeros' terms in increasing column (row) order,
   whatever the number of threads. --- */

/* x's nonzeros row by row: row_start (B + 1), cols and vals (nnz, and 16 spare: the vector loop
   stores whole vectors). Returns nnz, or -1 as soon as it would pass max_nnz (then the rest is
   unset). A NaN is a nonzero, so it reaches the product as in a dense one. */
int64_t sparse_rows(const float *x, int64_t B, int64_t D, int64_t max_nnz, int32_t *row_start, int32_t *cols,
                    float *vals) {
    int64_t n = 0;
    for (int64_t b = 0; b < B; b++) {
        const float *row = x + b * D;
        int64_t j = 0;
        row_start[b] = (int32_t)n;
        if (n > max_nnz) return -1;
#ifdef SPARSE_AVX512
        __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (; j + 16 <= D; j += 16) { /* compare 16 at a time, and pack the nonzeros */
            __m512 v = _mm512_loadu_ps(row + j);
            __mmask16 k = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
            __m512i c = _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)j));
            _mm512_storeu_ps(vals + n, _mm512_maskz_compress_ps(k, v));
            _mm512_storeu_si512((void *)(cols + n), _mm512_maskz_compress_epi32(k, c));
            n += __builtin_popcount((unsigned)k);
        }
#endif
        for (; j < D; j++) { /* branch-free: write, then advance only past a nonzero */
            cols[n] = (int32_t)j;
            vals[n] = row[j];
            n += row[j] != 0.0f;
        }
    }
    row_start[B] = (int32_t)n;
    return n > max_nnz ? -1 : n;
}

/* The same nonzeros column by column (from sparse_rows' output): col_start (D + 1), rows and
   vals, each column's rows in increasing order. */
void sparse_columns(const int32_t *row_start, const int32_t *cols, const float *vals, int64_t B, int64_t D,
                    int32_t *col_start, int32_t *rows, float *col_vals) {
    memset(col_start, 0, (size_t)(D + 1) * sizeof *col_start);
    int32_t nnz = row_start[B];
    for (int32_t k = 0; k < nnz; k++) col_start[cols[k] + 1]++;
    for (int64_t j = 0; j < D; j++) col_start[j + 1] += col_start[j];
    for (int64_t b = 0; b < B; b++) { /* col_start[j] walks through column j's places */
        for (int32_t k = row_start[b]; k < row_start[b + 1]; k++) {
            int32_t at = col_start[cols[k]]++;
            rows[at] = (int32_t)b;
            col_vals[at] = vals[k];
        }
    }
    memmove(col_start + 1, col_start, (size_t)D * sizeof *col_start); /* back to the starts */
    col_start[0] = 0;
}

/* the widest vector the CPU holds in one register: GCC keeps a wider type in memory, piece by
   piece (an AVX2 build's sparse_product on 16-float vectors took about 10 x as long) */
#if defined(__AVX512F__)
#define VEC_FLOATS 16
#elif defined(__AVX__)
#define VEC_FLOATS 8
#else
#define VEC_FLOATS 4
#endif
typedef float vecf __attribute__((vector_size(4 * VEC_FLOATS), aligned(4)));
/* loads and stores of vecf through its own (4-byte aligned) type: a memcpy into one was lowered
   through the stack in halves on AVX2, and each load then waited on those stores */
static inline vecf load_vecf(const float *p) { return *(const vecf *)p; }
static inline void store_vecf(float *p, vecf v) { *(vecf *)p = v; }
/* a * b + c as the vector loops' acc += a * b compiles (contracted to one fused multiply-add
   where the CPU has one): the scalar tail rounds each element as they do, so an element's value
   does not depend on which tile it fell in */
#ifdef __FMA__
#define MUL_ADD(a, b, c) fmaf((a), (b), (c))
#else
#define MUL_ADD(a, b, c) ((a) * (b) + (c))
#endif

/* out (R x N) = bias + S dense: S a sparse R x M matrix given by start (R + 1), index and vals
   (CSR), dense M x N contiguous; bias N floats or NULL (0). Each output row in tiles of 64
   columns (then 16, then 1) held in registers while its nonzeros' rows of `dense` stream past. */
void sparse_product(const int32_t *start, const int32_t *index, const float *vals, int64_t R,
                    const float *dense, int64_t N, const float *bias, float *out) {
    enum { WIDE = 64 / VEC_FLOATS, NARROW = 16 / VEC_FLOATS }; /* vectors in a tile of 64, of 16 */
#pragma omp parallel for schedule(static) if (R * N >= 16384)
    for (int64_t r = 0; r < R; r++) {
        float *o = out + r * N;
        int64_t o0 = 0;
        for (; o0 + 64 <= N; o0 += 64) {
            vecf acc[WIDE];
#pragma GCC unroll 16
            for (int t = 0; t < WIDE; t++) acc[t] = bias ? load_vecf(bias + o0 + VEC_FLOATS * t) : (vecf){0};
            for (int32_t k = start[r]; k < start[r + 1]; k++) {
                const float *w = dense + (int64_t)index[k] * N + o0;
#pragma GCC unroll 16
                for (int t = 0; t < WIDE; t++) acc[t] += vals[k] * load_vecf(w + VEC_FLOATS * t);
            }
#pragma GCC unroll 16
            for (int t = 0; t < WIDE; t++) store_vecf(o + o0 + VEC_FLOATS * t, acc[t]);
        }
        for (; o0 + 16 <= N; o0 += 16) { /* then 16 at a time */
            vecf acc[NARROW];
#pragma GCC unroll 4
            for (int t = 0; t < NARROW; t++) acc[t] = bias ? load_vecf(bias + o0 + VEC_FLOATS * t) : (vecf){0};
            for (int32_t k = start[r]; k < start[r + 1]; k++) {
                const float *w = dense + (int64_t)index[k] * N + o0;
#pragma GCC unroll 4
                for (int t = 0; t < NARROW; t++) acc[t] += vals[k] * load_vecf(w + VEC_FLOATS * t);
            }
#pragma GCC unroll 4
            for (int t = 0; t < NARROW; t++) store_vecf(o + o0 + VEC_FLOATS * t, acc[t]);
        }
        for (; o0 < N; o0++) { /* and the last N % 16 one by one, rounded as the vectors are */
            float acc = bias ? bias[o0] : 0.0f;
            for (int32_t k = start[r]; k < start[r + 1]; k++)
                acc = MUL_ADD(vals[k], dense[(int64_t)index[k] * N + o0], acc);
            o[o0] = acc;
        }
    }
}

/* --- dense products: out (M x N) = A B (+ bias), A read through its strides (am floats between
   rows, ak between columns: a transposed operand in place), B row-major with rows ldb apart.
   Tiles of GEMM_ROWS rows by GEMM_WIDTH columns (then 16, then 1) held in registers while k runs
   over all of K in order, so each element's sum has one fixed order whatever the thread count;
   the tiles are split between the threads. With AVX-512, 10 x 32 tiles keep 20 of the 32
   registers as sums (at the seed's shapes as fast as oneDNN's products on a Zen 4 EPYC, without
   a call through the dispatcher, an allocation or a copy out); with AVX2 and FMA, 6 x 16 tiles 12
   of the 16 (an AVX2 build on the same CPU: 0.90-1.37 x oneDNN's speed). `gemm_tiled()` says
   whether this build has either (else the fused step keeps PyTorch's products). --- */
#if defined(__AVX512F__)
#define GEMM_ROWS 10 /* 10 x 32: 20 of the 32 registers hold sums */
#define GEMM_NV 2
#elif defined(__AVX2__) && defined(__FMA__)
#define GEMM_ROWS 6 /* 6 x 16: 12 of the 16 registers */
#define GEMM_NV 1
#else
#define GEMM_ROWS 4
#define GEMM_NV 1
#endif
#define GEMM_WIDTH (16 * GEMM_NV)
#define GEMM_BLOCK 120 /* rows per pass over B: A's block stays in cache while B streams past */

int64_t gemm_tiled(void) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    return 1;
#else
    return 0;
#endif
}

/* one tile: `rows` (at most GEMM_ROWS) rows by 16 * nv columns, as GEMM_VECS vectors of the
   CPU's width (vecf) per 16 columns; a constant rows and nv (inlined) keep the sums in registers */
#define GEMM_VECS (16 / VEC_FLOATS)
static inline __attribute__((always_inline)) void gemm_tile(const float *A, int64_t am, int64_t ak,
                                                            const float *B, int64_t ldb, const float *bias,
                                                            float *out, int64_t ldo, int64_t K, int rows,
                                                            int nv) {
    vecf acc[GEMM_ROWS][2 * GEMM_VECS];
    int nvec = nv * GEMM_VECS;
    rows = rows < GEMM_ROWS ? rows : GEMM_ROWS; /* (so the compiler knows) */
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < nvec; v++) acc[r][v] = bias ? load_vecf(bias + VEC_FLOATS * v) : (vecf){0};
    for (int64_t k = 0; k < K; k++) {
        vecf b[2 * GEMM_VECS];
        for (int v = 0; v < nvec; v++) b[v] = load_vecf(B + k * ldb + VEC_FLOATS * v);
        const float *a = A + k * ak;
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < nvec; v++) acc[r][v] += a[r * am] * b[v];
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < nvec; v++) store_vecf(out + r * ldo + VEC_FLOATS * v, acc[r][v]);
}

/* columns [n0, N) of rows [m0, m1), fewer than 16 of them: one by one, rounded as the tiles are */
static void gemm_edge(const float *A, int64_t am, int64_t ak, const float *B, int64_t ldb, const float *bias,
                      float *out, int64_t ldo, int64_t K, int64_t m0, int64_t m1, int64_t n0, int64_t N) {
    for (int64_t m = m0; m < m1; m++)
        for (int64_t n = n0; n < N; n++) {
            float acc = bias ? bias[n] : 0.0f;
            for (int64_t k = 0; k < K; k++) acc = MUL_ADD(A[m * am + k * ak], B[k * ldb + n], acc);
            out[m * ldo + n] = acc;
        }
}

/* --- a helper thread for a busy machine (`pool_use`) ---
   When another process keeps a core busy, the training steps run on one thread (vaelab/threads.py):
   OpenMP's loops split their work in advance and end at a barrier, so a thread that loses its
   core for a time slice would hold every product up. Instead, while `pool_use` is on, mlp_step
   hands the output layer's weight gradient (a third of its dense work, needed by no later part of
   the step) to one helper thread and goes on with the rest of the backward pass meanwhile; at the
   end it takes whatever tiles the helper has not claimed. Only the product's inputs and output
   pass between the two cores, and a few counters, not every tile of every product. A tile the
   helper claimed but has not finished once the caller has waited 3 of its own chunks' time is
   taken over: the helper computes a chunk into its own scratch and copies it into place only after
   a compare-and-swap on the chunk's state shows that it was not taken over, so each tile is written
   once, by the same code whoever runs it (the numbers are those of one thread). Between jobs the
   helper spins POOL_SPIN_NS, then sleeps. --- */
#define POOL_TILES 4096
#define POOL_CHUNK 8 /* tiles claimed at a time (each claim is a cache line passed between cores) */
#define POOL_CHUNKS (POOL_TILES / POOL_CHUNK)
#define POOL_SPIN_NS 20000
#if defined(__x86_64__)
#define POOL_PAUSE() __builtin_ia32_pause()
#else
#define POOL_PAUSE() ((void)0)
#endif
enum { CHUNK_HELPER = 1, CHUNK_COPYING, CHUNK_DONE, CHUNK_TAKEN }; /* a chunk's state in its job */

/* a product's tiles: out (M x N) = A B (+ bias) in n tiles, `tiles` row tiles to a panel of
   GEMM_WIDTH columns, panel by panel (the columns past the last 16 are gemm_edge's) */
struct gemm_job {
    const float *A, *B, *bias;
    float *out;
    int64_t am, ak, ldb, K, M, N, tiles, n;
};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    _Atomic int started, sleeping, on, cpu, busy, delay_ns, pinned; /* pinned: the helper's CPU */
    _Atomic int64_t helped, taken; /* tiles the helper put in place; taken over from it */
    _Alignas(64) _Atomic uint64_t version; /* 2 seq while job seq is open; odd while it is written, or over */
    struct gemm_job job;
    _Alignas(64) _Atomic uint64_t next;   /* seq << 32 | the next tile */
    _Alignas(64) _Atomic uint64_t inside; /* the job the helper is working on (0: none) */
    _Alignas(64) _Atomic uint64_t state[POOL_CHUNKS]; /* seq << 8 | CHUNK_* (an older seq: unmarked) */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, .cpu = -1, .pinned = -1};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static struct gemm_job job_of(const float *A, int64_t am, int64_t ak, const float *B, int64_t ldb,
                              const float *bias, float *out, int64_t M, int64_t K, int64_t N) {
    int64_t wide = N / GEMM_WIDTH, n16 = N / 16 * 16, panels = wide + (n16 > GEMM_WIDTH * wide);
    int64_t tiles = (M + GEMM_ROWS - 1) / GEMM_ROWS;
    return (struct gemm_job){A, B, bias, out, am, ak, ldb, K, M, N, tiles, panels * tiles};
}

static float *tile_at(const struct gemm_job *j, int64_t t) {
    return j->out + t % j->tiles * GEMM_ROWS * j->N + t / j->tiles * GEMM_WIDTH;
}

/* tile t of the job into out, rows ldo apart (its place in the job's output, or a scratch tile) */
static inline __attribute__((always_inline)) void job_tile(const struct gemm_job *j, int64_t t, float *out,
                                                            int64_t ldo) {
    int64_t n0 = t / j->tiles * GEMM_WIDTH, m0 = t % j->tiles * GEMM_ROWS;
    int rows = j->M - m0 < GEMM_ROWS ? (int)(j->M - m0) : GEMM_ROWS, nv = n0 + GEMM_WIDTH <= j->N ? GEMM_NV : 1;
    const float *a = j->A + m0 * j->am, *B = j->B + n0, *bias = j->bias ? j->bias + n0 : 0;
    if (rows == GEMM_ROWS && nv == GEMM_NV) gemm_tile(a, j->am, j->ak, B, j->ldb, bias, out, ldo, j->K, GEMM_ROWS, GEMM_NV);
    else if (nv == 2) gemm_tile(a, j->am, j->ak, B, j->ldb, bias, out, ldo, j->K, rows, 2);
    else gemm_tile(a, j->am, j->ak, B, j->ldb, bias, out, ldo, j->K, rows, 1);
}

/* tile t of the job from a scratch tile (rows GEMM_WIDTH apart) into its place */
static void tile_put(const struct gemm_job *j, int64_t t, const float *scratch) {
    int64_t n0 = t / j->tiles * GEMM_WIDTH, m0 = t % j->tiles * GEMM_ROWS;
    int64_t rows = j->M - m0 < GEMM_ROWS ? j->M - m0 : GEMM_ROWS, cols = n0 + GEMM_WIDTH <= j->N ? GEMM_WIDTH : 16;
    float *out = tile_at(j, t);
    for (int64_t r = 0; r < rows; r++) memcpy(out + r * j->N, scratch + r * GEMM_WIDTH, (size_t)cols * sizeof *scratch);
}

/* the first tile of the next chunk of job seq, or -1 */
static int64_t pool_take(uint64_t seq, int64_t n) {
    uint64_t c = atomic_load(&pool.next);
    for (;;) {
        if ((c >> 32) != (seq & 0xffffffff) || (int64_t)(c & 0xffffffff) >= n) return -1;
        if (atomic_compare_exchange_weak(&pool.next, &c, c + POOL_CHUNK)) return (int64_t)(c & 0xffffffff);
    }
}

static int64_t chunk_end(int64_t t, int64_t n) { return t + POOL_CHUNK < n ? t + POOL_CHUNK : n; }

/* the helper's share of job seq: each chunk into scratch, then into place unless taken over */
static void pool_help(const struct gemm_job *j, uint64_t seq) {
    static float scratch[POOL_CHUNK][GEMM_ROWS * GEMM_WIDTH]; /* (the helper's alone) */
    for (int64_t t; (t = pool_take(seq, j->n)) >= 0;) {
        _Atomic uint64_t *state = &pool.state[t / POOL_CHUNK];
        uint64_t s = atomic_load(state), end = (uint64_t)chunk_end(t, j->n);
        if ((s >> 8) == seq || !atomic_compare_exchange_strong(state, &s, seq << 8 | CHUNK_HELPER)) continue;
        for (int64_t u = t; u < (int64_t)end; u++) job_tile(j, u, scratch[u - t], GEMM_WIDTH);
        for (int64_t until = pool.delay_ns ? now_ns() + pool.delay_ns : 0; now_ns() < until;) POOL_PAUSE(); /* (tests) */
        s = seq << 8 | CHUNK_HELPER;
        if (!atomic_compare_exchange_strong(state, &s, seq << 8 | CHUNK_COPYING)) continue;
        for (int64_t u = t; u < (int64_t)end; u++) tile_put(j, u, scratch[u - t]);
        atomic_store(state, seq << 8 | CHUNK_DONE);
        atomic_fetch_add_explicit(&pool.helped, (int64_t)end - t, memory_order_relaxed);
    }
}

static void pool_pin(void) { /* the helper onto pool.cpu, where one is asked for */
    int cpu = pool.cpu;
    if (cpu < 0 || cpu == pool.pinned) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0) pool.pinned = cpu;
}

static void *pool_helper(void *unused) {
    (void)unused;
    uint64_t seen = 0;
    for (int64_t idle = now_ns();;) {
        uint64_t v = atomic_load(&pool.version);
        if (v == seen || (v & 1)) { /* no open job: spin a while, then sleep until one opens */
            if (now_ns() - idle < POOL_SPIN_NS) {
                POOL_PAUSE();
                continue;
            }
            pthread_mutex_lock(&pool.lock);
            atomic_store(&pool.sleeping, 1);
            while (atomic_load(&pool.version) == v) pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_store(&pool.sleeping, 0);
            pthread_mutex_unlock(&pool.lock);
            idle = now_ns();
            continue;
        }
        seen = v;
        atomic_store(&pool.inside, v >> 1); /* then check that the job is still open (pool_join
                                                closes it, then waits while `inside` is its seq) */
        if (atomic_load(&pool.version) == v) {
            pool_pin();
            struct gemm_job job = pool.job;
            pool_help(&job, v >> 1);
        }
        atomic_store(&pool.inside, 0);
        idle = now_ns();
    }
    return NULL;
}

static void pool_forked(void) { /* in a forked child: no helper thread, and off until pool_use */
    pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
    pool.lock = lock;
    pool.wake = wake;
    atomic_store(&pool.started, 0);
    atomic_store(&pool.on, 0);
    atomic_store(&pool.pinned, -1);
    atomic_store(&pool.sleeping, 0);
    atomic_store(&pool.busy, 0);
    atomic_store(&pool.inside, 0);
}

static int pool_start(void) {
    static pthread_mutex_t starting = PTHREAD_MUTEX_INITIALIZER;
    static int forks;
    pthread_mutex_lock(&starting);
    if (!atomic_load(&pool.started)) {
        pthread_t t;
        pthread_attr_t attr;
        if (!forks) forks = pthread_atfork(NULL, NULL, pool_forked) == 0;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        atomic_store(&pool.started, forks && pthread_create(&t, &attr, pool_helper, NULL) == 0);
        pthread_attr_destroy(&attr);
    }
    pthread_mutex_unlock(&starting);
    return atomic_load(&pool.started);
}

/* job j opened to the helper (returns its seq) */
static uint64_t pool_open(const struct gemm_job *j) {
    uint64_t seq = (atomic_load(&pool.version) >> 1) + 1;
    atomic_store(&pool.version, 2 * seq - 1); /* (odd: being written) */
    pool.job = *j;
    atomic_store(&pool.next, (seq & 0xffffffff) << 32);
    atomic_store(&pool.version, 2 * seq);
    if (atomic_load(&pool.sleeping)) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_signal(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    return seq;
}

/* job seq's remaining tiles on this thread; returns with every tile in place and the helper out */
static void pool_join(const struct gemm_job *j, uint64_t seq) {
    uint64_t mine[POOL_CHUNKS / 64] = {0};
    int64_t start = now_ns(), done = 0;
    for (int64_t t; (t = pool_take(seq, j->n)) >= 0;) { /* (the chunks this thread claims are its own) */
        mine[t / POOL_CHUNK / 64] |= 1ull << (t / POOL_CHUNK % 64);
        for (int64_t u = t, end = chunk_end(t, j->n); u < end; u++, done++) job_tile(j, u, tile_at(j, u), j->N);
    }
    int64_t patience = done ? 3 * POOL_CHUNK * (now_ns() - start) / done : 20000; /* 3 chunks' time */
    patience = patience < 5000 ? 5000 : patience;
    for (int64_t c = 0; c * POOL_CHUNK < j->n; c++) { /* the helper's chunks: done, or taken over */
        if (mine[c / 64] >> (c % 64) & 1) continue;
        for (int64_t since = 0;;) {
            uint64_t s = atomic_load(&pool.state[c]), st = (s >> 8) == seq ? s & 0xff : 0;
            if (st == CHUNK_DONE || st == CHUNK_TAKEN) break;
            if (st != CHUNK_COPYING && since && now_ns() - since > patience &&
                atomic_compare_exchange_strong(&pool.state[c], &s, seq << 8 | CHUNK_TAKEN)) {
                int64_t end = chunk_end(c * POOL_CHUNK, j->n);
                for (int64_t u = c * POOL_CHUNK; u < end; u++) job_tile(j, u, tile_at(j, u), j->N);
                atomic_fetch_add(&pool.taken, end - c * POOL_CHUNK);
                break;
            }
            if (!since) since = now_ns();
            POOL_PAUSE();
        }
    }
    atomic_store(&pool.version, 2 * seq + 1); /* closed: then wait for the helper to leave it */
    while (atomic_load(&pool.inside) == seq) POOL_PAUSE();
}

/* While on, mlp_step shares its output layer's weight gradient with the helper thread (started on
   first use), pinned to `cpu` where cpu >= 0. Returns whether the helper runs. */
int64_t pool_use(int64_t on, int64_t cpu) {
    atomic_store(&pool.cpu, (int)cpu);
    atomic_store(&pool.on, on && pool_start());
    return atomic_load(&pool.on);
}

/* tiles the helper has put in place (which 0), or that were taken over from it (1), since loading */
int64_t pool_counts(int64_t which) { return which ? atomic_load(&pool.taken) : atomic_load(&pool.helped); }
void pool_delay(int64_t ns) { atomic_store(&pool.delay_ns, (int)ns); } /* (tests: takeovers) */
int64_t current_cpu(void) { return sched_getcpu(); }

void gemm(const float *A, int64_t am, int64_t ak, const float *B, int64_t ldb, const float *bias, float *out,
          int64_t M, int64_t K, int64_t N) {
    int64_t n16 = N / 16 * 16;
    for (int64_t b0 = 0; b0 < M; b0 += GEMM_BLOCK) {
        int64_t b1 = b0 + GEMM_BLOCK < M ? b0 + GEMM_BLOCK : M;
        struct gemm_job job = job_of(A + b0 * am, am, ak, B, ldb, bias, out + b0 * N, b1 - b0, K, N);
#pragma omp parallel for schedule(static) if (M * N * K >= 65536)
        for (int64_t t = 0; t < job.n; t++) job_tile(&job, t, tile_at(&job, t), N); /* (panel by panel) */
        if (n16 < N) gemm_edge(A, am, ak, B, ldb, bias, out, N, K, b0, b1, n16, N);
    }
}

/* --- the seed's whole step in one call: an MLP of one hidden layer each way with ReLUs and a
   narrow latent layer (784-256-2-256-784), forward and backward, the same arithmetic as
   NativeMLPStep's calls one by one (vaelab/native/mlp.py), without a trip through Python between
   them (about a tenth of a step). All of its scratch space is one workspace from the caller. --- */

enum { /* mlp_step's pointers, in this order */
    P_X, P_TARGET, P_EPS, P_W1, P_B1, P_WM, P_BM, P_WV, P_BV, P_W3, P_B3, P_W4, P_B4,
    P_DW1, P_DB1, P_DWM, P_DBM, P_DWV, P_DBV, P_DW3, P_DB3, P_DW4, P_DB4, P_WORK, P_COUNT
};

struct mlp_work { /* the workspace's parts (B rows, D inputs, H and G hidden units, K latents) */
    int32_t *rows_at, *cols, *unit_at, *unit_cols, *col_at, *by_col; /* nonzero lists */
    float *vals, *unit_vals, *col_vals, *w1t, *h, *latents, *a, *lwork, *w4t, *logits, *dl, *bwork,
        *dg, *dh, *dh_t, *dw1t;
};

/* the parts' places from `base` (or, with base 0, just the size), each 64-byte aligned */
static int64_t mlp_layout(char *base, int64_t B, int64_t D, int64_t H, int64_t K, int64_t G,
                          struct mlp_work *w) {
    int64_t at = 0, i4 = sizeof(int32_t), f4 = sizeof(float);
#define TAKE(field, count, size)                                                                       \
    do {                                                                                               \
        w->field = (void *)((uintptr_t)base + (uintptr_t)at); /* (base 0: sizes only) */              \
        at += ((count) * (size) + 63) / 64 * 64;                                                       \
    } while (0)
    TAKE(rows_at, B + 1, i4); TAKE(cols, B * D + 16, i4); TAKE(vals, B * D + 16, f4);
    TAKE(unit_at, H + 1, i4); TAKE(unit_cols, H * B + 16, i4); TAKE(unit_vals, H * B + 16, f4);
    TAKE(col_at, D + 1, i4); TAKE(by_col, B * D + 16, i4); TAKE(col_vals, B * D + 16, f4);
    TAKE(w1t, D * H, f4); TAKE(h, B * H, f4); TAKE(latents, 5 * B * K, f4); TAKE(a, B * G, f4);
    TAKE(lwork, 2 * K * G + 3 * B * K, f4); TAKE(w4t, G * D, f4); TAKE(logits, B * D, f4);
    TAKE(dl, B * D, f4); TAKE(bwork, D, f4); TAKE(dg, B * G, f4); TAKE(dh, B * H, f4);
    TAKE(dh_t, H * B, f4); TAKE(dw1t, D * H, f4);
#undef TAKE
    return at;
}

/* the bytes of mlp_step's workspace */
int64_t mlp_step_bytes(int64_t B, int64_t D, int64_t H, int64_t K, int64_t G) {
    struct mlp_work w;
    return mlp_layout(0, B, D, H, K, G, &w);
}

/* m's nonzeros (R x C) by rows where at most `density` of it is nonzero, else -1 (as mlp.py's
   _nonzeros: no list where the counts would pass 32 bits) */
static int64_t nonzeros(const float *m, int64_t R, int64_t C, double density, int32_t *at, int32_t *cols,
                        float *vals) {
    if (R * C + 16 >= ((int64_t)1 << 31)) return -1;
    return sparse_rows(m, R, C, (int64_t)(density * (double)R * (double)C), at, cols, vals);
}

static void relu_rows(float *v, int64_t n) { /* in place, a NaN kept (as clamp_min_(0)) */
#pragma omp simd
    for (int64_t i = 0; i < n; i++) v[i] = v[i] < 0.0f ? 0.0f : v[i];
}

/* One step of the seed's model: the losses into terms (the summed reconstruction loss and KL,
   nats), every gradient into its place (scaled by `scale`, the KL's by kl_scale = scale * beta).
   p: P_COUNT pointers (the enum above); the workspace mlp_step_bytes(...) bytes. The first
   layer skips x's zeros where at most max_density of x is nonzero, and its weight gradient takes
   the sparser of its gradient and x (up to max_density), as mlp.py's `_weight_grad`. Returns
   which ways it took: 1 the first layer over x's nonzeros, 2 its weight gradient over the
   gradient's, 4 over x's. */
int64_t mlp_step(void *const *p, int64_t B, int64_t D, int64_t H, int64_t K, int64_t G, float epsilon_std,
                 float bound, float scale, float kl_scale, double max_density, double *terms) {
    struct mlp_work w;
    mlp_layout(p[P_WORK], B, D, H, K, G, &w);
    const float *x = p[P_X], *W1 = p[P_W1], *W4 = p[P_W4];
    float *mean = w.latents, *log_var = mean + B * K, *std = log_var + B * K, *noise = std + B * K,
          *z = noise + B * K;
    int64_t ways = 0;
    /* forward: h = relu(x W1' + b1), the latent block to a = z W3' + b3, logits */
    int64_t nnz = nonzeros(x, B, D, max_density, w.rows_at, w.cols, w.vals);
    transpose(W1, H, D, w.w1t);
    if (nnz >= 0) {
        sparse_product(w.rows_at, w.cols, w.vals, B, w.w1t, H, p[P_B1], w.h);
        ways |= 1;
    } else {
        gemm(x, D, 1, w.w1t, H, p[P_B1], w.h, B, D, H);
    }
    relu_rows(w.h, B * H);
    terms[1] = latent_forward(w.h, B, H, K, p[P_WM], p[P_BM], p[P_WV], p[P_BV], p[P_EPS], epsilon_std,
                              p[P_W3], p[P_B3], G, mean, log_var, std, noise, z, w.a, w.lwork);
    relu_rows(w.a, B * G);
    transpose(W4, D, G, w.w4t);
    gemm(w.a, G, 1, w.w4t, D, p[P_B4], w.logits, B, G, D);
    terms[0] = bernoulli_head(w.logits, p[P_TARGET], B, D, bound, scale, w.dl, p[P_DB4], w.bwork);
    /* backward: the output layer, the latent block, the first layer */
    /* dl' g: on the helper thread where it is on (pool_use), while this one goes on */
    struct gemm_job dw4 = job_of(w.dl, 1, D, w.a, G, 0, p[P_DW4], D, B, G);
    int shared = dw4.n <= POOL_TILES && atomic_load(&pool.on) && !atomic_exchange(&pool.busy, 1);
    uint64_t seq = shared ? pool_open(&dw4) : 0;
    if (!shared) gemm(w.dl, 1, D, w.a, G, 0, p[P_DW4], D, B, G);
    gemm(w.dl, D, 1, W4, G, 0, w.dg, B, D, G); /* dl W4 */
    latent_backward(w.dg, w.a, B, G, 0, z, p[P_W3], p[P_DW3], p[P_DB3], mean, std, noise, K, kl_scale,
                    w.h, H, p[P_WM], p[P_WV], p[P_DWM], p[P_DBM], p[P_DWV], p[P_DBV], w.dh, w.lwork);
    activation_back(w.dh, w.h, B, H, 0, p[P_DB1]);
    transpose(w.dh, B, H, w.dh_t);
    double x_density = nnz >= 0 ? (double)nnz / (double)(B * D) : 1.0;
    double unit_density = x_density < max_density ? x_density : max_density;
    if (nonzeros(w.dh_t, H, B, unit_density, w.unit_at, w.unit_cols, w.unit_vals) >= 0) {
        sparse_product(w.unit_at, w.unit_cols, w.unit_vals, H, x, D, 0, p[P_DW1]); /* dh' x */
        ways |= 2;
    } else if (nnz >= 0) { /* (x' dh)' over x's columns */
        sparse_columns(w.rows_at, w.cols, w.vals, B, D, w.col_at, w.by_col, w.col_vals);
        sparse_product(w.col_at, w.by_col, w.col_vals, D, w.dh, H, 0, w.dw1t);
        transpose(w.dw1t, D, H, p[P_DW1]);
        ways |= 4;
    } else {
        gemm(w.dh, 1, H, x, D, 0, p[P_DW1], H, B, D);
    }
    if (shared) { /* the helper's product finished here, and its columns past the last 16 */
        pool_join(&dw4, seq);
        int64_t n16 = G / 16 * 16;
        if (n16 < G) gemm_edge(w.dl, 1, D, w.a, G, 0, p[P_DW4], G, B, 0, D, n16, G);
        atomic_store(&pool.busy, 0);
    }
    return ways;
}
