"""The CUDA C sources of the CuPy kernel set (:mod:`xcnn.kernels.cupy`), as plain strings.

They live apart from the Python that launches them so that a machine without
CuPy or a GPU can still check them: ``tests/test_cuda_kernels.py`` compiles
every one with ``nvcc`` for sm_90 and, with a small host shim, compiles the
same text as C++ and runs it on the CPU against the generic array code.

Every kernel is an ``extern "C" __global__`` function with explicit
arguments (CuPy's ``RawKernel`` compiles the text as it is) and a
grid-stride loop over its output elements, so any launch size covers all of
them, one thread per output element. :func:`cuda_source` prepends the two
typedefs each source needs: ``T`` the float type, ``L`` the label type.

Index conventions (shape symbols of :mod:`xcnn.functional`):

- ``x`` is NCHW, C-contiguous; ``P = OH*OW`` pixels per output map.
- The im2col matrix is *GEMM-ready*: ``col (C*KH*KW, NC*P)``, row
  ``k = c*KH*KW + i*KW + j`` (kernel offset (i, j) of channel c), column
  ``q = n*P + oy*OW + ox`` for the chunk's image n; ``y^T = W (F, C*KH*KW) @ col``
  is then one matrix product for the whole chunk, ``(F, NC*P)``.
- Max-pool's argmax is one byte per output pixel: the row-major offset
  ``i*K + j`` of the window's first maximum (K*K <= 255).
"""

from __future__ import annotations

__all__ = ["SOURCES", "CTYPES", "LABEL_CTYPES", "cuda_source"]

#: C type of each float dtype the kernels take.
CTYPES = {"float32": "float", "float64": "double"}
#: C type of each label dtype :data:`SOURCES` ``["xcnn_softmax_xent"]`` takes.
LABEL_CTYPES = {"int64": "long long", "int32": "int"}

# Helpers shared by every source. mul_rn rounds the product on its own (no
# fused multiply-add), so an update computes exactly what the generic code's
# separate CuPy kernels compute.
_PRELUDE = r"""
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
#define XCNN_LOOP(idx, total) \
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < (total); \
         idx += (long long)blockDim.x * gridDim.x)
"""

_IM2COL = r"""
// x (N, C, H, W) -> col (C*KH*KW, nc*OH*OW) for images n0 .. n0+nc-1; zero where the
// window hangs over the padding. Consecutive threads write consecutive columns.
extern "C" __global__ void xcnn_im2col(
    const T* x, T* col, long long total, int n0, int nc, int C, int H, int W,
    int KH, int KW, int S, int PT, int PL, int OH, int OW)
{
    const long long P = (long long)OH * OW;
    const long long cols = (long long)nc * P;
    XCNN_LOOP(idx, total) {
        const long long q = idx % cols;
        const int k = (int)(idx / cols);
        const int n = (int)(q / P);
        const int p = (int)(q % P);
        const int oy = p / OW, ox = p % OW;
        const int c = k / (KH * KW), r = k % (KH * KW);
        const int i = r / KW, j = r % KW;
        const int yy = oy * S + i - PT, xx = ox * S + j - PL;
        T v = 0;
        if (yy >= 0 && yy < H && xx >= 0 && xx < W)
            v = x[(((long long)(n0 + n) * C + c) * H + yy) * W + xx];
        col[idx] = v;
    }
}
"""

_COL2IM = r"""
// The input gradient as a gather: dx[n, c, y, x] sums dcol over the kernel offsets
// (i, j) whose window covers (y, x), in the order i, then j -- the order of the
// generic fold -- so results repeat bit for bit (no atomics). dcol (C*KH*KW, nc*P).
extern "C" __global__ void xcnn_col2im(
    const T* dcol, T* dx, long long total, int n0, int nc, int C, int H, int W,
    int KH, int KW, int S, int PT, int PL, int OH, int OW)
{
    const long long P = (long long)OH * OW;
    const long long cols = (long long)nc * P;
    XCNN_LOOP(idx, total) {
        const int xx = (int)(idx % W);
        const int yy = (int)((idx / W) % H);
        const int c = (int)((idx / ((long long)W * H)) % C);
        const int n = (int)(idx / ((long long)W * H * C));
        T acc = 0;
        for (int i = 0; i < KH; ++i) {
            const int ty = yy + PT - i;
            if (ty < 0 || ty % S != 0 || ty / S >= OH) continue;
            const int oy = ty / S;
            for (int j = 0; j < KW; ++j) {
                const int tx = xx + PL - j;
                if (tx < 0 || tx % S != 0 || tx / S >= OW) continue;
                const int ox = tx / S;
                const long long k = (long long)c * KH * KW + i * KW + j;
                acc += dcol[k * cols + (long long)n * P + (long long)oy * OW + ox];
            }
        }
        dx[(long long)n0 * C * H * W + idx] = acc;
    }
}
"""

