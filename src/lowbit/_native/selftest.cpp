// Standalone check of the kernels against a naive +-1 reference (no Python); scripts/test-aarch64.sh runs it
// under qemu-user. Exit status 0 when every supported kernel agrees on every shape.
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
    std::printf("best kernel: %s; %d checks, %d failures\n", lowbit::kernel_name(lowbit::best_kernel()), checks, failures);
    return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
