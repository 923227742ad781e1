// How late a sleeping helper thread starts after a condition-variable wake, by the idle gap before
// the wake: the measurement behind csrc/pool.h's item 4 (docs/sz.md, "After an idle gap").
//
//   g++ -O2 -pthread bench/wake_probe.cpp -o /tmp/wake_probe && /tmp/wake_probe && /tmp/wake_probe --keep-off
//
// Each trial: both threads idle for the gap, the main thread wakes the helper and then works for 1 ms;
// the helper records when it started and on which CPU, then works 1 ms too. --keep-off first allows
// the helper every CPU but the main thread's (as the pool does), only when the main thread's CPU
// changed. Prints per gap the median and 90th percentile start delay and how often the helper
// started on the main thread's CPU. 2 CPUs or more.
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

using clk = std::chrono::steady_clock;
static long now_ns() { return long(clk::now().time_since_epoch().count()); }
static void work(long ns) {
  const long end = now_ns() + ns;
  volatile double x = 1;
  while (now_ns() < end)
    for (int i = 0; i < 100; ++i) x = x * 1.0000001;
}

int main(int argc, char** argv) {
  const bool keep_off = argc > 1 && std::strcmp(argv[1], "--keep-off") == 0;
  std::mutex m;
  std::condition_variable cv;
  int gen = 0;
  std::atomic<long> started{0}, finished{0};
  std::atomic<int> helper_cpu{-1};
  std::thread helper([&] {
    int seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(m);
        cv.wait(lk, [&] { return gen != seen; });
        seen = gen;
      }
      started.store(now_ns());
      helper_cpu.store(sched_getcpu());
      work(1'000'000);
      finished.store(now_ns());
    }
  });
  cpu_set_t all;
  sched_getaffinity(0, sizeof(all), &all);
  int kept_off = -1;
  std::printf("%s\n", keep_off ? "helper kept off the waker's CPU" : "helper allowed on every CPU");
  for (int gap_us : {0, 1000, 3000, 10000, 30000}) {
    std::vector<double> delay;
    int same = 0;
    for (int r = 0; r < 40; ++r) {
      if (gap_us) std::this_thread::sleep_for(std::chrono::microseconds(gap_us));
      const int me = sched_getcpu();
      if (keep_off && me != kept_off) {
        cpu_set_t others = all;
        CPU_CLR(me, &others);
        pthread_setaffinity_np(helper.native_handle(), sizeof(others), &others);
        kept_off = me;
      }
      started.store(0), finished.store(0);
      const long t0 = now_ns();
      {
        std::lock_guard<std::mutex> g(m);
        ++gen;
      }
      cv.notify_one();
      work(1'000'000);
      const int mine = sched_getcpu();
      while (finished.load() == 0) {
      }
      delay.push_back((started.load() - t0) / 1e3);
      same += helper_cpu.load() == mine;
    }
    std::sort(delay.begin(), delay.end());
    std::printf("idle gap %5d us: helper start delay median %7.1f us, p90 %7.1f us; on the waker's CPU %2d/40\n",
                gap_us, delay[20], delay[36], same);
  }
  std::fflush(stdout);
  std::_Exit(0);  // the helper never returns
}
