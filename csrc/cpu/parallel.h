// Dynamic task scheduling for the CPU kernels: tasks are handed out one at a time from an atomic counter, because the
// machines this runs on are shared with other jobs, and a static split of the range would wait for its most
// preempted thread. Which thread runs a task changes nothing in the task's result.
//
// Included by the *_impl.h sources inside namespace mplus::MPLUS_ISA, after vec.h, so it is compiled per ISA level
// with the kernels it drives; the library headers it uses (ATen/Parallel.h, <atomic>) come from prelude.h.

// Runs body(state, task) for every task in [0, n) on the intra-op threads; each thread first builds its own state
// with make() (scratch buffers, a task object), once, and reuses it for every task it takes.
template <typename Make, typename Body>
void parallel_tasks(int64_t n, const Make& make, const Body& body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    auto state = make();
    for (int64_t task = next++; task < n; task = next++) body(state, task);
  });
}

// Runs body(task) for every task in [0, n): the same, without per-thread state.
template <typename Body>
void parallel_tasks(int64_t n, const Body& body) {
  parallel_tasks(n, [] { return 0; }, [&](int, int64_t task) { body(task); });
}
