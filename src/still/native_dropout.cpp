// still: dropout, and dropout after a ReLU or before a residual add, in one pass each way on the CPU.
//
// `still.layers.dropout` keeps an element where its 16-bit lane is at least a threshold. The lanes
// come from one 64-bit seed a call (drawn from the PyTorch generator): element 4 w + j takes bits
// 16 j .. 16 j + 15 of SplitMix64's word w, made here as the pass needs them, forward and again
// backward, so no mask or lanes are written or kept. (`layers._lanes` makes the same lanes with
// PyTorch's operators where this cannot run.) Each direction is one pass over the tensor with
// PyTorch's arithmetic, so the results are the bits of the PyTorch path's passes over those lanes:
//   forward   out  = round(0 + (scale * t) * kept),  t = relu(x) (NaN kept) or x
//   backward  grad_x = round(0 + (scale * grad) * kept), then 0 where relu and x <= 0
// and the residual form h + dropout(x) (fp32 h, x fp32 or bf16; `still_dropout_add`), whose
// backward also makes autograd's rounding of the sum's fp32 gradient to x's dtype.
// (`addcmul(0, t, mask, value=scale)` computes 0 + scale * t * mask in fp32, and rounds once to
// bf16; `threshold_backward` zeroes the gradient where relu(x) <= 0, that is where x <= 0.)
// fp32 or bf16 (uint16_t, rounded to nearest even, NaN as 0xFFFF: the rounding of PyTorch's
// vectorised conversion; its scalar one, for a loop's last elements, writes NaN as 0x7FC0), any
// length. Built with the machine's compiler by `still.compressive.native` and loaded with ctypes:
// 16 elements at a time in AVX-512 registers where the target has AVX-512 (F, BW, VL, DQ), else in
// portable C++ with the same arithmetic and bits, in loops of 16 elements the compiler vectorises.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define STILL_DROPOUT 1  // the AVX-512 kernels; else the portable ones
#include <immintrin.h>
#endif

namespace {

#ifdef STILL_DROPOUT

inline __mmask16 valid(int64_t left) {  // the first min(left, 16) of 16 elements
    return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void store(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
inline __m512i bf16_bits(__m512 v) {  // in the low halves of 32-bit lanes
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
}
inline void store(uint16_t* p, __mmask16 m, __m512 v) { _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(bf16_bits(v))); }

// The lanes of elements i .. i + 15 (i a multiple of 4): words w = i / 4 .. + 3 of SplitMix64 (Steele,
// Lea and Flood 2014) over the counter seed + (w + 1) * golden, each word's four 16-bit lanes in
// order (element 4 w + j: bits 16 j ..); `layers._lanes` makes the same in PyTorch's operators
inline __m256i draws(uint64_t seed, int64_t i) {
    const __m256i w = _mm256_add_epi64(_mm256_set1_epi64x(i / 4 + 1), _mm256_set_epi64x(3, 2, 1, 0));
    __m256i z = _mm256_add_epi64(_mm256_set1_epi64x(int64_t(seed)),
                                 _mm256_mullo_epi64(w, _mm256_set1_epi64x(int64_t(0x9E3779B97F4A7C15ull))));
    z = _mm256_mullo_epi64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), _mm256_set1_epi64x(int64_t(0xBF58476D1CE4E5B9ull)));
    z = _mm256_mullo_epi64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), _mm256_set1_epi64x(int64_t(0x94D049BB133111EBull)));
    return _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
}

// 1.0 at the kept elements of i .. i + 15 (lane >= threshold), 0.0 elsewhere
inline __m512 kept(uint64_t seed, int64_t i, __mmask16 m, __m256i threshold) {
    const __mmask16 keep = _mm256_mask_cmpge_epi16_mask(m, draws(seed, i), threshold);
    return _mm512_maskz_mov_ps(keep, _mm512_set1_ps(1.0f));
}

// elements [begin, end) of the dropout (Relu: of the ReLU, then the dropout)
template <class T, bool Relu>
void forward(const T* x, uint64_t seed, int64_t begin, int64_t end, int16_t threshold, float scale, T* out) {
    const __m512 k = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();
    const __m256i t = _mm256_set1_epi16(threshold);
    for (int64_t i = begin; i < end; i += 16) {
        const __mmask16 m = valid(end - i);
        __m512 v = load(x + i, m);
        if constexpr (Relu) v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_NLE_UQ), v);  // NaN kept
        store(out + i, m, _mm512_add_ps(zero, _mm512_mul_ps(_mm512_mul_ps(k, v), kept(seed, i, m, t))));
    }
}

// elements [begin, end) of its backward (`x` null: plain dropout; else the ReLU's input, whose
// gradient is zero where x <= 0)
template <class T>
void backward(const T* grad, uint64_t seed, const T* x, int64_t begin, int64_t end, int16_t threshold,
              float scale, T* out) {
    const __m512 k = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();
    const __m256i t = _mm256_set1_epi16(threshold);
    for (int64_t i = begin; i < end; i += 16) {
        const __mmask16 m = valid(end - i);
        __m512 g = _mm512_add_ps(zero, _mm512_mul_ps(_mm512_mul_ps(k, load(grad + i, m)), kept(seed, i, m, t)));
        if (x != nullptr) g = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(load(x + i, m), zero, _CMP_NLE_UQ), g);
        store(out + i, m, g);
    }
}

