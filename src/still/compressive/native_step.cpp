// still: the Compressive Transformer's one-token decoding step for the CPU, written by hand.
//
// The same step as `still.compressive.decode._step` (and `_step_and_compress`, and the draw of
// `sampling.next_token`) over the same ring buffers, for batch B at any size, in one call. Built by
// `still.compressive.native` with the machine's C++ compiler (`-O3 -march=native`) and loaded with
// ctypes. Why by hand (docs/performance.md, session 18): at batch 1 a compiled step of a small model
// is a few hundred tiny loops, each `omp for` or `omp single` ending at an OpenMP barrier (68 a step
// at d_model 128), and its matrix-vector products ran at about 1.3 multiply-adds a cycle. Here:
//
//   - the matrices are packed in blocks of 16 output rows, each block (in, 16) contiguous, so that a
//     product is vertical multiply-adds of one broadcast input and 16 weights (no horizontal sums),
//     four blocks at a time with two accumulators each; bf16 ones in pairs of inputs, so that one
//     load, a shift and a mask give two inputs' weights as floats (exactly);
//   - each thread takes its heads of the attention and the products over them (the output product
//     as its part of the sum over its heads' inputs), and a share of the feed-forward's hidden units
//     (the second product as its part of the sum over them); each keeps its own copy of the residual
//     stream and adds the parts in thread order (norms, residuals and biases computed on every
//     thread: a d-vector), so a layer needs 2 barriers, not ~17; a barrier is one atomic counter,
//     spun on for up to 50 µs, then slept on with a futex (another process may hold the core);
//   - the helper threads are this library's own, spinning a while between steps (a step follows
//     the previous one within microseconds), then sleeping on a futex;
//   - the compressions of eight compressing steps are computed together at the first of them, so
//     that the compression's weights are read once for eight (`Engine::compress_all`);
//   - the feed-forward's second product reads the weights of its nonzero inputs only (a ReLU's
//     outputs, mostly zeros in a trained model: `product_listed`).
//
// The library also holds a prompt's fp32 attention (`still_prompt_attention`, for
// `still.compressive.prefill`): several segments' queries over their own keys, four queries a pass.
//
// Layouts (all C-contiguous), W the stored dtype (float, or bf16 as uint16_t):
//   packed matrix (out/16, in, 16) fp32, or (out/16, in/2, 16, 2) bf16 (pairs of inputs); rows past
//   `out` zero
//   the feed-forward's second matrix in wider blocks, `wide` = `down_width(d)` output rows:
//   (d/wide, d_ff, wide) fp32, (d/wide, d_ff/2, wide, 2) bf16 (`product_listed`)
//   keys      (layers, B, H, KB, D, 16) fp32, (layers, B, H, KB, D/2, 16, 2) bf16: blocks of 16
//             slots; in bf16 in pairs of features (`key_index`)
//   values    (layers, B, H, K, D) W
//   inputs    (layers, B, M_cap, d) float   the memory ring's layer inputs
//   positions (H, KB, D, 16) a layer, as the keys: W_r R, column K-1-a for distance a
//   counters: next_c, next_m, n, m, as `Decoder._counters`.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <system_error>
#include <thread>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

typedef uint16_t bf16;  // the top half of a float

// 16 lanes of floats (v16), of 32-bit words (u16) and of masks (i16), and the operations on them the
// step uses: the same source on every processor.
#if defined(__AVX512F__)
// One AVX-512 register each: GCC's vector types as they are.
constexpr int VECTOR_BYTES = 64;
#define LANES_INLINE
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef uint16_t h16u __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u16 __attribute__((vector_size(64)));
typedef uint32_t u16a __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64)));

// x in every lane (as a vector, not 0 + x: that add, kept for x = -0, made GCC broadcast from a
// register after a scalar add instead of loading the broadcast, one shuffle a multiply-add in
// `product_rows_of`)
inline v16 splat(float x) { return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline u16 load_words(const uint32_t* p) { return *reinterpret_cast<const u16a*>(p); }
inline v16 load(const bf16* p) {
    u16 wide = __builtin_convertvector(*reinterpret_cast<const h16u*>(p), u16) << 16;
    return (v16)wide;
}
inline void store(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
// the low halves of 16 words (bf16 there) stored as 16 bf16
inline void store_halves(bf16* p, u16 x) { *reinterpret_cast<h16u*>(p) = __builtin_convertvector(x, h16u); }
// a where the mask is set, else b
template <class V>
inline V select(i16 mask, V a, V b) { return mask ? a : b; }
// each lane converted (float <-> int32, rounding toward zero)
template <class To, class From>
inline To convert(From x) { return __builtin_convertvector(x, To); }
#else
// Narrower registers (AVX2: 32 bytes; SSE or NEON: 16). GCC keeps a generic vector wider than the
// machine's registers in memory and moves it through the stack lane by lane (the step built for
// x86-64-v3 ran 4-5x slower than for AVX-512 here, slower than the compiled step), so a vector is
// an array of register-wide parts, each operation a loop over them (unrolled: the parts stay in
// registers). Also the build for processors without AVX-512, tested here (tests/compressive/test_native.py).
#define LANES_INLINE __attribute__((always_inline))  // where a call would pass `Lanes` through memory
#if defined(__AVX__)
constexpr int VECTOR_BYTES = 32;
#else
constexpr int VECTOR_BYTES = 16;
#endif
template <class T>
struct Lanes {
    static constexpr int W = VECTOR_BYTES / int(sizeof(T)) < 16 ? VECTOR_BYTES / int(sizeof(T)) : 16;  // a part's
    static constexpr int P = 16 / W;  // parts
    typedef T Part __attribute__((vector_size(W * sizeof(T))));
    typedef T Unaligned __attribute__((vector_size(W * sizeof(T)), aligned(alignof(T))));
    Part p[P];

    Lanes() = default;  // `Lanes x{}`: zeros
    template <class U>  // the same bits as lanes of another type of the same size: `(v16)words`
    explicit Lanes(const Lanes<U>& x) {
        static_assert(sizeof(U) == sizeof(T), "a reinterpretation keeps the lanes' size");
        for (int i = 0; i < P; ++i) p[i] = (Part)x.p[i];
    }
    T operator[](int l) const { return p[l / W][l % W]; }
    static Lanes load(const T* at) {
        Lanes x;
        for (int i = 0; i < P; ++i) x.p[i] = *reinterpret_cast<const Unaligned*>(at + i * W);
        return x;
    }
    void store(T* at) const {
        for (int i = 0; i < P; ++i) *reinterpret_cast<Unaligned*>(at + i * W) = p[i];
    }
#define STILL_LANES_OPERATOR(op)                                                              \
    friend Lanes operator op(Lanes a, const Lanes& b) {                                       \
        for (int i = 0; i < P; ++i) a.p[i] = a.p[i] op b.p[i];                                \
        return a;                                                                             \
    }                                                                                         \
    friend Lanes operator op(Lanes a, T b) {                                                  \
        for (int i = 0; i < P; ++i) a.p[i] = a.p[i] op b;                                     \
        return a;                                                                             \
    }                                                                                         \
    friend Lanes operator op(T a, Lanes b) {                                                  \
        for (int i = 0; i < P; ++i) b.p[i] = a op b.p[i];                                     \
        return b;                                                                             \
    }                                                                                         \
    Lanes& operator op##=(const Lanes& b) {                                                   \
        for (int i = 0; i < P; ++i) p[i] = p[i] op b.p[i];                                    \
        return *this;                                                                         \
    }
    STILL_LANES_OPERATOR(+)
    STILL_LANES_OPERATOR(-)
    STILL_LANES_OPERATOR(*)
    STILL_LANES_OPERATOR(/)
#undef STILL_LANES_OPERATOR
#define STILL_LANES_BITS(op)                                                                  \
    friend Lanes operator op(Lanes a, const Lanes& b) {                                       \
        for (int i = 0; i < P; ++i) a.p[i] = a.p[i] op b.p[i];                                \
        return a;                                                                             \
    }                                                                                         \
    friend Lanes operator op(Lanes a, T b) {                                                  \
        for (int i = 0; i < P; ++i) a.p[i] = a.p[i] op b;                                     \
        return a;                                                                             \
    }
    STILL_LANES_BITS(&)
    STILL_LANES_BITS(|)
    STILL_LANES_BITS(<<)
    STILL_LANES_BITS(>>)
#undef STILL_LANES_BITS
    friend Lanes operator~(Lanes a) {
        for (int i = 0; i < P; ++i) a.p[i] = ~a.p[i];
        return a;
    }
#define STILL_LANES_COMPARE(op)                                                               \
    friend Lanes<int32_t> operator op(const Lanes& a, const Lanes& b) {                       \
        Lanes<int32_t> m;                                                                     \
        for (int i = 0; i < P; ++i) m.p[i] = a.p[i] op b.p[i];                                \
        return m;                                                                             \
    }                                                                                         \
    friend Lanes<int32_t> operator op(const Lanes& a, T b) {                                  \
        Lanes<int32_t> m;                                                                     \
        for (int i = 0; i < P; ++i) m.p[i] = a.p[i] op b;                                     \
        return m;                                                                             \
    }
    STILL_LANES_COMPARE(<)
    STILL_LANES_COMPARE(>)
    STILL_LANES_COMPARE(!=)
#undef STILL_LANES_COMPARE
};
typedef Lanes<float> v16;
typedef Lanes<uint32_t> u16;
typedef Lanes<int32_t> i16;

template <class Part, int W>  // (a template: only the branch of this width is compiled)
inline Part broadcast(float x) {
    static_assert(W == 8 || W == 4, "parts of 8 or 4 floats");
    if constexpr (W == 8)
        return Part{x, x, x, x, x, x, x, x};
    else
        return Part{x, x, x, x};
}
inline v16 splat(float x) {
    v16 v;
    for (int i = 0; i < v16::P; ++i) v.p[i] = broadcast<v16::Part, v16::W>(x);
    return v;
}
typedef uint16_t h16u __attribute__((vector_size(u16::W * 2), aligned(2)));  // a u16 part's bf16
inline v16 load(const float* p) { return v16::load(p); }
inline u16 load_words(const uint32_t* p) { return u16::load(p); }
inline v16 load(const bf16* p) {  // each part's bf16 widened into the top halves of its words
    u16 wide;
    for (int i = 0; i < u16::P; ++i)
        wide.p[i] = __builtin_convertvector(*reinterpret_cast<const h16u*>(p + i * u16::W), u16::Part) << 16;
    return (v16)wide;
}
inline void store(float* p, v16 x) { x.store(p); }
inline void store_halves(bf16* p, u16 x) {
    for (int i = 0; i < u16::P; ++i)
        *reinterpret_cast<h16u*>(p + i * u16::W) = __builtin_convertvector(x.p[i], h16u);
}
template <class V>
inline V select(i16 mask, V a, const V& b) {
    for (int i = 0; i < V::P; ++i) a.p[i] = mask.p[i] ? a.p[i] : b.p[i];
    return a;
}
template <class To, class From>
inline To convert(const From& x) {
    To y;
    for (int i = 0; i < To::P; ++i) y.p[i] = __builtin_convertvector(x.p[i], typename To::Part);
    return y;
}
#endif

inline float hsum(v16 x) {
    float s = 0.f;
    for (int i = 0; i < 16; ++i) s += x[i];
    return s;
}

// 16 floats rounded to bf16 as PyTorch's conversion rounds them (to nearest, ties to even; a NaN to
// the quiet NaN 0x7fc0, as c10's scalar conversion), each bf16 in the low half of its lane
inline u16 rounded(v16 x) {
    const u16 bits = (u16)x;
    const u16 r = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    return select(x != x, u16{} + 0x7fc0u, r);
}

// e^x for x <= 0 (softmax weights), lanes below -87.3 give 0: Cody-Waite reduction and a degree-6
// polynomial (relative error about 2e-7, as a float's rounding).
LANES_INLINE inline v16 exp_neg(v16 x) {
    const v16 low = splat(-87.3f);
    i16 dead = x < low;
    x = select(x < low, low, x);
    v16 n = x * 1.44269504088896341f;
    n = convert<v16>(convert<i16>(n + select(n < 0.f, splat(-0.5f), splat(0.5f))));
    v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16 p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    i16 scale = (convert<i16>(n) + 127) << 23;
    v16 out = p * (v16)scale;
    i16 bits = (i16)out & ~dead;
    return (v16)bits;
}

inline void pause_once() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

long futex(std::atomic<uint32_t>* addr, int op, uint32_t value) {
    return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, value, nullptr, nullptr, 0);
}

