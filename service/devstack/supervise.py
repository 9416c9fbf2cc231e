"""A child process that `research-service dev` keeps running: restarted, and said so, when it dies.

Without it a dead worker leaves every turn queued while the API (and /readyz) look fine.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable

from service.devstack.privileges import _RunAs

# A child that ran this long before dying is restarted after FIRST_DELAY_S again; one that dies
# sooner waits twice as long as the time before, up to MAX_DELAY_S (a crash loop does not spin).
STABLE_S = 60.0
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0


def exit_text(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
        return f"was killed by {name}"
    return f"exited with code {code}"


class Supervisor:
    """Start `command`; a watcher thread restarts it whenever it exits until `stop()`."""

    def __init__(self, name: str, command: list[str], env: dict[str, str],
                 say: Callable[[str], None],
                 on_start: Callable[[int], None] = lambda pid: None) -> None:
        self.name, self.command, self.env = name, command, env
        self.say, self.on_start = say, on_start
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name=f"supervise-{name}",
                                         daemon=True)

    def start(self) -> None:
        self._spawn()
        self._watcher.start()

    def _spawn(self) -> None:
        # A session of its own: Ctrl-C in the terminal reaches `dev` alone, which stops the child
        # with SIGTERM (a graceful drain); SIGTERM also comes when `dev` dies (PDEATHSIG).
        self.process = subprocess.Popen(self.command, env=self.env, start_new_session=True,
                                        preexec_fn=_RunAs("direct").preexec(signal.SIGTERM))
        self._started = time.monotonic()
        self.on_start(self.process.pid)

    def _watch(self) -> None:
        delay = FIRST_DELAY_S / 2  # the first quick death doubles it to FIRST_DELAY_S
        while self.process is not None:
            code = self.process.wait()
            if self._stopping.is_set():
                return
            ran = time.monotonic() - self._started
            delay = FIRST_DELAY_S if ran >= STABLE_S else min(delay * 2, MAX_DELAY_S)
            self.say(f"{self.name} (pid {self.process.pid}) {exit_text(code)} after {ran:.0f} s; "
                     f"restarting it in {delay:.0f} s")
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._spawn()
                self.restarts += 1
            self.say(f"{self.name} restarted (pid {self.process.pid})")

    def stop(self, timeout: float = 20) -> None:
        """Stop the child (SIGTERM, then SIGKILL after `timeout`) and the restarts."""
        with self._lock:
            self._stopping.set()
            process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
