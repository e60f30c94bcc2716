/*
 * Fused Mamba-1 selective scan for the CPU, forward and backward (loaded by models/cpu_scan.py).
 *
 * Per channel row r = (batch b, channel d), with dt already softplus(delta + delta_bias):
 *   h_t[n] = exp(dt_t A[d,n]) h_{t-1}[n] + dt_t u_t B_t[n]
 *   y_t    = (sum_n C_t[n] h_t[n] + D[d] u_t) * silu(z_t)
 *
 * Layouts (float32, contiguous): u, dt, z, out, du, ddt, dz: (batch, dim, len);
 * A: (dim, dstate); B, C: (batch, len, dstate), time-major so that one step's dstate values are
 * adjacent (the inner loops run over dstate and vectorise); D: (dim,).
 *
 * Memory: the forward keeps only the state entering each chunk of `chunk` steps,
 * (batch, dim, nchunks, dstate); the backward recomputes a chunk's states from it into a
 * per-thread buffer of chunk * dstate floats, then runs the reverse recurrence over the chunk.
 * No (batch, dim, len, dstate) tensor exists at any time.
 *
 * Parallelism: work items are (batch, block of channels); threads take items from an atomic
 * counter (a busy core simply takes fewer). The gradients of B and C are sums over channels:
 * each item writes its own partial sum, (batch, blocks, len, dstate), which the caller adds up
 * in a fixed order, so the result does not depend on the thread count or the schedule.
 * Plain pthreads, not OpenMP: the library then never starts a second OpenMP runtime beside the
 * one torch ships (two spinning pools on two cores stall each other); `#pragma omp simd` only
 * asks for vectorisation (-fopenmp-simd, no runtime).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 512
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* exp(x) for float32: range reduction x = k ln2 + r, |r| <= ln2 / 2, a degree-6 Taylor
 * polynomial (relative error below 2e-7 on that interval), times 2^k built in the exponent
 * bits. Written out so that the compiler vectorises it inside the dstate loops, where libm's
 * expf would be a scalar call. Inputs are clamped to [-87, 88] (no overflow, no denormals). */
ALWAYS_INLINE float exp_approx(float x) {
    x = x > -87.0f ? x : -87.0f; /* one vmaxps and one vminps; a NaN becomes -87 */
    x = x < 88.0f ? x : 88.0f;
    const float k = __builtin_rintf(x * 1.44269504088896341f);
    const float r = x - k * 0.693145751953125f - k * 1.42860682030941723e-6f;
    const float p =
        1.0f + r * (1.0f + r * (0.5f + r * (1.66666667e-1f + r * (4.16666667e-2f + r * (8.33333333e-3f + r * 1.38888889e-3f)))));
    union {
        int32_t i;
        float f;
    } scale;
    scale.i = ((int32_t)k + 127) << 23;
    return p * scale.f;
}

typedef struct {
    int64_t batch, dim, len, dstate, chunk, nchunks, blocks;
    const float *u, *dt, *A, *B, *C, *D, *z; /* D and z may be NULL */
    float *out, *chunk_states, *last_state;  /* forward outputs; last_state may be NULL */
    const float *dout;                       /* backward input */
    float *du, *ddt, *dz, *dA_part, *dD_part, *dB_part, *dC_part; /* backward outputs */
} scan_args;

/* Channels [lo, hi) of block `blk` out of `blocks`, an even split of `dim`. */
ALWAYS_INLINE void block_rows(const scan_args *a, int64_t blk, int64_t *lo, int64_t *hi) {
    *lo = blk * a->dim / a->blocks;
    *hi = (blk + 1) * a->dim / a->blocks;
}

/* ---------------------------------------------------------------------------------------- */
/* Forward: one row, the whole sequence. `N` is a compile-time constant at the hot call sites. */