inline v16 low_of(u16 words) { return (v16)(words << 16); }  // the low halves' bf16 as floats
inline v16 high_of(u16 words) { return (v16)(words & 0xffff0000u); }  // the high halves'
inline v16 low_of(const uint32_t* p) { return low_of(load_words(p)); }
inline v16 high_of(const uint32_t* p) { return high_of(load_words(p)); }

// where feature j of slot `slot` lives in a head's keys (or position table): blocks of 16 slots,
// (KB, D, 16) in fp32, (KB, D / 2, 16, 2) in bf16 (pairs of features, as the bf16 matrices)
inline size_t key_index(const float*, int D, int slot, int j) { return size_t(slot / 16) * D * 16 + j * 16 + slot % 16; }
inline size_t key_index(const bf16*, int D, int slot, int j) {
    return size_t(slot / 16) * D * 16 + (j / 2) * 32 + (slot % 16) * 2 + j % 2;
}

// a slot's D features (a multiple of 16) into a row of values, and into a head's keys (`key_index`)
inline void put_row(float* row, const float* x, int D) { std::memcpy(row, x, D * sizeof(float)); }
inline void put_row(bf16* row, const float* x, int D) {
    for (int j = 0; j < D; j += 16)
        store_halves(row + j, rounded(load(x + j)));
}
inline void put_key(float* keys, int D, int slot, const float* x) {
    for (int j = 0; j < D; ++j) keys[key_index(keys, D, slot, j)] = x[j];
}
inline void put_key(bf16* keys, int D, int slot, const float* x) {
    // features 2l and 2l + 1 of the slot: one word, words[16 l]
    uint32_t* words = reinterpret_cast<uint32_t*>(keys + key_index(keys, D, slot, 0));
    for (int j = 0; j < D; j += 16) {
        const u16 r = rounded(load(x + j));
        for (int l = 0; l < 8; ++l) words[16 * (j / 2 + l)] = r[2 * l] | r[2 * l + 1] << 16;
    }
}

// The weights of inputs 2p and 2p + 1 for a block's 16 outputs, as floats: in fp32 two rows of the
// block (in, 16); in bf16 one row of 32-bit words (in / 2, 16, 2), whose low halves are input 2p's
// weights and high halves input 2p + 1's (a shift and a mask: exact).
inline void pair_at(const float* block, int p, v16& low, v16& high) {
    low = load(block + 32 * p);
    high = load(block + 32 * p + 16);
}
inline void pair_at(const bf16* block, int p, v16& low, v16& high) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(block) + 16 * p;
    low = low_of(words);
    high = high_of(words);
}

// Software prefetch of the weights `pair_at` reads PREFETCH_BYTES further on in the same block: the
// matrices stream from L3 at every step, and with the hardware prefetcher alone a bf16 product read
// 78-89 GB/s a core here (machine A), 90-105 with this (256 to 768 bytes ahead about the same, 2 KB
// and an L2 hint slower). Not in fp32, whose products ran slower with it in a step.
constexpr int PREFETCH_BYTES = 512;
inline void prefetch_pair(const float* block, int p, int ahead = PREFETCH_BYTES) {
    const char* at = reinterpret_cast<const char*>(block + 32 * p) + ahead;
    __builtin_prefetch(at);
    __builtin_prefetch(at + 64);
}
inline void prefetch_pair(const bf16* block, int p, int ahead = PREFETCH_BYTES) {
    __builtin_prefetch(reinterpret_cast<const char*>(block + 32 * p) + ahead);
}

// y[o] = sum_i x[i] W[o, i] over the inputs [i0, i1) (both even), for the output blocks [b0, b1) of
// a packed matrix (blocks of in * 16 weights, `pair_at`); y indexed by output row (block * 16 + lane).
// Four blocks at a time (two where registers are narrower than AVX-512's), two accumulators each
// (the even and the odd inputs).
template <class W>
void product(const W* w, int in, int i0, int i1, const float* x, int b0, int b1, float* y) {
    const size_t stride = size_t(in) * 16;
    int b = b0;
    for (; b + 4 <= b1 && VECTOR_BYTES == 64; b += 4) {
        const W *p0 = w + b * stride, *p1 = p0 + stride, *p2 = p1 + stride, *p3 = p2 + stride;
        v16 a0{}, a1{}, a2{}, a3{}, c0{}, c1{}, c2{}, c3{}, l0, l1, l2, l3, h0, h1, h2, h3;
        for (int p = i0 / 2; p < i1 / 2; ++p) {
            v16 s = splat(x[2 * p]), t = splat(x[2 * p + 1]);
            if constexpr (sizeof(W) == 2) {  // (fp32: 1.08x slower with these, 256 tokens after a prompt)
                prefetch_pair(p0, p);
                prefetch_pair(p1, p);
                prefetch_pair(p2, p);
                prefetch_pair(p3, p);
            }
            pair_at(p0, p, l0, h0);
            pair_at(p1, p, l1, h1);
            pair_at(p2, p, l2, h2);
            pair_at(p3, p, l3, h3);
            a0 += s * l0;
            a1 += s * l1;
            a2 += s * l2;
            a3 += s * l3;
            c0 += t * h0;
            c1 += t * h1;
            c2 += t * h2;
            c3 += t * h3;
        }
        store(y + b * 16, a0 + c0);
        store(y + b * 16 + 16, a1 + c1);
        store(y + b * 16 + 32, a2 + c2);
        store(y + b * 16 + 48, a3 + c3);
    }
    if constexpr (VECTOR_BYTES < 64) {  // narrower registers: two blocks at a time (four spill 16 of AVX2's)
        for (; b + 2 <= b1; b += 2) {
            const W *p0 = w + b * stride, *p1 = p0 + stride;
            v16 a0{}, a1{}, c0{}, c1{}, l0, l1, h0, h1;
            for (int p = i0 / 2; p < i1 / 2; ++p) {
                v16 s = splat(x[2 * p]), t = splat(x[2 * p + 1]);
                if constexpr (sizeof(W) == 2) {
                    prefetch_pair(p0, p);
                    prefetch_pair(p1, p);
                }
                pair_at(p0, p, l0, h0);
                pair_at(p1, p, l1, h1);
                a0 += s * l0;
                a1 += s * l1;
                c0 += t * h0;
                c1 += t * h1;
            }
            store(y + b * 16, a0 + c0);
            store(y + b * 16 + 16, a1 + c1);
        }
    }
    for (; b < b1; ++b) {
        v16 a{}, c{}, low, high;
        for (int p = i0 / 2; p < i1 / 2; ++p) {
            pair_at(w + b * stride, p, low, high);
            a += splat(x[2 * p]) * low;
            c += splat(x[2 * p + 1]) * high;
        }
        store(y + b * 16, a + c);
    }
}

template <class W>
void product(const W* w, int in, const float* x, int b0, int b1, float* y) {
    product(w, in, 0, in, x, b0, b1, y);
}

// the `bytes` bytes from `row` on (a multiple of 64) prefetched, line by line
inline void prefetch_row(const void* row, int bytes) {
    for (int at = 0; at < bytes; at += 64) __builtin_prefetch(static_cast<const char*>(row) + at);
}

// `product_listed` prefetches the weights of the input LISTED_AHEAD entries further on in its list
// (in bf16 with pairs of inputs, 16-21% less time than with the hardware prefetcher alone, on rows it
// skips between, machine A; in fp32 12% less, machine C); the entries past a list's end that this
// reads are within its room (`LISTED_PAD`), valid indices or 0
constexpr int LISTED_AHEAD = 8;

