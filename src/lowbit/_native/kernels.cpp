// XNOR + popcount kernels with runtime CPU dispatch; see kernels.h for the contracts.
//
// One binary runs everywhere: each instruction-set variant is compiled with a
// per-function target attribute and chosen at run time (AVX-512 VPOPCNTDQ,
// AVX2 with the nibble-table popcount of Mula, Kurz and Lemire, "Faster
// Population Counts Using AVX2 Instructions", 2018, scalar POPCNT, and NEON
// vcnt on aarch64). The GEMM is blocked (MB x NB output blocks, KC words of
// the reduction per pass) and register-tiled (MR x NR rows of A and B per
// micro-kernel, every loaded vector reused NR or MR times); OpenMP spreads the
// output blocks over cores.
//
// The convolution is direct: no im2col rows are formed. Its micro-kernel
// takes R output pixels (a pointer per pixel and kernel position, padding
// pointing at zero words) and G groups of 8 output channels from a weight
// panel (word t of the 8 channels' rows side by side), broadcasts each pixel
// word against the panel's vector and keeps one accumulator per (pixel,
// group) whose lanes are the 8 channels' popcounts: no horizontal reduction,
// no tail wasted in the short K of a 3x3 window, every loaded vector reused R
// or G times.
#include "kernels.h"

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LOWBIT_X86 1
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#define LOWBIT_AARCH64 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef LOWBIT_X86
#define TARGET_AVX512 __attribute__((target("avx512f,avx512vpopcntdq")))
#define TARGET_AVX2 __attribute__((target("avx2,popcnt")))
#define TARGET_POPCNT __attribute__((target("popcnt")))
#endif

