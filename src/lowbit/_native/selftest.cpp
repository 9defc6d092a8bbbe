// Standalone check of the GEMM, direct conv and max pool kernels against naive references (no Python);
// scripts/test-aarch64.sh runs it under qemu-user, scripts/sanitize-native.sh under ASan and UBSan. Exit status 0 when every supported kernel agrees on every shape.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels.h"

int main() {
    std::mt19937_64 rng(7);
    std::normal_distribution<float> normal;
    int failures = 0, checks = 0;
    const int64_t shapes[][3] = {{1, 1, 1}, {3, 5, 63}, {7, 4, 64}, {5, 9, 65}, {17, 13, 200}, {70, 66, 1000}, {2, 3, 5000}};
    for (const auto& shape : shapes) {
        const int64_t m = shape[0], n = shape[1], k = shape[2], words = (k + 63) / 64;
        std::vector<float> a(m * k), b(n * k);
        for (float& v : a) v = normal(rng);
        for (float& v : b) v = normal(rng);
        a[0] = 0.0f;  // sign(0) = +1
        std::vector<int32_t> expected(m * n);
        for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j) {
                int32_t dot = 0;
                for (int64_t t = 0; t < k; ++t) dot += (a[i * k + t] >= 0 ? 1 : -1) * (b[j * k + t] >= 0 ? 1 : -1);
                expected[i * n + j] = dot;
            }
        for (int kernel = 0; kernel < lowbit::KERNEL_COUNT; ++kernel) {
            if (!lowbit::kernel_supported(kernel)) continue;
            std::vector<uint64_t> pa(m * words), pb(n * words);
            lowbit::pack_signs_f32(a.data(), m, k, pa.data(), kernel, 2);
            lowbit::pack_signs_f32(b.data(), n, k, pb.data(), kernel, 2);
            std::vector<int32_t> got(m * n);
            lowbit::binary_gemm(pa.data(), m, pb.data(), n, words, k, got.data(), nullptr, nullptr, lowbit::Epilogue{}, kernel, 2);
            ++checks;
            if (got != expected) {
                ++failures;
                std::printf("FAIL %s m=%lld n=%lld k=%lld\n", lowbit::kernel_name(kernel), (long long)m, (long long)n,
                            (long long)k);
            }
        }
    }
    // direct conv: {batch, channels, h, w, out channels, kh, kw, stride, padding}; a pixel in the padding is a zero
    // word (-1 values: the Python layer adds its correction), channels past C are zero bits in x and weights
    const int conv_shapes[][9] = {{2, 70, 7, 9, 13, 3, 3, 1, 1}, {1, 130, 5, 6, 70, 3, 3, 2, 2}, {3, 5, 4, 4, 8, 2, 3, 1, 0},
                                  {1, 2050, 3, 3, 9, 1, 1, 1, 0}, {1, 256, 6, 6, 66, 3, 3, 1, 1}};
    for (const auto& c : conv_shapes) {
        const int64_t batch = c[0], ch = c[1], h = c[2], w = c[3], out_ch = c[4];
        const int kh = c[5], kw = c[6], stride = c[7], pad = c[8];
        const int64_t words = (ch + 63) / 64, ho = (h + 2 * pad - kh) / stride + 1, wo = (w + 2 * pad - kw) / stride + 1;
        const int64_t row_words = kh * kw * words, groups = (out_ch + lowbit::CONV_PANEL - 1) / lowbit::CONV_PANEL;
        std::vector<float> x(batch * h * w * ch), wt(out_ch * kh * kw * ch);  // NHWC input, weight [o][y][x][c]
        for (float& v : x) v = normal(rng);
        for (float& v : wt) v = normal(rng);
        std::vector<uint64_t> px(batch * h * w * words), rows(out_ch * row_words), panel(groups * row_words * lowbit::CONV_PANEL, 0);
        lowbit::pack_signs_f32(x.data(), batch * h * w, ch, px.data(), lowbit::KERNEL_SCALAR, 1);
        lowbit::pack_signs_f32(wt.data(), out_ch * kh * kw, ch, rows.data(), lowbit::KERNEL_SCALAR, 1);
        for (int64_t o = 0; o < out_ch; ++o)
            for (int64_t t = 0; t < row_words; ++t)
                panel[((o / lowbit::CONV_PANEL) * row_words + t) * lowbit::CONV_PANEL + o % lowbit::CONV_PANEL] = rows[o * row_words + t];
        std::vector<int32_t> expected(batch * ho * wo * out_ch);
        for (int64_t m = 0; m < batch * ho * wo; ++m)
            for (int64_t o = 0; o < out_ch; ++o) {
                const int64_t n = m / (ho * wo), oy = (m / wo) % ho, ox = m % wo;
                int32_t dot = 0;
                for (int ky = 0; ky < kh; ++ky)
                    for (int kx = 0; kx < kw; ++kx)
                        for (int64_t i = 0; i < ch; ++i) {
                            const int64_t iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
                            const bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
                            const int xs = inside && x[((n * h + iy) * w + ix) * ch + i] >= 0 ? 1 : -1;
                            dot += xs * (wt[((o * kh + ky) * kw + kx) * ch + i] >= 0 ? 1 : -1);
                        }
                expected[m * out_ch + o] = dot;
            }
        for (int kernel = 0; kernel < lowbit::KERNEL_COUNT; ++kernel) {
            if (!lowbit::kernel_supported(kernel)) continue;
            std::vector<int32_t> got(expected.size());
            lowbit::binary_conv(px.data(), batch, h, w, words, kh, kw, stride, stride, pad, pad, ho, wo, panel.data(),
                                out_ch, kh * kw * ch, got.data(), nullptr, nullptr, lowbit::Epilogue{}, kernel, 2);
            ++checks;
            if (got != expected) {
                ++failures;
                std::printf("FAIL conv %s c=%lld o=%lld\n", lowbit::kernel_name(kernel), (long long)ch, (long long)out_ch);
            }
        }
    }
    // max pooling (OR of the window's words inside the input) against a naive loop, and a kernel of 2**31 - 1
    // whose taps outside a 3x3 input must not be visited (the whole input in every window)
    {
        const int64_t batch = 2, h = 5, w = 4, words = 2;
        std::vector<uint64_t> x(batch * h * w * words), mask(words, 0), all_or(batch * words, 0);
        for (uint64_t& v : x) v = rng();
        const int pool_shapes[][6] = {{3, 2, 2, 1, 1, 1}, {2, 2, 2, 2, 0, 0}, {1, 4, 1, 3, 0, 2}};
        for (const auto& g : pool_shapes) {
            const int kh = g[0], kw = g[1], sh = g[2], sw = g[3], ph = g[4], pw = g[5];
            const int64_t ho = (h + 2 * ph - kh) / sh + 1, wo = (w + 2 * pw - kw) / sw + 1;
            std::vector<uint64_t> got(batch * ho * wo * words), expected(got.size(), 0);
            lowbit::max_pool_packed(x.data(), batch, h, w, words, kh, kw, sh, sw, ph, pw, ho, wo, mask.data(),
                                    got.data(), 2);
            for (int64_t n = 0; n < batch; ++n)
                for (int64_t oy = 0; oy < ho; ++oy)
                    for (int64_t ox = 0; ox < wo; ++ox)
                        for (int ky = 0; ky < kh; ++ky)
                            for (int kx = 0; kx < kw; ++kx) {
                                const int64_t iy = oy * sh - ph + ky, ix = ox * sw - pw + kx;
                                if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                                for (int64_t t = 0; t < words; ++t)
                                    expected[((n * ho + oy) * wo + ox) * words + t] |= x[((n * h + iy) * w + ix) * words + t];
                            }
            ++checks;
            if (got != expected) {
                ++failures;
                std::printf("FAIL max pool %dx%d\n", kh, kw);
            }
        }
        const int big = 2147483647, pad = big / 2;
        std::vector<uint64_t> got(batch * 3 * 3 * words), sub(batch * 3 * 3 * words);
        for (int64_t n = 0; n < batch; ++n)  // the top-left 3x3 pixels of each image
            for (int64_t i = 0; i < 9; ++i)
                for (int64_t t = 0; t < words; ++t) {
                    sub[(n * 9 + i) * words + t] = x[((n * h + i / 3) * w + i % 3) * words + t];
                    all_or[n * words + t] |= sub[(n * 9 + i) * words + t];
                }
        lowbit::max_pool_packed(sub.data(), batch, 3, 3, words, big, big, 1, 1, pad, pad, 3, 3, mask.data(), got.data(),
                                2);
        ++checks;
        for (int64_t i = 0; i < batch * 9 * words; ++i)
            if (got[i] != all_or[(i / (9 * words)) * words + i % words]) {
                ++failures;
                std::printf("FAIL max pool with a kernel of 2**31 - 1\n");
                break;
            }
    }
    // an absurd thread count is capped at MAX_THREADS (OpenMP would crash on it)
    {
        const int64_t rows = 512, k = 512;
        std::vector<float> x(rows * k, 1.0f);
        std::vector<uint64_t> out(rows * k / 64, 0);
        lowbit::pack_signs_f32(x.data(), rows, k, out.data(), lowbit::KERNEL_SCALAR, 1 << 20);
        ++checks;
        for (uint64_t v : out)
            if (v != ~uint64_t{0}) {
                ++failures;
                std::printf("FAIL pack with 2**20 threads\n");
                break;
            }
    }
    std::printf("best kernel: %s; %d checks, %d failures\n", lowbit::kernel_name(lowbit::best_kernel()), checks, failures);
    return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