// The feed-forward's second product over its nonzero inputs only: a ReLU's outputs, mostly zeros
// (81-89% in trained models at the reference preset, about half in untrained ones), whose weights
// need not be read. The matrix is packed in blocks of `wide` = 16 C output rows (`down_width`), so
// that an input's weights for a block are one run of memory: in fp32 (out / wide, in, wide); in bf16
// (out / wide, in, wide / 2, 2), outputs 2l and 2l + 1 in one 32-bit word, so that a shift and a mask
// give 16 even and 16 odd outputs' weights (in pairs of inputs, as the other matrices, a pair would
// be read where either input is nonzero: 75% of the pairs where half the inputs are zero). `even` and
// `odd` list the nonzero inputs of each parity in increasing order (`nonzero`). Each output's two
// accumulators sum the terms `product` sums, in the same order, less those of zero inputs, which add
// nothing (0 * w = 0 for a finite weight, and a + 0 = a): the outputs `product` gives.
template <int C>
void product_listed(const float* w, int in, int out, const int* even, int n_even, const int* odd, int n_odd,
                    const float* x, float* y) {
    constexpr int wide = 16 * C;
    for (int b = 0; b < out / wide; ++b) {
        const float* block = w + size_t(b) * in * wide;
        v16 a[C], c[C];
        for (int q = 0; q < C; ++q) a[q] = c[q] = v16{};
        for (int k = 0; k < n_even; ++k) {
            const float* row = block + size_t(even[k]) * wide;
            prefetch_row(block + size_t(even[k + LISTED_AHEAD]) * wide, 4 * wide);
            const v16 s = splat(x[even[k]]);
            for (int q = 0; q < C; ++q) a[q] += s * load(row + 16 * q);
        }
        for (int k = 0; k < n_odd; ++k) {
            const float* row = block + size_t(odd[k]) * wide;
            prefetch_row(block + size_t(odd[k + LISTED_AHEAD]) * wide, 4 * wide);
            const v16 t = splat(x[odd[k]]);
            for (int q = 0; q < C; ++q) c[q] += t * load(row + 16 * q);
        }
        for (int q = 0; q < C; ++q) store(y + b * wide + 16 * q, a[q] + c[q]);
    }
}

// (bf16: the inputs of one parity into the accumulators of even outputs `e` and odd outputs `o`; a row
// of `wide` / 2 words, G = wide / 32 vectors of them, or half of one where wide is 16)
template <int G, bool Half>
inline void add_listed(const uint32_t* block, int wide, const int* list, int n, const float* x, v16* e, v16* o) {
    for (int k = 0; k < n; ++k) {
        const uint32_t* row = block + size_t(list[k]) * (wide / 2);
        prefetch_row(block + size_t(list[k + LISTED_AHEAD]) * (wide / 2), 2 * wide);
        const v16 s = splat(x[list[k]]);
        for (int g = 0; g < G; ++g) {
            u16 words;
            if constexpr (Half) {
#ifdef __AVX512F__
                words = (u16)_mm512_maskz_loadu_epi32(0xff, row);
#else
                words = u16{};
                std::memcpy(&words, row, 8 * sizeof(uint32_t));
#endif
            } else {
                words = load_words(row + 16 * g);
            }
            e[g] += s * low_of(words);
            o[g] += s * high_of(words);
        }
    }
}

template <int C>
void product_listed(const bf16* w, int in, int out, const int* even, int n_even, const int* odd, int n_odd,
                    const float* x, float* y) {
    constexpr int wide = 16 * C, G = (C + 1) / 2;  // G vectors of 16 words a row (C = 1: 8 words, half used)
    for (int b = 0; b < out / wide; ++b) {
        const uint32_t* block = reinterpret_cast<const uint32_t*>(w) + size_t(b) * in * (wide / 2);
        v16 ae[G], ao[G], ce[G], co[G];
        for (int g = 0; g < G; ++g) ae[g] = ao[g] = ce[g] = co[g] = v16{};
        add_listed<G, C == 1>(block, wide, even, n_even, x, ae, ao);
        add_listed<G, C == 1>(block, wide, odd, n_odd, x, ce, co);
        for (int g = 0; g < G; ++g) {  // outputs 32 g + 2 l from the even sums, 32 g + 2 l + 1 from the odd
            const v16 e = ae[g] + ce[g], o = ao[g] + co[g];
            float* at = y + b * wide + 32 * g;
            for (int l = 0; l < 16 && 32 * g + 2 * l < wide; ++l) {
                at[2 * l] = e[l];
                at[2 * l + 1] = o[l];
            }
        }
    }
}

// the blocks' width of the matrix `product_listed` reads (`native.down_width` asks this one through
// `still_down_width`): the largest of 128, 64, 32 and 16 outputs that divides `out`
inline int down_width(int out) {
    for (int wide : {128, 64, 32})  // (at most 32 with narrower registers: wider blocks' sums spill)
        if (out % wide == 0 && (wide <= 32 || VECTOR_BYTES == 64)) return wide;
    return 16;
}

template <class W>
void product_listed(const W* w, int in, int out, const int* even, int n_even, const int* odd, int n_odd,
                    const float* x, float* y) {
    switch (down_width(out)) {
        case 128: return product_listed<8>(w, in, out, even, n_even, odd, n_odd, x, y);
        case 64: return product_listed<4>(w, in, out, even, n_even, odd, n_odd, x, y);
        case 32: return product_listed<2>(w, in, out, even, n_even, odd, n_odd, x, y);
        default: return product_listed<1>(w, in, out, even, n_even, odd, n_odd, x, y);
    }
}

// The nonzero inputs among [i0, i1) (both even) of x, as `product_listed` takes them: the even ones
// into `list` and the odd ones into `odd_list(list, in)` (in: x's length). Returns the two counts.
// With AVX-512, 16 entries at a time: a mask of the nonzero ones (a value's bits other than the sign
// not all zero: x != 0, NaN included) and their indices compressed into the list, stored 16 wide
// (`LISTED_PAD` entries past each list's end), where a branch an entry was mispredicted about half
// the time (7% of a bf16 step in an untrained model).
constexpr int LISTED_PAD = 16;
static_assert(LISTED_AHEAD <= LISTED_PAD, "product_listed's prefetches read within a list's room");
inline int* odd_list(int* list, int in) { return list + in / 2 + LISTED_PAD; }
inline size_t listed_size(int in) { return size_t(in) + 2 * LISTED_PAD; }  // a thread's list

inline void nonzero(const float* x, int i0, int i1, int* list, int in, int& n_even, int& n_odd) {
    n_even = n_odd = 0;
    int* odd = odd_list(list, in);
    int j = i0;
#ifdef __AVX512F__
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (; j + 16 <= i1; j += 16) {
        const __mmask16 m = _mm512_test_epi32_mask(_mm512_loadu_si512(x + j), magnitude);
        const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(j), lanes);
        const __mmask16 even = m & 0x5555, odds = m & 0xAAAA;
        _mm512_storeu_si512(list + n_even, _mm512_maskz_compress_epi32(even, index));
        _mm512_storeu_si512(odd + n_odd, _mm512_maskz_compress_epi32(odds, index));
        n_even += __builtin_popcount(even);
        n_odd += __builtin_popcount(odds);
    }
#endif
    for (; j < i1; j += 2) {  // (every index written, counted where nonzero: no branch to mispredict)
        list[n_even] = j;
        n_even += x[j] != 0.f;
        odd[n_odd] = j + 1;
        n_odd += x[j + 1] != 0.f;
    }
}

// `product` over R input rows at once (x rows `ldx` floats apart, y rows `ldy` apart), all inputs,
// output blocks [b0, b1): each pair of weights loaded once for the R rows. Every row's sums are
// formed as `product` forms them (the even inputs' and the odd inputs' accumulators, added at the
// end), so each row's result is the one `product` gives it.
// (The compressions' matrices, read once every `groups` compressing steps, have left L3 by then: their
// stream is prefetched further ahead, ROWS_PREFETCH_BYTES. Without it the taps' product ran about 2x
// slower in a step than with the same weights in cache.)
constexpr int ROWS_PREFETCH_BYTES = 2048;
template <class W, int R>
void product_rows_of(const W* w, int in, const float* x, size_t ldx, int b0, int b1, float* y, size_t ldy) {
    const size_t stride = size_t(in) * 16;
    for (int b = b0; b < b1; ++b) {
        const W* block = w + b * stride;
        v16 a[R], c[R], low, high;
        for (int r = 0; r < R; ++r) a[r] = c[r] = v16{};
        for (int p = 0; p < in / 2; ++p) {
            prefetch_pair(block, p, ROWS_PREFETCH_BYTES);
            pair_at(block, p, low, high);
            for (int r = 0; r < R; ++r) {
                a[r] += splat(x[r * ldx + 2 * p]) * low;
                c[r] += splat(x[r * ldx + 2 * p + 1]) * high;
            }
        }
        for (int r = 0; r < R; ++r) store(y + r * ldy + b * 16, a[r] + c[r]);
    }
}

template <class W>
void product_rows(const W* w, int in, const float* x, size_t ldx, int rows, int b0, int b1, float* y, size_t ldy) {
    constexpr int R = VECTOR_BYTES == 64 ? 8 : 2;  // rows at once (with narrower registers more rows' sums spill)
    for (; rows >= R; rows -= R, x += R * ldx, y += R * ldy) product_rows_of<W, R>(w, in, x, ldx, b0, b1, y, ldy);
    switch (rows) {
        case 7: return product_rows_of<W, 7>(w, in, x, ldx, b0, b1, y, ldy);
        case 6: return product_rows_of<W, 6>(w, in, x, ldx, b0, b1, y, ldy);
        case 5: return product_rows_of<W, 5>(w, in, x, ldx, b0, b1, y, ldy);
        case 4: return product_rows_of<W, 4>(w, in, x, ldx, b0, b1, y, ldy);
        case 3: return product_rows_of<W, 3>(w, in, x, ldx, b0, b1, y, ldy);
        case 2: return product_rows_of<W, 2>(w, in, x, ldx, b0, b1, y, ldy);
        case 1: return product_rows_of<W, 1>(w, in, x, ldx, b0, b1, y, ldy);
    }
}

// (x - mean) / sqrt(var + eps) * w + b over d features (d a multiple of 16); out may be x
void layer_norm(const float* x, const float* w, const float* b, int d, float eps, float* out) {
    v16 sum{};
    for (int j = 0; j < d; j += 16) sum += load(x + j);
    const float mean = hsum(sum) / d;
    v16 squares{};
    for (int j = 0; j < d; j += 16) {
        v16 centred = load(x + j) - mean;
        squares += centred * centred;
    }
    const float inv = 1.f / std::sqrt(hsum(squares) / d + eps);
    for (int j = 0; j < d; j += 16) store(out + j, (load(x + j) - mean) * inv * load(w + j) + load(b + j));
}

struct Layer {
    const void *qkv, *out, *up, *down, *taps, *positions;  // packed W; positions (H, KB, D, 16) W
    const float *u, *v, *norm1_w, *norm1_b, *norm2_w, *norm2_b, *up_b, *down_b;
};