// x's value as stored: rounded to bf16 (and widened back) where T is bf16
inline __m512 as_stored(const float*, __m512 v) { return v; }
inline __m512 as_stored(const uint16_t*, __m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }

// out = h + dropout(x) for fp32 h and out, x fp32 or bf16: the dropout's output rounded to x's
// dtype, then added in fp32 (PyTorch: the dropout in x's dtype, then the add promoting it)
template <class T>
void add_forward(const float* h, const T* x, uint64_t seed, int64_t begin, int64_t end, int16_t threshold,
                 float scale, float* out) {
    const __m512 k = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();
    const __m256i t = _mm256_set1_epi16(threshold);
    const T* tag = nullptr;
    for (int64_t i = begin; i < end; i += 16) {
        const __mmask16 m = valid(end - i);
        const __m512 d = _mm512_add_ps(zero, _mm512_mul_ps(_mm512_mul_ps(k, load(x + i, m)), kept(seed, i, m, t)));
        store(out + i, m, _mm512_add_ps(load(h + i, m), as_stored(tag, d)));
    }
}

// its gradient for x from the sum's, grad (fp32): grad rounded to x's dtype (autograd's cast at the
// add), then the dropout's backward
template <class T>
void add_backward(const float* grad, uint64_t seed, int64_t begin, int64_t end, int16_t threshold, float scale,
                  T* out) {
    const __m512 k = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();
    const __m256i t = _mm256_set1_epi16(threshold);
    const T* tag = nullptr;
    for (int64_t i = begin; i < end; i += 16) {
        const __mmask16 m = valid(end - i);
        const __m512 g = as_stored(tag, load(grad + i, m));
        store(out + i, m, _mm512_add_ps(zero, _mm512_mul_ps(_mm512_mul_ps(k, g), kept(seed, i, m, t))));
    }
}

#else  // portable: the arithmetic of the AVX-512 kernels above, in the same order (`each`)

inline uint64_t draw(uint64_t seed, int64_t w) {  // SplitMix64's word w (`draws`)
    uint64_t z = seed + uint64_t(w + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

inline float widen(uint16_t h) {  // a bf16's float
    const uint32_t bits = uint32_t(h) << 16;
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}
inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) { return widen(*p); }
inline uint16_t bf16_bits(float v) {  // to nearest, ties to even; NaN as 0xFFFF (`bf16_bits` above)
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    const uint32_t nan = 0u - uint32_t(v != v);  // all ones at a NaN (no branch: the loop vectorises)
    return uint16_t(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) | nan);
}
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = bf16_bits(v); }
// v where x > 0 or x is NaN (not x <= 0), else +0: `maskz_mov` above, as bits (a `?:` of floats
// left the loops unvectorised)
inline float unless_nonpositive(float x, float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    u &= 0u - uint32_t(!(x <= 0.0f));
    std::memcpy(&v, &u, sizeof v);
    return v;
}
inline float as_stored(const float*, float v) { return v; }
inline float as_stored(const uint16_t*, float v) { return widen(bf16_bits(v)); }

// f(i, keep) for each element i of [begin, end) (begin a multiple of 16), keep 1.0 where its lane
// (`draws`: element 4 w + j takes bits 16 j .. of word w) is at least the threshold, else 0.0. Sixteen
// elements at a time: their four words' lanes side by side in memory (little-endian), then a loop of
// 16 that the compiler vectorises.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "a word's lanes in memory in order");
template <class F>
inline void each(uint64_t seed, int64_t begin, int64_t end, int16_t threshold, const F& f) {
    for (int64_t i = begin; i < end; i += 16) {
        uint64_t words[4];
        for (int q = 0; q < 4; ++q) words[q] = draw(seed, i / 4 + q);
        int16_t lanes[16];
        std::memcpy(lanes, words, sizeof lanes);
        if (end - i >= 16) {
            for (int j = 0; j < 16; ++j) f(i + j, lanes[j] >= threshold ? 1.0f : 0.0f);
        } else {
            for (int j = 0; j < end - i; ++j) f(i + j, lanes[j] >= threshold ? 1.0f : 0.0f);
        }
    }
}

template <class T, bool Relu>
void forward(const T* x, uint64_t seed, int64_t begin, int64_t end, int16_t threshold, float scale, T* out) {
    each(seed, begin, end, threshold, [&](int64_t i, float keep) {
        float v = load(x + i);
        if constexpr (Relu) v = unless_nonpositive(v, v);  // NaN kept
        store(out + i, 0.0f + (scale * v) * keep);
    });
}

template <class T>
void backward(const T* grad, uint64_t seed, const T* x, int64_t begin, int64_t end, int16_t threshold,
              float scale, T* out) {
    if (x == nullptr) {  // (two loops, each without a branch: they vectorise)
        each(seed, begin, end, threshold, [&](int64_t i, float keep) {
            store(out + i, 0.0f + (scale * load(grad + i)) * keep);
        });
    } else {
        each(seed, begin, end, threshold, [&](int64_t i, float keep) {
            const float g = 0.0f + (scale * load(grad + i)) * keep;
            store(out + i, unless_nonpositive(load(x + i), g));
        });
    }
}