namespace lowbit {
namespace {

constexpr int64_t KC = 256;  // reduction words per pass: 16384 bits, 2 KiB of each row
constexpr int64_t MB = 64;   // rows of A per output block
constexpr int64_t NB = 64;   // rows of B per output block

// threads > 0 as asked, else OpenMP's default; at most MAX_THREADS either way (OMP_NUM_THREADS may say anything).
int resolve_threads(int threads) {
#ifdef _OPENMP
    return std::clamp(threads > 0 ? threads : omp_get_max_threads(), 1, MAX_THREADS);
#else
    (void)threads;
    return 1;
#endif
}

// ---------------------------------------------------------------- micro-kernels
// tile<R, C>(a, lda, b, ldb, words, out, ldo): out[i * ldo + j] += popcount(A_i XOR B_j) over `words` words.

#define LOWBIT_SCALAR_TILE_BODY                                                  \
    int64_t sum[R * C] = {};                                                     \
    for (int64_t w = 0; w < words; ++w) {                                        \
        uint64_t av[R], bv[C];                                                   \
        for (int i = 0; i < R; ++i) av[i] = a[i * lda + w];                      \
        for (int j = 0; j < C; ++j) bv[j] = b[j * ldb + w];                      \
        for (int i = 0; i < R; ++i)                                              \
            for (int j = 0; j < C; ++j) sum[i * C + j] += __builtin_popcountll(av[i] ^ bv[j]); \
    }                                                                            \
    for (int i = 0; i < R; ++i)                                                  \
        for (int j = 0; j < C; ++j) out[i * ldo + j] += sum[i * C + j];

#define LOWBIT_TILE_ARGS \
    const uint64_t *a, int64_t lda, const uint64_t *b, int64_t ldb, int64_t words, int64_t *out, int64_t ldo

// conv_tile<R, G>(px, taps, words, panel, group_stride, rows, out, ldo): for pixel r < rows and channel
// j = 8 g + l, out[r * ldo + j] = sum over kernel positions t and words w of
// popcount(px[t * R + r][w] XOR panel[g * group_stride + (t * words + w) * 8 + l]).
#define LOWBIT_CONV_ARGS                                                                                          \
    const uint64_t *const *px, int64_t taps, int64_t words, const uint64_t *panel, int64_t group_stride, int rows, \
        int64_t *out, int64_t ldo

#define LOWBIT_SCALAR_CONV_BODY                                                                  \
    int64_t sum[R * G * CONV_PANEL] = {};                                                        \
    for (int64_t t = 0; t < taps; ++t) {                                                         \
        const uint64_t* wt = panel + t * words * CONV_PANEL;                                     \
        for (int64_t w = 0; w < words; ++w)                                                      \
            for (int r = 0; r < R; ++r) {                                                        \
                const uint64_t v = px[t * R + r][w];                                             \
                for (int g = 0; g < G; ++g)                                                      \
                    for (int l = 0; l < CONV_PANEL; ++l)                                         \
                        sum[(r * G + g) * CONV_PANEL + l] +=                                     \
                            __builtin_popcountll(v ^ wt[g * group_stride + w * CONV_PANEL + l]); \
            }                                                                                    \
    }                                                                                            \
    for (int r = 0; r < rows; ++r)                                                               \
        for (int j = 0; j < G * CONV_PANEL; ++j) out[r * ldo + j] = sum[r * G * CONV_PANEL + j];

struct Portable {
    static constexpr int MR = 2, NR = 4, CONV_R = 1, CONV_G = 1;
    template <int R, int C>
    static void tile(LOWBIT_TILE_ARGS) { LOWBIT_SCALAR_TILE_BODY }
    template <int R, int G>
    static void conv_tile(LOWBIT_CONV_ARGS) { LOWBIT_SCALAR_CONV_BODY }
};

#ifdef LOWBIT_X86
struct ScalarPopcnt {
    static constexpr int MR = 2, NR = 4, CONV_R = 1, CONV_G = 1;
    template <int R, int C>
    TARGET_POPCNT static void tile(LOWBIT_TILE_ARGS) { LOWBIT_SCALAR_TILE_BODY }
    template <int R, int G>
    TARGET_POPCNT static void conv_tile(LOWBIT_CONV_ARGS) { LOWBIT_SCALAR_CONV_BODY }
};

struct Avx2 {
    static constexpr int MR = 2, NR = 4, CONV_R = 3, CONV_G = 1;
    template <int R, int C>
    TARGET_AVX2 static void tile(LOWBIT_TILE_ARGS) {
        const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                               0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
        const __m256i low = _mm256_set1_epi8(0x0f);
        const __m256i zero = _mm256_setzero_si256();
        __m256i total[R * C];
        for (int t = 0; t < R * C; ++t) total[t] = zero;
        int64_t w = 0;
        while (w + 4 <= words) {
            // byte counters hold at most 8 per vector, so 31 vectors fit before they are summed
            const int64_t steps = std::min<int64_t>(31, (words - w) / 4);
            __m256i bytes[R * C];
            for (int t = 0; t < R * C; ++t) bytes[t] = zero;
            for (int64_t s = 0; s < steps; ++s, w += 4) {
                __m256i av[R], bv[C];
                for (int i = 0; i < R; ++i) av[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * lda + w));
                for (int j = 0; j < C; ++j) bv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j * ldb + w));
                for (int i = 0; i < R; ++i)
                    for (int j = 0; j < C; ++j) {
                        const __m256i x = _mm256_xor_si256(av[i], bv[j]);
                        const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(x, low));
                        const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(x, 4), low));
                        bytes[i * C + j] = _mm256_add_epi8(bytes[i * C + j], _mm256_add_epi8(lo, hi));
                    }
            }
            for (int t = 0; t < R * C; ++t) total[t] = _mm256_add_epi64(total[t], _mm256_sad_epu8(bytes[t], zero));
        }
        for (int i = 0; i < R; ++i)
            for (int j = 0; j < C; ++j) {
                alignas(32) int64_t lanes[4];
                _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), total[i * C + j]);
                int64_t sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
                for (int64_t r = w; r < words; ++r) sum += __builtin_popcountll(a[i * lda + r] ^ b[j * ldb + r]);
                out[i * ldo + j] += sum;
            }
    }

    // lanes: 4 channels per vector, 2 vectors per group; byte counters summed into 64-bit lanes every 31 words
    template <int R, int G>
    TARGET_AVX2 static void conv_tile(LOWBIT_CONV_ARGS) {
        constexpr int V = G * 2;
        const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                               0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
        const __m256i low = _mm256_set1_epi8(0x0f);
        const __m256i zero = _mm256_setzero_si256();
        __m256i total[R * V], bytes[R * V];
        for (int i = 0; i < R * V; ++i) total[i] = bytes[i] = zero;
        int pending = 0;
        for (int64_t t = 0; t < taps; ++t) {
            const uint64_t* wt = panel + t * words * CONV_PANEL;
            for (int64_t w = 0; w < words; ++w) {
                __m256i wv[V];
                for (int j = 0; j < V; ++j)
                    wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + (j / 2) * group_stride +
                                                                                w * CONV_PANEL + (j % 2) * 4));
                for (int r = 0; r < R; ++r) {
                    const __m256i v = _mm256_set1_epi64x(static_cast<long long>(px[t * R + r][w]));
                    for (int j = 0; j < V; ++j) {
                        const __m256i x = _mm256_xor_si256(v, wv[j]);
                        const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(x, low));
                        const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(x, 4), low));
                        bytes[r * V + j] = _mm256_add_epi8(bytes[r * V + j], _mm256_add_epi8(lo, hi));
                    }
                }
                if (++pending == 31) {  // byte counters hold at most 8 per word
                    for (int i = 0; i < R * V; ++i) {
                        total[i] = _mm256_add_epi64(total[i], _mm256_sad_epu8(bytes[i], zero));
                        bytes[i] = zero;
                    }
                    pending = 0;
                }
            }
        }
        for (int i = 0; i < R * V; ++i) total[i] = _mm256_add_epi64(total[i], _mm256_sad_epu8(bytes[i], zero));
        for (int r = 0; r < R; ++r)
            if (r < rows)
                for (int j = 0; j < V; ++j)
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + 4 * j), total[r * V + j]);
    }
};