struct Shape {
    int layers, batch, heads, d_head, d, ff, vocab, n_cap, m_cap, k_blocks, pre_norm, compression,
        rate, taps, threads, bf16, groups;  // groups: compressions computed together (`compress_all`)
    int tap_rows[64];
    float eps;
};

enum Compression { NONE = 0, TAPS = 1, MAX = 2, MEAN = 3 };

struct Call {  // one step's arguments
    const int64_t* tokens;  // (B,)
    int next_c, next_m, n, m, compress;
    float* logits;  // (B, V)
};

// The keys and values of compressions computed ahead, a thread's heads (`Engine::compress_all`)
struct Pending {
    std::vector<float> kv;  // (groups, layers, B, 2, w): keys, then values of the thread's heads (w features)
    int used = INT_MAX;  // how many of them have been written (none computed yet: more than there are)
    int next_m = -1, next_c = -1;  // the counters of the step whose compression comes next
};

struct Engine {
    Shape s;
    std::vector<Layer> layer;
    const float *embedding, *norm_w, *norm_b;
    const void* head;
    void *keys, *values;
    float* inputs;
    // shared between the threads: each writes its own part, the others read it after a barrier.
    // out_parts, down_parts: (threads, B, d), a thread's share of the sums over the inputs
    // compressed: (layers, B, groups, d), the compressions computed together (`compress_groups`)
    std::vector<float> out_parts, down_parts, logits, compressed;
    // one a thread: the residual stream h and its normed copy x (B, d), the queries, keys and values
    // (B, 3d), the attention's output (B, d), the feed-forward's hidden layer (B, d_ff), the windows
    // of the compression (groups, taps * d), attention scratch, the valid slots and their columns
    // (K each, then their count, then SLOTS_AHEAD + 1 entries of room for the weighted sums' prefetches)
    std::vector<std::vector<float>> h, x, qkv, attended, hidden, windows, scratch;
    std::vector<std::vector<int>> slots;
    std::vector<std::vector<int>> listed;  // one a thread: the nonzero hidden units (`nonzero`), d_ff
    std::vector<std::vector<int>> runs;  // one a thread: the valid slots as runs (`run_as`), then their count
    // one a thread: compressed memories normed, and their queries-keys-values, (groups, d + 3d)
    std::vector<std::vector<float>> rows;
    std::vector<Pending> pending;  // one a thread: the compressions computed ahead (`compress_all`)
    Call call{};
    std::vector<std::thread> workers;
    std::atomic<uint32_t> go{0};
    std::atomic<uint32_t> sleeping{0};
    std::atomic<int64_t> arrived{0};
    std::atomic<int> stop{0};
    int64_t spin_ns = 200000;
    std::vector<int64_t> passed;  // barriers passed, one a thread (the same count on all)

    // A barrier spins while the others are due within microseconds (the usual wait: a few µs a
    // step), then sleeps on a futex: where another process competes for the cores, a thread the
    // system has not scheduled would otherwise keep its partner spinning on the core it needs
    // (spinning 2^20 pauses before yielding, a step of the peer benchmark's model took 35 ms there;
    // sleeping after 50 µs, 0.8 ms).
    std::atomic<uint32_t> released{0};  // barriers completed (the futex word)
    std::atomic<uint32_t> barrier_sleepers{0};
    int64_t barrier_spin_ns = 50000;

    void barrier(int t) {
        if (s.threads == 1) return;
        int64_t target = ++passed[t] * s.threads;
        if (arrived.fetch_add(1) + 1 == target) {  // the last to arrive lets the others go
            released.fetch_add(1);
            if (barrier_sleepers.load()) futex(&released, FUTEX_WAKE_PRIVATE, INT_MAX);
            return;
        }
        auto start = std::chrono::steady_clock::now();
        int spins = 0;
        while (arrived.load(std::memory_order_acquire) < target) {
            pause_once();
            if (++spins % 64 == 0 &&
                std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
                        .count() > barrier_spin_ns) {
                barrier_sleepers.fetch_add(1);
                for (;;) {  // (the word read before the count: a release in between ends the wait at once)
                    uint32_t word = released.load();
                    if (arrived.load() >= target) break;
                    futex(&released, FUTEX_WAIT_PRIVATE, word);
                }
                barrier_sleepers.fetch_sub(1);
                return;
            }
        }
    }

    void worker(int t) {
        uint32_t seen = 0;
        for (;;) {
            auto start = std::chrono::steady_clock::now();
            int spins = 0;
            while (go.load(std::memory_order_acquire) == seen) {
                pause_once();
                if (++spins % 256 == 0 &&
                    std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
                            .count() > spin_ns) {
                    sleeping.store(1);
                    if (go.load() == seen) futex(&go, FUTEX_WAIT_PRIVATE, seen);
                    sleeping.store(0);
                    start = std::chrono::steady_clock::now();
                }
            }
            seen = go.load(std::memory_order_acquire);
            if (stop.load()) return;
            run(t);
        }
    }

    void step(const Call& c) {
        call = c;  // read by every thread when it starts (before its first barrier)
        if (s.threads > 1) {
            go.fetch_add(1);
            if (sleeping.load()) futex(&go, FUTEX_WAKE_PRIVATE, INT_MAX);
        }
        run(0);
    }

    void run(int t) {
        const Call c = call;  // the next step may change `call` while this thread finishes
        if (s.bf16)
            run_as<bf16>(t, c);
        else
            run_as<float>(t, c);
    }

    // [first, last) of `count` items for thread t
    void share(int count, int t, int& first, int& last) const {
        first = int(int64_t(count) * t / s.threads);
        last = int(int64_t(count) * (t + 1) / s.threads);
    }

    // h (B, d) += the threads' parts (threads, B, d), in thread order (the same sums on every thread),
    // and a bias
    void add_parts(float* h, const std::vector<float>& parts, const float* bias) const {
        const size_t size = size_t(s.batch) * s.d;
        for (int b = 0; b < s.batch; ++b)
            for (int j = 0; j < s.d; j += 16) {
                const size_t at = size_t(b) * s.d + j;
                v16 sum = load(parts.data() + at);
                for (int t = 1; t < s.threads; ++t) sum += load(parts.data() + t * size + at);
                if (bias) sum += load(bias + j);
                store(h + at, load(h + at) + sum);
            }
    }

    template <class W>
    void run_as(int t, const Call& c);
    template <class W>
    void attend(int t, int i, int b, int head, const float* q, const float* key, const float* value, float* out);
    template <class W>
    void compress_all(int t, const Call& c);
    template <class W>
    void compress_groups(int t, const Call& c);
};

// The weighted sums prefetch the value rows SLOTS_AHEAD slots further on. The slot entries past the
// valid ones that this reads (`Engine::slots` has SLOTS_AHEAD + 1 entries of room) hold slots of
// earlier steps, position columns, the count or 0, all in [0, K]: rows of the head's values or the
// one just past them (a prefetch never faults).
constexpr int SLOTS_AHEAD = 8;

// sum_v weight[v] rows[slot[v]] (D floats each, D = 16 C) + own * value, over the valid slots,
// divided by total
template <class W, int C>
void weighted_values(const W* rows, int D, const int* slot, const float* weight, int valid, float own,
                     const float* value, float total, float* out) {
    v16 a[C], c[C];
    for (int k = 0; k < C; ++k) a[k] = c[k] = v16{};
    int v = 0;
    for (; v + 2 <= valid; v += 2) {
        const W* r0 = rows + size_t(slot[v]) * D;
        const W* r1 = rows + size_t(slot[v + 1]) * D;
        prefetch_row(rows + size_t(slot[v + SLOTS_AHEAD]) * D, int(D * sizeof(W)));
        prefetch_row(rows + size_t(slot[v + SLOTS_AHEAD + 1]) * D, int(D * sizeof(W)));
        v16 w0 = splat(weight[v]), w1 = splat(weight[v + 1]);
        for (int k = 0; k < C; ++k) {
            a[k] += w0 * load(r0 + 16 * k);
            c[k] += w1 * load(r1 + 16 * k);
        }
    }
    if (v < valid) {
        const W* r0 = rows + size_t(slot[v]) * D;
        for (int k = 0; k < C; ++k) a[k] += splat(weight[v]) * load(r0 + 16 * k);
    }
    for (int k = 0; k < C; ++k) store(out + 16 * k, (a[k] + c[k] + splat(own) * load(value + 16 * k)) / total);
}

template <class W>
void weighted_values_any(const W* rows, int D, const int* slot, const float* weight, int valid, float own,
                         const float* value, float total, float* out) {
    for (int j = 0; j < D; j += 16) {
        v16 a{};
        for (int v = 0; v < valid; ++v) a += splat(weight[v]) * load(rows + size_t(slot[v]) * D + j);
        store(out + j, (a + splat(own) * load(value + j)) / total);
    }
}

// weighted_values for bf16 rows of D = 32 C features: each 32-bit word of a row holds features 2l
// (low half) and 2l + 1 (high half), so one load gives 16 even and 16 odd features
template <int C>
void weighted_value_pairs(const bf16* rows, int D, const int* slot, const float* weight, int valid, float own,
                          const float* value, float total, float* out) {
    v16 even[C], odd[C], even2[C], odd2[C];
    for (int k = 0; k < C; ++k) even[k] = odd[k] = even2[k] = odd2[k] = v16{};
    int v = 0;
    for (; v + 2 <= valid; v += 2) {
        const uint32_t* r0 = reinterpret_cast<const uint32_t*>(rows + size_t(slot[v]) * D);
        const uint32_t* r1 = reinterpret_cast<const uint32_t*>(rows + size_t(slot[v + 1]) * D);
        prefetch_row(rows + size_t(slot[v + SLOTS_AHEAD]) * D, 2 * D);
        prefetch_row(rows + size_t(slot[v + SLOTS_AHEAD + 1]) * D, 2 * D);
        v16 w0 = splat(weight[v]), w1 = splat(weight[v + 1]);
        for (int k = 0; k < C; ++k) {
            even[k] += w0 * low_of(r0 + 16 * k);
            odd[k] += w0 * high_of(r0 + 16 * k);
            even2[k] += w1 * low_of(r1 + 16 * k);
            odd2[k] += w1 * high_of(r1 + 16 * k);
        }
    }
    if (v < valid) {
        const uint32_t* r0 = reinterpret_cast<const uint32_t*>(rows + size_t(slot[v]) * D);
        for (int k = 0; k < C; ++k) {
            even[k] += splat(weight[v]) * low_of(r0 + 16 * k);
            odd[k] += splat(weight[v]) * high_of(r0 + 16 * k);
        }
    }
    for (int k = 0; k < C; ++k) {
        v16 e = even[k] + even2[k], o = odd[k] + odd2[k];
        for (int l = 0; l < 16; ++l) {
            out[32 * k + 2 * l] = (e[l] + own * value[32 * k + 2 * l]) / total;
            out[32 * k + 2 * l + 1] = (o[l] + own * value[32 * k + 2 * l + 1]) / total;
        }
    }
}