template <class T>
void add_forward(const float* h, const T* x, uint64_t seed, int64_t begin, int64_t end, int16_t threshold,
                 float scale, float* out) {
    const T* tag = nullptr;
    each(seed, begin, end, threshold, [&](int64_t i, float keep) {
        out[i] = h[i] + as_stored(tag, 0.0f + (scale * load(x + i)) * keep);
    });
}

template <class T>
void add_backward(const float* grad, uint64_t seed, int64_t begin, int64_t end, int16_t threshold, float scale,
                  T* out) {
    const T* tag = nullptr;
    each(seed, begin, end, threshold, [&](int64_t i, float keep) {
        store(out + i, 0.0f + (scale * as_stored(tag, grad[i])) * keep);
    });
}

#endif  // STILL_DROPOUT

// run(begin, end) over [0, n) in `threads` parts of whole 16-element blocks, part 0 on this thread
template <class Run>
void split(int64_t n, int64_t threads, const Run& run) {
    const int64_t blocks = (n + 15) / 16;
    threads = std::max<int64_t>(1, std::min(threads, blocks));
    std::vector<std::thread> helpers;
    auto part = [&](int64_t p) { run(std::min(n, blocks * p / threads * 16), std::min(n, blocks * (p + 1) / threads * 16)); };
    int64_t p = 1;
    try {
        for (; p < threads; ++p) helpers.emplace_back(part, p);
    } catch (const std::system_error&) {  // no thread to be had (the system's limit): the rest on this one
    }
    for (int64_t rest = p; rest < threads; ++rest) part(rest);
    part(0);
    for (auto& helper : helpers) helper.join();
}

// run(begin, end, tag) over [0, n) as `split` does, tag a null pointer of the element type: bf16
// (uint16_t) where `bf16`, else float
template <class Run>
void over(int64_t n, int64_t threads, int64_t bf16, const Run& run) {
    split(n, threads, [&](int64_t begin, int64_t end) {
        if (bf16)
            run(begin, end, static_cast<uint16_t*>(nullptr));
        else
            run(begin, end, static_cast<float*>(nullptr));
    });
}


}  // namespace

extern "C" {

// 1 where this build runs the AVX-512 kernels, 0 where the portable ones (a test builds both)
int64_t still_dropout_avx512() {
#ifdef STILL_DROPOUT
    return 1;
#else
    return 0;
#endif
}

// The entry points below: n elements of fp32 (bf16 = 0) or bf16 (bf16 = 1), the lanes of `seed`
// (`draws`), lanes >= threshold kept, the kept elements scaled by `scale`; they return 0.

// out = dropout(relu(x)) where relu, else dropout(x)
int64_t still_dropout(const void* x, int64_t seed, int64_t n, int64_t threshold, float scale, int64_t relu,
                      int64_t bf16, void* out, int64_t threads) {
    const auto t = int16_t(threshold);
    over(n, threads, bf16, [&](int64_t begin, int64_t end, auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        if (relu)
            forward<T, true>(static_cast<const T*>(x), uint64_t(seed), begin, end, t, scale, static_cast<T*>(out));
        else
            forward<T, false>(static_cast<const T*>(x), uint64_t(seed), begin, end, t, scale, static_cast<T*>(out));
    });
    return 0;
}

// its gradient from the output's, grad; x: the ReLU's input where there was one, else null
int64_t still_dropout_backward(const void* grad, int64_t seed, const void* x, int64_t n, int64_t threshold,
                               float scale, int64_t bf16, void* out, int64_t threads) {
    over(n, threads, bf16, [&](int64_t begin, int64_t end, auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        backward<T>(static_cast<const T*>(grad), uint64_t(seed), static_cast<const T*>(x), begin, end, int16_t(threshold), scale,
                    static_cast<T*>(out));
    });
    return 0;
}

// out = h + dropout(x), h and out fp32 (x fp32 or bf16)
int64_t still_dropout_add(const float* h, const void* x, int64_t seed, int64_t n, int64_t threshold,
                          float scale, int64_t bf16, float* out, int64_t threads) {
    over(n, threads, bf16, [&](int64_t begin, int64_t end, auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        add_forward<T>(h, static_cast<const T*>(x), uint64_t(seed), begin, end, int16_t(threshold), scale, out);
    });
    return 0;
}

// x's gradient (in x's dtype) from the sum's, grad (fp32); h's is grad itself
int64_t still_dropout_add_backward(const float* grad, int64_t seed, int64_t n, int64_t threshold, float scale,
                                   int64_t bf16, void* out, int64_t threads) {
    over(n, threads, bf16, [&](int64_t begin, int64_t end, auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        add_backward<T>(grad, uint64_t(seed), begin, end, int16_t(threshold), scale, static_cast<T*>(out));
    });
    return 0;
}

}  // extern "C"
