// still: the bf16 training attention's weights on the CPU, scores in fp32, in one pass.
//
// `still.compressive.attention._AttentionWeights.forward` under bf16 autocast, for processors with
// AMX (bf16 tiles) and AVX-512 bf16: softmax(mask(content + shifted position scores)) over
// heads-major (G = H * B) rows, where both score products run on AMX tiles with fp32 accumulators
// and their sum, the mask and the softmax stay in fp32; only the weights are rounded to bf16.
// PyTorch's bf16 products round each score to bf16 at their output (the bf16 path), and its fp32
// products of the same bf16 operands run on the fp32 units (`attention.FP32_POSITION_SCORES`):
// rounding the position scores is most of how far a bf16 step's gradient lies from an fp32 step's
// (docs/performance.md, session 22). Here the scores of 16 query rows at a time live in a scratch
// of 2 x 16 x K floats (in the core's caches), so the (G, L, K) scores are written once, as bf16
// weights, where the PyTorch path makes five passes over them. The backward's first pass too
// (`still_attention_backward`): the softmax's backward and the shift of its result back to the
// position scores' order, one pass where PyTorch makes three; the four products stay PyTorch's.
//
// Built with the machine's compiler (`-O3 -march=native`) by `still.compressive.native` and loaded
// with ctypes. Without AMX in the compiler's target, or where the operating system refuses the tile data
// (`arch_prctl`), `still_attention_weights` returns nonzero and the caller takes the PyTorch path.
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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__)
#define STILL_AMX 1
#endif

namespace {

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

// tiles 0: C (16 x 16 fp32), 1: A (16 rows x 32 bf16), 2: B (16 pairs x 16 columns, VNNI)
void configure_tiles() {
    TileConfig c{};
    c.palette = 1;
    for (int t = 0; t < 3; ++t) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

// (rows, D) bf16 -> B tiles: tile (nb, db) holds rows 16 nb .. +15 (its columns) and features
// 32 db .. +31 (16 pairs, its rows), as 32-bit words [p][n] = features (2p, 2p + 1) of row n
void pack_vnni(const uint16_t* src, int64_t rows, int64_t d, uint32_t* packed) {
    const auto* words = reinterpret_cast<const uint32_t*>(src);
    const int64_t half = d / 2, nd = d / 32;
    const __m512i index = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(int(half)));
    for (int64_t nb = 0; nb < rows / 16; ++nb)
        for (int64_t db = 0; db < nd; ++db) {
            const uint32_t* base = words + nb * 16 * half + db * 16;
            uint32_t* tile = packed + (nb * nd + db) * 256;
            for (int p = 0; p < 16; ++p)
                _mm512_storeu_si512(tile + p * 16, _mm512_i32gather_epi32(index, base + p, 4));
        }
}

// 16 rows of `a` (row stride d) times the packed columns blocks [first, last) -> out (row stride k_len)
void scores(const uint16_t* a, const uint32_t* packed, int64_t d, int64_t first, int64_t last, float* out,
            int64_t k_len) {
    const int64_t nd = d / 32;
    for (int64_t cb = first; cb < last; ++cb) {
        _tile_zero(0);
        for (int64_t db = 0; db < nd; ++db) {
            _tile_loadd(1, a + db * 32, d * 2);
            _tile_loadd(2, packed + (cb * nd + db) * 256, 64);
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, out + cb * 16, k_len * 4);
    }
}

inline __m512 exp_nonpositive(__m512 x) {  // e^x for x <= 0; exactly 0 below -87 (and at -inf)
    const __m512 low = _mm512_set1_ps(-87.0f);
    const __mmask16 under = _mm512_cmp_ps_mask(x, low, _CMP_LT_OQ);
    x = _mm512_max_ps(x, low);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // x - n ln 2, in two parts
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);       // |r| <= ln(2) / 2
    __m512 p = _mm512_set1_ps(1.0f / 720);  // Taylor to r^6: relative error under 1.3e-7
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(__mmask16(~under), p, n);
}

inline __mmask16 lanes(int64_t left) {  // the first min(left, 16) lanes (none where left <= 0)
    return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// one row: s (the content scores, overwritten), p (its position scores, already shifted), bias row
// (bf16; null: none beyond the causal mask); n valid keys of k_len -> out (bf16)
void softmax_row(float* s, const float* p, const uint16_t* bias, int64_t n, int64_t k_len, uint16_t* out) {
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    __m512 vmax = minus_inf;
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = lanes(n - j);
        __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, s + j), _mm512_maskz_loadu_ps(m, p + j));
        if (bias != nullptr)
            v = _mm512_add_ps(v, _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, bias + j)), 16)));
        _mm512_mask_storeu_ps(s + j, m, v);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
    }
    const float top = _mm512_reduce_max_ps(vmax);
    if (top == -INFINITY) {  // every key masked (not reached by the callers: a query sees its own key)
        std::memset(out, 0, k_len * sizeof(uint16_t));
        return;
    }
    const __m512 shift = _mm512_set1_ps(top);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = lanes(n - j);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), shift));
        _mm512_mask_storeu_ps(s + j, m, e);
        vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = lanes(n - j);
        const __m256bh w = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), inv));
        _mm256_mask_storeu_epi16(out + j, m, (__m256i)w);
    }
    if (n < k_len) std::memset(out + n, 0, (k_len - n) * sizeof(uint16_t));
}