template <class W>
void weighted_sum(const W* rows, int D, const int* slot, const float* weight, int valid, float own,
                  const float* value, float total, float* out) {
    if constexpr (sizeof(W) == 2) {
        switch (D) {
            case 32: return weighted_value_pairs<1>(rows, D, slot, weight, valid, own, value, total, out);
            case 64: return weighted_value_pairs<2>(rows, D, slot, weight, valid, own, value, total, out);
        }
    }
    switch (D / 16) {
        case 1: return weighted_values<W, 1>(rows, D, slot, weight, valid, own, value, total, out);
        case 2: return weighted_values<W, 2>(rows, D, slot, weight, valid, own, value, total, out);
        case 4: return weighted_values<W, 4>(rows, D, slot, weight, valid, own, value, total, out);
        default: return weighted_values_any<W>(rows, D, slot, weight, valid, own, value, total, out);
    }
}

template <class W>
void Engine::attend(int t, int i, int b, int hd, const float* q, const float* key, const float* value,
                    float* out) {
    const int D = s.d_head, KB = s.k_blocks, K = s.n_cap + s.m_cap;
    const Layer& L = layer[i];
    float* content = scratch[t].data();  // KB * 16
    float* by_column = content + KB * 16;  // KB * 16
    float* qc = by_column + KB * 16;  // D
    float* qp = qc + D;  // D
    float* score = qp + D;  // the valid slots', padded to 16
    const int* slot = slots[t].data();
    const int valid = slots[t][2 * K];
    for (int j = 0; j < D; ++j) {
        qc[j] = q[j] + L.u[hd * D + j];
        qp[j] = q[j] + L.v[hd * D + j];
    }
    const W* keys = static_cast<const W*>(this->keys) + ((size_t(i) * s.batch + b) * s.heads + hd) * KB * D * 16;
    const W* pos = static_cast<const W*>(L.positions) + size_t(hd) * KB * D * 16;
    // the content and position products over KB blocks of 16 slots: a head's keys and position table
    // are laid out as a packed matrix of KB blocks over D inputs (`product`)
    product(keys, D, qc, 0, KB, content);
    product(pos, D, qp, 0, KB, by_column);
    const float scale = 1.f / std::sqrt(float(D));
    float own = 0.f;
    for (int j = 0; j < D; ++j) own += qc[j] * key[j];
    own = (own + by_column[K - 1]) * scale;
    // the valid slots' scores, run by run: in a run of consecutive slots the column is the slot plus
    // a constant (the rings are written in order), so a run is vector loads of both products
    v16 highest = splat(own);
    const int* run = runs[t].data();
    for (int r = 0; r < runs[t].back(); ++r, run += 4) {
        const int first = run[0], last = run[1], shift = run[2], at = run[3];
        int v = first;
        for (; v + 16 <= last; v += 16) {
            v16 x = (load(content + v) + load(by_column + v + shift)) * scale;
            store(score + at + v - first, x);
            highest = select(highest > x, highest, x);
        }
        for (; v < last; ++v) {
            float x = (content[v] + by_column[v + shift]) * scale;
            score[at + v - first] = x;
            highest = select(highest > x, highest, splat(x));
        }
    }
    float top = highest[0];
    for (int l = 1; l < 16; ++l) top = std::max(top, highest[l]);
    int padded = (valid + 15) / 16 * 16;
    for (int v = valid; v < padded; ++v) score[v] = -INFINITY;
    v16 sum{};
    for (int v = 0; v < padded; v += 16) {
        v16 e = exp_neg(load(score + v) - top);
        store(score + v, e);
        sum += e;
    }
    float own_weight = std::exp(own - top);
    float total = hsum(sum) + own_weight;
    const W* values =
        static_cast<const W*>(this->values) + ((size_t(i) * s.batch + b) * s.heads + hd) * size_t(K) * D;
    weighted_sum(values, D, slot, score, valid, own_weight, value, total, out);
}

// A step on thread t: its heads of each layer's attention and its share of every product. Two
// barriers a layer: after the attention and the output product (each thread's sum over its heads'
// inputs), and after the feed-forward (each thread's hidden units, and their sum in the second
// product); each thread then adds the parts to its own copy of the residual stream.
template <class W>
void Engine::run_as(int t, const Call& c) {
    const int B = s.batch, d = s.d, H = s.heads, D = s.d_head, K = s.n_cap + s.m_cap;
    {  // the valid slots (the compressed ring first, then the memory ring) and their position columns
        int* slot = slots[t].data();
        int* column = slot + K;
        int valid = 0;
        for (int j = 0; j < s.n_cap; ++j) {
            int age = ((c.next_c - 1 - j) % s.n_cap + s.n_cap) % s.n_cap;
            if (age < c.n) {
                slot[valid] = j;
                column[valid++] = K - 1 - (c.m + 1 + age);
            }
        }
        for (int j = 0; j < s.m_cap; ++j) {
            int age = ((c.next_m - j) % s.m_cap + s.m_cap) % s.m_cap;
            if (age >= 1 && age <= c.m) {
                slot[valid] = s.n_cap + j;
                column[valid++] = K - 1 - age;
            }
        }
        slots[t][2 * K] = valid;
        std::vector<int>& run = runs[t];  // (first slot, end, column - slot, index among the valid) a run
        run.clear();
        for (int v = 0; v < valid; ++v) {
            const int shift = column[v] - slot[v];
            if (v > 0 && slot[v] == slot[v - 1] + 1 && shift == column[v - 1] - slot[v - 1]) {
                run[run.size() - 3] = slot[v] + 1;
            } else {
                run.insert(run.end(), {slot[v], slot[v] + 1, shift, v});
            }
        }
        run.push_back(int(run.size() / 4));
    }
    float* h = this->h[t].data();
    float* x = this->x[t].data();
    float* qkv = this->qkv[t].data();
    float* attended = this->attended[t].data();
    float* hidden = this->hidden[t].data();
    int* listed = this->listed[t].data();
    float* out_part = out_parts.data() + size_t(t) * B * d;
    float* down_part = down_parts.data() + size_t(t) * B * d;
    for (int b = 0; b < B; ++b) std::memcpy(h + b * d, embedding + size_t(c.tokens[b]) * d, d * sizeof(float));
    int h0, h1, u0, u1;
    share(H, t, h0, h1);
    share(s.ff / 16, t, u0, u1);
    const int new_slot = s.n_cap + c.next_m;
    const int per_head = D / 16;  // blocks of 16 output rows a head
    for (int i = 0; i < s.layers; ++i) {
        const Layer& L = layer[i];
        for (int b = 0; b < B; ++b) {
            float* xb = x + b * d;
            if (s.pre_norm)
                layer_norm(h + b * d, L.norm1_w, L.norm1_b, d, s.eps, xb);
            else
                std::memcpy(xb, h + b * d, d * sizeof(float));
            float* q = qkv + size_t(b) * 3 * d;
            for (int part = 0; part < 3; ++part)  // this thread's heads of the queries, keys and values
                product(static_cast<const W*>(L.qkv), d, xb, part * d / 16 + h0 * per_head,
                        part * d / 16 + h1 * per_head, q);
            for (int hd = h0; hd < h1; ++hd) {
                const float* key = q + d + hd * D;
                const float* value = q + 2 * d + hd * D;
                attend<W>(t, i, b, hd, q + hd * D, key, value, attended + b * d + hd * D);
                // the token's key and value into the memory ring's next slot (masked in this step)
                W* keys = static_cast<W*>(this->keys) + ((size_t(i) * B + b) * H + hd) * s.k_blocks * D * 16;
                W* values = static_cast<W*>(this->values) + (((size_t(i) * B + b) * H + hd) * K + new_slot) * D;
                put_key(keys, D, new_slot, key);
                put_row(values, value, D);
            }
            // the output product over this thread's heads
            product(static_cast<const W*>(L.out), d, h0 * D, h1 * D, attended + b * d, 0, d / 16, out_part + b * d);
            if (s.compression != NONE && t == 0)
                std::memcpy(inputs + ((size_t(i) * B + b) * s.m_cap + c.next_m) * d, h + b * d, d * sizeof(float));
        }
        barrier(t);
        add_parts(h, out_parts, nullptr);
        for (int b = 0; b < B; ++b) {
            float* hb = h + b * d;
            float* xb = x + b * d;
            if (s.pre_norm) {
                layer_norm(hb, L.norm2_w, L.norm2_b, d, s.eps, xb);
            } else {
                layer_norm(hb, L.norm1_w, L.norm1_b, d, s.eps, hb);
                std::memcpy(xb, hb, d * sizeof(float));
            }
            float* up = hidden + size_t(b) * s.ff;
            product(static_cast<const W*>(L.up), d, xb, u0, u1, up);  // this thread's hidden units
            for (int j = u0 * 16; j < u1 * 16; ++j) up[j] = std::max(up[j] + L.up_b[j], 0.f);
            // the second product over the nonzero hidden units only (`product_listed`)
            int n_even, n_odd;
            nonzero(up, u0 * 16, u1 * 16, listed, s.ff, n_even, n_odd);
            product_listed(static_cast<const W*>(L.down), s.ff, d, listed, n_even, odd_list(listed, s.ff), n_odd, up,
                           down_part + b * d);
        }
        barrier(t);
        add_parts(h, down_parts, L.down_b);
        if (!s.pre_norm)
            for (int b = 0; b < B; ++b) layer_norm(h + b * d, L.norm2_w, L.norm2_b, d, s.eps, h + b * d);
    }
    int v0, v1;
    share((s.vocab + 15) / 16, t, v0, v1);
    const int vp = (s.vocab + 15) / 16 * 16;
    for (int b = 0; b < B; ++b) {
        float* xb = x + b * d;
        if (s.pre_norm)
            layer_norm(h + b * d, norm_w, norm_b, d, s.eps, xb);
        else
            std::memcpy(xb, h + b * d, d * sizeof(float));
        product(static_cast<const W*>(head), d, xb, v0, v1, logits.data() + size_t(b) * vp);
    }
    if (c.compress) compress_all<W>(t, c);
    barrier(t);  // the logits complete; every thread done reading this step's shared buffers
    if (t == 0)
        for (int b = 0; b < B; ++b)
            std::memcpy(c.logits + size_t(b) * s.vocab, logits.data() + size_t(b) * vp, s.vocab * sizeof(float));
}