ALWAYS_INLINE void forward_row(const scan_args *a, int64_t b, int64_t d, const int64_t N, float *yblk) {
    const int64_t L = a->len, T = a->chunk;
    const int64_t row = b * a->dim + d;
    const float *u = a->u + row * L, *dt = a->dt + row * L, *z = a->z ? a->z + row * L : NULL;
    const float *A = a->A + d * N, *Bb = a->B + b * L * N, *Cb = a->C + b * L * N;
    const float Dd = a->D ? a->D[d] : 0.0f;
    float *out = a->out + row * L, *states = a->chunk_states + row * a->nchunks * N;
    float h[N];
    for (int64_t n = 0; n < N; n++) h[n] = 0.0f;
    for (int64_t c = 0; c < a->nchunks; c++) {
        const int64_t t0 = c * T, t1 = t0 + T < L ? t0 + T : L;
        memcpy(states + c * N, h, N * sizeof(float));
        for (int64_t t = t0; t < t1; t++) {
            const float dt_t = dt[t], dtu = dt_t * u[t];
            const float *Bt = Bb + t * N, *Ct = Cb + t * N;
            float y = 0.0f;
#pragma omp simd reduction(+ : y)
            for (int64_t n = 0; n < N; n++) {
                h[n] = exp_approx(dt_t * A[n]) * h[n] + dtu * Bt[n];
                y += Ct[n] * h[n];
            }
            yblk[t - t0] = y;
        }
        /* D skip connection and the silu(z) gate, vectorised over the chunk's steps. */
        if (z) {
#pragma omp simd
            for (int64_t t = t0; t < t1; t++) {
                const float zt = z[t];
                out[t] = (yblk[t - t0] + Dd * u[t]) * zt / (1.0f + exp_approx(-zt));
            }
        } else {
#pragma omp simd
            for (int64_t t = t0; t < t1; t++) out[t] = yblk[t - t0] + Dd * u[t];
        }
    }
    if (a->last_state) memcpy(a->last_state + row * N, h, N * sizeof(float));
}

/* ---------------------------------------------------------------------------------------- */
/* Backward: one row, chunks from last to first. Scratch: H and dA of the chunk (T * N each),
 * dy and the pre-gate output (T each), the running state gradient and dA accumulator (N each). */

