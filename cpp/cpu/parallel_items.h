// fa3_jax CPU backend: the thread pool of every CPU kernel (attention, FP8 quantization).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <system_error>
#include <thread>
#include <vector>

namespace fa3 {

// Runs body(item, scratch) for item in [0, n) on up to num_threads threads; each thread makes
// its scratch once and pulls items from a shared counter (items differ in cost under masks).
template <class MakeScratch, class Body>
void parallel_items(int64_t n, int num_threads, const MakeScratch& make_scratch, const Body& body) {
  if (n <= 0) return;
  int64_t threads = num_threads > 0 ? num_threads : int64_t(std::thread::hardware_concurrency());
  threads = std::max<int64_t>(1, std::min(threads, n));
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    auto scratch = make_scratch();
    for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < n;)
      body(item, scratch);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(worker);
    } catch (const std::system_error&) {
      break;  // out of threads: the shared counter lets the ones running finish every item
    }
  }
  worker();
  for (auto& t : pool) t.join();
}

}  // namespace fa3
