// still: the bf16 training attention's weights on the CPU, scores in fp32, in one pass.
//
// `still.compressive.attention._AttentionWeights.forward` under bf16 autocast, for processors with
// AVX-512 bf16: softmax(mask(content + shifted position scores)) over heads-major (G = H * B) rows,
// where both score products run with fp32 accumulators (on AMX tiles where the processor has them
// and the system allows, else on AVX-512 bf16's `vdpbf16ps` in registers: `block_bf16`) and their
// sum, the mask and the softmax stay in fp32; only the weights are rounded to bf16.
// PyTorch's bf16 products round each score to bf16 at their output (the bf16 path), and its fp32
// products of the same bf16 operands run on the fp32 units (`attention.FP32_POSITION_SCORES`):
// rounding the position scores is most of how far a bf16 step's gradient lies from an fp32 step's
// (docs/performance.md, session 22). Here the scores of 16 query rows at a time live in a scratch
// of 2 x 16 x K floats (in the core's caches), so the (G, L, K) scores are written once, as bf16
// weights, where the PyTorch path makes five passes over them. The backward's first pass too
// (`still_attention_backward`): the softmax's backward and the shift of its result back to the
// position scores' order, one pass where PyTorch makes three; the four products stay PyTorch's.
// And the attention-reconstruction loss's content-only attention (`still_content_attention`: both
// products as above, the scores and the softmax in fp32, where PyTorch makes three bf16 passes and
// rounds the scores) and its squared error (`still_squared_error` and its gradient, one pass each).
// fp32 training takes the same passes on fused multiply-adds (`still_attention_weights_fp32`,
// `still_attention_grads_fp32`: register-blocked products, no AMX), where PyTorch's fp32 path makes
// five passes over the (G, L, K) scores forward and four backward around its products: on AVX-512,
// else on narrower registers with FMA (AVX2, ARM's NEON), with the same bits.
//
// Built with the machine's compiler (`-O3 -march=native`) by `still.compressive.native` and loaded
// with ctypes. Without AVX-512 bf16 in the compiler's target, `still_attention_weights` returns
// nonzero and the caller takes the PyTorch path (without FMA, the fp32 kernels likewise).
//
// Layouts (bf16 as uint16_t, row-major, contiguous), g = h * B + b:
//   q_content (G, L, D), k (G, K, D): the content queries (with u and the scale) and the keys;
//   q_position (H, B * L, D), r (H, K, D): the position queries (with v and the scale) and the
//     projected encodings of the distances K - 1 .. 0;
//   bias: (L, K) rows per batch row b, at bias + b * bias_batch_stride: 0 or -inf, added (masks
//     beyond the causal one: empty memory slots), or null for none; the causal mask is applied by
//     itself;
//   out (G, L, K): the weights, exactly 0 at masked keys (the backward relies on it).
// Score(g, i, j) = q_content[g, i] . k[g, j] + q_position[g, i] . r[h, j + L - 1 - i] + bias[b, i, j]
// for j <= K - L + i; masked beyond.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)  // (elsewhere, as on ARM, the bf16 kernels say they cannot run)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__AVX512F__)
#define STILL_AVX512 1
#endif
#if defined(STILL_AVX512) || (defined(__FMA__) && defined(__AVX__)) || defined(__aarch64__)
#define STILL_FP32 1  // the fp32 kernels: on AVX-512, else on narrower registers with fused multiply-adds
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define STILL_BF16 1  // the bf16 kernels, their products on AVX-512 bf16's dot products ...
#endif
#if defined(STILL_BF16) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define STILL_AMX 1  // ... or on AMX tiles where the processor has them and the system hands them out
#endif

namespace {

// ---- 16 fp32 lanes (`F16`) and what the softmax rows and the fp32 products do with them: one
// AVX-512 register and its intrinsics, or without AVX-512 (AVX2 with FMA, ARM's NEON) registers'
// worth of parts with the same arithmetic lane by lane: fused multiply-adds, rounding to nearest even,
// GCC's order of `_mm512_reduce_add_ps`; so both builds give the same bits (the tests compare them).
// A `Mask` (`lanes(n)`) holds the first min(n, 16) lanes; masked loads read zeros in the others.

#ifdef STILL_AVX512

typedef __m512 F16;
typedef __mmask16 Mask;

inline Mask lanes(int64_t left) {  // the first min(left, 16) lanes (none where left <= 0)
    return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}
inline F16 zeros() { return _mm512_setzero_ps(); }
inline F16 splat(float x) { return _mm512_set1_ps(x); }
inline F16 load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, F16 x) { _mm512_storeu_ps(p, x); }
inline F16 add(F16 a, F16 b) { return _mm512_add_ps(a, b); }
inline F16 sub(F16 a, F16 b) { return _mm512_sub_ps(a, b); }
inline F16 mul(F16 a, F16 b) { return _mm512_mul_ps(a, b); }
inline F16 fmadd(F16 a, F16 b, F16 c) { return _mm512_fmadd_ps(a, b, c); }
inline F16 max_where(F16 a, Mask m, F16 b) { return _mm512_mask_max_ps(a, m, a, b); }  // m: a > b ? a : b; else a
inline F16 add_where(F16 a, Mask m, F16 b) { return _mm512_mask_add_ps(a, m, a, b); }  // m: a + b; else a
inline F16 mul_where(Mask m, F16 a, F16 b) { return _mm512_maskz_mul_ps(m, a, b); }    // m: a b; else 0
inline float reduce_add(F16 x) { return _mm512_reduce_add_ps(x); }
inline float reduce_max(F16 x) { return _mm512_reduce_max_ps(x); }

typedef __mmask16 Flags;  // lanes where a comparison holds
inline Flags below(F16 a, F16 b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline F16 maximum(F16 a, F16 b) { return _mm512_max_ps(a, b); }  // a > b ? a : b
inline F16 nearest_even(F16 x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline F16 fnmadd(F16 a, F16 b, F16 c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b, rounded once
inline F16 scaled_unless(Flags zero, F16 p, F16 n) { return _mm512_maskz_scalef_ps(__mmask16(~zero), p, n); }  // p 2^n

// rows of bf16 (uint16_t) or fp32 values as fp32, and back: the lanes of m (the others zero; not stored)
inline __m512 widen_bf16(__m256i half) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)); }
inline __m512 load_row(const uint16_t* g, __mmask16 m) { return widen_bf16(_mm256_maskz_loadu_epi16(m, g)); }
inline __m512 load_row(const float* g, __mmask16 m) { return _mm512_maskz_loadu_ps(m, g); }
inline void store_row(float* out, __mmask16 m, __m512 x) { _mm512_mask_storeu_ps(out, m, x); }
#ifdef STILL_BF16
inline void store_row(uint16_t* out, __mmask16 m, __m512 x) {  // rounded to nearest even
    _mm256_mask_storeu_epi16(out, m, (__m256i)_mm512_cvtneps_pbh(x));
}
#endif

// src (rows, cols) row-major -> dst (cols, rows); rows a multiple of 16
void transpose_fp32(const float* src, int64_t rows, int64_t cols, float* dst) {
    const __m512i index = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(int(cols)));
    for (int64_t r0 = 0; r0 < rows; r0 += 16)
        for (int64_t c = 0; c < cols; ++c)
            _mm512_storeu_ps(dst + c * rows + r0, _mm512_i32gather_ps(index, src + r0 * cols + c, 4));
}

#elif defined(STILL_FP32)

#if defined(__aarch64__)
constexpr int PART = 4;  // floats a register: NEON's 16 bytes
typedef float32x4_t Native;
#else
constexpr int PART = 8;  // AVX's 32 bytes (FMA comes with AVX2)
typedef __m256 Native;
#endif
constexpr int PARTS = 16 / PART;
typedef float Part __attribute__((vector_size(4 * PART)));
typedef float PartU __attribute__((vector_size(4 * PART), aligned(4)));

struct F16 {
    Part p[PARTS];
    float operator[](int l) const { return p[l / PART][l % PART]; }
    void set(int l, float x) { p[l / PART][l % PART] = x; }
};
struct Mask {
    int64_t n;  // the first n lanes
};
inline Mask lanes(int64_t left) { return Mask{std::clamp<int64_t>(left, 0, 16)}; }
inline Mask operator&(Mask a, Mask b) { return Mask{std::min(a.n, b.n)}; }