struct Avx512 {
    static constexpr int MR = 4, NR = 4, CONV_R = 6, CONV_G = 4;
    template <int R, int C>
    TARGET_AVX512 static void tile(LOWBIT_TILE_ARGS) {
        __m512i acc[R * C];
        for (int t = 0; t < R * C; ++t) acc[t] = _mm512_setzero_si512();
        int64_t w = 0;
        for (; w + 8 <= words; w += 8) {
            __m512i av[R], bv[C];
            for (int i = 0; i < R; ++i) av[i] = _mm512_loadu_si512(a + i * lda + w);
            for (int j = 0; j < C; ++j) bv[j] = _mm512_loadu_si512(b + j * ldb + w);
            for (int i = 0; i < R; ++i)
                for (int j = 0; j < C; ++j)
                    acc[i * C + j] = _mm512_add_epi64(acc[i * C + j], _mm512_popcnt_epi64(_mm512_xor_si512(av[i], bv[j])));
        }
        if (w < words) {
            const __mmask8 mask = static_cast<__mmask8>((1u << (words - w)) - 1u);
            __m512i av[R], bv[C];
            for (int i = 0; i < R; ++i) av[i] = _mm512_maskz_loadu_epi64(mask, a + i * lda + w);
            for (int j = 0; j < C; ++j) bv[j] = _mm512_maskz_loadu_epi64(mask, b + j * ldb + w);
            for (int i = 0; i < R; ++i)
                for (int j = 0; j < C; ++j)
                    acc[i * C + j] = _mm512_add_epi64(acc[i * C + j], _mm512_popcnt_epi64(_mm512_xor_si512(av[i], bv[j])));
        }
        if constexpr (C == 4 && R % 2 == 0) {
            // two rows (8 accumulators) at a time: a transposing add tree leaves sum(acc[t]) in lane t
            for (int i = 0; i < R; i += 2) {
                const __m512i* v = acc + i * C;
                __m512i pair[4];
                for (int p = 0; p < 4; ++p)
                    pair[p] = _mm512_add_epi64(_mm512_unpacklo_epi64(v[2 * p], v[2 * p + 1]),
                                               _mm512_unpackhi_epi64(v[2 * p], v[2 * p + 1]));
                __m512i quad[2];
                for (int q = 0; q < 2; ++q)
                    quad[q] = _mm512_add_epi64(_mm512_shuffle_i64x2(pair[2 * q], pair[2 * q + 1], 0x88),
                                               _mm512_shuffle_i64x2(pair[2 * q], pair[2 * q + 1], 0xDD));
                const __m512i sums = _mm512_add_epi64(_mm512_shuffle_i64x2(quad[0], quad[1], 0x88),
                                                      _mm512_shuffle_i64x2(quad[0], quad[1], 0xDD));
                for (int r = 0; r < 2; ++r) {
                    __m256i* row = reinterpret_cast<__m256i*>(out + (i + r) * ldo);
                    const __m256i half = r == 0 ? _mm512_castsi512_si256(sums) : _mm512_extracti64x4_epi64(sums, 1);
                    _mm256_storeu_si256(row, _mm256_add_epi64(_mm256_loadu_si256(row), half));
                }
            }
        } else {
            for (int i = 0; i < R; ++i)
                for (int j = 0; j < C; ++j) out[i * ldo + j] += _mm512_reduce_add_epi64(acc[i * C + j]);
        }
    }

    // lanes: the 8 channels of a panel group; R * G accumulators stay in registers across the whole window
    template <int R, int G>
    TARGET_AVX512 static void conv_tile(LOWBIT_CONV_ARGS) {
        __m512i acc[R * G];
        for (int i = 0; i < R * G; ++i) acc[i] = _mm512_setzero_si512();
        for (int64_t t = 0; t < taps; ++t) {
            const uint64_t* wt = panel + t * words * CONV_PANEL;
            const uint64_t* const* p = px + t * R;
            for (int64_t w = 0; w < words; ++w) {
                __m512i wv[G];
                for (int g = 0; g < G; ++g) wv[g] = _mm512_loadu_si512(wt + g * group_stride + w * CONV_PANEL);
                for (int r = 0; r < R; ++r) {
                    const __m512i v = _mm512_set1_epi64(static_cast<long long>(p[r][w]));
                    for (int g = 0; g < G; ++g)
                        acc[r * G + g] = _mm512_add_epi64(acc[r * G + g], _mm512_popcnt_epi64(_mm512_xor_si512(v, wv[g])));
                }
            }
        }
        for (int r = 0; r < R; ++r)
            if (r < rows)
                for (int g = 0; g < G; ++g) _mm512_storeu_si512(out + r * ldo + g * CONV_PANEL, acc[r * G + g]);
    }
};
#endif  // LOWBIT_X86

