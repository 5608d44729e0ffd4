// Per-device CUDA state shared by the CUDA FFI handlers (cpp/ffi_cuda.cc) and the sm90 launchers
// (cpp/hopper/): device facts queried once per device, and "do this once per device" for things
// such as a kernel's shared-memory limit, which CUDA keeps per device (per primary context).
//
// Why per device and not per process: one JAX process drives every local GPU, each from its own
// XLA thread. A process-wide `static` set on the first GPU leaves every other GPU without it (the
// forward kernel then failed to launch on all but the first GPU). Everything here is thread-safe;
// after the first call per device it costs an atomic load.
//
// Host-only; no CuTe, no XLA.
#pragma once

#include <cuda_runtime.h>

#include <mutex>

namespace fa3::cuda {

inline constexpr int kMaxDevices = 64;

struct DeviceFacts {
  cudaError_t status = cudaSuccess;  // of the queries below; the facts are valid only on success
  int major = 0, minor = 0;
  int num_sms = 0;
  int l2_bytes = 0;
};

// Runs fn() once per device ordinal and returns the first run's result on every later call.
// Ordinals outside [0, kMaxDevices) run fn() every time (correct, just not cached).
template <class Result>
class PerDevice {
 public:
  template <class Fn>
  const Result& get(int device, Fn&& fn) {
    if (device < 0 || device >= kMaxDevices) {
      overflow_ = fn();
      return overflow_;
    }
    std::call_once(once_[device], [&] { value_[device] = fn(); });
    return value_[device];
  }

 private:
  std::once_flag once_[kMaxDevices];
  Result value_[kMaxDevices] = {};
  Result overflow_{};
};

// Compute capability, SM count and L2 size of `device`, queried with cudaDeviceGetAttribute (cheap,
// unlike cudaGetDeviceProperties) the first time and cached.
inline const DeviceFacts& device_facts(int device) {
  static PerDevice<DeviceFacts> cache;
  return cache.get(device, [device] {
    DeviceFacts f;
    auto q = [&](int* out, cudaDeviceAttr a) {
      if (f.status == cudaSuccess) f.status = cudaDeviceGetAttribute(out, a, device);
    };
    q(&f.major, cudaDevAttrComputeCapabilityMajor);
    q(&f.minor, cudaDevAttrComputeCapabilityMinor);
    q(&f.num_sms, cudaDevAttrMultiProcessorCount);
    q(&f.l2_bytes, cudaDevAttrL2CacheSize);
    return f;
  });
}

// The device current on this thread (the FFI handlers make it the one XLA runs the call on).
inline int current_device() {
  int dev = -1;
  return cudaGetDevice(&dev) == cudaSuccess ? dev : -1;
}

// Raises `kernel`'s dynamic shared-memory limit to `bytes` on the current device, once per device
// and kernel (each kernel instantiation owns one `static PerDevice<cudaError_t>`).
template <class Kernel>
cudaError_t set_smem_limit_once(PerDevice<cudaError_t>& done, Kernel kernel, int bytes) {
  return done.get(current_device(), [&] {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  });
}

}  // namespace fa3::cuda

namespace fa3::cuda {

// Launchers test a launch with this, which leaves the error in place: the FFI handler reads it
// (cudaGetLastError) to name the CUDA error beside the kernel the launcher names.
inline bool launch_failed() { return cudaPeekAtLastError() != cudaSuccess; }

}  // namespace fa3::cuda