// op on each part of a and b
template <class Op>
inline F16 lanewise(F16 a, const F16& b, const Op& op) {
    for (int i = 0; i < PARTS; ++i) a.p[i] = op(a.p[i], b.p[i]);
    return a;
}
// op on the lanes of m, a's lanes elsewhere (op takes parts and floats alike)
template <class Op>
inline F16 where(F16 a, Mask m, const F16& b, const Op& op) {
    if (m.n == 16) return lanewise(a, b, op);
    for (int l = 0; l < m.n; ++l) a.set(l, op(a[l], b[l]));
    return a;
}
inline Part part(float x) {  // x in every lane
#if defined(__aarch64__)
    return Part{x, x, x, x};
#else
    return Part{x, x, x, x, x, x, x, x};
#endif
}
inline Part fused(Part a, Part b, Part c) {  // a b + c, rounded once (not left to the compiler's contraction)
#if defined(__aarch64__)
    return (Part)vfmaq_f32((Native)c, (Native)a, (Native)b);
#else
    return (Part)_mm256_fmadd_ps((Native)a, (Native)b, (Native)c);
#endif
}
inline Part nearest_even(Part x) {  // as `_mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT)`
#if defined(__aarch64__)
    return (Part)vrndnq_f32((Native)x);
#else
    return (Part)_mm256_round_ps((Native)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
}

inline F16 zeros() { return F16{}; }
inline F16 splat(float x) {
    F16 v;
    for (int i = 0; i < PARTS; ++i) v.p[i] = part(x);
    return v;
}
inline F16 load(const float* p) {
    F16 v;
    for (int i = 0; i < PARTS; ++i) v.p[i] = *reinterpret_cast<const PartU*>(p + i * PART);
    return v;
}
inline void store(float* p, const F16& x) {
    for (int i = 0; i < PARTS; ++i) *reinterpret_cast<PartU*>(p + i * PART) = x.p[i];
}
inline F16 add(F16 a, const F16& b) { return lanewise(a, b, [](auto x, auto y) { return x + y; }); }
inline F16 sub(F16 a, const F16& b) { return lanewise(a, b, [](auto x, auto y) { return x - y; }); }
inline F16 mul(F16 a, const F16& b) { return lanewise(a, b, [](auto x, auto y) { return x * y; }); }
inline F16 fmadd(F16 a, const F16& b, const F16& c) {
    for (int i = 0; i < PARTS; ++i) a.p[i] = fused(a.p[i], b.p[i], c.p[i]);
    return a;
}
inline F16 max_where(F16 a, Mask m, const F16& b) { return where(a, m, b, [](auto x, auto y) { return x > y ? x : y; }); }
inline F16 add_where(F16 a, Mask m, const F16& b) { return where(a, m, b, [](auto x, auto y) { return x + y; }); }
inline F16 mul_where(Mask m, const F16& a, const F16& b) {
    if (m.n == 16) return mul(a, b);
    F16 v{};
    for (int l = 0; l < m.n; ++l) v.set(l, a[l] * b[l]);
    return v;
}
// GCC's `_mm512_reduce_add_ps` and `_mm512_reduce_max_ps` (`_mm512_max_ps(a, b)`: a > b ? a : b): halves,
// quarters, then pairs
template <class Op>
inline float reduce(const F16& x, const Op& op) {
    float half[8], quarter[4];
    for (int l = 0; l < 8; ++l) half[l] = op(x[8 + l], x[l]);
    for (int l = 0; l < 4; ++l) quarter[l] = op(half[4 + l], half[l]);
    return op(op(quarter[0], quarter[2]), op(quarter[1], quarter[3]));
}
inline float reduce_add(const F16& x) { return reduce(x, [](float a, float b) { return a + b; }); }
inline float reduce_max(const F16& x) { return reduce(x, [](float a, float b) { return a > b ? a : b; }); }

typedef int32_t Words __attribute__((vector_size(4 * PART)));
struct Flags {
    Words p[PARTS];  // all ones where a comparison holds
};
inline Flags below(const F16& a, const F16& b) {
    Flags f;
    for (int i = 0; i < PARTS; ++i) f.p[i] = a.p[i] < b.p[i];
    return f;
}
inline F16 maximum(F16 a, const F16& b) { return lanewise(a, b, [](auto x, auto y) { return x > y ? x : y; }); }
inline F16 nearest_even(F16 x) {
    for (int i = 0; i < PARTS; ++i) x.p[i] = nearest_even(x.p[i]);
    return x;
}
inline F16 fnmadd(F16 a, const F16& b, const F16& c) {
    for (int i = 0; i < PARTS; ++i) a.p[i] = fused(-a.p[i], b.p[i], c.p[i]);
    return a;
}
inline F16 scaled_unless(const Flags& zero, F16 p, const F16& n) {  // p 2^n (n an integer in [-126, 127]), rounded once
    for (int i = 0; i < PARTS; ++i)
        p.p[i] = zero.p[i] ? part(0.0f) : p.p[i] * (Part)((__builtin_convertvector(n.p[i], Words) + 127) << 23);
    return p;
}

inline F16 load_row(const float* g, Mask m) {
    if (m.n == 16) return load(g);
    F16 v{};
    for (int l = 0; l < m.n; ++l) v.set(l, g[l]);
    return v;
}
inline void store_row(float* out, Mask m, const F16& x) {
    if (m.n == 16) return store(out, x);
    for (int l = 0; l < m.n; ++l) out[l] = x[l];
}

// src (rows, cols) row-major -> dst (cols, rows); rows a multiple of 16
void transpose_fp32(const float* src, int64_t rows, int64_t cols, float* dst) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16)
        for (int64_t c = 0; c < cols; ++c)
            for (int64_t t = 0; t < 16; ++t) dst[c * rows + r0 + t] = src[(r0 + t) * cols + c];
}

#endif

#ifdef STILL_FP32

// e^x for x <= 0; exactly 0 below -87 (and at -inf)
inline F16 exp_nonpositive(F16 x) {
    const F16 low = splat(-87.0f);
    const Flags under = below(x, low);
    x = maximum(x, low);
    const F16 n = nearest_even(mul(x, splat(1.44269504088896341f)));
    F16 r = fnmadd(n, splat(0.693359375f), x);  // x - n ln 2, in two parts
    r = fnmadd(n, splat(-2.12194440e-4f), r);   // |r| <= ln(2) / 2
    F16 p = splat(1.0f / 720);                   // Taylor to r^6: relative error under 1.3e-7
    p = fmadd(p, r, splat(1.0f / 120));
    p = fmadd(p, r, splat(1.0f / 24));
    p = fmadd(p, r, splat(1.0f / 6));
    p = fmadd(p, r, splat(0.5f));
    p = fmadd(p, r, splat(1.0f));
    p = fmadd(p, r, splat(1.0f));
    return scaled_unless(under, p, n);
}

// one row: s (the content scores, overwritten), p (its position scores, already shifted), bias row
// (bf16 or fp32, as the output; null: none beyond the causal mask); n valid keys of k_len -> out
// (bf16 or fp32). Without `Position`, p is not read: the content scores alone (the reconstruction
// loss's targets).
template <bool Position, class T>
void softmax_row(float* s, const float* p, const T* bias, int64_t n, int64_t k_len, T* out) {
    F16 vmax = splat(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) {
        const Mask m = lanes(n - j);
        F16 v = load_row(s + j, m);
        if constexpr (Position) v = add(v, load_row(p + j, m));
        if (bias != nullptr) v = add(v, load_row(bias + j, m));
        store_row(s + j, m, v);
        vmax = max_where(vmax, m, v);
    }
    const float top = reduce_max(vmax);
    if (top == -INFINITY) {  // every key masked (not reached by the callers: a query sees its own key)
        std::memset(out, 0, k_len * sizeof(T));
        return;
    }
    const F16 shift = splat(top);
    F16 vsum = zeros();
    for (int64_t j = 0; j < n; j += 16) {
        const Mask m = lanes(n - j);
        const F16 e = exp_nonpositive(sub(load_row(s + j, m), shift));
        store_row(s + j, m, e);
        vsum = add_where(vsum, m, e);
    }
    const F16 inv = splat(1.0f / reduce_add(vsum));
    for (int64_t j = 0; j < n; j += 16) {
        const Mask m = lanes(n - j);
        store_row(out + j, m, mul(load_row(s + j, m), inv));
    }
    if (n < k_len) std::memset(out + n, 0, (k_len - n) * sizeof(T));
}

// one row of the backward: dot = sum_j w_j g_j, ds_j = w_j (g_j - dot) in fp32 (rounded once where
// the output is bf16), into ds (K) and, shifted right by `shift` (the distances' order of the
// position scores), into raw. w and the output bf16 or fp32; g bf16 or fp32 (computed in fp32 by
// the callers that form it), where only its first n columns are read (the weights are zero beyond)
// and ds is zero beyond them.
template <class W, class G>
void softmax_backward_row(const W* w, const G* g, int64_t k_len, int64_t n, int64_t shift, W* ds, W* raw) {
    F16 acc = zeros();
    for (int64_t j = 0; j < n; j += 16) {
        const Mask m = lanes(n - j);
        acc = fmadd(load_row(w + j, m), load_row(g + j, m), acc);
    }
    const F16 dot = splat(reduce_add(acc));
    std::memset(raw, 0, shift * sizeof(W));
    for (int64_t j = 0; j < k_len; j += 16) {
        const Mask m = lanes(k_len - j), valid = lanes(n - j);
        const F16 wj = load_row(w + j, valid);
        const F16 gj = load_row(g + j, valid);
        const F16 d = mul_where(valid, wj, sub(gj, dot));
        store_row(ds + j, m, d);
        store_row(raw + shift + j, lanes(k_len - shift - j) & m, d);  // what stays in the row
    }
}

// run(begin, end) over [0, count) in min(threads, count) parts (at least one): the first on the
// calling thread, the others on helpers started here
template <class Run>
void on_parts(int64_t count, int64_t threads, const Run& run) {
    threads = std::max<int64_t>(1, std::min(threads, count));
    auto part = [&](int64_t p) { run(count * p / threads, count * (p + 1) / threads); };
    std::vector<std::thread> helpers;
    int64_t p = 1;
    try {
        for (; p < threads; ++p) helpers.emplace_back(part, p);
    } catch (const std::system_error&) {  // no thread to be had (the system's limit): the rest on this one
    }
    for (int64_t rest = p; rest < threads; ++rest) part(rest);
    part(0);
    for (auto& helper : helpers) helper.join();
}

// ---- fp32 training attention on fused multiply-adds (`still_attention_weights_fp32` and
// `still_attention_grads_fp32`): the same passes as the bf16 kernel below, every product from
// `product_fp32`'s register blocks.

