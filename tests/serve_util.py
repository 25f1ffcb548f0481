"""Starting `scratchlm serve` in a subprocess for the server tests: on a free port (--port 0, the URL read
from the line it prints once listening), its stderr kept in a file that a failure shows."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

START_TIMEOUT = 180  # seconds to wait for the server to listen: generous, two test workers share 2 cores


class ServerProcess:
    def __init__(self, args: list[str], log_dir: Path):
        env = dict(os.environ, PYTHONPATH=os.getcwd(), SCRATCHLM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log_path = log_dir / "server.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "scratchlm", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        self.url = self._wait_for_url()
        # keep reading stdout so a chatty server never blocks on a full pipe
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def _wait_for_url(self) -> str:
        found: list[str] = []

        def read():
            for line in self.proc.stdout:
                if line.startswith("scratchlm serve: http://"):
                    found.append(line.split()[2])
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(START_TIMEOUT)
        if not found:
            self.stop()
            raise RuntimeError(f"the server did not start: {self.log()}")
        url = found[0]
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:  # the line comes once listening; /health answers right after
            try:
                if httpx.get(url + "/health", timeout=10).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"the server does not answer /health: {self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
