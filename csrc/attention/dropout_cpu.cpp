// Attention dropout masks, CPU: the Philox4x32-10 uniforms of the dropout stream
// (csrc/attention/philox_math.h; definition: mmkernels/reference.py dropout_uniform),
// replacing the reference's int64 torch ops (~30 passes through memory per round) with
// one pass per element.
//
//   dropout_uniform(seed, offset, stream0, num_streams, rows, cols)
//       (num_streams, len(rows), len(cols)) float32: element (h, i, j) is the uniform
//       of stream stream0 + h, packed query row rows[i], key column cols[j].
//   dropout_keep(seed, offset, stream0, num_streams, rows, cols, dropout_p)
//       the same shape, bool: uniform >= float32(dropout_p).
//
// seed and offset are 64-bit words passed as int64 bit patterns (a seed >= 2^63 comes
// in negative); stream and rows are taken modulo 2^32. Each element is a pure function
// of its indices, so the result is the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "attention/philox_math.h"

namespace mmkernels {
namespace attention {
namespace {

constexpr int64_t kGrainElements = 1 << 15;

at::Tensor index_vector(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  return t.to(at::kLong).contiguous();
}

template <typename Out, typename F>
at::Tensor dropout_fill(int64_t seed, int64_t offset, int64_t stream0, int64_t num_streams,
                        const at::Tensor& rows_in, const at::Tensor& cols_in, at::ScalarType dtype,
                        const char* op, F f) {
  TORCH_CHECK(num_streams >= 0, op, ": num_streams must be >= 0, got ", num_streams);
  const at::Tensor rows = index_vector(rows_in, "rows", op);
  const at::Tensor cols = index_vector(cols_in, "cols", op);
  const int64_t R = rows.numel(), C = cols.numel();
  at::Tensor out = at::empty({num_streams, R, C}, rows_in.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
  const uint64_t base = static_cast<uint64_t>(offset) >> 2;
  const uint32_t st0 = static_cast<uint32_t>(static_cast<uint64_t>(stream0));
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  const int64_t* cp = cols.const_data_ptr<int64_t>();
  Out* op_ = out.mutable_data_ptr<Out>();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / C);
  at::parallel_for(0, num_streams * R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t hr = begin; hr < end; ++hr) {
      const uint32_t stream = st0 + static_cast<uint32_t>(hr / R);
      const uint32_t row = static_cast<uint32_t>(static_cast<uint64_t>(rp[hr % R]));
      Out* o = op_ + hr * C;
      // one Philox call per column group (four consecutive columns share one)
      uint64_t group = 0;
      Philox4 x{};
      bool have = false;
      for (int64_t j = 0; j < C; ++j) {
        const uint64_t g = dropout_group(cp[j]);
        if (!have || g != group) {
          x = dropout_philox(base, g, stream, row, k0, k1);
          group = g;
          have = true;
        }
        o[j] = f(philox_uint_to_uniform(philox_word(x, dropout_word(cp[j]))));
      }
    }
  });
  return out;
}

at::Tensor dropout_uniform(int64_t seed, int64_t offset, int64_t stream0, int64_t num_streams,
                           const at::Tensor& rows, const at::Tensor& cols) {
  return dropout_fill<float>(seed, offset, stream0, num_streams, rows, cols, at::kFloat,
                             "dropout_uniform", [](float u) { return u; });
}

at::Tensor dropout_keep(int64_t seed, int64_t offset, int64_t stream0, int64_t num_streams,
                        const at::Tensor& rows, const at::Tensor& cols, double dropout_p) {
  const float p = static_cast<float>(dropout_p);  // as the kernels receive it
  return dropout_fill<bool>(seed, offset, stream0, num_streams, rows, cols, at::kBool,
                            "dropout_keep", [p](float u) { return u >= p; });
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("dropout_uniform", &dropout_uniform);
  m.impl("dropout_keep", &dropout_keep);
}

}  // namespace attention
}  // namespace mmkernels