// C (MR x 16 NV) = (or += where Add) sum over p in [p0, p1) of A(i, p) B(p, :): A(i, p) at
// a[i * ars + p * acs] (broadcast), B's row p at b + p * ldb (16 NV floats), C's row i at c + i * ldc.
// The MR x NV accumulators stay in registers: per p, NV loads, MR broadcasts and MR NV multiply-adds.
// Each output sums its terms in the order of p, whatever the block: the same bits in every build.
#ifdef STILL_AVX512
template <int MR, int NV, bool Add>
inline void block_fp32(const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, int64_t p0,
                       int64_t p1, float* c, int64_t ldc) {
    F16 acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j) acc[i][j] = Add ? load(c + i * ldc + 16 * j) : zeros();
    for (int64_t p = p0; p < p1; ++p) {
        F16 bv[NV];
        for (int j = 0; j < NV; ++j) bv[j] = load(b + p * ldb + 16 * j);
        for (int i = 0; i < MR; ++i) {
            const F16 ai = splat(a[i * ars + p * acs]);
            for (int j = 0; j < NV; ++j) acc[i][j] = fmadd(ai, bv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j) store(c + i * ldc + 16 * j, acc[i][j]);
}
#else
// narrower registers: 4 rows x 16, the accumulators named (GCC kept an array of them in memory)
template <int MR, int NV, bool Add>
inline void block_fp32(const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, int64_t p0,
                       int64_t p1, float* c, int64_t ldc) {
    static_assert(MR == 4 && NV == 1, "blocks of 4 rows x 16");
    F16 c0 = Add ? load(c) : zeros(), c1 = Add ? load(c + ldc) : zeros(), c2 = Add ? load(c + 2 * ldc) : zeros(),
        c3 = Add ? load(c + 3 * ldc) : zeros();
    for (int64_t p = p0; p < p1; ++p) {
        const F16 bv = load(b + p * ldb);
        const float* ap = a + p * acs;
        c0 = fmadd(splat(ap[0]), bv, c0);
        c1 = fmadd(splat(ap[ars]), bv, c1);
        c2 = fmadd(splat(ap[2 * ars]), bv, c2);
        c3 = fmadd(splat(ap[3 * ars]), bv, c3);
    }
    store(c, c0);
    store(c + ldc, c1);
    store(c + 2 * ldc, c2);
    store(c + 3 * ldc, c3);
}
#endif

#ifdef STILL_AVX512
constexpr int BLOCK_ROWS = 8, BLOCK_WIDTH = 2;  // 8 x 32 outputs: 16 of AVX-512's 32 registers
#else
constexpr int BLOCK_ROWS = 4, BLOCK_WIDTH = 1;  // 4 x 16: 8 of AVX2's 16 registers (16 of NEON's 32)
#endif

// C (rows x n) = (or += where Add) A B over p in [first(i), p1) for the 8 rows from i (the terms
// before are zero in A): rows a multiple of 8, n of 16 (see `block_fp32`)
template <bool Add, class First>
void product_fp32_from(const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, int64_t rows,
                       int64_t n, const First& first, int64_t p1, float* c, int64_t ldc) {
    for (int64_t i8 = 0; i8 < rows; i8 += 8) {
        const int64_t p0 = first(i8);
        for (int64_t i = i8; i < i8 + 8; i += BLOCK_ROWS) {
            const float* ai = a + i * ars;
            float* ci = c + i * ldc;
            int64_t j = 0;
            for (; j + 16 * BLOCK_WIDTH <= n; j += 16 * BLOCK_WIDTH)
                block_fp32<BLOCK_ROWS, BLOCK_WIDTH, Add>(ai, ars, acs, b + j, ldb, p0, p1, ci + j, ldc);
            if constexpr (BLOCK_WIDTH > 1)
                if (j < n) block_fp32<BLOCK_ROWS, 1, Add>(ai, ars, acs, b + j, ldb, p0, p1, ci + j, ldc);
        }
    }
}

// the same over p in [p0, p1) for every row
template <bool Add = false>
void product_fp32(const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, int64_t rows, int64_t n,
                  int64_t p0, int64_t p1, float* c, int64_t ldc) {
    product_fp32_from<Add>(a, ars, acs, b, ldb, rows, n, [p0](int64_t) { return p0; }, p1, c, ldc);
}

// The fp32 weights of groups [g0, g1) into out (G, L, K) (layouts as the bf16 kernel's, in fp32),
// 16 query rows at a time: the position scores of the columns they read and the content scores of
// the keys they see, then their softmax rows; where v is not null, (weights v) of the 16 rows into
// values_out (G, L, D) while their weights are in the core's cache.
void weights_of_fp32(const float* q_content, const float* k, const float* q_position, const float* r,
                     const float* bias, int64_t bias_batch_stride, float* out, const float* v, float* values_out,
                     int64_t g0, int64_t g1, int64_t batch, int64_t l, int64_t k_len, int64_t d) {
    std::vector<float> rt(d * k_len), kt(d * k_len), content(16 * k_len), position(16 * k_len);
    const int64_t offset = k_len - l;  // query i is key offset + i
    int64_t transposed_head = -1;
    for (int64_t g = g0; g < g1; ++g) {
        const int64_t h = g / batch, b = g % batch;
        if (h != transposed_head) {
            transpose_fp32(r + h * k_len * d, k_len, d, rt.data());  // (D, K)
            transposed_head = h;
        }
        transpose_fp32(k + g * k_len * d, k_len, d, kt.data());
        const float* bias_b = bias == nullptr ? nullptr : bias + b * bias_batch_stride;
        for (int64_t i0 = 0; i0 < l; i0 += 16) {
            const int64_t rows = g * l + i0;  // q_position's row h * B * L + b * L + i0 is the same
            // row i reads the position scores of columns L - 1 - i .. K - 1, its keys 0 .. K - L + i
            const int64_t first = l - 16 - i0, seen = offset + i0 + 16;
            product_fp32(q_position + rows * d, d, 1, rt.data() + first, k_len, 16, k_len - first, 0, d,
                         position.data() + first, k_len);
            product_fp32(q_content + rows * d, d, 1, kt.data(), k_len, 16, seen, 0, d, content.data(), k_len);
            for (int64_t t = 0; t < 16; ++t) {
                const int64_t i = i0 + t;
                softmax_row<true>(content.data() + t * k_len, position.data() + t * k_len + (l - 1 - i),
                                  bias_b == nullptr ? nullptr : bias_b + i * k_len, offset + i + 1, k_len,
                                  out + (rows + t) * k_len);
            }
            if (v != nullptr)
                product_fp32(out + rows * k_len, k_len, 1, v + g * k_len * d, d, 16, d, 0, seen, values_out + rows * d, d);
        }
    }
}

// The fp32 backward of `weights_of_fp32` for the heads [h0, h1) (each head's groups, so that r's
// gradient is summed by one thread): per group, 16 rows at a time, the weights' gradient (go v^T,
// where gw is null), the scores' gradient ds and its shift raw (`softmax_backward_row`, kept for
// the group in the core's L2), grad_q_content = ds k and grad_q_position = raw r; then per group
// grad_k = ds^T q_content, grad_v = w^T go and grad_r += raw^T q_position. Terms the causal mask
// makes zero are skipped.
void attention_grads_fp32(const float* w, const float* gw, const float* go, const float* v, const float* qc,
                          const float* k, const float* qp, const float* r, float* gqc, float* gk, float* gv,
                          float* gqp, float* gr, int64_t h0, int64_t h1, int64_t batch, int64_t l, int64_t k_len,
                          int64_t d) {
    const int64_t offset = k_len - l;
    const bool outputs = gw == nullptr;
    std::vector<float> ds(l * k_len), raw(l * k_len), vt(outputs ? d * k_len : 0), gwf(outputs ? 16 * k_len : 0);
    // ds row i is zero past key offset + i, raw row i before column l - 1 - i: in the transposed
    // products, key rows j .. j + 7 need the query rows from j - offset, distance columns c .. c + 7
    // those from l - 8 - c
    auto ds_first = [&](int64_t j) { return std::max<int64_t>(0, j - offset); };
    auto raw_first = [&](int64_t c) { return std::max<int64_t>(0, l - 8 - c); };
    for (int64_t h = h0; h < h1; ++h)
        for (int64_t b = 0; b < batch; ++b) {
            const int64_t g = h * batch + b;
            const float* kg = k + g * k_len * d;
            if (outputs) transpose_fp32(v + g * k_len * d, k_len, d, vt.data());
            for (int64_t i0 = 0; i0 < l; i0 += 16) {
                const int64_t rows = g * l + i0, first = l - 16 - i0, seen = offset + i0 + 16;
                if (outputs)
                    product_fp32(go + rows * d, d, 1, vt.data(), k_len, 16, seen, 0, d, gwf.data(), k_len);
                for (int64_t t = 0; t < 16; ++t) {
                    const int64_t i = i0 + t;
                    const float* grad = outputs ? gwf.data() + t * k_len : gw + (rows + t) * k_len;
                    softmax_backward_row(w + (rows + t) * k_len, grad, k_len, offset + i + 1, l - 1 - i,
                                         ds.data() + i * k_len, raw.data() + i * k_len);
                }
                product_fp32(ds.data() + i0 * k_len, k_len, 1, kg, d, 16, d, 0, seen, gqc + rows * d, d);
                product_fp32(raw.data() + i0 * k_len, k_len, 1, r + h * k_len * d, d, 16, d, first, k_len,
                             gqp + rows * d, d);
            }
            product_fp32_from<false>(ds.data(), 1, k_len, qc + g * l * d, d, k_len, d, ds_first, l, gk + g * k_len * d, d);
            if (outputs)
                product_fp32_from<false>(w + g * l * k_len, 1, k_len, go + g * l * d, d, k_len, d, ds_first, l,
                                    gv + g * k_len * d, d);
            if (b == 0)
                product_fp32_from<false>(raw.data(), 1, k_len, qp + g * l * d, d, k_len, d, raw_first, l, gr + h * k_len * d, d);
            else
                product_fp32_from<true>(raw.data(), 1, k_len, qp + g * l * d, d, k_len, d, raw_first, l, gr + h * k_len * d, d);
        }
}

#endif  // STILL_FP32

#ifdef STILL_BF16

// ---- The bf16 kernels' products, on AMX tiles (`Tiles`) where the processor has them and the system
// hands out their data, else on AVX-512 bf16's dot products (`vdpbf16ps`) in registers (AMD's Zen 4
// and 5, for one). Both read the same operands: A row-major bf16, 32 values a key block; B packed as
// AMX's B tiles (`pack_vnni`, `pack_values`: 16 pairs x 16 columns as 32-bit words); both sum the
// products of bf16 pairs in fp32.

std::atomic<bool> tiles_allowed{true};  // false: the dot products where AMX would run (tests compare the two)
std::atomic<bool> content_by_columns{true};  // false: `content_of`'s rows on the dot products (timing, tests)

// Where the bf16 kernels find a (head, batch row) group's rows of keys, values, the output or its
// gradient: (B, H, n, D) with each row's D values contiguous, element (b, h, j, f) at
// b * batch + h * head + j * row + f. Heads-major (G, n, D): {n D, B n D, D}; the keys and values of
// one (B, n, 2d) projection (the values at + d): {n 2d, D, 2d}; an output (B, n, d): {n d, D, d}.
struct Layout {
    int64_t batch, head, row;
    int64_t at(int64_t g, int64_t batch_size) const { return (g % batch_size) * batch + (g / batch_size) * head; }
};

// `layouts`: the (batch, head, row) strides of k and v (alike), then of the output or its gradient
// (`Layout`); null: heads-major (G, K, D) and (G, L, D), contiguous. 3 where a row stride is odd or
// below D (the kernels read rows as pairs of bf16).
bool layouts_of(const int64_t* layouts, int64_t batch, int64_t l, int64_t k_len, int64_t d, Layout& kv, Layout& out) {
    if (layouts == nullptr) {
        kv = Layout{k_len * d, batch * k_len * d, d};
        out = Layout{l * d, batch * l * d, d};
        return true;
    }
    kv = Layout{layouts[0], layouts[1], layouts[2]};
    out = Layout{layouts[3], layouts[4], layouts[5]};
    return kv.row >= d && kv.row % 2 == 0 && out.row >= d && out.row % 2 == 0;
}

#ifdef STILL_AMX
struct alignas(64) TileConfig {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

bool amx_permitted() {  // Linux hands out the tile data only on request, once per process
    static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return ok;
}
#endif  // STILL_AMX

bool use_tiles() {
#ifdef STILL_AMX
    return tiles_allowed.load() && amx_permitted();
#else
    return false;
#endif
}

// run(std::true_type) where the products run on AMX tiles, else run(std::false_type)
template <class Run>
void with_products(const Run& run) {
#ifdef STILL_AMX
    if (use_tiles()) {
        run(std::true_type{});
        return;
    }
#endif
    run(std::false_type{});
}

// tiles 0: C (16 x 16 fp32), 1: A (16 rows x 32 bf16), 2: B (16 pairs x 16 columns, VNNI); `count`
// tiles of that shape (16 rows of 64 bytes) in all, up to 8; nothing without `Tiles`
template <bool Tiles>
void configure_tiles([[maybe_unused]] int count = 3) {
    if constexpr (Tiles) {
#ifdef STILL_AMX
        TileConfig c{};
        c.palette = 1;
        for (int t = 0; t < count; ++t) {
            c.rows[t] = 16;
            c.colsb[t] = 64;
        }
        _tile_loadconfig(&c);
#endif
    }
}

template <bool Tiles>
void release_tiles() {
    if constexpr (Tiles) {
#ifdef STILL_AMX
        _tile_release();
#endif
    }
}

// C (MR x 16 NV, fp32) = (or += where Add) A B over the key blocks [kb0, kb1), as AMX's tile products
// compute it: A's row i at a + i * lda (bf16; block kb's 32 values from a + 32 kb), B's tile of key
// block kb and column block j at b + kb * kstride + j * cstride, C's row i at c + i * ldc. Per pair
// of A's values: NV loads, MR broadcasts and MR NV `vdpbf16ps` (two products summed into each fp32
// lane); the MR x NV accumulators stay in registers (16 of 32 at 8 x 2).
template <int MR, int NV, bool Add>
inline void block_bf16(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t kstride, int64_t cstride,
                       int64_t kb0, int64_t kb1, float* c, int64_t ldc) {
    __m512 acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j) acc[i][j] = Add ? _mm512_loadu_ps(c + i * ldc + 16 * j) : _mm512_setzero_ps();
    for (int64_t kb = kb0; kb < kb1; ++kb) {
        const uint16_t* ak = a + kb * 32;
        const uint32_t* bk = b + kb * kstride;
        for (int p = 0; p < 16; ++p) {
            __m512bh bv[NV];
            for (int j = 0; j < NV; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(bk + j * cstride + p * 16);
#pragma GCC unroll 16
            for (int i = 0; i < MR; ++i) {
                int32_t pair;  // A's values 2p and 2p + 1 of row i
                std::memcpy(&pair, ak + i * lda + 2 * p, sizeof pair);
                const __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
                for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], ai, bv[j]);
            }
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

// `block_bf16` over `rows` rows (a multiple of 8) and the column blocks [j0, j1): two at a time
template <bool Add>
void product_bf16(const uint16_t* a, int64_t lda, int64_t rows, const uint32_t* b, int64_t kstride, int64_t cstride,
                  int64_t j0, int64_t j1, int64_t kb0, int64_t kb1, float* c, int64_t ldc) {
    for (int64_t i = 0; i < rows; i += 8) {
        const uint16_t* ai = a + i * lda;
        float* ci = c + i * ldc;
        int64_t j = j0;
        for (; j + 2 <= j1; j += 2)
            block_bf16<8, 2, Add>(ai, lda, b + j * cstride, kstride, cstride, kb0, kb1, ci + 16 * j, ldc);
        if (j < j1) block_bf16<8, 1, Add>(ai, lda, b + j * cstride, kstride, cstride, kb0, kb1, ci + 16 * j, ldc);
    }
}

// `_mm512_permutex2var_epi16` indices interleaving two rows a and b of 32 bf16 into 32-bit words:
// word c of `low` is (a[c], b[c]) for columns 0-15, of `high` for columns 16-31
struct PairIndex {
    __m512i low, high;
};

inline PairIndex pair_index() {
    alignas(64) uint16_t low[32], high[32];
    for (int c = 0; c < 16; ++c) {
        low[2 * c] = uint16_t(c), low[2 * c + 1] = uint16_t(32 + c);
        high[2 * c] = uint16_t(16 + c), high[2 * c + 1] = uint16_t(48 + c);
    }
    return {_mm512_load_si512(low), _mm512_load_si512(high)};
}

// r[i] holds row i of a 16 x 16 matrix of 32-bit values; afterwards, column i (in registers: four
// rounds of 16 shuffles, where 16 gathers of a column each cost several times as much)
inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int k = 0; k < 8; ++k) {  // pairs of rows, 32-bit words interleaved
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; ++k) {  // quads of rows, 64-bit words interleaved
        u[4 * k] = (__m512)_mm512_unpacklo_pd((__m512d)t[4 * k], (__m512d)t[4 * k + 2]);
        u[4 * k + 1] = (__m512)_mm512_unpackhi_pd((__m512d)t[4 * k], (__m512d)t[4 * k + 2]);
        u[4 * k + 2] = (__m512)_mm512_unpacklo_pd((__m512d)t[4 * k + 1], (__m512d)t[4 * k + 3]);
        u[4 * k + 3] = (__m512)_mm512_unpackhi_pd((__m512d)t[4 * k + 1], (__m512d)t[4 * k + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // u[4k + c]'s 128-bit lane j: column 4j + c of rows 4k .. 4k + 3
        const __m512 a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), b = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
        const __m512 e = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
        const __m512 f = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
        r[c] = _mm512_shuffle_f32x4(a, e, 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(a, e, 0xdd);
        r[4 + c] = _mm512_shuffle_f32x4(b, f, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(b, f, 0xdd);
    }
}

// (rows, D) bf16 at row stride ld (even) -> B tiles: tile (nb, db) holds rows 16 nb .. +15 (its
// columns) and features 32 db .. +31 (16 pairs, its rows), as 32-bit words [p][n] = features (2p, 2p + 1)
// of row n: each tile the transpose of its rows' 16 x 16 words, in registers (`transpose16`)
void pack_vnni(const uint16_t* src, int64_t rows, int64_t d, int64_t ld, uint32_t* packed) {
    const int64_t nd = d / 32;
    __m512 r[16];
    for (int64_t nb = 0; nb < rows / 16; ++nb)
        for (int64_t db = 0; db < nd; ++db) {
            const uint16_t* base = src + nb * 16 * ld + db * 32;
            for (int n = 0; n < 16; ++n) r[n] = _mm512_loadu_ps(base + n * ld);
            transpose16(r);
            uint32_t* tile = packed + (nb * nd + db) * 256;
            for (int p = 0; p < 16; ++p) _mm512_storeu_ps(tile + p * 16, r[p]);
        }
}

// 16 rows of `a` (row stride lda) times the packed columns blocks [first, last) -> out (row stride k_len)
template <bool Tiles>
void scores(const uint16_t* a, int64_t lda, const uint32_t* packed, int64_t d, int64_t first, int64_t last,
            float* out, int64_t k_len) {
    const int64_t nd = d / 32;
    if constexpr (!Tiles) {
        product_bf16<false>(a, lda, 16, packed, 256, nd * 256, first, last, 0, nd, out, k_len);
        return;
    }
#ifdef STILL_AMX
    for (int64_t cb = first; cb < last; ++cb) {
        _tile_zero(0);
        for (int64_t db = 0; db < nd; ++db) {
            _tile_loadd(1, a + db * 32, lda * 2);
            _tile_loadd(2, packed + (cb * nd + db) * 256, 64);
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, out + cb * 16, k_len * 4);
    }
#endif
}

// count fp32 values (a multiple of 16) rounded to bf16
void to_bf16(const float* src, int64_t count, uint16_t* dst) {
    for (int64_t j = 0; j < count; j += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j)));
}

void pack_values(const uint16_t* v, int64_t n, int64_t d, int64_t ld, uint32_t* packed);

// 16 rows of weights w (row stride k_len, bf16) times the values packed by `pack_values`, over the key
// blocks [0, kb1) (the weights are zero beyond) -> out (16, d) bf16, row stride out_ld; o: a 16 x d
// fp32 scratch. Two column blocks at a time (tiles 0 and 3, A in 1, B in 2 and 4).
template <bool Tiles>
void weights_times_values(const uint16_t* w, const uint32_t* packed, int64_t kb1, int64_t k_len, int64_t d, float* o,
                          uint16_t* out, int64_t out_ld) {
    const int64_t nc = d / 16;
    if constexpr (!Tiles) product_bf16<false>(w, k_len, 16, packed, nc * 256, 256, 0, nc, 0, kb1, o, d);
#ifdef STILL_AMX
    else for (int64_t cb = 0; cb < nc; cb += 2) {
        _tile_zero(0);
        _tile_zero(3);
        for (int64_t kb = 0; kb < kb1; ++kb) {
            _tile_loadd(1, w + kb * 32, k_len * 2);
            _tile_loadd(2, packed + (kb * nc + cb) * 256, 64);
            _tile_loadd(4, packed + (kb * nc + cb + 1) * 256, 64);
            _tile_dpbf16ps(0, 1, 2);
            _tile_dpbf16ps(3, 1, 4);
        }
        _tile_stored(0, o + cb * 16, d * 4);
        _tile_stored(3, o + (cb + 1) * 16, d * 4);
    }
#endif
    if (out_ld == d)
        to_bf16(o, 16 * d, out);
    else
        for (int t = 0; t < 16; ++t) to_bf16(o + t * d, d, out + t * out_ld);
}

// The weights of groups [g0, g1) into out (G, L, K); where v is not null, also (weights v) into
// values_out, 16 rows at a time while their weights are in the core's cache. k and v where `kv` says,
// values_out where `vo` says.
template <bool Tiles>
void weights_of(const uint16_t* q_content, const uint16_t* k, const uint16_t* q_position, const uint16_t* r,
                const uint16_t* bias, int64_t bias_batch_stride, uint16_t* out, const uint16_t* v,
                uint16_t* values_out, int64_t g0, int64_t g1, int64_t batch, int64_t l, int64_t k_len, int64_t d,
                Layout kv, Layout vo) {
    std::vector<uint32_t> r_packed(k_len * d / 2), k_packed(k_len * d / 2), v_packed(v == nullptr ? 0 : k_len * d / 2);
    std::vector<float> content(16 * k_len), position(16 * k_len), o(16 * d);
    configure_tiles<Tiles>(5);
    int64_t packed_head = -1;
    for (int64_t g = g0; g < g1; ++g) {
        const int64_t h = g / batch, b = g % batch;
        if (h != packed_head) {
            pack_vnni(r + h * k_len * d, k_len, d, d, r_packed.data());
            packed_head = h;
        }
        pack_vnni(k + kv.at(g, batch), k_len, d, kv.row, k_packed.data());
        if (v != nullptr) pack_values(v + kv.at(g, batch), k_len, d, kv.row, v_packed.data());
        const uint16_t* bias_b = bias == nullptr ? nullptr : bias + b * bias_batch_stride;
        for (int64_t i0 = 0; i0 < l; i0 += 16) {
            const int64_t rows = g * l + i0;  // q_position's row h * B * L + b * L + i0 is the same
            // row i reads the position scores of columns L - 1 - i .. K - 1, its keys 0 .. K - L + i
            scores<Tiles>(q_position + rows * d, d, r_packed.data(), d, (l - 16 - i0) / 16, k_len / 16,
                          position.data(), k_len);
            scores<Tiles>(q_content + rows * d, d, k_packed.data(), d, 0, (k_len - l + i0) / 16 + 1, content.data(),
                          k_len);
            for (int64_t t = 0; t < 16; ++t) {
                const int64_t i = i0 + t;
                softmax_row<true>(content.data() + t * k_len, position.data() + t * k_len + (l - 1 - i),
                            bias_b == nullptr ? nullptr : bias_b + i * k_len, k_len - l + i + 1, k_len, out + (rows + t) * k_len);
            }
            if (v != nullptr)  // the 16 rows see keys 0 .. K - L + i0 + 15
                weights_times_values<Tiles>(out + rows * k_len, v_packed.data(), (k_len - l + i0 + 16 + 31) / 32,
                                            k_len, d, o.data(), values_out + vo.at(g, batch) + i0 * vo.row, vo.row);
        }
    }
    release_tiles<Tiles>();
}

// (n, D) bf16 values at row stride ld -> B tiles for (16 rows x 32 keys of weights) times values:
// tile (kb, cb) holds keys 32 kb .. +31 (16 pairs, its rows) and features 16 cb .. +15 (its columns),
// as 32-bit words [p][c] = (v[32 kb + 2p][16 cb + c], v[32 kb + 2p + 1][16 cb + c]); n a multiple of
// 32, D of 32
void pack_values(const uint16_t* v, int64_t n, int64_t d, int64_t ld, uint32_t* packed) {
    const int64_t nc = d / 16;
    const PairIndex index = pair_index();
    for (int64_t kb = 0; kb < n / 32; ++kb)
        for (int p = 0; p < 16; ++p) {
            const uint16_t* a = v + (32 * kb + 2 * p) * ld;
            for (int64_t cb = 0; cb < nc; cb += 2) {
                const __m512i va = _mm512_loadu_si512(a + 16 * cb), vb = _mm512_loadu_si512(a + ld + 16 * cb);
                _mm512_storeu_si512(packed + ((kb * nc + cb) * 16 + p) * 16, _mm512_permutex2var_epi16(va, index.low, vb));
                _mm512_storeu_si512(packed + ((kb * nc + cb + 1) * 16 + p) * 16,
                                    _mm512_permutex2var_epi16(va, index.high, vb));
            }
        }
}

// `content_of` on AVX-512 bf16's dot products, 16 queries at a time with their scores transposed:
// s^T (n keys x 16 queries) = k q^T, each of its n rows one register of the 16 queries' scores for
// a key. Each query's softmax then runs down the lanes: its maximum and sum are lanewise over the n
// registers (no reduction across lanes, one division for all 16), and the weights come out already
// as the B operand of out^T (D x 16) = v^T w^T (pairs of keys, a query a lane). Short rows (the
// reconstruction loss's n = n_s and n_s / c keys) spent most of their time in the per-row sums and
// division of `softmax_row` (docs/performance.md, session 42). The scores are the same sums as the
// row-major path's (each lane sums the same pairs in the same order), the maximum and the weights'
// rounding too; the sum over the keys runs in another order.

void transpose_bf16(const uint16_t* src, int64_t rows, int64_t cols, int64_t stride, uint16_t* dst,
                    int64_t dst_stride);

void content_of_columns(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, uint16_t* weights_out,
                        int64_t g0, int64_t g1, int64_t l, int64_t n, int64_t d, int64_t q_stride, int64_t kv_stride,
                        int64_t out_stride) {
    const int64_t nd = d / 32, nk = n / 32;
    std::vector<uint32_t> q_packed(16 * d / 2), w_packed(16 * n / 2);
    std::vector<uint16_t> vt(d * n);
    std::vector<float> st(n * 16), ot(d * 16);
    alignas(64) uint16_t pairs[32];  // word 2i: query i's weight of the even key (low half), 2i + 1: the odd one's
    for (int i = 0; i < 16; ++i) pairs[2 * i] = uint16_t(i), pairs[2 * i + 1] = uint16_t(16 + i);
    const __m512i interleave = _mm512_load_si512(pairs);
    for (int64_t g = g0; g < g1; ++g) {
        const uint16_t* kg = k + g * kv_stride;
        transpose_bf16(v + g * kv_stride, n, d, d, vt.data(), n);  // v^T (D, n)
        for (int64_t i0 = 0; i0 < l; i0 += 16) {
            pack_vnni(q + g * q_stride + i0 * d, 16, d, d, q_packed.data());  // 16 queries as B's columns
            product_bf16<false>(kg, d, n, q_packed.data(), 256, nd * 256, 0, 1, 0, nd, st.data(), 16);  // s^T
            __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
            for (int64_t j = 0; j < n; j += 2) {
                m0 = _mm512_max_ps(m0, _mm512_loadu_ps(st.data() + j * 16));
                m1 = _mm512_max_ps(m1, _mm512_loadu_ps(st.data() + (j + 1) * 16));
            }
            const __m512 top = _mm512_max_ps(m0, m1);  // every query's maximum (finite: no key is masked)
            __m512 s0 = _mm512_setzero_ps(), s1 = s0;
            for (int64_t j = 0; j < n; j += 2) {
                const __m512 e0 = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(st.data() + j * 16), top));
                const __m512 e1 = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(st.data() + (j + 1) * 16), top));
                _mm512_storeu_ps(st.data() + j * 16, e0);
                _mm512_storeu_ps(st.data() + (j + 1) * 16, e1);
                s0 = _mm512_add_ps(s0, e0);
                s1 = _mm512_add_ps(s1, e1);
            }
            const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(s0, s1));
            for (int64_t j = 0; j < n; j += 2) {  // w_packed[kb][p][i] = (w[i][32 kb + 2p], w[i][32 kb + 2p + 1])
                const __m512 even = _mm512_mul_ps(_mm512_loadu_ps(st.data() + j * 16), inv);
                const __m512 odd = _mm512_mul_ps(_mm512_loadu_ps(st.data() + (j + 1) * 16), inv);
                const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);  // even's 16 low, odd's 16 high
                _mm512_storeu_si512(w_packed.data() + j * 8, _mm512_permutexvar_epi16(interleave, both));
            }
            __m512 r[16];
            if (weights_out != nullptr) {  // the weights as rows (16, n): each key block's pairs transposed
                uint16_t* rows = weights_out + (g * l + i0) * n;
                for (int64_t kb = 0; kb < nk; ++kb) {
                    for (int p = 0; p < 16; ++p) r[p] = _mm512_loadu_ps(w_packed.data() + kb * 256 + p * 16);
                    transpose16(r);
                    for (int64_t i = 0; i < 16; ++i) _mm512_storeu_ps(rows + i * n + 32 * kb, r[i]);
                }
            }
            product_bf16<false>(vt.data(), n, d, w_packed.data(), 256, 0, 0, 1, 0, nk, ot.data(), 16);  // out^T
            uint16_t* o = out + g * out_stride + i0 * d;
            for (int64_t f = 0; f < d; f += 16) {  // out rows: out^T's 16 x 16 blocks transposed, rounded once
                for (int x = 0; x < 16; ++x) r[x] = _mm512_loadu_ps(ot.data() + (f + x) * 16);
                transpose16(r);
                for (int64_t i = 0; i < 16; ++i)
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i * d + f), (__m256i)_mm512_cvtneps_pbh(r[i]));
            }
        }
    }
}