_BIAS_ACT = r"""
// The GEMM's (F, nc*P) result -> y (N, F, P) for images n0.., plus the bias and, with
// relu, max(., 0) and its mask, in one pass (NaN -> 0, as the generic where(x > 0, x, 0)).
extern "C" __global__ void xcnn_bias_act(
    const T* src, const T* b, T* y, bool* mask, long long total, int n0, int nc, int F,
    int P, int has_bias, int relu)
{
    XCNN_LOOP(idx, total) {
        const int p = (int)(idx % P);
        const int f = (int)((idx / P) % F);
        const long long n = idx / ((long long)P * F);
        T v = src[(long long)f * nc * P + n * P + p];
        if (has_bias) v += b[f];
        const long long o = (long long)n0 * F * P + idx;
        if (relu) {
            const bool on = v > 0;
            mask[o] = on;
            v = on ? v : (T)0;
        }
        y[o] = v;
    }
}
"""

_NFP_TO_FNP = r"""
// dy (N, F, P) images n0 .. n0+nc-1 -> dyT (F, nc*P), the GEMM-ready layout of the backward.
extern "C" __global__ void xcnn_nfp_to_fnp(
    const T* dy, T* out, long long total, int n0, int nc, int F, int P)
{
    const long long cols = (long long)nc * P;
    XCNN_LOOP(idx, total) {
        const long long q = idx % cols;
        const int f = (int)(idx / cols);
        const long long n = q / P;
        const int p = (int)(q % P);
        out[idx] = dy[((n0 + n) * F + f) * P + p];
    }
}
"""

_ROWS_BIAS_ACT = r"""
// Dense: z (N, O) -> y = z + b (O,) and, with relu, max(., 0) and its mask, in one pass.
extern "C" __global__ void xcnn_rows_bias_act(
    const T* z, const T* b, T* y, bool* mask, long long total, int O, int relu)
{
    XCNN_LOOP(idx, total) {
        T v = z[idx] + b[idx % O];
        if (relu) {
            const bool on = v > 0;
            mask[idx] = on;
            v = on ? v : (T)0;
        }
        y[idx] = v;
    }
}
"""

_RELU = r"""
// y = max(x, 0) and mask = x > 0 in one pass (NaN -> 0 with mask False, as the generic code).
extern "C" __global__ void xcnn_relu(const T* x, T* y, bool* mask, long long total)
{
    XCNN_LOOP(idx, total) {
        const T v = x[idx];
        const bool on = v > 0;
        mask[idx] = on;
        y[idx] = on ? v : (T)0;
    }
}
"""

_RELU_BACK = r"""
extern "C" __global__ void xcnn_relu_back(const T* dy, const bool* mask, T* dx, long long total)
{
    XCNN_LOOP(idx, total) { dx[idx] = mask[idx] ? dy[idx] : (T)0; }
}
"""

_MAXPOOL = r"""
// y[n, c, oy, ox] = max of the K x K window at (oy*S, ox*S); arg = offset i*K + j of its
// first maximum in row-major order (a NaN counts as the maximum, as argmax/max do).
// want_arg == 0: inference, no argmax written.
extern "C" __global__ void xcnn_maxpool(
    const T* x, T* y, unsigned char* arg, long long total, int H, int W, int K, int S,
    int OH, int OW, int want_arg)
{
    XCNN_LOOP(idx, total) {
        const int ox = (int)(idx % OW);
        const int oy = (int)((idx / OW) % OH);
        const long long plane = idx / ((long long)OW * OH);
        const T* base = x + plane * H * W + (long long)(oy * S) * W + ox * S;
        T best = base[0];
        int a = 0;
        for (int r = 1; r < K * K; ++r) {
            const T v = base[(r / K) * W + r % K];
            if (v > best || (v != v && best == best)) { best = v; a = r; }
        }
        y[idx] = best;
        if (want_arg) arg[idx] = (unsigned char)a;
    }
}
"""

_MAXPOOL_BACK = r"""
// Route each window's gradient to its argmax, as a gather: dx[n, c, y, x] sums dy over the
// windows covering (y, x) whose argmax is (y, x), in increasing offset order (that of the
// generic fold); pixels no window covers get 0.
extern "C" __global__ void xcnn_maxpool_back(
    const T* dy, const unsigned char* arg, T* dx, long long total, int H, int W, int K,
    int S, int OH, int OW)
{
    XCNN_LOOP(idx, total) {
        const int xx = (int)(idx % W);
        const int yy = (int)((idx / W) % H);
        const long long plane = idx / ((long long)W * H);
        const int oy_lo = yy >= K ? (yy - K) / S + 1 : 0;
        const int oy_hi = yy / S < OH - 1 ? yy / S : OH - 1;
        const int ox_lo = xx >= K ? (xx - K) / S + 1 : 0;
        const int ox_hi = xx / S < OW - 1 ? xx / S : OW - 1;
        T acc = 0;
        for (int oy = oy_hi; oy >= oy_lo; --oy) {
            for (int ox = ox_hi; ox >= ox_lo; --ox) {
                const long long o = plane * OH * OW + (long long)oy * OW + ox;
                if (arg[o] == (yy - oy * S) * K + (xx - ox * S)) acc += dy[o];
            }
        }
        dx[idx] = acc;
    }
}
"""

