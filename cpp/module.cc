// The one Python extension: registrations() maps each FFI target name to its handler capsule per
// platform; Python registers them in one loop (python/fa3_jax/_ffi.py).
#include <nanobind/nanobind.h>

#include "ffi_handlers.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_fa3_jax_ext, m) {
  m.def("registrations", [] {
    nb::dict fwd, bwd, all;
    fwd["cpu"] = capsule(fa3_fwd_cpu);
    bwd["cpu"] = capsule(fa3_bwd_cpu);
#ifdef FA3_JAX_WITH_CUDA
    fwd["CUDA"] = capsule(fa3_fwd_cuda);
    bwd["CUDA"] = capsule(fa3_bwd_cuda);
#endif
    all["fa3_fwd"] = fwd;
    all["fa3_bwd"] = bwd;
    return all;
  });
#ifdef FA3_JAX_WITH_CUDA
  m.attr("cuda_built") = true;
  m.attr("cuda_head_dims") = FA3_JAX_CUDA_HEAD_DIMS;
#else
  m.attr("cuda_built") = false;
  m.attr("cuda_head_dims") = "";
#endif
}
