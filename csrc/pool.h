// The extension's own worker pool: parallel_for(n, threads, fn) runs fn(i) for i in [0, n) on the
// calling thread plus up to threads - 1 helpers. Used by every native op instead of OpenMP.
//
// Why not OpenMP: an OpenMP parallel region ends in a barrier that every thread of the team must
// reach, so the caller waits for a worker the OS has not scheduled yet. On a machine whose cores are
// busy (FL simulations run many clients per machine) that wait is a scheduler time slice, and libgomp
// spins while it waits (its default wait policy), burning the caller's own share: on 2 busy cores
// the OpenMP build's SZ encode and decode ran several times slower on 2 threads than on one (issue
// 18). OMP_WAIT_POLICY / GOMP_SPINCOUNT would help, but libgomp reads them once, when it is loaded:
// that is when torch is imported (torch ships libgomp.so.1, and this extension's libgomp.so.1
// dependency resolves to that already-loaded copy), before our code runs; and omp_set_dynamic
// adjusts by the 15-minute load average, far too slow for a load that comes and goes.
//
// Here the caller claims tasks from a shared counter like any helper and waits only for tasks a
// helper has already claimed; a helper that has not started by the time the counter runs out finds
// nothing to do. Waits are short spins, then a condition variable (no long spinning that steals the
// cores from the threads being waited for). A helper that claimed a task and then lost its core
// still makes the caller wait for a time slice, so helpers are used only where they can run:
//   1. size: below an op's threshold (2 x 2^16 values for SZ, 2 x 2^17 elements for the mask) one
//      thread; a helper's wake-up costs about what it would save;
//   2. free cores: no more threads than cores nobody else is running on at the call (free_cpus);
//   3. back-off: after a call whose caller waited long for a helper, single-threaded for 20 ms and
//      up (note_wait);
//   4. never on the caller's CPU: each job first confines the helpers to the process's CPUs minus the
//      one the caller runs on (only when that CPU changed since the last job: a syscall per helper).
//      In a VM, a vCPU that has been idle for a few ms is halted on the host, and the guest scheduler
//      then stops treating it as an idle CPU (vcpu_is_preempted), so a woken helper was queued behind
//      the caller on the caller's own CPU until a load balance moved it, ~1-5 ms later: measured here
//      (2 vCPUs, 2026-11-30, bench/wake_probe.cpp), after a 10 ms idle gap a helper started a median
//      0.9 ms after its wake and 1 in 2 on the caller's CPU, and SZ's encode and decode on 2 threads
//      lost their whole speed-up (bench_threads.py, gap 10). Excluded from the caller's CPU the
//      helper must go to another one: it started within 25-80 us at every gap tried.
// On an idle machine the ops keep their speed-up (helpers join within microseconds); on a busy one
// they run at about single-thread speed: bench/bench_threads.py measures both.
//
// Results never depend on the thread count: tasks write disjoint outputs chosen by index.
#pragma once
#include <immintrin.h>
#include <omp.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace fc {
namespace pool {

// Thread count: fedcompress.set_num_threads(n) when set (> 0); otherwise omp_get_max_threads() of the
// calling thread, which torch.set_num_threads and OMP_NUM_THREADS set (torch's pool is OpenMP).
inline std::atomic<int>& override_threads() {
  static std::atomic<int> n{0};
  return n;
}
inline int max_threads() {
  const int o = override_threads().load(std::memory_order_relaxed);
  return o > 0 ? o : std::max(1, omp_get_max_threads());
}
// The CPUs this process may run on, as first seen (sched_getaffinity; cgroup quotas are not seen);
// empty where the call fails.
inline const cpu_set_t& affinity_set() {
  static const cpu_set_t set = [] {
    cpu_set_t s;
    CPU_ZERO(&s);
    if (sched_getaffinity(0, sizeof(s), &s) != 0) CPU_ZERO(&s);
    return s;
  }();
  return set;
}
inline int affinity_cpus() { return std::max(1, CPU_COUNT(&affinity_set())); }
// The load gate (on by default; tests switch it off to reach the threaded path on a busy machine).
inline std::atomic<bool>& load_gate() {
  static std::atomic<bool> on{true};
  return on;
}
inline std::atomic<int>& spinning_helpers() {  // ours, runnable while they spin: not someone else's load
  static std::atomic<int> n{0};
  return n;
}
// Cores nobody else is running on right now: online CPUs - (runnable tasks - this caller - our
// spinning helpers), at most the CPUs we may use, from /proc/loadavg's instantaneous "running/total"
// field (system-wide; ~5 us to read; an op that gets here takes >= ~0.2 ms). A helper only pays
// when it gets a core of its own: on a busy machine it would wait in the run queue while holding a
// task, and the caller must wait for every task taken. Where /proc/loadavg is unreadable: every CPU
// we may use counts as free.
inline int free_cpus() {
  const int ncpu = affinity_cpus();
  static const long online = std::max(1L, sysconf(_SC_NPROCESSORS_ONLN));
  const int fd = ::open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ncpu;
  char buf[128];
  const ssize_t len = ::read(fd, buf, sizeof(buf) - 1);
  ::close(fd);
  if (len <= 0) return ncpu;
  buf[len] = 0;
  const char* p = buf;
  for (int f = 0; f < 3 && p; ++f) p = std::strchr(p, ' ') ? std::strchr(p, ' ') + 1 : nullptr;  // 4th field
  if (!p) return ncpu;
  const long running = std::strtol(p, nullptr, 10);
  if (running <= 0) return ncpu;
  const long others = running - 1 - spinning_helpers().load(std::memory_order_relaxed);
  return int(std::min<long>(ncpu, std::max<long>(0, online - std::max<long>(0, others))));
}
// Back-off: when a job's caller had to wait long for a task a helper had claimed (the helper was
// preempted: the load came after free_cpus looked), jobs run on the caller alone for a while, 20 ms
// doubling up to 1 s while it keeps happening. One slow call per back-off period, not every call.
inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline std::atomic<int64_t>& solo_until_ns() {
  static std::atomic<int64_t> t{0};
  return t;
}
inline std::atomic<int64_t>& backoff_ns() {
  static std::atomic<int64_t> t{20'000'000};
  return t;
}
inline bool backing_off() { return now_ns() < solo_until_ns().load(std::memory_order_relaxed); }
// The caller finished its own tasks at `own` ns after the start and the last helper task at `wait` ns
// after that: more than half its own time plus 0.2 ms means a helper sat in a run queue.
inline void note_wait(int64_t own, int64_t wait) {
  if (wait > own / 2 + 200'000) {
    const int64_t b = backoff_ns().load(std::memory_order_relaxed);
    solo_until_ns().store(now_ns() + b, std::memory_order_relaxed);
    backoff_ns().store(std::min<int64_t>(2 * b, 1'000'000'000), std::memory_order_relaxed);
  } else {
    backoff_ns().store(20'000'000, std::memory_order_relaxed);
  }
}

// Threads for `work` units when each thread should get at least `min_per_thread` of them: 1 below
// 2 * min_per_thread (waking a helper costs more than it saves), never more than max_threads(), and
// no more than the cores free right now (free_cpus; the caller always counts as one).
inline int threads_for(int64_t work, int64_t min_per_thread) {
  const int64_t t = std::min<int64_t>(min_per_thread > 0 ? work / min_per_thread : work, max_threads());
  if (t <= 1) return 1;
  if (!load_gate().load(std::memory_order_relaxed)) return int(t);
  return backing_off() ? 1 : int(std::max<int64_t>(1, std::min<int64_t>(t, free_cpus())));
}

// A caller's own thread count (the FedSynth kernels get torch.get_num_threads() from Python), capped
// by fedcompress.set_num_threads when that is set and by the free cores (free_cpus).
inline int cap(int threads) {
  const int o = override_threads().load(std::memory_order_relaxed);
  const int t = std::max(1, o > 0 ? std::min(threads, o) : threads);
  if (t <= 1 || !load_gate().load(std::memory_order_relaxed)) return t;
  return backing_off() ? 1 : std::max(1, std::min(t, free_cpus()));
}

// Jobs that went to helpers (tests check the single-thread path below a size threshold with it).
inline std::atomic<int64_t>& jobs_dispatched() {
  static std::atomic<int64_t> n{0};
  return n;
}

struct Job {
  int64_t n = 0;
  void (*call)(void*, int64_t) = nullptr;
  void* ctx = nullptr;  // the caller's closure: touched only for a claimed index < n
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<int> seats{0};  // helpers still allowed to join (threads - 1)
  std::mutex m;
  std::condition_variable cv;
  std::exception_ptr error;

  void work() {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      try {
        call(ctx, i);
      } catch (...) {
        std::lock_guard<std::mutex> g(m);
        if (!error) error = std::current_exception();
      }
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
        std::lock_guard<std::mutex> g(m);  // the caller may be between its check and its wait
        cv.notify_all();
      }
    }
  }
};

class Pool {
 public:
  static Pool& get() {
    // Leaked on purpose: helpers outlive static destruction at exit. After fork() the child has no
    // helpers, so it gets a fresh pool (the caller never waits for helpers that did not claim a task,
    // so even the stale one could not hang it).
    static std::atomic<Pool*> inst{nullptr};
    static std::mutex init;
    Pool* p = inst.load(std::memory_order_acquire);
    if (p && p->pid_ == getpid()) return *p;
    std::lock_guard<std::mutex> g(init);
    p = inst.load(std::memory_order_relaxed);
    if (!p || p->pid_ != getpid()) {
      p = new Pool();
      inst.store(p, std::memory_order_release);
    }
    return *p;
  }