#ifdef LOWBIT_AARCH64
struct Neon {
    static constexpr int MR = 2, NR = 4, CONV_R = 2, CONV_G = 1;
    template <int R, int C>
    static void tile(LOWBIT_TILE_ARGS) {
        uint64x2_t total[R * C];
        for (int t = 0; t < R * C; ++t) total[t] = vdupq_n_u64(0);
        int64_t w = 0;
        while (w + 2 <= words) {
            const int64_t steps = std::min<int64_t>(31, (words - w) / 2);  // byte counters: 31 * 8 <= 255
            uint8x16_t bytes[R * C];
            for (int t = 0; t < R * C; ++t) bytes[t] = vdupq_n_u8(0);
            for (int64_t s = 0; s < steps; ++s, w += 2) {
                uint64x2_t av[R], bv[C];
                for (int i = 0; i < R; ++i) av[i] = vld1q_u64(a + i * lda + w);
                for (int j = 0; j < C; ++j) bv[j] = vld1q_u64(b + j * ldb + w);
                for (int i = 0; i < R; ++i)
                    for (int j = 0; j < C; ++j)
                        bytes[i * C + j] = vaddq_u8(bytes[i * C + j], vcntq_u8(vreinterpretq_u8_u64(veorq_u64(av[i], bv[j]))));
            }
            for (int t = 0; t < R * C; ++t) total[t] = vpadalq_u32(total[t], vpaddlq_u16(vpaddlq_u8(bytes[t])));
        }
        for (int i = 0; i < R; ++i)
            for (int j = 0; j < C; ++j) {
                int64_t sum = static_cast<int64_t>(vaddvq_u64(total[i * C + j]));
                for (int64_t r = w; r < words; ++r) sum += __builtin_popcountll(a[i * lda + r] ^ b[j * ldb + r]);
                out[i * ldo + j] += sum;
            }
    }

    // lanes: 2 channels per vector, 4 vectors per group; byte counters widened into 64-bit lanes every 31 words
    template <int R, int G>
    static void conv_tile(LOWBIT_CONV_ARGS) {
        constexpr int V = G * 4;
        uint64x2_t total[R * V];
        uint8x16_t bytes[R * V];
        for (int i = 0; i < R * V; ++i) {
            total[i] = vdupq_n_u64(0);
            bytes[i] = vdupq_n_u8(0);
        }
        int pending = 0;
        for (int64_t t = 0; t < taps; ++t) {
            const uint64_t* wt = panel + t * words * CONV_PANEL;
            for (int64_t w = 0; w < words; ++w) {
                uint64x2_t wv[V];
                for (int j = 0; j < V; ++j) wv[j] = vld1q_u64(wt + (j / 4) * group_stride + w * CONV_PANEL + (j % 4) * 2);
                for (int r = 0; r < R; ++r) {
                    const uint64x2_t v = vdupq_n_u64(px[t * R + r][w]);
                    for (int j = 0; j < V; ++j)
                        bytes[r * V + j] = vaddq_u8(bytes[r * V + j], vcntq_u8(vreinterpretq_u8_u64(veorq_u64(v, wv[j]))));
                }
                if (++pending == 31) {  // byte counters: 31 * 8 <= 255
                    for (int i = 0; i < R * V; ++i) {
                        total[i] = vpadalq_u32(total[i], vpaddlq_u16(vpaddlq_u8(bytes[i])));
                        bytes[i] = vdupq_n_u8(0);
                    }
                    pending = 0;
                }
            }
        }
        for (int i = 0; i < R * V; ++i) total[i] = vpadalq_u32(total[i], vpaddlq_u16(vpaddlq_u8(bytes[i])));
        for (int r = 0; r < R; ++r)
            if (r < rows)
                for (int j = 0; j < V; ++j) vst1q_u64(reinterpret_cast<uint64_t*>(out + r * ldo + 2 * j), total[r * V + j]);
    }
};
#endif  // LOWBIT_AARCH64

// ---------------------------------------------------------------- blocked drivers

static_assert(NB == 64, "a block's columns fill exactly one word of packed output");