void weights_of(const uint16_t* q_content, const uint16_t* k, const uint16_t* q_position, const uint16_t* r,
                const uint16_t* bias, int64_t bias_batch_stride, uint16_t* out, int64_t g0, int64_t g1,
                int64_t batch, int64_t l, int64_t k_len, int64_t d) {
    std::vector<uint32_t> r_packed(k_len * d / 2), k_packed(k_len * d / 2);
    std::vector<float> content(16 * k_len), position(16 * k_len);
    configure_tiles();
    int64_t packed_head = -1;
    for (int64_t g = g0; g < g1; ++g) {
        const int64_t h = g / batch, b = g % batch;
        if (h != packed_head) {
            pack_vnni(r + h * k_len * d, k_len, d, r_packed.data());
            packed_head = h;
        }
        pack_vnni(k + g * k_len * d, k_len, d, k_packed.data());
        const uint16_t* bias_b = bias == nullptr ? nullptr : bias + b * bias_batch_stride;
        for (int64_t i0 = 0; i0 < l; i0 += 16) {
            const int64_t rows = g * l + i0;  // q_position's row h * B * L + b * L + i0 is the same
            // row i reads the position scores of columns L - 1 - i .. K - 1, its keys 0 .. K - L + i
            scores(q_position + rows * d, r_packed.data(), d, (l - 16 - i0) / 16, k_len / 16, position.data(), k_len);
            scores(q_content + rows * d, k_packed.data(), d, 0, (k_len - l + i0) / 16 + 1, content.data(), k_len);
            for (int64_t t = 0; t < 16; ++t) {
                const int64_t i = i0 + t;
                softmax_row(content.data() + t * k_len, position.data() + t * k_len + (l - 1 - i),
                            bias_b == nullptr ? nullptr : bias_b + i * k_len, k_len - l + i + 1, k_len, out + (rows + t) * k_len);
            }
        }
    }
    _tile_release();
}

// one row of the backward: dot = sum_j w_j g_j, ds_j = w_j (g_j - dot) in fp32, rounded once to bf16,
// into ds (K) and, shifted right by `shift` (the distances' order of the position scores), into raw
void softmax_backward_row(const uint16_t* w, const uint16_t* g, int64_t k_len, int64_t shift, uint16_t* ds,
                          uint16_t* raw) {
    auto widen = [](__m256i half) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)); };
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < k_len; j += 16) {
        const __mmask16 m = lanes(k_len - j);
        acc = _mm512_fmadd_ps(widen(_mm256_maskz_loadu_epi16(m, w + j)), widen(_mm256_maskz_loadu_epi16(m, g + j)), acc);
    }
    const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
    std::memset(raw, 0, shift * sizeof(uint16_t));
    for (int64_t j = 0; j < k_len; j += 16) {
        const __mmask16 m = lanes(k_len - j);
        const __m512 wj = widen(_mm256_maskz_loadu_epi16(m, w + j));
        const __m512 gj = widen(_mm256_maskz_loadu_epi16(m, g + j));
        const __m256i d = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(wj, _mm512_sub_ps(gj, dot)));
        _mm256_mask_storeu_epi16(ds + j, m, d);
        _mm256_mask_storeu_epi16(raw + shift + j, lanes(k_len - shift - j) & m, d);  // what stays in the row
    }
}

// run(part) for part 0 .. threads - 1: part 0 on the calling thread, the others on helpers started here
template <class Run>
void on_threads(int64_t threads, const Run& run) {
    std::vector<std::thread> helpers;
    for (int64_t part = 1; part < threads; ++part) helpers.emplace_back(run, part);
    run(0);
    for (auto& helper : helpers) helper.join();
}

#endif  // STILL_AMX

}  // namespace

extern "C" {

// 0 where this build can run the kernel here; 1: not compiled for AMX; 2: the system refuses the tiles
int64_t still_attention_available() {
#ifdef STILL_AMX
    return amx_permitted() ? 0 : 2;
#else
    return 1;
#endif
}

// The weights (see the top of this file); 0 on success, nonzero (nothing written) where this
// build or these shapes cannot (`still_attention_available`, or 3: shapes).
int64_t still_attention_weights(const uint16_t* q_content, const uint16_t* k, const uint16_t* q_position,
                                const uint16_t* r, const uint16_t* bias, int64_t bias_batch_stride, uint16_t* out,
                                int64_t heads, int64_t batch, int64_t l, int64_t k_len, int64_t d, int64_t threads) {
    const int64_t available = still_attention_available();
    if (available != 0) return available;
    if (heads < 1 || batch < 1 || l < 16 || l % 16 || k_len % 16 || k_len < l || d < 32 || d % 32) return 3;
#ifdef STILL_AMX
    const int64_t groups = heads * batch;
    threads = std::max<int64_t>(1, std::min(threads, groups));
    auto run = [&](int64_t part) {
        weights_of(q_content, k, q_position, r, bias, bias_batch_stride, out, groups * part / threads,
                   groups * (part + 1) / threads, batch, l, k_len, d);
    };
    on_threads(threads, run);
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
#ifdef STILL_AMX
    const int64_t rows = groups * l;
    threads = std::max<int64_t>(1, std::min(threads, groups));
    auto run = [&](int64_t part) {
        for (int64_t row = rows * part / threads; row < rows * (part + 1) / threads; ++row) {
            const int64_t at = row * k_len;
            softmax_backward_row(weights + at, grad + at, k_len, l - 1 - row % l, grad_scores + at, grad_raw + at);
        }
    };
    on_threads(threads, run);
#endif
    return 0;
}

}  // extern "C"
