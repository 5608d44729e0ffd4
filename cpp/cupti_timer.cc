// _fa3_jax_cupti: device-side kernel timing for the benchmarks (python/fa3_jax/timing.py).
//
// start() turns on CUPTI's concurrent-kernel activity records; stop() forces CUPTI to hand back
// every buffer, turns collection off and returns [(kernel_name, start_ns, end_ns), ...] for the
// kernels that ran in between. Timestamps are GPU times in nanoseconds, so a kernel's duration is
// free of launch overhead and host jitter. The caller must wait for its work to finish (e.g.
// jax.block_until_ready) before stop(): a kernel still running has no end time yet, and stop()
// reports that as an error rather than returning a sum that is silently too small.
//
// Every CUPTI failure becomes a Python RuntimeError carrying CUPTI's own message.
#include <cupti.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

// The records are read as CUpti_ActivityKernel10, the layout CUDA 13's CUPTI writes; an older or
// newer CUPTI may write another layout, so the build and the runtime check below pin the major.
static_assert(CUPTI_API_VERSION >= 130000 && CUPTI_API_VERSION < 140000,
              "cupti_timer.cc reads CUpti_ActivityKernel10 records, the layout of CUDA 13's CUPTI");

namespace nb = nanobind;

namespace {

using KernelRecord = std::tuple<std::string, uint64_t, uint64_t>;

// CUPTI requires 8-byte aligned buffers; 8 MiB holds tens of thousands of kernel records, so a
// benchmark call never fills one and CUPTI rarely has to ask for more mid-run.
constexpr size_t kBufferBytes = 8 << 20;
constexpr size_t kBufferAlign = 8;

// State shared with the buffer-completed callback, which CUPTI may run on its own thread.
struct Collected {
  std::mutex mutex;
  std::vector<KernelRecord> kernels;
  size_t incomplete = 0;  // records whose end timestamp CUPTI had not filled in yet
  size_t dropped = 0;     // records CUPTI lost because no buffer was free
  std::string error;      // first CUPTI error seen inside a callback (callbacks cannot throw)
};

Collected& collected() {
  static Collected c;
  return c;
}

std::string cupti_message(CUptiResult r) {
  const char* s = nullptr;
  if (cuptiGetResultString(r, &s) != CUPTI_SUCCESS || s == nullptr) {
    return "CUPTI error " + std::to_string(static_cast<int>(r));
  }
  return s;
}

void check(CUptiResult r, const char* what) {
  if (r != CUPTI_SUCCESS) {
    throw std::runtime_error(std::string("_fa3_jax_cupti: ") + what + " failed: " +
                             cupti_message(r));
  }
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  // A null buffer is CUPTI's documented "none available": it then drops records and counts them.
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(kBufferAlign, kBufferBytes));
  *size = *buffer ? kBufferBytes : 0;
  *max_records = 0;  // as many as fit
}

void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream_id, uint8_t* buffer, size_t size,
                               size_t valid_size) {
  (void)size;
  Collected& c = collected();
  std::lock_guard<std::mutex> lock(c.mutex);
  CUpti_Activity* record = nullptr;
  for (;;) {
    CUptiResult r = cuptiActivityGetNextRecord(buffer, valid_size, &record);
    if (r == CUPTI_ERROR_MAX_LIMIT_REACHED) break;  // the normal end of the buffer
    if (r != CUPTI_SUCCESS) {
      if (c.error.empty()) c.error = "reading activity records: " + cupti_message(r);
      break;
    }
    if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
    if (k->end == 0 || k->end < k->start) {
      ++c.incomplete;
      continue;
    }
    // CUPTI owns the name string only until the buffer is released, so it is copied here.
    c.kernels.emplace_back(k->name ? k->name : "<unnamed>", k->start, k->end);
  }
  size_t dropped = 0;
  if (cuptiActivityGetNumDroppedRecords(ctx, stream_id, &dropped) == CUPTI_SUCCESS) {
    c.dropped += dropped;
  }
  std::free(buffer);
}

bool g_callbacks_registered = false;
bool g_running = false;

void start() {
  if (g_running) throw std::runtime_error("_fa3_jax_cupti: start() called twice without stop()");
  if (!g_callbacks_registered) {
    uint32_t version = 0;
    check(cuptiGetVersion(&version), "cuptiGetVersion");
    if (version / 10000 != CUPTI_API_VERSION / 10000) {
      throw std::runtime_error(
          "_fa3_jax_cupti: built against CUPTI API " + std::to_string(CUPTI_API_VERSION) +
          " but the loaded libcupti reports " + std::to_string(version) +
          "; its kernel record layout may differ, so no timings are read");
    }
    check(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed),
          "cuptiActivityRegisterCallbacks");
    g_callbacks_registered = true;
  }
  {
    Collected& c = collected();
    std::lock_guard<std::mutex> lock(c.mutex);
    c.kernels.clear();
    c.incomplete = c.dropped = 0;
    c.error.clear();
  }
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL),
        "cuptiActivityEnable(CONCURRENT_KERNEL)");
  g_running = true;
}

std::vector<KernelRecord> stop() {
  if (!g_running) throw std::runtime_error("_fa3_jax_cupti: stop() called without start()");
  g_running = false;
  CUptiResult flushed, disabled;
  {
    // The flush waits on CUPTI's worker, which never needs the GIL; releasing it lets other
    // Python threads run meanwhile.
    nb::gil_scoped_release release;
    flushed = cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    disabled = cuptiActivityDisable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  }
  check(flushed, "cuptiActivityFlushAll");
  check(disabled, "cuptiActivityDisable(CONCURRENT_KERNEL)");
  Collected& c = collected();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (!c.error.empty()) throw std::runtime_error("_fa3_jax_cupti: " + c.error);
  if (c.dropped) {
    throw std::runtime_error("_fa3_jax_cupti: CUPTI dropped " + std::to_string(c.dropped) +
                             " kernel records (no activity buffer was available)");
  }
  if (c.incomplete) {
    throw std::runtime_error("_fa3_jax_cupti: " + std::to_string(c.incomplete) +
                             " kernels had not finished at stop(); wait for the work "
                             "(jax.block_until_ready) before calling stop()");
  }
  return std::move(c.kernels);
}

}  // namespace

NB_MODULE(_fa3_jax_cupti, m) {
  m.doc() = "CUPTI kernel activity timing for fa3_jax's benchmarks (see fa3_jax.timing).";
  m.def("start", &start, "Start recording GPU kernel executions (CUPTI concurrent-kernel activity).");
  m.def("stop", &stop,
        "Flush, stop recording and return [(kernel_name, start_ns, end_ns), ...] of the kernels "
        "run since start(). Wait for the GPU work to finish before calling it.");
}