// After a step that filled the memory ring (mem_len + c): the oldest c layer inputs of every layer
// compressed into one memory, projected to its keys and values, written to the compressed ring's
// slot next_c (`decode._step_and_compress`).
//
// The compressions of the next `groups` such steps are computed together, at the first of them,
// and kept (`pending`) for the others. They are known then: the ring is full at every compressing
// step, and the c memories the g-th next one compresses are the ring's oldest entries g c .. g c +
// c - 1, which no step writes before they have been compressed (a step writes the slot the last
// compression freed). Computed together, each weight of the convolution and of the key-value
// product is read once for all of them, not once a compression (at d_model 128 in fp32 the
// compression was 12% of a token's time, mostly those reads: docs/performance.md, session 21).
// Each row's sums are formed as one at a time would form them (`product_rows`), so the keys and
// values are the same. A call whose counters are not the ones the kept compressions were made for
// computes them again. Every thread reads its own copy of the old inputs (before the step's last
// barrier, after which the next step may overwrite the oldest), and keeps its own heads' keys and
// values and its own count of what it has kept (the same on every thread: the same calls).
template <class W>
void Engine::compress_all(int t, const Call& call) {
    const int B = s.batch, H = s.heads, D = s.d_head, K = s.n_cap + s.m_cap;
    int h0, h1;
    share(H, t, h0, h1);
    Pending& kept = pending[t];
    if (kept.used >= s.groups || call.next_m != kept.next_m || call.next_c != kept.next_c) {
        compress_groups<W>(t, call);
        kept.used = 0;
    }
    // this compression's keys and values, this thread's heads, into the compressed ring's slot next_c
    const int slot = call.next_c, w = (h1 - h0) * D;
    for (int i = 0; i < s.layers; ++i)
        for (int b = 0; b < B; ++b) {
            const float* kv = kept.kv.data() + ((size_t(kept.used) * s.layers + i) * B + b) * 2 * w;  // keys, values
            for (int hd = h0; hd < h1; ++hd) {
                W* keys = static_cast<W*>(this->keys) + ((size_t(i) * B + b) * H + hd) * s.k_blocks * D * 16;
                W* values = static_cast<W*>(this->values) + (((size_t(i) * B + b) * H + hd) * K + slot) * D;
                put_key(keys, D, slot, kv + (hd - h0) * D);
                put_row(values, kv + w + (hd - h0) * D, D);
            }
        }
    kept.used += 1;
    kept.next_m = (call.next_m + s.rate) % s.m_cap;  // the next compressing step's counters
    kept.next_c = (call.next_c + 1) % s.n_cap;
}

// The compressions of this step and the next s.groups - 1 compressing ones (`compress_all`): f_c of
// each one's c oldest memories (this thread's share of the features, into the shared `compressed`,
// (layers, B, groups, d)), a barrier, then each one's keys and values for this thread's heads into
// its `pending` (groups, layers, B, 2, its heads' features).
template <class W>
void Engine::compress_groups(int t, const Call& call) {
    const int B = s.batch, d = s.d, D = s.d_head, c = s.rate, G = s.groups;
    const int next_m = (call.next_m + 1) % s.m_cap;  // the ring after the step: its oldest first
    auto old = [&](int i, int b, int r) {  // the r-th oldest memory of layer i, row b
        return inputs + ((size_t(i) * B + b) * s.m_cap + (next_m + r) % s.m_cap) * d;
    };
    int o0, o1;
    share(d / 16, t, o0, o1);
    if (s.compression == TAPS) {  // the convolution: one product with the taps' rows side by side
        const size_t width = size_t(s.taps) * d;
        for (int i = 0; i < s.layers; ++i)
            for (int b = 0; b < B; ++b) {
                float* window = windows[t].data();  // (groups, taps * d)
                for (int g = 0; g < G; ++g)
                    for (int k = 0; k < s.taps; ++k)
                        std::memcpy(window + g * width + k * d, old(i, b, g * c + s.tap_rows[k]), d * sizeof(float));
                product_rows(static_cast<const W*>(layer[i].taps), s.taps * d, window, width, G, o0, o1,
                             compressed.data() + (size_t(i) * B + b) * G * d, d);
            }
    } else {  // max or mean pooling: this thread's share of the features
        for (int i = 0; i < s.layers; ++i)
            for (int b = 0; b < B; ++b)
                for (int g = 0; g < G; ++g) {
                    float* out = compressed.data() + ((size_t(i) * B + b) * G + g) * d;
                    for (int j = o0 * 16; j < o1 * 16; ++j) {
                        float acc = old(i, b, g * c)[j];
                        for (int r = 1; r < c; ++r)
                            acc = s.compression == MAX ? std::max(acc, old(i, b, g * c + r)[j])
                                                       : acc + old(i, b, g * c + r)[j];
                        out[j] = s.compression == MAX ? acc : acc / c;
                    }
                }
    }
    barrier(t);
    int h0, h1;
    share(s.heads, t, h0, h1);
    float* x = rows[t].data();  // (groups, d): the compressed memories, normed
    float* kv = x + size_t(G) * d;  // (groups, 3d): their keys at [d, 2d), values at [2d, 3d)
    float* kept = pending[t].kv.data();
    for (int i = 0; i < s.layers; ++i) {
        const Layer& L = layer[i];
        for (int b = 0; b < B; ++b) {
            for (int g = 0; g < G; ++g) {
                const float* memory = compressed.data() + ((size_t(i) * B + b) * G + g) * d;
                if (s.pre_norm)
                    layer_norm(memory, L.norm1_w, L.norm1_b, d, s.eps, x + g * d);
                else
                    std::memcpy(x + g * d, memory, d * sizeof(float));
            }
            for (int part = 1; part < 3; ++part)
                product_rows(static_cast<const W*>(L.qkv), d, x, d, G, part * d / 16 + h0 * D / 16,
                             part * d / 16 + h1 * D / 16, kv, 3 * d);
            const int w = (h1 - h0) * D;  // this thread's heads' features
            for (int g = 0; g < G; ++g) {  // keys at [0, w), values at [w, 2w)
                float* out = kept + ((size_t(g) * s.layers + i) * B + b) * 2 * w;
                const float* in = kv + size_t(g) * 3 * d + d + h0 * D;
                std::memcpy(out, in, w * sizeof(float));
                std::memcpy(out + w, in + d, w * sizeof(float));
            }
        }
    }
}

// `sampling.next_token` for one row: the `n_exclude` excluded tokens at -inf, temperature, top-k,
// top-p, softmax, and the inverted cumulative distribution at u.
int64_t draw(const float* logits_in, int vocab, float temperature, int top_k, float top_p, const int64_t* exclude,
             int n_exclude, float u, std::vector<float>& work, std::vector<int>& order) {
    float* logits = work.data();
    float* probs = logits + vocab;
    std::copy(logits_in, logits_in + vocab, logits);
    for (int i = 0; i < n_exclude; ++i) logits[exclude[i]] = -INFINITY;
    // (the largest logit subtracted before dividing by T, as `next_token` does: a tiny T then
    // sends the others to -inf, not every logit to +-inf and the softmax to NaN)
    if (temperature != 1.f) {
        float peak = -INFINITY;
        for (int j = 0; j < vocab; ++j) peak = std::max(peak, logits[j]);
        for (int j = 0; j < vocab; ++j) logits[j] = (logits[j] - peak) / temperature;
    }
    if (top_k > 0 && top_k < vocab) {
        std::copy(logits, logits + vocab, probs);
        std::nth_element(probs, probs + (top_k - 1), probs + vocab, std::greater<float>());
        float kth = probs[top_k - 1];
        for (int j = 0; j < vocab; ++j)
            if (logits[j] < kth) logits[j] = -INFINITY;
    }
    if (top_p < 1.f) {
        std::iota(order.begin(), order.begin() + vocab, 0);
        std::stable_sort(order.begin(), order.begin() + vocab, [&](int a, int b) { return logits[a] > logits[b]; });
        float top = logits[order[0]], total = 0.f;
        for (int j = 0; j < vocab; ++j) total += std::exp(logits[j] - top);
        float running = 0.f;
        std::vector<int> drop;
        for (int j = 0; j < vocab; ++j) {
            float p = std::exp(logits[order[j]] - top) / total;
            running += p;
            if (running - p >= top_p) drop.push_back(order[j]);
        }
        for (int j : drop) logits[j] = -INFINITY;
    }
    float top = -INFINITY;
    for (int j = 0; j < vocab; ++j) top = std::max(top, logits[j]);
    float total = 0.f;
    for (int j = 0; j < vocab; ++j) total += probs[j] = std::exp(logits[j] - top);
    for (int j = 0; j < vocab; ++j) probs[j] /= total;
    float running = 0.f, all = 0.f;
    for (int j = 0; j < vocab; ++j) all += probs[j];
    int64_t last = 0;
    for (int j = 0; j < vocab; ++j) {
        running += probs[j];
        if (probs[j] > 0.f) {
            last = j;
            if (running > u * all) return j;
        }
    }
    return last;
}

// out[r][c] = sum over e < D of x[r][e] * rows[e * ld + c] for 4 vectors x[r] and the columns
// [c0, c1) (multiples of 16), out[r] = out + r * ld_out: each weight loaded once for the four, two
// blocks of 16 columns at a time (eight independent sums; one block with registers narrower than AVX-512's)
template <int D>
void dot_columns4(const float (*x)[D], const float* rows, size_t ld, int c0, int c1, float* out, size_t ld_out) {
    int c = c0;
    for (; c + 32 <= c1 && VECTOR_BYTES == 64; c += 32) {  // (narrower registers: 16 at a time, or the sums spill)
        v16 a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
        for (int e = 0; e < D; ++e) {
            const v16 w = load(rows + e * ld + c), z = load(rows + e * ld + c + 16);
            const v16 y0 = splat(x[0][e]), y1 = splat(x[1][e]), y2 = splat(x[2][e]), y3 = splat(x[3][e]);
            a0 += y0 * w;
            a1 += y1 * w;
            a2 += y2 * w;
            a3 += y3 * w;
            b0 += y0 * z;
            b1 += y1 * z;
            b2 += y2 * z;
            b3 += y3 * z;
        }
        store(out + c, a0);
        store(out + ld_out + c, a1);
        store(out + 2 * ld_out + c, a2);
        store(out + 3 * ld_out + c, a3);
        store(out + c + 16, b0);
        store(out + ld_out + c + 16, b1);
        store(out + 2 * ld_out + c + 16, b2);
        store(out + 3 * ld_out + c + 16, b3);
    }
    for (; c < c1; c += 16) {
        v16 a0{}, a1{}, a2{}, a3{};
        for (int e = 0; e < D; ++e) {
            const v16 w = load(rows + e * ld + c);
            a0 += splat(x[0][e]) * w;
            a1 += splat(x[1][e]) * w;
            a2 += splat(x[2][e]) * w;
            a3 += splat(x[3][e]) * w;
        }
        store(out + c, a0);
        store(out + ld_out + c, a1);
        store(out + 2 * ld_out + c, a2);
        store(out + 3 * ld_out + c, a3);
    }
}