// softmax(q k^T) v for groups [g0, g1): q (L, D) per group at q + g * q_stride, k and v (n, D) at
// + g * kv_stride, out (L, D) at out + g * out_stride; both products with fp32 sums, the scores and
// the softmax in fp32, the weights rounded once to bf16 for the second product, its sums in fp32.
// The weights (L, n) also into weights_out + g * L * n where not null (for a backward).
template <bool Tiles>
void content_of(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out, uint16_t* weights_out,
                int64_t g0, int64_t g1, int64_t l, int64_t n, int64_t d, int64_t q_stride, int64_t kv_stride,
                int64_t out_stride) {
    std::vector<uint32_t> k_packed(n * d / 2), v_packed(n * d / 2);
    std::vector<float> s(16 * n), o(16 * d);
    std::vector<uint16_t> w(16 * n);
    configure_tiles<Tiles>(5);  // (`weights_times_values`' tiles)
    for (int64_t g = g0; g < g1; ++g) {
        pack_vnni(k + g * kv_stride, n, d, d, k_packed.data());
        pack_values(v + g * kv_stride, n, d, d, v_packed.data());
        for (int64_t i0 = 0; i0 < l; i0 += 16) {
            scores<Tiles>(q + g * q_stride + i0 * d, d, k_packed.data(), d, 0, n / 16, s.data(), n);
            uint16_t* wrows = weights_out == nullptr ? w.data() : weights_out + (g * l + i0) * n;
            for (int64_t t = 0; t < 16; ++t)
                softmax_row<false, uint16_t>(s.data() + t * n, nullptr, nullptr, n, n, wrows + t * n);
            weights_times_values<Tiles>(wrows, v_packed.data(), n / 32, n, d, o.data(),
                                        out + g * out_stride + i0 * d, d);
        }
    }
    release_tiles<Tiles>();
}