// The epilogue of one output block: rows [m0, m1) x columns [n0, n1) of popcounts acc[(i - m0) * NB + j - n0].
// Float NCHW output goes through a transposed block so that each channel's pixels are stored contiguously.
void store_block(const int64_t* acc, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t n_rows, int64_t k,
                 int32_t* out_i, float* out_f, uint64_t* out_bits, const Epilogue& ep) {
    const int64_t cols = n1 - n0, p = ep.nchw_pixels;
    const auto value = [&](int64_t j, int32_t dot) {
        float v = static_cast<float>(dot);
        if (ep.scale) v *= ep.scale[n0 + j];
        if (ep.bias) v += ep.bias[n0 + j];
        return v;
    };
    float values[NB * MB];
    for (int64_t i = m0; i < m1; ++i) {
        const int64_t* row = acc + (i - m0) * NB;
        int32_t dot[NB];
        for (int64_t j = 0; j < cols; ++j) dot[j] = static_cast<int32_t>(k - 2 * row[j]);
        if (ep.correction) {  // wraps as int32 (an add in int64, cast back) instead of overflowing
            const int32_t* corr = ep.correction + (i % ep.correction_rows) * n_rows + n0;
            for (int64_t j = 0; j < cols; ++j) dot[j] = static_cast<int32_t>(int64_t{dot[j]} + corr[j]);
        }
        if (out_bits) {
            uint8_t set[NB] = {};
            for (int64_t j = 0; j < cols; ++j) set[j] = int64_t{ep.direction[n0 + j]} * dot[j] >= ep.threshold[n0 + j];
            uint64_t bits = 0;
            static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "flag j is byte j % 8 of a loaded word");
            for (int byte = 0; byte < NB / 8; ++byte) {  // 8 flags of 0/1 -> 8 bits: flag b is bit b of the top byte
                uint64_t flags;
                std::memcpy(&flags, set + 8 * byte, sizeof(flags));
                bits |= ((flags * 0x0102040810204080ull) >> 56) << (8 * byte);
            }
            out_bits[i * ((n_rows + 63) / 64) + n0 / 64] = bits;
        } else if (out_f && p > 0) {
            for (int64_t j = 0; j < cols; ++j) values[j * MB + (i - m0)] = value(j, dot[j]);
        } else if (out_f) {
            for (int64_t j = 0; j < cols; ++j) out_f[i * n_rows + n0 + j] = value(j, dot[j]);
        } else {
            std::memcpy(out_i + i * n_rows + n0, dot, static_cast<size_t>(cols) * sizeof(int32_t));
        }
    }
    if (!out_f || p == 0) return;
    for (int64_t i = m0; i < m1;) {  // runs of pixels within one image
        const int64_t image = i / p, run = std::min(m1, (image + 1) * p) - i;
        for (int64_t j = 0; j < cols; ++j)
            std::memcpy(out_f + (image * n_rows + n0 + j) * p + i % p, values + j * MB + (i - m0),
                        static_cast<size_t>(run) * sizeof(float));
        i += run;
    }
}

template <class Isa>
void gemm_blocked(const uint64_t* a, int64_t m_rows, const uint64_t* b, int64_t n_rows, int64_t words, int64_t k,
                  int32_t* out_i, float* out_f, uint64_t* out_bits, const Epilogue& ep, int threads) {
    constexpr int MR = Isa::MR, NR = Isa::NR;
    const int64_t m_blocks = (m_rows + MB - 1) / MB, n_blocks = (n_rows + NB - 1) / NB;
    const int64_t jobs = m_blocks * n_blocks;
    const bool parallel = threads > 1 && jobs > 1 && double(m_rows) * double(n_rows) * double(words) >= 32768.0;
    (void)parallel;
#pragma omp parallel for schedule(dynamic) num_threads(static_cast<int>(std::min<int64_t>(threads, jobs))) if (parallel)
    for (int64_t job = 0; job < jobs; ++job) {
        const int64_t m0 = (job % m_blocks) * MB, n0 = (job / m_blocks) * NB;
        const int64_t m1 = std::min(m_rows, m0 + MB), n1 = std::min(n_rows, n0 + NB);
        int64_t acc[MB * NB];
        std::memset(acc, 0, sizeof(acc));
        for (int64_t k0 = 0; k0 < words; k0 += KC) {
            const int64_t kw = std::min(KC, words - k0);
            for (int64_t i = m0; i < m1; i += MR) {
                const int64_t rows = std::min<int64_t>(MR, m1 - i);
                const uint64_t* ai = a + i * words + k0;
                for (int64_t j = n0; j < n1; j += NR) {
                    const int64_t cols = std::min<int64_t>(NR, n1 - j);
                    const uint64_t* bj = b + j * words + k0;
                    int64_t* t = acc + (i - m0) * NB + (j - n0);
                    if (rows == MR && cols == NR) {
                        Isa::template tile<MR, NR>(ai, words, bj, words, kw, t, NB);
                    } else if (cols == NR) {
                        for (int64_t r = 0; r < rows; ++r) Isa::template tile<1, NR>(ai + r * words, words, bj, words, kw, t + r * NB, NB);
                    } else {
                        for (int64_t r = 0; r < rows; ++r)
                            for (int64_t c = 0; c < cols; ++c)
                                Isa::template tile<1, 1>(ai + r * words, words, bj + c * words, words, kw, t + r * NB + c, NB);
                    }
                }
            }
        }
        store_block(acc, m0, m1, n0, n1, n_rows, k, out_i, out_f, out_bits, ep);
    }
}