// A prompt's attention (`still.compressive.prefill`, fp32): for batch row b, segment s of a group and
// head h, each of the segment's L queries over the segment's K keys, of which the first padding[s]
// are padding (masked) and the last L its own (causal): query i sees keys padding[s] .. K - L + i.
// What `RelativeMultiHeadAttention._causal_attention` computes with `padding`, scores in fp32:
//   score(i, j) = scale (q_i + u_h) . k_j + scale (q_i + v_h) . T_h[:, L - i + j]
// where T_h (D, K + 1) is the head's W_r R for the distances K .. 0 (column c: distance K - c), then
// softmax over the keys seen and the sum of their values. Per (row, segment, head) the keys are
// gathered transposed, (D, K), so that 16 columns' scores are vertical multiply-adds, as are those
// of the head's table (copied once a call into aligned rows: `local`); four queries at a time, each
// key, table entry and value loaded once for the four (`dot_columns4`). A query's scores stay in a
// scratch of K floats (no (L, K) tensor is written), so its passes run in the core's caches.
// Layouts: q (B, ., d) rows of d = H D, the group's first at q (batch stride q_batch); rows (B,
// n_rows, 2d): [keys | values] of every row a segment may read; index (S, K): each segment's keys'
// rows (padding rows any); local (H, D, tp): head h's T, columns K + 1 .. tp - 1 zero (tp: K + 1
// rounded up to 16); out (B, S L, d).
template <int C>  // C = D / 16 blocks of a head's features
void prompt_attention_task(const float* q, int64_t q_batch, const float* rows, int64_t n_rows, const int64_t* index,
                           const int64_t* padding, const float* u, const float* v, const float* tables, int tp,
                           float scale, float* out, int b, int s, int h, int S, int L, int K, int H,
                           std::vector<float>& scratch) {
    constexpr int D = 16 * C;
    const int d = H * D, pad = int(padding[s]), valid = K - pad, kp = (valid + 15) / 16 * 16;
    const size_t ld_raw = tp + 16;
    scratch.resize(size_t(D) * kp + size_t(valid) * D + 4 * kp + 4 * ld_raw + 32);
    // 64-byte aligned
    float* kt = scratch.data() + (-reinterpret_cast<uintptr_t>(scratch.data()) / sizeof(float) & 15);
    const float* local = tables + size_t(h) * D * tp;  // (D, tp): the head's table, rows aligned
    float* values = kt + size_t(D) * kp;       // (valid, D)
    float* content = values + size_t(valid) * D;  // (4, kp): four queries' content scores, then their weights
    float* raw = content + 4 * kp;             // (4, ld_raw): their position scores by column
    const float* base = rows + size_t(b) * n_rows * 2 * d;
    for (int jj = 0; jj < valid; ++jj) {
        const float* row = base + size_t(index[size_t(s) * K + pad + jj]) * 2 * d;
        for (int e = 0; e < D; ++e) kt[size_t(e) * kp + jj] = row[h * D + e];
        std::memcpy(values + size_t(jj) * D, row + d + h * D, D * sizeof(float));
    }
    for (int e = 0; e < D; ++e)
        for (int jj = valid; jj < kp; ++jj) kt[size_t(e) * kp + jj] = 0.f;
    float qc[4][D], qp[4][D];  // (q + u) scale and (q + v) scale of four queries (zeros past the last)
    for (int i0 = 0; i0 < L; i0 += 4) {
        const int nq = std::min(4, L - i0);
        for (int r = 0; r < 4; ++r) {
            const float* qi = q + size_t(b) * q_batch + (size_t(s) * L + i0 + r) * d + h * D;
            for (int e = 0; e < D; ++e) {
                qc[r][e] = r < nq ? (qi[e] + u[h * D + e]) * scale : 0.f;
                qp[r][e] = r < nq ? (qi[e] + v[h * D + e]) * scale : 0.f;
            }
        }
        // query i sees the local keys 0 .. n_i - 1 (n_i = K - L + i - pad + 1), key jj's position score
        // at column L - i + pad + jj of the table (its last at column K for every query)
        const int n_most = K - L + (i0 + nq - 1) - pad + 1, nb = (n_most + 15) / 16 * 16;
        dot_columns4<D>(qc, kt, kp, 0, nb, content, kp);
        dot_columns4<D>(qp, local, tp, (L - (i0 + nq - 1) + pad) / 16 * 16, tp, raw, ld_raw);
        v16 inverse[4];
        for (int r = 0; r < nq; ++r) {
            const int i = i0 + r, n = K - L + i - pad + 1, start = L - i + pad;
            float* scores = content + r * kp;
            const float* position = raw + r * ld_raw + start;
            for (int j = 0; j + 16 <= n; j += 16) store(scores + j, load(scores + j) + load(position + j));
            for (int j = n / 16 * 16; j < n; ++j) scores[j] = scores[j] + position[j];
            for (int j = n; j < nb; ++j) scores[j] = -INFINITY;
            v16 top = splat(-INFINITY);
            for (int j = 0; j < nb; j += 16) {
                const v16 x = load(scores + j);
                top = select(x > top, x, top);
            }
            float most = top[0];
            for (int k = 1; k < 16; ++k) most = std::max(most, top[k]);
            v16 total{};
            for (int j = 0; j < nb; j += 16) {
                const v16 w = exp_neg(load(scores + j) - most);
                store(scores + j, w);
                total += w;
            }
            inverse[r] = splat(1.f / hsum(total));
        }
        for (int r = nq; r < 4; ++r)  // no such queries: weights 0
            for (int j = 0; j < nb; ++j) content[r * kp + j] = 0.f;
        v16 a[4][C];  // the four queries' weighted sums of values, each value loaded once for the four
        for (int r = 0; r < 4; ++r)
            for (int c = 0; c < C; ++c) a[r][c] = v16{};
        for (int jj = 0; jj < n_most; ++jj) {
            const v16 w0 = splat(content[jj]), w1 = splat(content[kp + jj]), w2 = splat(content[2 * kp + jj]),
                      w3 = splat(content[3 * kp + jj]);
            for (int c = 0; c < C; ++c) {
                const v16 value = load(values + size_t(jj) * D + 16 * c);
                a[0][c] += w0 * value;
                a[1][c] += w1 * value;
                a[2][c] += w2 * value;
                a[3][c] += w3 * value;
            }
        }
        for (int r = 0; r < nq; ++r) {
            float* o = out + (size_t(b) * S * L + size_t(s) * L + i0 + r) * d + h * D;
            for (int c = 0; c < C; ++c) store(o + 16 * c, a[r][c] * inverse[r]);
        }
    }
}

// `product` of x with a matrix packed in pairs of inputs (`pack`) into y_pairs, and `product_listed`
// of x's nonzero entries (`nonzero`) with the same matrix packed by input in blocks of `down_width`
// (`pack(..., by_input=True)`) into y_listed: what the step runs on the feed-forward's second matrix
// and what it stands for, side by side (`still_down_products`, for a test that they agree bit for bit)
template <class W>
void down_products(const W* by_pairs, const W* by_input, int in, int out, const float* x, float* y_pairs,
                   float* y_listed) {
    product(by_pairs, in, x, 0, out / 16, y_pairs);
    std::vector<int> list(listed_size(in));
    int n_even, n_odd;
    nonzero(x, 0, in, list.data(), in, n_even, n_odd);
    product_listed(by_input, in, out, list.data(), n_even, odd_list(list.data(), in), n_odd, x, y_listed);
}

}  // namespace

