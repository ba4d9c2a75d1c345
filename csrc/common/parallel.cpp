#include "common/parallel.h"

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_tuner {

namespace {

thread_local bool in_worker = false;

class Pool {
 public:
  explicit Pool(int n) {
    for (int i = 0; i < n - 1; ++i) {
      workers_.emplace_back([this] { loop(); });
    }
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) {
      w.join();
    }
  }

  // Runs task(i) for i in [0, count); the caller takes part in the work.
  void run(int count, const std::function<void(int)>& task) {
    std::unique_lock<std::mutex> run_lk(run_mu_); // one parallel region at a time
    {
      std::lock_guard<std::mutex> lk(mu_);
      task_ = &task;
      count_ = count;
      next_ = 0;
      pending_ = count;
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return pending_ == 0; });
    task_ = nullptr;
    if (error_) {
      std::rethrow_exception(error_);
    }
  }

 private:
  void loop() {
    in_worker = true;
    uint64_t seen = 0;
    while (true) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) {
          return;
        }
        seen = generation_;
      }
      work();
    }
  }

  void work() {
    while (true) {
      int i;
      const std::function<void(int)>* task;
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (task_ == nullptr || next_ >= count_) {
          return;
        }
        i = next_++;
        task = task_;
      }
      bool saved = in_worker;
      in_worker = true;
      try {
        (*task)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) {
          error_ = std::current_exception();
        }
      }
      in_worker = saved;
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) {
        done_cv_.notify_all();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  const std::function<void(int)>* task_ = nullptr;
  int count_ = 0;
  int next_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

Pool& pool() {
  static Pool p(num_threads());
  return p;
}

} // namespace

int num_threads() {
  static int n = [] {
    if (const char* env = std::getenv("MLX_TUNER_NUM_THREADS")) {
      int v = std::atoi(env);
      if (v > 0) {
        return v;
      }
    }
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return n;
}

void parallel_for(
    int64_t n,
    int64_t grain,
    const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) {
    return;
  }
  grain = std::max<int64_t>(grain, 1);
  int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, 4 * num_threads());
  if (chunks <= 1 || num_threads() == 1 || in_worker) {
    fn(0, n);
    return;
  }
  int64_t step = (n + chunks - 1) / chunks;
  chunks = (n + step - 1) / step;
  pool().run(static_cast<int>(chunks), [&](int c) {
    int64_t b = c * step;
    fn(b, std::min(n, b + step));
  });
}

} // namespace mlx_tuner