// Direct convolution: output blocks of MB pixels x NB channels as in the GEMM; inside a block, tiles of CONV_R
// pixels (the last tile of a block repeats its last pixel, computed but not stored) x CONV_G panel groups.
template <class Isa>
void conv_blocked(const uint64_t* x, int64_t batch, int64_t h, int64_t w, int64_t words, int kh, int kw, int sh,
                  int sw, int ph, int pw, int64_t ho, int64_t wo, const uint64_t* panel, int64_t n_rows, int64_t k,
                  int32_t* out_i, float* out_f, uint64_t* out_bits, const Epilogue& ep, int threads) {
    constexpr int R = Isa::CONV_R, G = Isa::CONV_G;
    const int64_t taps = int64_t{kh} * kw;
    const int64_t m_rows = batch * ho * wo, group_stride = taps * words * CONV_PANEL;
    if (m_rows == 0 || n_rows == 0) return;
    const int64_t m_blocks = (m_rows + MB - 1) / MB, n_blocks = (n_rows + NB - 1) / NB;
    const int64_t jobs = m_blocks * n_blocks;
    const std::vector<uint64_t> zeros(static_cast<size_t>(words), 0);  // a pixel in the padding
    const bool parallel = threads > 1 && jobs > 1 && double(m_rows) * double(n_rows) * double(taps * words) >= 32768.0;
    const int team = parallel ? static_cast<int>(std::min<int64_t>(threads, jobs)) : 1;
    // every thread's window pointers, allocated here so that std::bad_alloc reaches the caller, not OpenMP
    std::vector<const uint64_t*> all_px(static_cast<size_t>(taps) * R * static_cast<size_t>(team));
#pragma omp parallel num_threads(team) if (parallel)
    {
        int thread = 0;
#ifdef _OPENMP
        thread = omp_get_thread_num();
#endif
        const uint64_t** px = all_px.data() + static_cast<size_t>(thread) * static_cast<size_t>(taps) * R;
        int64_t acc[MB * NB];
#pragma omp for schedule(dynamic)
        for (int64_t job = 0; job < jobs; ++job) {
            const int64_t m0 = (job % m_blocks) * MB, n0 = (job / m_blocks) * NB;
            const int64_t m1 = std::min(m_rows, m0 + MB), n1 = std::min(n_rows, n0 + NB);
            const int64_t g0 = n0 / CONV_PANEL, g1 = (n1 + CONV_PANEL - 1) / CONV_PANEL;
            for (int64_t i = m0; i < m1; i += R) {
                const int rows = static_cast<int>(std::min<int64_t>(R, m1 - i));
                for (int r = 0; r < R; ++r) {
                    const int64_t m = i + std::min(r, rows - 1);
                    const int64_t n = m / (ho * wo), oy = (m / wo) % ho, ox = m % wo;
                    for (int ky = 0; ky < kh; ++ky) {
                        const int64_t iy = oy * sh - ph + ky;
                        for (int kx = 0; kx < kw; ++kx) {
                            const int64_t ix = ox * sw - pw + kx;
                            const bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
                            px[(int64_t{ky} * kw + kx) * R + r] =
                                inside ? x + ((n * h + iy) * w + ix) * words : zeros.data();
                        }
                    }
                }
                int64_t g = g0;
                for (; g + G <= g1; g += G)
                    Isa::template conv_tile<R, G>(px, taps, words, panel + g * group_stride, group_stride, rows,
                                                  acc + (i - m0) * NB + (g * CONV_PANEL - n0), NB);
                for (; g < g1; ++g)
                    Isa::template conv_tile<R, 1>(px, taps, words, panel + g * group_stride, group_stride, rows,
                                                  acc + (i - m0) * NB + (g * CONV_PANEL - n0), NB);
            }
            store_block(acc, m0, m1, n0, n1, n_rows, k, out_i, out_f, out_bits, ep);
        }
    }
}

// ---------------------------------------------------------------- sign packing

void pack_row_scalar(const float* x, int64_t k, uint64_t* out) {
    const int64_t words = (k + 63) / 64;
    std::memset(out, 0, static_cast<size_t>(words) * sizeof(uint64_t));
    for (int64_t i = 0; i < k; ++i)
        if (x[i] >= 0.0f) out[i / 64] |= uint64_t{1} << (i % 64);
}

