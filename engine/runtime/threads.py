"""How many threads the compiled kernels use.

The count follows, in order: ``set_num_threads(n)``, ``OMP_NUM_THREADS``, all cores. When the
user chose no count, ``run_threads`` shrinks it to the cores other processes leave free, and
``threads_for`` runs small kernels on one thread. Results never depend on the thread count.
"""
import os
import time

import numpy as np

from .. import _kernels

_num_threads = None


def openmp_enabled():
    """True when the compiled kernels were built with OpenMP (else they run on one thread)."""
    return _kernels.openmp_enabled()


def get_num_threads():
    """Threads the kernels use: set_num_threads(n) if called, else OMP_NUM_THREADS, else all cores."""
    if not openmp_enabled():
        return 1
    if _num_threads is not None:
        return _num_threads
    return max(1, _kernels.omp_max_threads())


def set_num_threads(n):
    """Use `n` threads in the kernels for the rest of the process (None: back to OMP_NUM_THREADS / all cores)."""
    global _num_threads
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"set_num_threads: expected a positive integer, got {n!r}")
        n = int(n)
    _num_threads = n


def threads_chosen():
    """True when the thread count was chosen (set_num_threads(n) or OMP_NUM_THREADS), not defaulted."""
    return _num_threads is not None or bool(os.environ.get("OMP_NUM_THREADS"))


class CpuShare:
    """How many cores other processes (or the hypervisor, as steal time) keep busy.

    Busy time of the whole machine from /proc/stat minus this process's own CPU time, over
    windows of at least `window` seconds (the counters tick every 10 ms); between windows
    the last estimate stands, so a call costs a clock read. `read` gives (machine busy
    core-seconds, own core-seconds) and `clock` seconds; tests pass their own.
    """

    def __init__(self, window=0.25, read=None, clock=time.monotonic, cores=None):
        self.window, self.read, self.clock = window, read or self._proc_stat, clock
        self.cores = cores or os.cpu_count() or 1
        self.others, self._last, self._broken = 0.0, None, False

    @staticmethod
    def _proc_stat():
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
        ticks = [int(v) for v in fields[1:9]]
        busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait; steal counts as taken
        return busy / os.sysconf("SC_CLK_TCK"), time.process_time()

    def update(self):
        """Refresh the estimate when a window has passed; returns cores busy with others' work."""
        now = self.clock()
        if self._broken or (self._last is not None and now - self._last[0] < self.window):
            return self.others
        try:
            busy, own = self.read()
        except (OSError, ValueError, IndexError):
            self._broken, self.others = True, 0.0  # no /proc/stat here: assume the machine is ours
            return self.others
        if self._last is not None:
            t, busy0, own0 = self._last
            self.others = max(0.0, ((busy - busy0) - (own - own0)) / (now - t))
        self._last = (now, busy, own)
        return self.others

    def threads(self, wanted):
        """At most `wanted` threads, one per core the others leave free (at least one)."""
        free = self.cores - self.update()
        return max(1, min(wanted, int(free + 0.5)))


cpu_share = CpuShare()


def run_threads():
    """Threads for the next parallel call whose threads wait for each other (barriers).

    A count the user chose is used as is. The default (all cores) shrinks to the cores other
    processes leave free: with one busy process beside it on two cores, two threads that wait
    at every barrier for a descheduled partner are slower than one (docs/benchmarks.md, "Under
    a competing load"). Results do not depend on the thread count, so this changes only the time.
    """
    wanted = get_num_threads()
    if wanted == 1 or threads_chosen():
        return wanted
    return cpu_share.threads(wanted)


# Below this many output elements a kernel runs on one thread: waking a sleeping thread
# pool costs tens of microseconds, more than the work (batch-1 inference is all such calls).
# Results do not depend on the thread count, so this changes only the time.
SERIAL_BELOW = 32768


def threads_for(n_elements):
    """Threads for a kernel writing `n_elements` outputs: one below SERIAL_BELOW, else run_threads()."""
    return 1 if n_elements < SERIAL_BELOW else run_threads()


def kernels_path():
    """File of the compiled kernel extension actually used, the CPU target's (CI checks it is a built extension)."""
    return os.path.abspath(_kernels.module.__file__)
