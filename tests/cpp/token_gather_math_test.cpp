// Host unit test of csrc/token_gather/token_gather_math.h, the rules shared by the CPU
// and CUDA kernels; compiled (with UBSan where available) and run by
// tests/test_token_gather.py::test_shared_math_host_unit. It checks the CUDA row
// mover's choice of word (row_word_bytes), the rank count's launch shape
// (rank_split) and its chunked counting (rank_count) without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "check.h"
#include "token_gather/token_gather_math.h"

using namespace mmkernels::token_gather;

// The widest of 16, 8, 4 bytes (wider than the element) on which src and dst agree.
void check_word_bytes() {
  for (int E : {1, 2, 4, 8}) {
    for (uint64_t src = 0; src < 64; src += E) {
      for (uint64_t dst = 4096; dst < 4096 + 64; dst += E) {
        const int w = row_word_bytes(src, dst, E);
        int want = E;
        for (int c : {16, 8, 4}) {
          if (c > E && (src % c) == (dst % c)) {
            want = c;
            break;
          }
        }
        CHECK(w == want, "E=%d src=%llu dst=%llu: %d, want %d", E, (unsigned long long)src,
              (unsigned long long)dst, w, want);
      }
    }
  }
  // The review's case: fp16 rows of 100 elements (200 bytes): rows whose offsets differ by
  // an odd number of rows agree modulo 8, not 16, and now move in 8-byte words (they
  // were moved element by element).
  CHECK(row_word_bytes(0, 200, 2) == 8 && row_word_bytes(0, 400, 2) == 16, "fp16 D=100");
  CHECK(row_word_bytes(2, 0, 2) == 2 && row_word_bytes(4, 0, 2) == 4, "fp16 offsets");
  CHECK(row_word_bytes(8, 0, 8) == 8, "8-byte elements misaligned by 8: element by element");
}

// rank_split: about 4 blocks per SM, at most ceil(N / threads) a row, gridDim.y capped,
// and the chunks cover the row exactly.
void check_rank_split() {
  for (int64_t B : {1, 2, 7, 64, 1000, 100000}) {
    for (int64_t N : {1, 255, 257, 3000, 7000, 50000, 100000000}) {
      const RankSplit s = rank_split(B, N, 132, 256);
      CHECK(s.splits >= 1 && s.splits <= mmkernels::kMaxGridYZ && s.chunk >= 1,
            "B=%lld N=%lld: %lld x %lld", (long long)B, (long long)N, (long long)s.splits,
            (long long)s.chunk);
      CHECK(s.splits * s.chunk >= N && (s.splits - 1) * s.chunk < N, "cover B=%lld N=%lld",
            (long long)B, (long long)N);
      CHECK(s.splits <= (N + 255) / 256, "splits %lld for N=%lld", (long long)s.splits,
            (long long)N);
    }
  }
  CHECK(rank_split(1, 7000, 132, 256).splits == 28, "B=1: every chunk of 256 its own block");
  CHECK(rank_split(1000, 7000, 132, 256).splits == 1, "B >= 4 SMs: a block per row");
  CHECK(rank_split(1, 1000000000, 132, 256).splits == 528, "4 * SMs");
  CHECK(rank_split(3, 10, 0, 256).splits == 1, "no SM count");
}

// The chunked count of the CUDA kernel (kStageTokens tokens staged at a time) equals
// the rank of the stable sort, ties and NaN included.
void check_rank_count() {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> val(0, 9);
  for (int it = 0; it < 50; ++it) {
    const int64_t N = 1 + it * 37;
    std::vector<float> noise(N);
    for (auto& v : noise) v = val(rng) == 0 ? NAN : static_cast<float>(val(rng));
    std::vector<int64_t> order(N);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return noise_before(noise[a], a, noise[b], b);
    });
    const int64_t stage = 1 + it % 64;
    for (int64_t r = 0; r < N; ++r) {
      const int64_t j = order[r];
      int64_t rank = 0;
      for (int64_t i0 = 0; i0 < N; i0 += stage) {
        const int64_t i1 = std::min(N, i0 + stage);
        rank += rank_count<float>(noise[j], j, i0, i1, [&](int64_t i) { return noise[i]; });
      }
      CHECK(rank == r, "N=%lld token %lld: rank %lld, sorted at %lld", (long long)N,
            (long long)j, (long long)rank, (long long)r);
    }
  }
}

int main() {
  check_word_bytes();
  check_rank_split();
  check_rank_count();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
