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

// The most threads a kernel runs (OpenMP crashes on absurd team sizes): `threads` above it is rejected by the
// Python module (lowbit.runtime.kernels.MAX_THREADS is the same), and 0 (OpenMP's default) is capped to it.
constexpr int MAX_THREADS = 1024;

const char* kernel_name(int kernel);
bool kernel_supported(int kernel);  // compiled in and supported by this CPU
int best_kernel();

// Per-output-column epilogue of a binary GEMM, on d = dot + correction[m % correction_rows, n]:
// - out_bits set: bit n of row m (words [m, ceil(N / 64)], zero tail) is 1 iff direction[n] * d >= threshold[n]
//   (batch norm + sign of the next binary layer folded into one integer comparison per channel);
// - out_f set: float(d) * scale[n] + bias[n] (each pointer may be null: scale 1, bias 0), stored row-major
//   [M, N], or, with nchw_pixels = P > 0, as NCHW: row m = image m / P, pixel m % P, at [m / P, n, m % P];
// - else out_i[m, n] = d.
struct Epilogue {
    const float* scale = nullptr;
    const float* bias = nullptr;
    const int32_t* correction = nullptr;
    int64_t correction_rows = 0;
    int64_t nchw_pixels = 0;
    const int32_t* threshold = nullptr;
    const int32_t* direction = nullptr;
};

// Sizes are non-negative and the buffers hold what they describe; every function returns at once on empty work.
// Dot products are int32: k < 2**31.

// Sign-pack float rows x[rows, k] (C order) into out[rows, ceil(k / 64)].
void pack_signs_f32(const float* x, int64_t rows, int64_t k, uint64_t* out, int kernel, int threads);

// C[m, n] = k - 2 * popcount(A[m, :] XOR B[n, :]) for A[m_rows, words], B[n_rows, words],
// written through the epilogue to out_i (int32), out_f (float32) or out_bits (packed signs).
void binary_gemm(const uint64_t* a, int64_t m_rows, const uint64_t* b, int64_t n_rows, int64_t words, int64_t k,
                 int32_t* out_i, float* out_f, uint64_t* out_bits, const Epilogue& epilogue, int kernel, int threads);

// Sign-pack an NCHW float tensor x[batch, channels, pixels] into pixel words out[batch, pixels, ceil(channels / 64)]
// (channel c is bit c % 64 of word c / 64, zero tail): the layout im2col_packed reads.
void pack_signs_nchw(const float* x, int64_t batch, int64_t channels, int64_t pixels, uint64_t* out, int threads);

// Max pooling of packed +-1 pixels x[batch, h, w, words] -> out[batch, ho, wo, words]: the max of +-1 values is
// the OR of their bits; channels whose bit is a decreasing function of the pooled value take the AND
// (and_mask bit set). Window positions in the padding are skipped (torch pads max pooling with -inf); only the
// taps inside the input are visited, so a huge kernel costs no more than the input.
void max_pool_packed(const uint64_t* x, int64_t batch, int64_t h, int64_t w, int64_t words, int kh, int kw, int sh,
                     int sw, int ph, int pw, int64_t ho, int64_t wo, const uint64_t* and_mask, uint64_t* out,
                     int threads);

// Output channels per group of a conv weight panel: panel[g, t, l] is word t of the packed weight row of output
// channel 8 g + l (rows as binary_gemm's B: kernel position (y, x) at words [(y * kw + x) * words, ...)), the
// channels past the last one all-zero words.
constexpr int64_t CONV_PANEL = 8;

// Direct binary convolution of pixel words x[batch, h, w, words] (channel c is bit c % 64 of word c / 64, zero
// tail) with a weight panel[ceil(out_channels / 8), kh * kw * words, 8]: the binary GEMM of the bit-packed im2col
// rows (pixels in the padding are zero words) against the weight rows, computed without forming those rows, with
// the output pixels (n, oy, ox) as GEMM rows, written through binary_gemm's epilogue (k = kh * kw * channels).
void binary_conv(const uint64_t* x, int64_t batch, int64_t h, int64_t w, int64_t words, int kh, int kw, int sh,
                 int sw, int ph, int pw, int64_t ho, int64_t wo, const uint64_t* panel, int64_t out_channels,
                 int64_t k, int32_t* out_i, float* out_f, uint64_t* out_bits, const Epilogue& epilogue, int kernel,
                 int threads);

}  // namespace lowbit