// src (rows, cols) bf16 at row stride `stride`, rows and cols multiples of 32 -> dst (cols, rows) at
// row stride `dst_stride`. Per 32 x 32 block: each pair of rows interleaved into 32-bit words (a
// column's two values), then two 16 x 16 word transposes in registers (`transpose16`).
void transpose_bf16(const uint16_t* src, int64_t rows, int64_t cols, int64_t stride, uint16_t* dst,
                    int64_t dst_stride) {
    const PairIndex index = pair_index();
    __m512 x[16], y[16];
    for (int64_t r0 = 0; r0 < rows; r0 += 32)
        for (int64_t c0 = 0; c0 < cols; c0 += 32) {
            for (int i = 0; i < 16; ++i) {  // rows r0 + 2i and r0 + 2i + 1: word c = (a[c], b[c])
                const uint16_t* a = src + (r0 + 2 * i) * stride + c0;
                const __m512i va = _mm512_loadu_si512(a), vb = _mm512_loadu_si512(a + stride);
                x[i] = (__m512)_mm512_permutex2var_epi16(va, index.low, vb);
                y[i] = (__m512)_mm512_permutex2var_epi16(va, index.high, vb);
            }
            transpose16(x);  // x[c]: column c0 + c's 32 values, rows r0 .. r0 + 31
            transpose16(y);
            for (int c = 0; c < 16; ++c) {
                _mm512_storeu_ps(dst + (c0 + c) * dst_stride + r0, x[c]);
                _mm512_storeu_ps(dst + (c0 + 16 + c) * dst_stride + r0, y[c]);
            }
        }
}