#ifdef LOWBIT_X86
TARGET_AVX2 void pack_row_avx2(const float* x, int64_t k, uint64_t* out) {
    const __m256 zero = _mm256_setzero_ps();
    const int64_t full = k / 64;
    for (int64_t w = 0; w < full; ++w) {
        uint64_t bits = 0;
        for (int q = 0; q < 8; ++q) {
            const __m256 v = _mm256_loadu_ps(x + w * 64 + q * 8);
            bits |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ))))
                    << (8 * q);
        }
        out[w] = bits;
    }
    if (full * 64 < k) pack_row_scalar(x + full * 64, k - full * 64, out + full);
}

__attribute__((target("avx512f"))) void pack_row_avx512(const float* x, int64_t k, uint64_t* out) {
    const __m512 zero = _mm512_setzero_ps();
    const int64_t words = (k + 63) / 64;
    for (int64_t w = 0; w < words; ++w) {
        uint64_t bits = 0;
        for (int q = 0; q < 4; ++q) {
            const int64_t start = w * 64 + q * 16;
            if (start >= k) break;
            const int64_t n = std::min<int64_t>(16, k - start);
            const __mmask16 mask = n == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
            const __m512 v = _mm512_maskz_loadu_ps(mask, x + start);
            bits |= static_cast<uint64_t>(_mm512_mask_cmp_ps_mask(mask, v, zero, _CMP_GE_OQ)) << (16 * q);
        }
        out[w] = bits;
    }
}
#endif

}  // namespace

// ---------------------------------------------------------------- dispatch

const char* kernel_name(int kernel) {
    static const char* const names[KERNEL_COUNT] = {"scalar", "avx2", "avx512", "neon"};
    return kernel >= 0 && kernel < KERNEL_COUNT ? names[kernel] : "unknown";
}

bool kernel_supported(int kernel) {
    switch (kernel) {
        case KERNEL_SCALAR:
            return true;
#ifdef LOWBIT_X86
        case KERNEL_AVX2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
        case KERNEL_AVX512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#endif
#ifdef LOWBIT_AARCH64
        case KERNEL_NEON:
            return true;
#endif
        default:
            return false;
    }
}

int best_kernel() {
    for (int kernel : {KERNEL_AVX512, KERNEL_NEON, KERNEL_AVX2})
        if (kernel_supported(kernel)) return kernel;
    return KERNEL_SCALAR;
}

void pack_signs_f32(const float* x, int64_t rows, int64_t k, uint64_t* out, int kernel, int threads) {
    if (rows <= 0 || k <= 0) return;
    const int64_t words = (k + 63) / 64;
    void (*pack_row)(const float*, int64_t, uint64_t*) = pack_row_scalar;
#ifdef LOWBIT_X86
    if (kernel == KERNEL_AVX512) pack_row = pack_row_avx512;
    if (kernel == KERNEL_AVX2) pack_row = pack_row_avx2;
#else
    (void)kernel;
#endif
    threads = resolve_threads(threads);
    const bool parallel = threads > 1 && rows > 1 && rows * k >= (int64_t{1} << 16);
    (void)parallel;
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(std::min<int64_t>(threads, rows))) if (parallel)
    for (int64_t r = 0; r < rows; ++r) pack_row(x + r * k, k, out + r * words);
}

void binary_gemm(const uint64_t* a, int64_t m_rows, const uint64_t* b, int64_t n_rows, int64_t words, int64_t k,
                 int32_t* out_i, float* out_f, uint64_t* out_bits, const Epilogue& epilogue, int kernel, int threads) {
    threads = resolve_threads(threads);
    switch (kernel) {
#ifdef LOWBIT_X86
        case KERNEL_AVX512:
            return gemm_blocked<Avx512>(a, m_rows, b, n_rows, words, k, out_i, out_f, out_bits, epilogue, threads);
        case KERNEL_AVX2:
            return gemm_blocked<Avx2>(a, m_rows, b, n_rows, words, k, out_i, out_f, out_bits, epilogue, threads);
        default:
            if (__builtin_cpu_supports("popcnt"))
                return gemm_blocked<ScalarPopcnt>(a, m_rows, b, n_rows, words, k, out_i, out_f, out_bits, epilogue, threads);
            return gemm_blocked<Portable>(a, m_rows, b, n_rows, words, k, out_i, out_f, out_bits, epilogue, threads);
#elif defined(LOWBIT_AARCH64)
        case KERNEL_NEON:
            return gemm_blocked<Neon>(a, m_rows, b, n_rows, words, k, out_i, out_f, out_bits, epilogue, threads);
        default:
            return gemm_blocked<Portable>(a, m_rows, b, n_rows, words, k, out_i, out_f, out_bits, epilogue, threads);
#else
        default:
            return gemm_blocked<Portable>(a, m_rows, b, n_rows, words, k, out_i, out_f, out_bits, epilogue, threads);
#endif
    }
}

