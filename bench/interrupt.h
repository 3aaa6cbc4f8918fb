// What the harness started, and how it is stopped on SIGINT / SIGTERM.
//
// Every resource that outlives one function (netns, sshd, relay, mounts,
// scratch directories) registers an undo action on the CleanupStack and runs
// it itself on the normal path. The signals are blocked in every thread and
// taken by one watcher thread: the first one sets the interrupted flag and
// SIGTERMs the process groups of the short-lived children (copies, mounts,
// the workload), so the main thread's waits return and it unwinds through
// the same undo actions; a second signal runs every pending undo action from
// the watcher and exits at once.
#pragma once

#include <sys/types.h>

#include <functional>
#include <stdexcept>
#include <string>

namespace lazyfs::bench {

struct Interrupted : std::runtime_error {
  Interrupted() : std::runtime_error("interrupted") {}
};

// Blocks SIGINT, SIGTERM and SIGHUP and starts the watcher. Call before any
// other thread starts.
void install_interrupt_handler();
bool interrupted();
// Throws Interrupted once a signal came.
void check_interrupted();

// Process groups the watcher SIGTERMs on the first signal.
void track_process_group(pid_t pgid);
void untrack_process_group(pid_t pgid);

class CleanupStack {
 public:
  // Registers `undo`, described by `what` for the log; returns its handle.
  static int push(std::string what, std::function<void()> undo);
  // Runs (once) and forgets the action `id`; no-op if it already ran.
  static void run(int id);
  // Forgets `id` without running it.
  static void drop(int id);
  // Runs every pending action, newest first.
  static void run_all();
};

}  // namespace lazyfs::bench