// 32 rows of a (row stride k_len, bf16) times the (k_len, d) matrix packed by `pack_values`, over the
// key blocks [kb0, kb1) (the others are zero in a) -> out (32, d) bf16; o: a 32 x d fp32 scratch.
// Four accumulators at a time (two 16-row halves x two column blocks), so that the products of one
// key block do not wait for each other. Tiles 0-7 (`configure_tiles(8)`).
template <bool Tiles>
void rows_times(const uint16_t* a, const uint32_t* packed, int64_t kb0, int64_t kb1, int64_t k_len, int64_t d,
                float* o, uint16_t* out) {
    const int64_t nc = d / 16;
    if constexpr (!Tiles) product_bf16<false>(a, k_len, 32, packed, nc * 256, 256, 0, nc, kb0, kb1, o, d);
#ifdef STILL_AMX
    else for (int64_t cb = 0; cb < nc; cb += 2) {
        _tile_zero(0);
        _tile_zero(3);
        _tile_zero(4);
        _tile_zero(5);
        for (int64_t kb = kb0; kb < kb1; ++kb) {
            _tile_loadd(1, a + kb * 32, k_len * 2);
            _tile_loadd(6, a + 16 * k_len + kb * 32, k_len * 2);
            _tile_loadd(2, packed + (kb * nc + cb) * 256, 64);
            _tile_loadd(7, packed + (kb * nc + cb + 1) * 256, 64);
            _tile_dpbf16ps(0, 1, 2);
            _tile_dpbf16ps(3, 1, 7);
            _tile_dpbf16ps(4, 6, 2);
            _tile_dpbf16ps(5, 6, 7);
        }
        _tile_stored(0, o + cb * 16, d * 4);
        _tile_stored(3, o + (cb + 1) * 16, d * 4);
        _tile_stored(4, o + 16 * d + cb * 16, d * 4);
        _tile_stored(5, o + 16 * d + (cb + 1) * 16, d * 4);
    }
#endif
    to_bf16(o, 32 * d, out);
}

// acc (d, k_len) fp32 (= where `accumulate`, else overwritten) the transposed operand at (d, l) bf16
// (row stride l) times the (l, k_len) rows packed by `pack_values`, column block cb (16 columns) summed
// over the row blocks [first_block(cb), l / 32) (the earlier ones are zero in those columns); two
// feature blocks at a time. Tiles 0-4.
template <bool Tiles, class First>
void transposed_times(float* acc, const uint16_t* at, const uint32_t* packed, int64_t l, int64_t k_len, int64_t d,
                      bool accumulate, const First& first_block) {
    const int64_t nk = k_len / 16, rblocks = l / 32;
    if constexpr (!Tiles) {  // a column block at a time (each its own first row block), 16 features at a time
        for (int64_t cb = 0; cb < nk; ++cb)
            for (int64_t f = 0; f < d; f += 16) {
                const uint16_t* a = at + f * l;
                const uint32_t* b = packed + cb * 256;
                float* c = acc + f * k_len + cb * 16;
                if (accumulate)
                    block_bf16<16, 1, true>(a, l, b, nk * 256, 256, first_block(cb), rblocks, c, k_len);
                else
                    block_bf16<16, 1, false>(a, l, b, nk * 256, 256, first_block(cb), rblocks, c, k_len);
            }
        return;
    }
#ifdef STILL_AMX
    for (int64_t cb = 0; cb < nk; ++cb) {
        const int64_t first = first_block(cb);
        for (int64_t fb = 0; fb < d / 16; fb += 2) {
            float* c0 = acc + fb * 16 * k_len + cb * 16;
            float* c1 = c0 + 16 * k_len;
            if (accumulate) {
                _tile_loadd(0, c0, k_len * 4);
                _tile_loadd(3, c1, k_len * 4);
            } else {
                _tile_zero(0);
                _tile_zero(3);
            }
            for (int64_t rb = first; rb < rblocks; ++rb) {
                _tile_loadd(2, packed + (rb * nk + cb) * 256, 64);
                _tile_loadd(1, at + fb * 16 * l + rb * 32, l * 2);
                _tile_loadd(4, at + (fb + 1) * 16 * l + rb * 32, l * 2);
                _tile_dpbf16ps(0, 1, 2);
                _tile_dpbf16ps(3, 4, 2);
            }
            _tile_stored(0, c0, k_len * 4);
            _tile_stored(3, c1, k_len * 4);
        }
    }
#endif
}

// The backward of `still_attention_weights` through its four products, for the heads [h0, h1) (each
// head's groups h B .. h B + B - 1, so that r's gradient is summed by one thread). Per group: the
// scores' gradient ds and its shift raw for all L rows (`softmax_backward_row`, rounded to bf16,
// kept in the core's L2); then grad_q_content = ds k and grad_q_position = raw r, 32 rows at a time;
// grad_k^T = q_content^T ds and grad_r^T += q_position^T raw, each 16 x 16 block summed over the
// row blocks in its accumulator (fp32; transposed at the end of a group and of a head). The key
// blocks the causal mask leaves zero are skipped. grad_r in fp32, centred over the distances where
// `center`.
template <bool Tiles>
void attention_grads_of(const uint16_t* w, const uint16_t* gw, const uint16_t* go, const uint16_t* v,
                        const uint16_t* qc, const uint16_t* k, const uint16_t* qp, const uint16_t* r, uint16_t* gqc,
                        uint16_t* gk, uint16_t* gv, uint16_t* gqp, float* gr, int64_t h0, int64_t h1, int64_t batch,
                        int64_t l, int64_t k_len, int64_t d, bool center, Layout kv, Layout og) {
    const int64_t kblocks = k_len / 32, offset = k_len - l;  // query i is key offset + i
    const bool outputs = gw == nullptr;  // the weights' gradient from the output's: go v^T
    std::vector<uint32_t> k_packed(k_len * d / 2), r_packed(k_len * d / 2), ds_packed(l * k_len / 2),
        raw_packed(l * k_len / 2), v_packed(outputs ? k_len * d / 2 : 0), w_packed(outputs ? l * k_len / 2 : 0);
    std::vector<uint16_t> ds(l * k_len), raw(l * k_len), qt(d * l), qpt(d * l), kt(d * k_len), got(outputs ? d * l : 0);
    std::vector<float> acc_k(d * k_len), acc_r(d * k_len), o(32 * d), gwf(outputs ? 16 * k_len : 0);
    configure_tiles<Tiles>(8);
    // ds row i is zero past key offset + i: columns 16 cb .. are zero in rows i < 16 cb - offset;
    // raw row i is zero before column l - 1 - i: columns .. 16 cb + 15 are zero in rows i < l - 16 - 16 cb
    auto ds_first = [&](int64_t cb) { return std::max<int64_t>(0, (16 * cb - offset) / 32); };
    auto raw_first = [&](int64_t cb) { return std::max<int64_t>(0, (l - 16 - 16 * cb) / 32); };
    for (int64_t h = h0; h < h1; ++h) {
        pack_values(r + h * k_len * d, k_len, d, d, r_packed.data());
        for (int64_t b = 0; b < batch; ++b) {
            const int64_t g = h * batch + b;  // q_position's rows h B L + b L .. are the group's g L ..
            const int64_t kv_at = kv.at(g, batch), og_at = og.at(g, batch);
            pack_values(k + kv_at, k_len, d, kv.row, k_packed.data());
            if (!outputs) {
                for (int64_t i = 0; i < l; ++i) {
                    const int64_t at = (g * l + i) * k_len;
                    softmax_backward_row(w + at, gw + at, k_len, k_len, l - 1 - i, ds.data() + i * k_len,
                                         raw.data() + i * k_len);
                }
            } else {  // 16 rows of the weights' gradient at a time, in fp32, over the keys they see
                pack_vnni(v + kv_at, k_len, d, kv.row, v_packed.data());
                for (int64_t i0 = 0; i0 < l; i0 += 16) {
                    const int64_t seen = offset + i0 + 16;  // keys of the 16 rows: 0 .. offset + i0 + 15
                    scores<Tiles>(go + og_at + i0 * og.row, og.row, v_packed.data(), d, 0, seen / 16, gwf.data(),
                                  k_len);
                    for (int64_t t = 0; t < 16; ++t) {
                        const int64_t i = i0 + t;
                        softmax_backward_row(w + (g * l + i) * k_len, gwf.data() + t * k_len, k_len, seen, l - 1 - i,
                                             ds.data() + i * k_len, raw.data() + i * k_len);
                    }
                }
            }
            for (int64_t i0 = 0; i0 < l; i0 += 32) {
                const int64_t ds_end = std::min(kblocks, (offset + i0 + 32 + 31) / 32);
                const int64_t raw_begin = std::max<int64_t>(0, (l - 32 - i0) / 32);
                rows_times<Tiles>(ds.data() + i0 * k_len, k_packed.data(), 0, ds_end, k_len, d, o.data(),
                                  gqc + (g * l + i0) * d);
                rows_times<Tiles>(raw.data() + i0 * k_len, r_packed.data(), raw_begin, kblocks, k_len, d, o.data(),
                                  gqp + (g * l + i0) * d);
            }
            transpose_bf16(qc + g * l * d, l, d, d, qt.data(), l);
            transpose_bf16(qp + g * l * d, l, d, d, qpt.data(), l);
            pack_values(ds.data(), l, k_len, k_len, ds_packed.data());
            pack_values(raw.data(), l, k_len, k_len, raw_packed.data());
            transposed_times<Tiles>(acc_k.data(), qt.data(), ds_packed.data(), l, k_len, d, false, ds_first);
            transposed_times<Tiles>(acc_r.data(), qpt.data(), raw_packed.data(), l, k_len, d, b > 0, raw_first);
            to_bf16(acc_k.data(), d * k_len, kt.data());  // grad_k^T to bf16, then transposed into place
            transpose_bf16(kt.data(), d, k_len, k_len, gk + kv_at, kv.row);
            if (outputs) {  // grad_v^T = go^T w, summed over the rows where w is not zero (those of ds)
                transpose_bf16(go + og_at, l, d, og.row, got.data(), l);
                pack_values(w + g * l * k_len, l, k_len, k_len, w_packed.data());
                transposed_times<Tiles>(acc_k.data(), got.data(), w_packed.data(), l, k_len, d, false, ds_first);
                to_bf16(acc_k.data(), d * k_len, kt.data());
                transpose_bf16(kt.data(), d, k_len, k_len, gv + kv_at, kv.row);
            }
        }
        // grad_r[h] (k_len, d) fp32 from grad_r^T, centred over the distances: each feature's mean removed
        const __m512i index = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(int(k_len)));
        for (int64_t f0 = 0; f0 < d; f0 += 16) {
            alignas(64) float mean[16];
            for (int64_t f = 0; f < 16; ++f) {
                double sum = 0;
                if (center)
                    for (int64_t c = 0; c < k_len; ++c) sum += acc_r[(f0 + f) * k_len + c];
                mean[f] = float(sum / double(k_len));
            }
            const __m512 m = _mm512_load_ps(mean);
            for (int64_t c = 0; c < k_len; ++c)
                _mm512_storeu_ps(gr + (h * k_len + c) * d + f0,
                                 _mm512_sub_ps(_mm512_i32gather_ps(index, acc_r.data() + f0 * k_len + c, 4), m));
        }
    }
    release_tiles<Tiles>();
}

