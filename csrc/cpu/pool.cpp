// The sleeping thread pool of pool.h.
#include "pool.h"

#include <unistd.h>

#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

namespace fastmerge {
namespace cpu {
namespace {

thread_local int tl_num = 0;
thread_local bool tl_inside = false;

struct Pool {
  std::mutex call;  // one loop at a time
  std::mutex m;  // guards everything below
  std::condition_variable work, done;
  int workers = 0;  // worker k runs piece k (k >= 1)
  uint64_t generation = 0;  // bumped by each loop
  int tasks = 0;
  int pending = 0;
  void (*task)(void*, int) = nullptr;
  void* ctx = nullptr;
  std::exception_ptr error;
  const pid_t pid = getpid();

  void grow(int n) {  // with m held
    while (workers < n) {
      const int id = ++workers;
      std::thread([this, id, seen = generation]() mutable { serve(id, seen); }).detach();
    }
  }

  void serve(int id, uint64_t seen) {
    tl_inside = true;
    tl_num = id;
    std::unique_lock<std::mutex> lk(m);
    for (;;) {
      work.wait(lk, [&] { return generation != seen; });
      seen = generation;
      if (id >= tasks) continue;
      void (*fn)(void*, int) = task;
      void* c = ctx;
      lk.unlock();
      std::exception_ptr e;
      try {
        fn(c, id);
      } catch (...) {
        e = std::current_exception();
      }
      lk.lock();
      if (e && !error) error = e;
      if (--pending == 0) done.notify_one();
    }
  }
};

Pool& pool() {
  // Never destroyed (workers may still wait on it at exit). A forked child has none of the parent's
  // threads, so it starts a pool of its own.
  static Pool* p = new Pool();
  if (p->pid != getpid()) p = new Pool();
  return *p;
}

void run_serially(int tasks, void (*task)(void*, int), void* ctx) {
  const int num = tl_num;
  const bool inside = tl_inside;
  tl_inside = true;
  try {
    for (int k = 0; k < tasks; ++k) {
      tl_num = k;
      task(ctx, k);
    }
  } catch (...) {
    tl_num = num, tl_inside = inside;
    throw;
  }
  tl_num = num, tl_inside = inside;
}

}  // namespace

int pool_thread_num() { return tl_num; }

void pool_run(int tasks, void (*task)(void*, int), void* ctx) {
  if (tasks <= 1 || tl_inside) return run_serially(tasks, task, ctx);
  Pool& p = pool();
  std::unique_lock<std::mutex> call(p.call, std::try_to_lock);
  if (!call.owns_lock()) return run_serially(tasks, task, ctx);
  {
    std::lock_guard<std::mutex> lk(p.m);
    p.grow(tasks - 1);
    p.task = task;
    p.ctx = ctx;
    p.tasks = tasks;
    p.pending = tasks - 1;
    p.error = nullptr;
    ++p.generation;
  }
  p.work.notify_all();
  std::exception_ptr mine;
  tl_inside = true;
  tl_num = 0;
  try {
    task(ctx, 0);
  } catch (...) {
    mine = std::current_exception();
  }
  tl_inside = false;
  std::exception_ptr theirs;
  {
    std::unique_lock<std::mutex> lk(p.m);
    p.done.wait(lk, [&] { return p.pending == 0; });
    theirs = p.error;
    p.error = nullptr;
  }
  if (mine) std::rethrow_exception(mine);
  if (theirs) std::rethrow_exception(theirs);
}

}  // namespace cpu
}  // namespace fastmerge
