#include "interrupt.h"

#include <signal.h>
#include <unistd.h>

#include <fmt/core.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <thread>

namespace lazyfs::bench {
namespace {

std::atomic<bool> g_interrupted{false};
// Undo actions running now, in any thread.
std::atomic<int> g_running{0};

struct Registry {
  std::mutex mu;
  std::set<pid_t> groups;
  int next_id = 1;
  std::map<int, std::pair<std::string, std::function<void()>>> actions;
};

Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: the watcher may use it at exit
  return *r;
}

sigset_t handled_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  return set;
}

void watch() {
  const sigset_t set = handled_signals();
  for (int count = 0;; ++count) {
    int sig = 0;
    if (::sigwait(&set, &sig) != 0) continue;
    if (count == 0) {
      fmt::print(stderr, "\nlazyfs-bench: {} received, cleaning up (again to force)\n",
                 ::strsignal(sig));
      g_interrupted = true;
      std::lock_guard lock(registry().mu);
      for (pid_t g : registry().groups) ::kill(-g, SIGTERM);
    } else {
      fmt::print(stderr, "lazyfs-bench: cleaning up now\n");
      CleanupStack::run_all();
      // The main thread may be half-way through an action it took: let it
      // finish (bounded) rather than leave it half done.
      for (int i = 0; i < 3000 && g_running.load() > 0; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      ::_exit(130);
    }
  }
}

}  // namespace

void install_interrupt_handler() {
  // A shell without job control starts background commands with SIGINT
  // ignored, and an ignored signal is never pending for sigwait(): take
  // SIGINT and SIGTERM back. SIGHUP stays ignored under nohup.
  ::signal(SIGINT, SIG_DFL);
  ::signal(SIGTERM, SIG_DFL);
  const sigset_t set = handled_signals();
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::thread(watch).detach();
}

bool interrupted() {
  return g_interrupted.load();
}

void check_interrupted() {
  if (g_interrupted.load()) throw Interrupted();
}

void track_process_group(pid_t pgid) {
  std::lock_guard lock(registry().mu);
  registry().groups.insert(pgid);
  if (g_interrupted) ::kill(-pgid, SIGTERM);
}

void untrack_process_group(pid_t pgid) {
  std::lock_guard lock(registry().mu);
  registry().groups.erase(pgid);
}

int CleanupStack::push(std::string what, std::function<void()> undo) {
  std::lock_guard lock(registry().mu);
  int id = registry().next_id++;
  registry().actions.emplace(id, std::make_pair(std::move(what), std::move(undo)));
  return id;
}

void CleanupStack::run(int id) {
  std::function<void()> undo;
  {
    std::lock_guard lock(registry().mu);
    auto it = registry().actions.find(id);
    if (it == registry().actions.end()) return;
    undo = std::move(it->second.second);
    registry().actions.erase(it);
    ++g_running;  // under the lock, so run_all's waiter cannot miss it
  }
  try {
    undo();
  } catch (const std::exception& e) {
    fmt::print(stderr, "lazyfs-bench: cleanup: {}\n", e.what());
  }
  --g_running;
}

void CleanupStack::drop(int id) {
  std::lock_guard lock(registry().mu);
  registry().actions.erase(id);
}

void CleanupStack::run_all() {
  for (;;) {
    int id = 0;
    {
      std::lock_guard lock(registry().mu);
      if (registry().actions.empty()) return;
      id = registry().actions.rbegin()->first;
    }
    run(id);
  }
}

}  // namespace lazyfs::bench