// The backward of `content_of` (the reconstruction loss's approximation) for groups [g0, g1), on
// AVX-512 bf16's dot products, 32 queries at a time: from the weights w (L, n) the forward kept and
// the output's gradient go (L, D), the weights' gradient transposed, gw^T (n x 32) = v go^T, in fp32;
// the scores' gradient ds^T = w^T (gw^T - sum_j w gw), lanewise in fp32 (a query a lane), rounded
// once; then grad_q = ds k (where gq is not null), grad_k += ds^T q and grad_v += w^T go, the last
// two summed over the query blocks in fp32 and rounded once. PyTorch's path rounds gw, ds and each
// product's output to bf16. q, k, v as `content_of` reads them; w (G, L, n), go, gq (G, L, D) and
// gk, gv (G, n, D) contiguous. L, n and D multiples of 32.
void content_grads_of(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* w, const uint16_t* go,
                      uint16_t* gq, uint16_t* gk, uint16_t* gv, int64_t g0, int64_t g1, int64_t l, int64_t n,
                      int64_t d, int64_t q_stride, int64_t kv_stride) {
    const int64_t nd = d / 32, nc = d / 16, nk = n / 32;
    std::vector<uint32_t> go_vnni(32 * d / 2), go_values(32 * d / 2), q_values(32 * d / 2), k_values(n * d / 2);
    std::vector<uint16_t> wt(n * 32), dst(n * 32), ds(32 * n);
    std::vector<float> gwt(n * 32), acc_k(n * d), acc_v(n * d), o(32 * d);
    for (int64_t g = g0; g < g1; ++g) {
        const uint16_t* qg = q + g * q_stride;
        const uint16_t* kg = k + g * kv_stride;
        const uint16_t* vg = v + g * kv_stride;
        if (gq != nullptr) pack_values(kg, n, d, d, k_values.data());
        for (int64_t i0 = 0; i0 < l; i0 += 32) {
            const uint16_t* go_block = go + (g * l + i0) * d;
            pack_vnni(go_block, 32, d, d, go_vnni.data());  // go^T as B: 32 queries, two column blocks
            product_bf16<false>(vg, d, n, go_vnni.data(), 256, nd * 256, 0, 2, 0, nd, gwt.data(), 32);
            transpose_bf16(w + (g * l + i0) * n, 32, n, n, wt.data(), 32);  // w^T (n, 32)
            __m512 dot[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t j = 0; j < n; ++j)
                for (int h = 0; h < 2; ++h)
                    dot[h] = _mm512_fmadd_ps(load_row(wt.data() + j * 32 + 16 * h, __mmask16(0xffff)),
                                             _mm512_loadu_ps(gwt.data() + j * 32 + 16 * h), dot[h]);
            for (int64_t j = 0; j < n; ++j)
                for (int h = 0; h < 2; ++h) {
                    const __m512 wj = load_row(wt.data() + j * 32 + 16 * h, __mmask16(0xffff));
                    const __m512 dsj = _mm512_mul_ps(wj, _mm512_sub_ps(_mm512_loadu_ps(gwt.data() + j * 32 + 16 * h), dot[h]));
                    store_row(dst.data() + j * 32 + 16 * h, __mmask16(0xffff), dsj);
                }
            if (gq != nullptr) {  // grad_q rows: ds (32, n) times k
                transpose_bf16(dst.data(), n, 32, 32, ds.data(), n);
                product_bf16<false>(ds.data(), n, 32, k_values.data(), nc * 256, 256, 0, nc, 0, nk, o.data(), d);
                to_bf16(o.data(), 32 * d, gq + (g * l + i0) * d);
            }
            pack_values(qg + i0 * d, 32, d, d, q_values.data());
            pack_values(go_block, 32, d, d, go_values.data());
            if (i0 == 0) {
                product_bf16<false>(dst.data(), 32, n, q_values.data(), nc * 256, 256, 0, nc, 0, 1, acc_k.data(), d);
                product_bf16<false>(wt.data(), 32, n, go_values.data(), nc * 256, 256, 0, nc, 0, 1, acc_v.data(), d);
            } else {
                product_bf16<true>(dst.data(), 32, n, q_values.data(), nc * 256, 256, 0, nc, 0, 1, acc_k.data(), d);
                product_bf16<true>(wt.data(), 32, n, go_values.data(), nc * 256, 256, 0, nc, 0, 1, acc_v.data(), d);
            }
        }
        to_bf16(acc_k.data(), n * d, gk + g * n * d);
        to_bf16(acc_v.data(), n * d, gv + g * n * d);
    }
}

#endif  // STILL_BF16

}  // namespace