extern "C" {

// `down_width` for Python's packing of the matrix (`native.down_width`), so that the two agree
int64_t still_down_width(int64_t out) { return down_width(int(out)); }

// 1 where this build takes the AVX-512 paths (`nonzero`'s and `add_listed`'s), 0 where it takes the
// portable ones (a test builds those too: tests/compressive/test_native.py, `build`)
int64_t still_avx512() {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

// `down_products` (dims: in, out, bf16 0 or 1). Returns 0, or 1 where in is odd or out not a multiple
// of 16 (nothing then done).
int64_t still_down_products(const int64_t* dims, const void* by_pairs, const void* by_input, const float* x,
                            float* y_pairs, float* y_listed) {
    const int in = int(dims[0]), out = int(dims[1]);
    if (in % 2 || out % 16) return 1;
    if (dims[2])
        down_products(static_cast<const bf16*>(by_pairs), static_cast<const bf16*>(by_input), in, out, x, y_pairs,
                      y_listed);
    else
        down_products(static_cast<const float*>(by_pairs), static_cast<const float*>(by_input), in, out, x, y_pairs,
                      y_listed);
    return 0;
}

// `prompt_attention_task` for every (batch row, segment, head) of a group, on `threads` threads (the
// caller's and helpers started here). dims: B, S, L, K, H, D, n_rows, q_batch, table_head, table_ld,
// threads. Returns 0, or 1 where D is not a multiple of 16 up to 128 (nothing then done).
int64_t still_prompt_attention(const int64_t* dims, const float* q, const float* rows, const int64_t* index,
                               const int64_t* padding, const float* u, const float* v, const float* table, double scale,
                               float* out) {
    const int B = int(dims[0]), S = int(dims[1]), L = int(dims[2]), K = int(dims[3]), H = int(dims[4]),
              D = int(dims[5]);
    const int64_t n_rows = dims[6], q_batch = dims[7], table_head = dims[8], table_ld = dims[9];
    if (D % 16 || D > 128 || D <= 0) return 1;
    // every head's table in aligned rows, columns past K zero (read only for keys masked), once a call
    const int tp = (K + 1 + 15) / 16 * 16;
    std::vector<float> tables(size_t(H) * D * tp + 16, 0.f);
    float* local = tables.data() + (-reinterpret_cast<uintptr_t>(tables.data()) / sizeof(float) & 15);
    for (int h = 0; h < H; ++h)
        for (int e = 0; e < D; ++e)
            std::memcpy(local + (size_t(h) * D + e) * tp, table + h * table_head + e * table_ld,
                        (K + 1) * sizeof(float));
    using Task = decltype(&prompt_attention_task<1>);
    static constexpr Task by_width[] = {prompt_attention_task<1>, prompt_attention_task<2>, prompt_attention_task<3>,
                                        prompt_attention_task<4>, prompt_attention_task<5>, prompt_attention_task<6>,
                                        prompt_attention_task<7>, prompt_attention_task<8>};
    const Task task_of = by_width[D / 16 - 1];
    const int tasks = B * S * H;
    const int threads = int(std::max<int64_t>(1, std::min<int64_t>(dims[10], tasks)));
    auto run = [&](int part) {
        std::vector<float> scratch;
        // every threads-th task (segments have different lengths: neighbours share them out)
        for (int task = part; task < tasks; task += threads) {
            const int h = task % H, s = (task / H) % S, b = task / (H * S);
            task_of(q, q_batch, rows, n_rows, index, padding, u, v, local, tp, float(scale), out, b, s, h, S, L, K, H,
                    scratch);
        }
    };
    std::vector<std::thread> helpers;
    int part = 1;
    try {
        for (; part < threads; ++part) helpers.emplace_back(run, part);
    } catch (const std::system_error&) {  // no thread to be had: the rest on this one
    }
    for (int rest = part; rest < threads; ++rest) run(rest);
    run(0);
    for (std::thread& helper : helpers) helper.join();
    return 0;
}

void still_decoder_free(void* engine);

// dims: layers, batch, heads, d_head, d_model, d_ff, vocab, n_cap, m_cap, k_blocks, pre_norm,
// compression (0 none, 1 taps, 2 max, 3 mean), rate, taps, threads, bf16, groups (the most compressions
// computed together), then the taps' rows.
// pointers: embedding, head, norm weight, norm bias, keys, values, inputs, then a layer each:
// qkv, out, up, down, taps, positions, u, v, norm1 w, norm1 b, norm2 w, norm2 b, up bias, down bias.
// Null where a helper thread cannot be started.
void* still_decoder_new(const int64_t* dims, const int64_t* pointers, double eps, int64_t spin_ns,
                        int64_t barrier_spin_ns) {
    auto* e = new Engine();
    Shape& s = e->s;
    int* fields[] = {&s.layers, &s.batch, &s.heads, &s.d_head, &s.d, &s.ff, &s.vocab, &s.n_cap, &s.m_cap,
                     &s.k_blocks, &s.pre_norm, &s.compression, &s.rate, &s.taps, &s.threads, &s.bf16, &s.groups};
    const int n_fields = sizeof(fields) / sizeof(fields[0]);
    for (int j = 0; j < n_fields; ++j) *fields[j] = int(dims[j]);
    for (int k = 0; k < s.taps && k < 64; ++k) s.tap_rows[k] = int(dims[n_fields + k]);
    s.eps = float(eps);
    e->spin_ns = spin_ns;
    e->barrier_spin_ns = barrier_spin_ns;
    auto ptr = [&](int j) { return reinterpret_cast<const void*>(pointers[j]); };
    e->embedding = static_cast<const float*>(ptr(0));
    e->head = ptr(1);
    e->norm_w = static_cast<const float*>(ptr(2));
    e->norm_b = static_cast<const float*>(ptr(3));
    e->keys = const_cast<void*>(ptr(4));
    e->values = const_cast<void*>(ptr(5));
    e->inputs = static_cast<float*>(const_cast<void*>(ptr(6)));
    for (int i = 0; i < s.layers; ++i) {
        int j = 7 + 14 * i;
        Layer L;
        L.qkv = ptr(j), L.out = ptr(j + 1), L.up = ptr(j + 2), L.down = ptr(j + 3), L.taps = ptr(j + 4);
        L.positions = ptr(j + 5);
        const float** floats[] = {&L.u, &L.v, &L.norm1_w, &L.norm1_b, &L.norm2_w, &L.norm2_b, &L.up_b, &L.down_b};
        for (int k = 0; k < 8; ++k) *floats[k] = static_cast<const float*>(ptr(j + 6 + k));
        e->layer.push_back(L);
    }
    const int B = s.batch, d = s.d, K = s.n_cap + s.m_cap, T = s.threads;
    e->out_parts.assign(size_t(T) * B * d, 0.f);
    e->down_parts.assign(size_t(T) * B * d, 0.f);
    e->logits.assign(size_t(B) * ((s.vocab + 15) / 16 * 16), 0.f);
    // the compressions of up to `groups` compressing steps together, at most as many as the full ring
    // holds: the g-th next one compresses entries g c + 1 .. g c + c after the newest (mod M_cap)
    s.groups = s.compression == NONE ? 1 : std::max(1, std::min(s.groups, s.m_cap / s.rate));
    e->compressed.assign(size_t(s.layers) * B * s.groups * d, 0.f);
    const size_t scratch = size_t(s.k_blocks) * 32 + 2 * s.d_head + K + 16;
    for (int t = 0; t < T; ++t) {
        e->h.emplace_back(size_t(B) * d, 0.f);
        e->x.emplace_back(size_t(B) * d, 0.f);
        e->qkv.emplace_back(size_t(B) * 3 * d, 0.f);
        e->attended.emplace_back(size_t(B) * d, 0.f);
        e->hidden.emplace_back(size_t(B) * s.ff, 0.f);
        e->windows.emplace_back(size_t(s.groups) * std::max(s.taps, 1) * d, 0.f);
        e->rows.emplace_back(size_t(s.groups) * 4 * d, 0.f);
        int h0, h1;
        e->share(s.heads, t, h0, h1);
        e->pending.emplace_back();
        e->pending.back().kv.assign(size_t(s.groups) * s.layers * B * 2 * (h1 - h0) * s.d_head, 0.f);
        e->scratch.emplace_back(scratch, 0.f);
        e->slots.emplace_back(2 * K + 1 + SLOTS_AHEAD + 1, 0);
        e->listed.emplace_back(listed_size(s.ff), 0);
        e->runs.emplace_back();
        e->runs.back().reserve(4 * (K + 1));
    }
    e->passed.assign(T, 0);
    try {
        for (int t = 1; t < T; ++t) e->workers.emplace_back([e, t] { e->worker(t); });
    } catch (const std::system_error&) {  // no thread to be had (the system's limit): no engine, the workers
        still_decoder_free(e);             // started ended (every step waits for all T); the caller asks for fewer
        return nullptr;
    }
    return e;
}

// One step: tokens (B,) int64 in, logits (B, V) out; with sample != 0 also the drawn tokens (B,)
// from the uniform numbers (B,). Returns 0, or 1 + the row of a token outside the vocabulary
// (nothing then done).
int64_t still_decoder_step(void* engine, const int64_t* tokens, int64_t next_c, int64_t next_m, int64_t n, int64_t m,
                        int64_t compress, float* logits, int64_t sample, const float* uniform, double temperature,
                        int64_t top_k, double top_p, const int64_t* exclude, int64_t n_exclude, int64_t* drawn) {
    auto* e = static_cast<Engine*>(engine);
    for (int b = 0; b < e->s.batch; ++b)
        if (tokens[b] < 0 || tokens[b] >= e->s.vocab) return 1 + b;
    Call c;
    c.tokens = tokens, c.next_c = int(next_c), c.next_m = int(next_m), c.n = int(n), c.m = int(m);
    c.compress = int(compress), c.logits = logits;
    e->step(c);
    if (sample) {
        thread_local std::vector<float> work;
        thread_local std::vector<int> order;
        work.resize(2 * size_t(e->s.vocab));
        order.resize(e->s.vocab);
        for (int b = 0; b < e->s.batch; ++b)
            drawn[b] = draw(logits + size_t(b) * e->s.vocab, e->s.vocab, float(temperature), int(top_k), float(top_p),
                            exclude, int(n_exclude), uniform[b], work, order);
    }
    return 0;
}

// `steps` steps with the draw, each fed the token drawn by the one before (the first fed `tokens`):
// the drawn tokens (steps, B) into `drawn`, with the uniform numbers (steps, B). `counters` (next_c,
// next_m, n, m) in and out, advanced as `Decoder._advance` does. Returns as `still_decoder_step`
// (only the first tokens can be outside the vocabulary).
int64_t still_decoder_run(void* engine, const int64_t* tokens, int64_t* counters, int64_t steps, float* logits,
                          const float* uniform, double temperature, int64_t top_k, double top_p,
                          const int64_t* exclude, int64_t n_exclude, int64_t* drawn) {
    auto* e = static_cast<Engine*>(engine);
    const Shape& s = e->s;
    const bool compressing = s.compression != NONE;
    const int mem_len = s.m_cap - (compressing ? s.rate : 1);
    for (int64_t k = 0; k < steps; ++k) {
        int64_t& next_c = counters[0];
        int64_t& next_m = counters[1];
        int64_t& n = counters[2];
        int64_t& m = counters[3];
        const bool compress = compressing && m + 1 == s.m_cap;
        const int64_t* in = k == 0 ? tokens : drawn + (k - 1) * s.batch;
        int64_t failed = still_decoder_step(engine, in, next_c, next_m, n, m, compress, logits, 1,
                                            uniform + k * s.batch, temperature, top_k, top_p, exclude,
                                            n_exclude, drawn + k * s.batch);
        if (failed) return failed;
        next_m = (next_m + 1) % s.m_cap;
        if (!compressing) {
            m = std::min<int64_t>(m + 1, mem_len);
        } else if (compress) {
            next_c = (next_c + 1) % s.n_cap;
            n = std::min<int64_t>(n + 1, s.n_cap);
            m += 1 - s.rate;
        } else {
            m += 1;
        }
    }
    return 0;
}

void still_decoder_free(void* engine) {
    auto* e = static_cast<Engine*>(engine);
    e->stop.store(1);
    e->go.fetch_add(1);
    futex(&e->go, FUTEX_WAKE_PRIVATE, INT_MAX);
    for (auto& w : e->workers) w.join();
    delete e;
}

}  // extern "C"
