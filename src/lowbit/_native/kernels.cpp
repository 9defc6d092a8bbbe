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
#include "kernels.h"

#include <algorithm>
#include <cstring>
#include <initializer_list>

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

int resolve_threads(int threads) {
#ifdef _OPENMP
    return threads > 0 ? threads : omp_get_max_threads();
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

struct Portable {
    static constexpr int MR = 2, NR = 4;
    template <int R, int C>
    static void tile(LOWBIT_TILE_ARGS) { LOWBIT_SCALAR_TILE_BODY }
};

#ifdef LOWBIT_X86
struct ScalarPopcnt {
    static constexpr int MR = 2, NR = 4;
    template <int R, int C>
    TARGET_POPCNT static void tile(LOWBIT_TILE_ARGS) { LOWBIT_SCALAR_TILE_BODY }
};

struct Avx2 {
    static constexpr int MR = 2, NR = 4;
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
};

struct Avx512 {
    static constexpr int MR = 4, NR = 4;
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
};
#endif  // LOWBIT_X86

#ifdef LOWBIT_AARCH64
struct Neon {
    static constexpr int MR = 2, NR = 4;
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
};
#endif  // LOWBIT_AARCH64

// ---------------------------------------------------------------- blocked GEMM driver

template <class Isa>
void gemm_blocked(const uint64_t* a, int64_t m_rows, const uint64_t* b, int64_t n_rows, int64_t words, int64_t k,
                  int32_t* out_i, float* out_f, uint64_t* out_bits, const Epilogue& ep, int threads) {
    constexpr int MR = Isa::MR, NR = Isa::NR;
    const int64_t m_blocks = (m_rows + MB - 1) / MB, n_blocks = (n_rows + NB - 1) / NB;
    const int64_t jobs = m_blocks * n_blocks;
    const bool parallel = threads > 1 && jobs > 1 && m_rows * n_rows * words >= (int64_t{1} << 15);
    (void)parallel;
#pragma omp parallel for schedule(dynamic) num_threads(threads) if (parallel)
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
        static_assert(NB == 64, "a block's columns fill exactly one word of packed output");
        const int64_t out_words = (n_rows + 63) / 64;
        for (int64_t i = m0; i < m1; ++i) {
            const int32_t* corr = ep.correction ? ep.correction + (i % ep.correction_rows) * n_rows : nullptr;
            uint64_t bits = 0;
            for (int64_t j = n0; j < n1; ++j) {
                int32_t dot = static_cast<int32_t>(k - 2 * acc[(i - m0) * NB + (j - n0)]);
                if (corr) dot += corr[j];
                if (out_bits) {
                    bits |= static_cast<uint64_t>(ep.direction[j] * dot >= ep.threshold[j]) << (j - n0);
                } else if (out_f) {
                    float value = static_cast<float>(dot);
                    if (ep.scale) value *= ep.scale[j];
                    if (ep.bias) value += ep.bias[j];
                    const int64_t p = ep.nchw_pixels;
                    out_f[p > 0 ? ((i / p) * n_rows + j) * p + i % p : i * n_rows + j] = value;
                } else {
                    out_i[i * n_rows + j] = dot;
                }
            }
            if (out_bits) out_bits[i * out_words + n0 / 64] = bits;
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
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
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

void im2col_packed(const uint64_t* x, int64_t batch, int64_t h, int64_t w, int64_t words, int kh, int kw, int sh,
                   int sw, int ph, int pw, int64_t ho, int64_t wo, uint64_t* out, int threads) {
    const int64_t row_words = int64_t{kh} * kw * words;
    const int64_t rows = batch * ho * wo;
    threads = resolve_threads(threads);
    const bool parallel = threads > 1 && rows * row_words >= (int64_t{1} << 16);
    (void)parallel;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = r / (ho * wo), oy = (r / wo) % ho, ox = r % wo;
        uint64_t* dst = out + r * row_words;
        for (int ky = 0; ky < kh; ++ky) {
            const int64_t iy = oy * sh - ph + ky;
            for (int kx = 0; kx < kw; ++kx, dst += words) {
                const int64_t ix = ox * sw - pw + kx;
                if (iy < 0 || iy >= h || ix < 0 || ix >= w)
                    std::memset(dst, 0, static_cast<size_t>(words) * sizeof(uint64_t));
                else
                    std::memcpy(dst, x + ((n * h + iy) * w + ix) * words, static_cast<size_t>(words) * sizeof(uint64_t));
            }
        }
    }
}

void pack_signs_nchw(const float* x, int64_t batch, int64_t channels, int64_t pixels, uint64_t* out, int threads) {
    const int64_t words = (channels + 63) / 64;
    constexpr int64_t PB = 256;  // pixels per task: the task's words stay in L1 while its channels stream by
    const int64_t pixel_blocks = (pixels + PB - 1) / PB, tasks = batch * words * pixel_blocks;
    threads = resolve_threads(threads);
    const bool parallel = threads > 1 && tasks > 1 && batch * channels * pixels >= (int64_t{1} << 16);
    (void)parallel;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
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
    const int64_t rows = batch * ho * wo;
    threads = resolve_threads(threads);
    const bool parallel = threads > 1 && rows * words * kh * kw >= (int64_t{1} << 16);
    (void)parallel;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = r / (ho * wo), oy = (r / wo) % ho, ox = r % wo;
        for (int64_t word = 0; word < words; ++word) {
            uint64_t any = 0, all = ~uint64_t{0};
            for (int ky = 0; ky < kh; ++ky) {
                const int64_t iy = oy * sh - ph + ky;
                if (iy < 0 || iy >= h) continue;
                for (int kx = 0; kx < kw; ++kx) {
                    const int64_t ix = ox * sw - pw + kx;
                    if (ix < 0 || ix >= w) continue;
                    const uint64_t v = x[((n * h + iy) * w + ix) * words + word];
                    any |= v;
                    all &= v;
                }
            }
            out[r * words + word] = (any & ~and_mask[word]) | (all & and_mask[word]);
        }
    }
}

}  // namespace lowbit