_SOFTMAX_XENT = r"""
// One thread per row of logits (N, K): log-sum-exp stable log-softmax, the row's
// log-probability of its label, and dlogits = (softmax - onehot) / N, in one pass.
extern "C" __global__ void xcnn_softmax_xent(
    const T* logits, const L* labels, T* dlogits, T* logp_label, long long total, int K)
{
    XCNN_LOOP(n, total) {
        const T* row = logits + n * K;
        T m = row[0];
        for (int k = 1; k < K; ++k) {
            const T v = row[k];
            if (v > m || v != v) m = (m != m) ? m : v;
        }
        T s = 0;
        for (int k = 0; k < K; ++k) s += exp(row[k] - m);
        const T lse = log(s);
        const L lab = labels[n];
        T picked = (T)0 / (T)0;  // NaN for a label outside [0, K)
        for (int k = 0; k < K; ++k) {
            const T logp = (row[k] - m) - lse;
            if (k == lab) picked = logp;
            dlogits[n * K + k] = (exp(logp) - (k == lab ? (T)1 : (T)0)) / (T)total;
        }
        logp_label[n] = picked;
    }
}
"""

_SGD = r"""
// p <- p - lr * (g + wd * p) (the wd term only with has_wd), each product rounded on its
// own: exactly the generic update's separate CuPy kernels.
extern "C" __global__ void xcnn_sgd(
    const T* p, const T* g, T* out, long long total, T lr, T wd, int has_wd)
{
    XCNN_LOOP(idx, total) {
        const T pi = p[idx];
        const T gi = has_wd ? g[idx] + mul_rn(wd, pi) : g[idx];
        out[idx] = pi - mul_rn(lr, gi);
    }
}
"""

_MOMENTUM = r"""
// v <- mu*v + g (v = g on the first step, has_v == 0); p <- p - lr * (v + wd * p).
extern "C" __global__ void xcnn_momentum(
    const T* p, const T* g, const T* v, T* p_out, T* v_out, long long total, T lr, T mu,
    T wd, int has_v, int has_wd)
{
    XCNN_LOOP(idx, total) {
        const T vi = has_v ? mul_rn(mu, v[idx]) + g[idx] : g[idx];
        const T pi = p[idx];
        v_out[idx] = vi;
        p_out[idx] = pi - mul_rn(lr, has_wd ? vi + mul_rn(wd, pi) : vi);
    }
}
"""

_ADAM = r"""
// m <- b1*m + (1-b1)*g, v <- b2*v + (1-b2)*g^2 (from zeros on the first step, has_mv == 0);
// p <- p - (step_size * m / (sqrt(v) + eps_hat) + lr*wd * p), the bias corrections folded
// into step_size and eps_hat on the host (the generic update's order of operations).
extern "C" __global__ void xcnn_adam(
    const T* p, const T* g, const T* m, const T* v, T* p_out, T* m_out, T* v_out,
    long long total, T b1, T c1, T b2, T c2, T step_size, T eps_hat, T lrwd, int has_mv,
    int has_wd)
{
    XCNN_LOOP(idx, total) {
        const T gi = g[idx];
        const T mi = has_mv ? mul_rn(b1, m[idx]) + mul_rn(c1, gi) : mul_rn(c1, gi);
        const T vi = has_mv ? mul_rn(b2, v[idx]) + mul_rn(mul_rn(c2, gi), gi)
                            : mul_rn(mul_rn(c2, gi), gi);
        const T pi = p[idx];
        m_out[idx] = mi;
        v_out[idx] = vi;
        T upd = mul_rn(step_size, mi) / (sqrt(vi) + eps_hat);
        if (has_wd) upd = upd + mul_rn(lrwd, pi);
        p_out[idx] = pi - upd;
    }
}
"""

#: Kernel name -> CUDA C source (without the ``T``/``L`` typedefs; see :func:`cuda_source`).
SOURCES: dict[str, str] = {
    "xcnn_im2col": _IM2COL,
    "xcnn_col2im": _COL2IM,
    "xcnn_bias_act": _BIAS_ACT,
    "xcnn_nfp_to_fnp": _NFP_TO_FNP,
    "xcnn_rows_bias_act": _ROWS_BIAS_ACT,
    "xcnn_relu": _RELU,
    "xcnn_relu_back": _RELU_BACK,
    "xcnn_maxpool": _MAXPOOL,
    "xcnn_maxpool_back": _MAXPOOL_BACK,
    "xcnn_softmax_xent": _SOFTMAX_XENT,
    "xcnn_sgd": _SGD,
    "xcnn_momentum": _MOMENTUM,
    "xcnn_adam": _ADAM,
}


def cuda_source(name: str, dtype: str = "float32", label_dtype: str = "int64") -> str:
    """The complete source of kernel ``name`` for ``dtype`` (and ``label_dtype``), as compiled.

    Raises KeyError for an unknown kernel or dtype.
    """
    return (
        f"typedef {CTYPES[dtype]} T;\ntypedef {LABEL_CTYPES[label_dtype]} L;\n"
        + _PRELUDE
        + SOURCES[name]
    )