extern "C" {

// 0 where this build can run the bf16 kernels here; 1: not compiled for AVX-512 bf16
int64_t still_attention_available() {
#ifdef STILL_BF16
    return 0;
#else
    return 1;
#endif
}

// What the bf16 kernels' products run on: 1 AMX tiles, 0 AVX-512 bf16's dot products (the compiler's
// target has no AMX, the system refuses the tile data, or `still_attention_allow_tiles(0)`), -1 none
int64_t still_attention_tiles() {
#ifdef STILL_BF16
    return use_tiles() ? 1 : 0;
#else
    return -1;
#endif
}

// allow != 0: AMX tiles where they can run (the default); 0: the dot products everywhere (tests
// compare the two). Returns still_attention_tiles() after the change.
int64_t still_attention_allow_tiles(int64_t allow) {
#ifdef STILL_BF16
    tiles_allowed.store(allow != 0);
#endif
    return still_attention_tiles();
}

// on != 0: the content attention's dot-product path by columns (`content_of_columns`, the default);
// 0: by rows (`content_of`), as before session 42 (tests and timing compare the two). Returns the
// setting before; -1 where the bf16 kernels are not built.
int64_t still_content_by_columns(int64_t on) {
#ifdef STILL_BF16
    return content_by_columns.exchange(on != 0) ? 1 : 0;
#else
    (void)on;
    return -1;
#endif
}

// 0 where this build can run the fp32 kernels (`still_attention_weights_fp32`, `_grads_fp32`) here;
// 1: not compiled for AVX-512, nor for fused multiply-adds on narrower registers (AVX2 with FMA, ARM)
int64_t still_attention_fp32_available() {
#ifdef STILL_FP32
    return 0;
#else
    return 1;
#endif
}

// `still_attention_weights` in fp32 (fp32 operands, bias, weights and outputs; the same layouts),
// every product on fused multiply-adds: the weights into out (G, L, K) and, where v is not null,
// (weights v) into values_out (G, L, D). L, K and D multiples of 16. 0 on success; nonzero, nothing
// written, where this build cannot (1) or 3: shapes.
int64_t still_attention_weights_fp32(const float* q_content, const float* k, const float* q_position, const float* r,
                                     const float* bias, int64_t bias_batch_stride, float* out, const float* v,
                                     float* values_out, int64_t heads, int64_t batch, int64_t l, int64_t k_len,
                                     int64_t d, int64_t threads) {
    const int64_t available = still_attention_fp32_available();
    if (available != 0) return available;
    if (heads < 1 || batch < 1 || l < 16 || l % 16 || k_len % 16 || k_len < l || d < 16 || d % 16) return 3;
    if (v != nullptr && values_out == nullptr) return 3;
#ifdef STILL_FP32
    on_parts(heads * batch, threads, [&](int64_t g0, int64_t g1) {
        weights_of_fp32(q_content, k, q_position, r, bias, bias_batch_stride, out, v, values_out, g0, g1, batch, l,
                        k_len, d);
    });
#endif
    return 0;
}

// The backward of `still_attention_weights_fp32` through its products, in fp32 (`attention_grads_fp32`):
// from the weights w (G, L, K) and their gradient gw (G, L, K), or (gw null) the gradient go (G, L, D)
// of (weights v) and v (G, K, D), the gradients of q_content (G, L, D), k (G, K, D), q_position
// (H, B L, D), r (H, K, D, summed over the batch rows) and, where gw is null, v (G, K, D). L, K and D
// multiples of 16. 0 on success; nonzero, nothing written, where this build cannot (1) or 3: shapes.
int64_t still_attention_grads_fp32(const float* w, const float* gw, const float* go, const float* v,
                                   const float* q_content, const float* k, const float* q_position, const float* r,
                                   float* grad_q_content, float* grad_k, float* grad_v, float* grad_q_position,
                                   float* grad_r, int64_t heads, int64_t batch, int64_t l, int64_t k_len, int64_t d,
                                   int64_t threads) {
    const int64_t available = still_attention_fp32_available();
    if (available != 0) return available;
    if (heads < 1 || batch < 1 || l < 16 || l % 16 || k_len % 16 || k_len < l || d < 16 || d % 16) return 3;
    if (gw == nullptr && (go == nullptr || v == nullptr || grad_v == nullptr)) return 3;
#ifdef STILL_FP32
    on_parts(heads, threads, [&](int64_t h0, int64_t h1) {
        attention_grads_fp32(w, gw, go, v, q_content, k, q_position, r, grad_q_content, grad_k, grad_v,
                             grad_q_position, grad_r, h0, h1, batch, l, k_len, d);
    });
#endif
    return 0;
}


// The weights (see the top of this file); 0 on success, nonzero (nothing written) where this
// build or these shapes cannot (`still_attention_available`, or 3: shapes).
// Where v is not null, also the weights times the values into values_out (bf16; products of bf16
// pairs, sums in fp32; K then a multiple of 32). k and v (G, K, D) and values_out (G, L, D)
// heads-major and contiguous, or where `layouts` says (`layouts_of`).
int64_t still_attention_weights(const uint16_t* q_content, const uint16_t* k, const uint16_t* q_position,
                                const uint16_t* r, const uint16_t* bias, int64_t bias_batch_stride, uint16_t* out,
                                const uint16_t* v, uint16_t* values_out, int64_t heads, int64_t batch, int64_t l,
                                int64_t k_len, int64_t d, const int64_t* layouts, int64_t threads) {
    const int64_t available = still_attention_available();
    if (available != 0) return available;
    if (heads < 1 || batch < 1 || l < 16 || l % 16 || k_len % 16 || k_len < l || d < 32 || d % 32) return 3;
    if (v != nullptr && (values_out == nullptr || k_len % 32)) return 3;
#ifdef STILL_BF16
    Layout kv{}, vo{};
    if (!layouts_of(layouts, batch, l, k_len, d, kv, vo)) return 3;
    with_products([&](auto tiles) {
        on_parts(heads * batch, threads, [&](int64_t g0, int64_t g1) {
            weights_of<tiles()>(q_content, k, q_position, r, bias, bias_batch_stride, out, v, values_out, g0, g1, batch,
                                l, k_len, d, kv, vo);
        });
    });
#endif
    return 0;
}

// The backward's first pass: from the weights w and their gradient g (G, L, K) bf16, the scores'
// gradient ds = w (g - sum(w g)) (the softmax's backward) into grad_scores, and the same shifted back
// to the position scores' order into grad_raw: grad_raw[g, i, c] = ds[g, i, c - (L - 1 - i)], 0 for
// c < L - 1 - i (PyTorch's path: `_softmax_backward_data`, then two copies). 0 on success.
int64_t still_attention_backward(const uint16_t* weights, const uint16_t* grad, uint16_t* grad_scores,
                                 uint16_t* grad_raw, int64_t groups, int64_t l, int64_t k_len, int64_t threads) {
    const int64_t available = still_attention_available();
    if (available != 0) return available;
    if (groups < 1 || l < 1 || k_len < l) return 3;
#ifdef STILL_BF16
    on_parts(groups * l, std::min(threads, groups), [&](int64_t row0, int64_t row1) {  // at most a thread a group
        for (int64_t row = row0; row < row1; ++row) {
            const int64_t at = row * k_len;
            softmax_backward_row(weights + at, grad + at, k_len, k_len, l - 1 - row % l, grad_scores + at, grad_raw + at);
        }
    });
#endif
    return 0;
}

// The backward of `still_attention_weights` and its four products in one pass (see
// `attention_grads_of`): from the weights w (G, L, K), their gradient gw (G, L, K) and the forward's
// operands, grad_q_content (G, L, D), grad_k (G, K, D), grad_q_position (H, B L, D), all bf16, and
// grad_r (H, K, D) fp32, summed over the batch rows and centred over the distances where `center`.
// With gw null, the weights were followed by the product with the values v (G, K, D), out = w v:
// gw is computed from the output's gradient go (G, L, D) as go v^T (in fp32, not rounded), and
// grad_v = w^T go (G, K, D) bf16 is written too. L, K and D multiples of 32. k, v and their gradients
// (G, K, D) and go (G, L, D) heads-major and contiguous, or where `layouts` says (`layouts_of`: k, v,
// grad_k and grad_v alike, then go). 0 on success; nonzero, nothing written, where this build cannot
// or 3: shapes.
int64_t still_attention_grads(const uint16_t* w, const uint16_t* gw, const uint16_t* go, const uint16_t* v,
                              const uint16_t* q_content, const uint16_t* k, const uint16_t* q_position,
                              const uint16_t* r, uint16_t* grad_q_content, uint16_t* grad_k, uint16_t* grad_v,
                              uint16_t* grad_q_position, float* grad_r, int64_t heads, int64_t batch, int64_t l,
                              int64_t k_len, int64_t d, int64_t center, const int64_t* layouts, int64_t threads) {
    const int64_t available = still_attention_available();
    if (available != 0) return available;
    if (heads < 1 || batch < 1 || l < 32 || l % 32 || k_len % 32 || k_len < l || d < 32 || d % 32) return 3;
    if (gw == nullptr && (go == nullptr || v == nullptr || grad_v == nullptr)) return 3;
#ifdef STILL_BF16
    Layout kv{}, og{};
    if (!layouts_of(layouts, batch, l, k_len, d, kv, og)) return 3;
    with_products([&](auto tiles) {
        on_parts(heads, threads, [&](int64_t h0, int64_t h1) {
            attention_grads_of<tiles()>(w, gw, go, v, q_content, k, q_position, r, grad_q_content, grad_k, grad_v,
                                        grad_q_position, grad_r, h0, h1, batch, l, k_len, d, center != 0, kv, og);
        });
    });
#endif
    return 0;
}

// The attention-reconstruction loss's squared error from bf16 approximations a and targets b of
// `count` elements: sum_i (a_i - b_i)^2 with each difference exact in fp32 (the products of two
// bf16 numbers' difference), summed in fp32 over blocks of 1024 and the blocks in double. One pass
// where PyTorch makes three (a cast, a difference and a dot product). The sum into *total; 0 on
// success, nonzero (nothing written) where this build cannot (`still_attention_available`).
int64_t still_squared_error(const uint16_t* a, const uint16_t* b, int64_t count, double* total_out) {
    const int64_t available = still_attention_available();
    if (available != 0) return available;
#ifdef STILL_BF16
    double total = 0;
    for (int64_t start = 0; start < count; start += 1024) {
        const int64_t end = std::min(count, start + 1024);
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int64_t i = start;
        for (; i + 32 <= end; i += 32) {
            const __m512 d0 = _mm512_sub_ps(widen_bf16(_mm256_loadu_si256((const __m256i*)(a + i))),
                                            widen_bf16(_mm256_loadu_si256((const __m256i*)(b + i))));
            const __m512 d1 = _mm512_sub_ps(widen_bf16(_mm256_loadu_si256((const __m256i*)(a + i + 16))),
                                            widen_bf16(_mm256_loadu_si256((const __m256i*)(b + i + 16))));
            acc0 = _mm512_fmadd_ps(d0, d0, acc0);
            acc1 = _mm512_fmadd_ps(d1, d1, acc1);
        }
        for (; i < end; i += 16) {
            const __mmask16 m = lanes(end - i);
            const __m512 d = _mm512_sub_ps(widen_bf16(_mm256_maskz_loadu_epi16(m, a + i)),
                                           widen_bf16(_mm256_maskz_loadu_epi16(m, b + i)));
            acc0 = _mm512_fmadd_ps(d, d, acc0);
        }
        total += double(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)));
    }
    *total_out = total;
#endif
    return 0;
}

// Its gradient: out_i = bf16(scale (a_i - b_i)), the difference and the product in fp32; 0 on success
int64_t still_squared_error_grad(const uint16_t* a, const uint16_t* b, int64_t count, float scale, uint16_t* out) {
    const int64_t available = still_attention_available();
    if (available != 0) return available;
#ifdef STILL_BF16
    const __m512 k = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < count; i += 16) {
        const __mmask16 m = lanes(count - i);
        const __m512 d = _mm512_sub_ps(widen_bf16(_mm256_maskz_loadu_epi16(m, a + i)), widen_bf16(_mm256_maskz_loadu_epi16(m, b + i)));
        _mm256_mask_storeu_epi16(out + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(d, k)));
    }
#endif
    return 0;
}

// Content-only attention without a mask, the attention-reconstruction loss's targets (no gradient):
// out = softmax(q k^T) v per group g < groups, bf16 (see `content_of` for the layouts; the scale
// already in q); the weights (G, L, n) into `weights` where not null (contiguous). L a multiple of 16,
// n of 32, D of 32. 0 on success; nonzero, nothing written, where this build cannot
// (`still_attention_available`) or 3: shapes.
int64_t still_content_attention(const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* out,
                                uint16_t* weights, int64_t groups, int64_t l, int64_t n, int64_t d, int64_t q_stride,
                                int64_t kv_stride, int64_t out_stride, int64_t threads) {
    const int64_t available = still_attention_available();
    if (available != 0) return available;
    if (groups < 1 || l < 16 || l % 16 || n < 32 || n % 32 || d < 32 || d % 32) return 3;
#ifdef STILL_BF16
    with_products([&](auto tiles) {
        on_parts(groups, threads, [&](int64_t g0, int64_t g1) {
            if constexpr (tiles())
                content_of<true>(q, k, v, out, weights, g0, g1, l, n, d, q_stride, kv_stride, out_stride);
            else if (content_by_columns.load())
                content_of_columns(q, k, v, out, weights, g0, g1, l, n, d, q_stride, kv_stride, out_stride);
            else
                content_of<false>(q, k, v, out, weights, g0, g1, l, n, d, q_stride, kv_stride, out_stride);
        });
    });
#endif
    return 0;
}

// The backward of `still_content_attention` with its weights kept (`content_grads_of`): from q, k, v
// as the forward read them, its weights w (G, L, n) and the output's gradient go (G, L, D), both
// contiguous, the gradients of q (where gq is not null), k and v, contiguous (G, L, D) and (G, n, D).
// L, n and D multiples of 32. 0 on success; nonzero, nothing written, where this build cannot or 3:
// shapes.
int64_t still_content_attention_grads(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* w,
                                      const uint16_t* go, uint16_t* gq, uint16_t* gk, uint16_t* gv, int64_t groups,
                                      int64_t l, int64_t n, int64_t d, int64_t q_stride, int64_t kv_stride,
                                      int64_t threads) {
    const int64_t available = still_attention_available();
    if (available != 0) return available;
    if (groups < 1 || l < 32 || l % 32 || n < 32 || n % 32 || d < 32 || d % 32) return 3;
#ifdef STILL_BF16
    on_parts(groups, threads, [&](int64_t g0, int64_t g1) {
        content_grads_of(q, k, v, w, go, gq, gk, gv, g0, g1, l, n, d, q_stride, kv_stride);
    });
#endif
    return 0;
}

}  // extern "C"