ALWAYS_INLINE void backward_row(const scan_args *a, int64_t b, int64_t d, int64_t blk, const int64_t N,
                                float *scratch) {
    const int64_t L = a->len, T = a->chunk;
    const int64_t row = b * a->dim + d;
    const float *u = a->u + row * L, *dt = a->dt + row * L, *z = a->z ? a->z + row * L : NULL;
    const float *dout = a->dout + row * L;
    const float *A = a->A + d * N, *Bb = a->B + b * L * N, *Cb = a->C + b * L * N;
    const float Dd = a->D ? a->D[d] : 0.0f;
    const float *states = a->chunk_states + row * a->nchunks * N;
    float *du = a->du + row * L, *ddt = a->ddt + row * L, *dz = a->dz ? a->dz + row * L : NULL;
    float *dBp = a->dB_part + (b * a->blocks + blk) * L * N, *dCp = a->dC_part + (b * a->blocks + blk) * L * N;
    float *H = scratch, *E = H + T * N, *dy = E + T * N, *ypre = dy + T, *dh = ypre + T, *dAacc = dh + N;
    float dD = 0.0f;
    for (int64_t n = 0; n < N; n++) dh[n] = dAacc[n] = 0.0f;

    for (int64_t c = a->nchunks - 1; c >= 0; c--) {
        const int64_t t0 = c * T, t1 = t0 + T < L ? t0 + T : L;
        /* 1. Recompute the chunk's states (and their decays) from the state entering it. */
        const float *hprev = states + c * N;
        for (int64_t t = t0; t < t1; t++) {
            const float dt_t = dt[t], dtu = dt_t * u[t];
            const float *Bt = Bb + t * N, *Ct = Cb + t * N;
            float *Ht = H + (t - t0) * N, *Et = E + (t - t0) * N;
            float y = 0.0f;
#pragma omp simd reduction(+ : y)
            for (int64_t n = 0; n < N; n++) {
                Et[n] = exp_approx(dt_t * A[n]);
                Ht[n] = Et[n] * hprev[n] + dtu * Bt[n];
                y += Ct[n] * Ht[n];
            }
            ypre[t - t0] = y;
            hprev = Ht;
        }
        /* 2. Through the gate and the skip: dy = dout * silu(z), dz = dout * y * silu'(z). */
        if (z) {
#pragma omp simd reduction(+ : dD)
            for (int64_t t = t0; t < t1; t++) {
                const float zt = z[t], sig = 1.0f / (1.0f + exp_approx(-zt));
                const float y = ypre[t - t0] + Dd * u[t];
                dz[t] = dout[t] * y * sig * (1.0f + zt * (1.0f - sig));
                dy[t - t0] = dout[t] * zt * sig;
                dD += dy[t - t0] * u[t];
            }
        } else {
#pragma omp simd reduction(+ : dD)
            for (int64_t t = t0; t < t1; t++) {
                dy[t - t0] = dout[t];
                dD += dout[t] * u[t];
            }
        }
        /* 3. The reverse recurrence: dh_t = dA_{t+1} dh_{t+1} + dy_t C_t. */
        for (int64_t t = t1 - 1; t >= t0; t--) {
            const float dt_t = dt[t], u_t = u[t], dy_t = dy[t - t0], dtu = dt_t * u_t;
            const float *Bt = Bb + t * N, *Ct = Cb + t * N;
            const float *Ht = H + (t - t0) * N, *Et = E + (t - t0) * N;
            const float *Hp = t > t0 ? Ht - N : states + c * N;
            float *dBt = dBp + t * N, *dCt = dCp + t * N;
            float s_B = 0.0f, s_A = 0.0f;
#pragma omp simd reduction(+ : s_B, s_A)
            for (int64_t n = 0; n < N; n++) {
                const float g = dh[n] + dy_t * Ct[n];
                const float gdecay = g * Hp[n] * Et[n]; /* d loss / d (dt_t A[n]) */
                s_B += g * Bt[n];
                s_A += gdecay * A[n];
                dAacc[n] += gdecay * dt_t;
                dBt[n] += g * dtu;
                dCt[n] += dy_t * Ht[n];
                dh[n] = g * Et[n];
            }
            du[t] = dy_t * Dd + dt_t * s_B;
            ddt[t] = u_t * s_B + s_A;
        }
    }
    memcpy(a->dA_part + row * N, dAacc, N * sizeof(float));
    a->dD_part[row] = dD;
}

/* Hot dstate values get their own unrolled copy; others take the generic loop. */
#define DISPATCH_N(N, CALL_CONST, CALL_ANY) \
    switch (N) {                            \
        case 4: CALL_CONST(4); break;       \
        case 8: CALL_CONST(8); break;       \
        case 16: CALL_CONST(16); break;     \
        case 32: CALL_CONST(32); break;     \
        case 64: CALL_CONST(64); break;     \
        default: CALL_ANY; break;           \
    }

static void forward_item(const scan_args *a, int64_t item, float *scratch) {
    const int64_t b = item / a->blocks, blk = item % a->blocks;
    int64_t lo, hi;
    block_rows(a, blk, &lo, &hi);
    for (int64_t d = lo; d < hi; d++) {
#define FWD_CONST(K) forward_row(a, b, d, K, scratch)
        DISPATCH_N(a->dstate, FWD_CONST, forward_row(a, b, d, a->dstate, scratch))
#undef FWD_CONST
    }
}

static void backward_item(const scan_args *a, int64_t item, float *scratch) {
    const int64_t b = item / a->blocks, blk = item % a->blocks;
    int64_t lo, hi;
    block_rows(a, blk, &lo, &hi);
    for (int64_t d = lo; d < hi; d++) {
#define BWD_CONST(K) backward_row(a, b, d, blk, K, scratch)
        DISPATCH_N(a->dstate, BWD_CONST, backward_row(a, b, d, blk, a->dstate, scratch))
#undef BWD_CONST
    }
}