void binary_conv(const uint64_t* x, int64_t batch, int64_t h, int64_t w, int64_t words, int kh, int kw, int sh,
                 int sw, int ph, int pw, int64_t ho, int64_t wo, const uint64_t* panel, int64_t out_channels,
                 int64_t k, int32_t* out_i, float* out_f, uint64_t* out_bits, const Epilogue& epilogue, int kernel,
                 int threads) {
    threads = resolve_threads(threads);
#define LOWBIT_CONV(ISA)                                                                                            \
    conv_blocked<ISA>(x, batch, h, w, words, kh, kw, sh, sw, ph, pw, ho, wo, panel, out_channels, k, out_i, out_f, \
                      out_bits, epilogue, threads)
    switch (kernel) {
#ifdef LOWBIT_X86
        case KERNEL_AVX512:
            return LOWBIT_CONV(Avx512);
        case KERNEL_AVX2:
            return LOWBIT_CONV(Avx2);
        default:
            if (__builtin_cpu_supports("popcnt")) return LOWBIT_CONV(ScalarPopcnt);
            return LOWBIT_CONV(Portable);
#elif defined(LOWBIT_AARCH64)
        case KERNEL_NEON:
            return LOWBIT_CONV(Neon);
        default:
            return LOWBIT_CONV(Portable);
#else
        default:
            return LOWBIT_CONV(Portable);
#endif
    }
#undef LOWBIT_CONV
}

void pack_signs_nchw(const float* x, int64_t batch, int64_t channels, int64_t pixels, uint64_t* out, int threads) {
    if (batch <= 0 || channels <= 0 || pixels <= 0) return;
    const int64_t words = (channels + 63) / 64;
    constexpr int64_t PB = 256;  // pixels per task: the task's words stay in L1 while its channels stream by
    const int64_t pixel_blocks = (pixels + PB - 1) / PB, tasks = batch * words * pixel_blocks;
    threads = resolve_threads(threads);
    const bool parallel = threads > 1 && tasks > 1 && batch * channels * pixels >= (int64_t{1} << 16);
    (void)parallel;
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(std::min<int64_t>(threads, tasks))) if (parallel)
    for (int64_t task = 0; task < tasks; ++task) {
        const int64_t n = task / (words * pixel_blocks), word = (task / pixel_blocks) % words;
        const int64_t p0 = (task % pixel_blocks) * PB, count = std::min(PB, pixels - p0);
        uint64_t bits[PB] = {};
        const int64_t c_end = std::min(channels, (word + 1) * 64);
        for (int64_t c = word * 64; c < c_end; ++c) {
            const float* row = x + (n * channels + c) * pixels + p0;
            const int shift = static_cast<int>(c % 64);
            for (int64_t p = 0; p < count; ++p) bits[p] |= static_cast<uint64_t>(row[p] >= 0.0f) << shift;
        }
        uint64_t* dst = out + (n * pixels + p0) * words + word;
        for (int64_t p = 0; p < count; ++p) dst[p * words] = bits[p];
    }
}

void max_pool_packed(const uint64_t* x, int64_t batch, int64_t h, int64_t w, int64_t words, int kh, int kw, int sh,
                     int sw, int ph, int pw, int64_t ho, int64_t wo, const uint64_t* and_mask, uint64_t* out,
                     int threads) {
    if (batch <= 0 || ho <= 0 || wo <= 0 || words <= 0) return;
    const int64_t rows = batch * ho * wo;
    threads = resolve_threads(threads);
    const double taps = double(std::min<int64_t>(kh, h)) * double(std::min<int64_t>(kw, w));
    const bool parallel = threads > 1 && double(rows) * double(words) * taps >= 65536.0;
    (void)parallel;
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(std::min<int64_t>(threads, rows))) if (parallel)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = r / (ho * wo), oy = (r / wo) % ho, ox = r % wo;
        // the window's rows [y0, y1) and columns [x0, x1) inside the input
        const int64_t y0 = std::max<int64_t>(0, oy * sh - ph), y1 = std::min<int64_t>(h, oy * sh - ph + kh);
        const int64_t x0 = std::max<int64_t>(0, ox * sw - pw), x1 = std::min<int64_t>(w, ox * sw - pw + kw);
        for (int64_t word = 0; word < words; ++word) {
            uint64_t any = 0, all = ~uint64_t{0};
            for (int64_t iy = y0; iy < y1; ++iy)
                for (int64_t ix = x0; ix < x1; ++ix) {
                    const uint64_t v = x[((n * h + iy) * w + ix) * words + word];
                    any |= v;
                    all &= v;
                }
            out[r * words + word] = (any & ~and_mask[word]) | (all & and_mask[word]);
        }
    }
}

}  // namespace lowbit
