// Host-side device facts shared by the CUDA registrations (only compiled with CUDA).
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>

namespace mmkernels {

// Streaming multiprocessors of CUDA device `dev`, queried once per device and cached
// (launch shapes call it on every op; the attribute query is not free). 132 (an
// H100 SXM) when the query fails: only launch shapes use it, never a result.
inline int sm_count(int dev) {
  constexpr int kDevices = 64;
  static std::atomic<int> cache[kDevices] = {};  // 0: not queried yet
  auto query = [](int d) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d) != cudaSuccess) {
      cudaGetLastError();  // clear it: the launch reports its own errors
      return 132;
    }
    return sms > 0 ? sms : 132;
  };
  if (dev < 0 || dev >= kDevices) return query(dev);
  int sms = cache[dev].load(std::memory_order_relaxed);
  if (sms == 0) {
    sms = query(dev);
    cache[dev].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

}  // namespace mmkernels
