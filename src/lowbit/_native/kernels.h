// XNOR + popcount kernels of lowbit's native runtime (C++17, no Python).
//
// Conventions (docs/architecture.md, "File codecs"): a binary value is +1 where
// the real value is >= 0 and bit 1 stands for +1; a row of K values is packed
// LSB first into ceil(K / 64) uint64 words, the tail of the last word zero.
// The dot product of two packed rows is K - 2 * popcount(a XOR b), in int32.
#pragma once

#include <cstdint>

namespace lowbit {

enum Kernel : int { KERNEL_SCALAR = 0, KERNEL_AVX2 = 1, KERNEL_AVX512 = 2, KERNEL_NEON = 3, KERNEL_COUNT = 4 };

const char* kernel_name(int kernel);
bool kernel_supported(int kernel);  // compiled in and supported by this CPU
int best_kernel();

// Per-output-column epilogue of a binary GEMM: with `out_f` set,
// out_f[m, n] = float(dot + correction[m % correction_rows, n]) * scale[n] + bias[n]
// (each pointer may be null: no correction, scale 1, bias 0); else out_i[m, n] = dot + correction.
struct Epilogue {
    const float* scale = nullptr;
    const float* bias = nullptr;
    const int32_t* correction = nullptr;
    int64_t correction_rows = 0;
};

// Sign-pack float rows x[rows, k] (C order) into out[rows, ceil(k / 64)].
void pack_signs_f32(const float* x, int64_t rows, int64_t k, uint64_t* out, int kernel, int threads);

// C[m, n] = k - 2 * popcount(A[m, :] XOR B[n, :]) for A[m_rows, words], B[n_rows, words],
// written through the epilogue to out_i (int32) or out_f (float32), both [m_rows, n_rows].
void binary_gemm(const uint64_t* a, int64_t m_rows, const uint64_t* b, int64_t n_rows, int64_t words, int64_t k,
                 int32_t* out_i, float* out_f, const Epilogue& epilogue, int kernel, int threads);

// Bit-packed im2col: x[batch, h, w, words] (channel words per pixel) -> out[batch * ho * wo, kh * kw * words],
// kernel position (y, x) at words [(y * kw + x) * words, ...); pixels in the padding are zero words.
void im2col_packed(const uint64_t* x, int64_t batch, int64_t h, int64_t w, int64_t words, int kh, int kw, int sh,
                   int sw, int ph, int pw, int64_t ho, int64_t wo, uint64_t* out, int threads);

}  // namespace lowbit