  void run(int64_t n, int threads, void (*call)(void*, int64_t), void* ctx) {
    if (threads <= 1 || n <= 1 || tl_in_task()) return run_inline(n, call, ctx);
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return run_inline(n, call, ctx);  // another caller holds the helpers
    const int helpers = int(std::min<int64_t>(threads - 1, n - 1));
    grow(helpers);
    keep_off(sched_getcpu());
    auto job = std::make_shared<Job>();
    job->n = n, job->call = call, job->ctx = ctx;
    job->seats.store(helpers, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> g(m_);
      cur_ = job;
      gen_.fetch_add(1, std::memory_order_release);
    }
    jobs_dispatched().fetch_add(1, std::memory_order_relaxed);
    if (sleeping_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    const int64_t t0 = now_ns();
    tl_in_task() = true;
    job->work();
    tl_in_task() = false;
    const int64_t t1 = now_ns();
    // wait for tasks helpers claimed: a short spin (they are usually mid-block), then sleep
    for (int k = 0; k < 2000 && job->done.load(std::memory_order_acquire) < n; ++k) _mm_pause();
    if (job->done.load(std::memory_order_acquire) < n) {
      std::unique_lock<std::mutex> lk(job->m);
      job->cv.wait(lk, [&] { return job->done.load(std::memory_order_acquire) >= n; });
    }
    note_wait(t1 - t0, now_ns() - t1);
    {
      std::lock_guard<std::mutex> g(m_);
      cur_.reset();  // late helpers find no job; any that hold one keep it alive by reference
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  Pool() : pid_(getpid()) {}

  static bool& tl_in_task() {  // nested calls (a task that calls parallel_for) run inline
    static thread_local bool b = false;
    return b;
  }
  static void run_inline(int64_t n, void (*call)(void*, int64_t), void* ctx) {
    for (int64_t i = 0; i < n; ++i) call(ctx, i);
  }

  void grow(int helpers) {
    std::lock_guard<std::mutex> g(m_);
    while (int(threads_.size()) < std::min(helpers, 255)) {
      std::thread t([this] { helper(); });
      pthread_setname_np(t.native_handle(), "fc-pool");
      threads_.push_back(t.native_handle());
      t.detach();  // helpers never exit: the handle stays valid
      kept_off_ = -1;  // the new helper may run anywhere: confine them all again
    }
  }

  // Confine every helper to the process's CPUs but `cpu` (the caller's; header comment, item 4).
  // Called under run_mutex_; a syscall per helper only when the caller's CPU changed.
  void keep_off(int cpu) {
    const cpu_set_t& all = affinity_set();
    if (cpu < 0 || cpu == kept_off_ || CPU_COUNT(&all) < 2 || !CPU_ISSET(cpu, &all)) return;
    cpu_set_t others = all;
    CPU_CLR(cpu, &others);
    std::lock_guard<std::mutex> g(m_);
    for (pthread_t t : threads_) pthread_setaffinity_np(t, sizeof(others), &others);
    kept_off_ = cpu;
  }

  void helper() {
    tl_in_task() = true;
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      // spin ~50 us for the next job (back-to-back calls, e.g. the tensors of one state dict), then sleep
      const auto t0 = std::chrono::steady_clock::now();
      spinning_helpers().fetch_add(1, std::memory_order_relaxed);
      for (int k = 0; gen_.load(std::memory_order_acquire) == seen; ++k) {
        _mm_pause();
        if ((k & 255) == 255 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(50)) break;
      }
      spinning_helpers().fetch_sub(1, std::memory_order_relaxed);
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(m_);
        if (gen_.load(std::memory_order_acquire) == seen) {
          sleeping_.fetch_add(1, std::memory_order_acq_rel);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        }
        seen = gen_.load(std::memory_order_acquire);
        job = cur_;
      }
      if (job && job->seats.fetch_sub(1, std::memory_order_acq_rel) > 0) job->work();
    }
  }

  const pid_t pid_;
  std::mutex run_mutex_;  // one job at a time; a concurrent caller runs its own inline
  std::mutex m_;
  std::condition_variable cv_;
  std::shared_ptr<Job> cur_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleeping_{0};
  std::vector<pthread_t> threads_;
  int kept_off_ = -1;  // the CPU the helpers are kept off (-1: none yet); guarded by run_mutex_
};

// fn(i) for i in [0, n) on up to `threads` threads (the caller included). Exceptions from fn are
// rethrown in the caller (the first one) after every claimed task has finished.
template <class F>
void parallel_for(int64_t n, int threads, F&& fn) {
  auto tramp = [](void* c, int64_t i) { (*static_cast<std::remove_reference_t<F>*>(c))(i); };
  Pool::get().run(n, threads, tramp, const_cast<void*>(static_cast<const void*>(&fn)));
}

}  // namespace pool
}  // namespace fc