/* ---------------------------------------------------------------------------------------- */
/* A minimal parallel-for: `nthreads` workers (the caller is one) take items from a counter. */

typedef void (*item_fn)(const scan_args *, int64_t, float *);

typedef struct {
    const scan_args *args;
    item_fn fn;
    int64_t nitems, scratch_floats;
    int64_t next; /* atomic */
} job_t;

static void *worker(void *p) {
    job_t *job = (job_t *)p;
    float *scratch = malloc((size_t)job->scratch_floats * sizeof(float));
    if (!scratch) return NULL;
    for (;;) {
        const int64_t i = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (i >= job->nitems) break;
        job->fn(job->args, i, scratch);
    }
    free(scratch);
    return NULL;
}

/* 0 on success; -1 when no scratch memory could be had (the outputs are then incomplete). */
static int parallel_for(const scan_args *args, item_fn fn, int64_t nitems, int64_t scratch_floats,
                        int nthreads) {
    job_t job = {args, fn, nitems, scratch_floats, 0};
    pthread_t threads[MAX_THREADS];
    int started = 0;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > nitems) nthreads = (int)nitems;
    /* A thread that cannot be created is simply not used: the others take its items. */
    for (int i = 1; i < nthreads; i++)
        if (pthread_create(&threads[started], NULL, worker, &job) == 0) started++;
    worker(&job);
    for (int i = 0; i < started; i++) pthread_join(threads[i], NULL);
    /* A worker whose allocation failed took no items; the others took them. Items left over
     * mean that every worker failed. */
    return job.next >= nitems ? 0 : -1;
}

static int64_t scratch_floats(int64_t chunk, int64_t dstate) { return 2 * chunk * dstate + 2 * chunk + 2 * dstate; }

/* ---------------------------------------------------------------------------------------- */
/* Entry points (ctypes). Pointers to contiguous float32 buffers; NULL where optional. */

int mamba_scan_fwd(int64_t batch, int64_t dim, int64_t len, int64_t dstate, int64_t chunk, int64_t blocks,
                   const float *u, const float *dt, const float *A, const float *B, const float *C,
                   const float *D, const float *z, float *out, float *chunk_states, float *last_state,
                   int nthreads) {
    scan_args a = {0};
    a.batch = batch, a.dim = dim, a.len = len, a.dstate = dstate, a.chunk = chunk, a.blocks = blocks;
    a.nchunks = (len + chunk - 1) / chunk;
    a.u = u, a.dt = dt, a.A = A, a.B = B, a.C = C, a.D = D, a.z = z;
    a.out = out, a.chunk_states = chunk_states, a.last_state = last_state;
    return parallel_for(&a, forward_item, batch * blocks, chunk, nthreads);
}

int mamba_scan_bwd(int64_t batch, int64_t dim, int64_t len, int64_t dstate, int64_t chunk, int64_t blocks,
                   const float *u, const float *dt, const float *A, const float *B, const float *C,
                   const float *D, const float *z, const float *chunk_states, const float *dout, float *du,
                   float *ddt, float *dz, float *dA_part, float *dD_part, float *dB_part, float *dC_part,
                   int nthreads) {
    scan_args a = {0};
    a.batch = batch, a.dim = dim, a.len = len, a.dstate = dstate, a.chunk = chunk, a.blocks = blocks;
    a.nchunks = (len + chunk - 1) / chunk;
    a.u = u, a.dt = dt, a.A = A, a.B = B, a.C = C, a.D = D, a.z = z;
    a.chunk_states = (float *)chunk_states, a.dout = dout;
    a.du = du, a.ddt = ddt, a.dz = dz, a.dA_part = dA_part, a.dD_part = dD_part;
    a.dB_part = dB_part, a.dC_part = dC_part;
    return parallel_for(&a, backward_item, batch * blocks, scratch_floats(chunk, dstate), nthreads);
}

/* The version of this interface; the loader refuses a library built from another one. */
int mamba_scan_abi(void) { return 1; }
