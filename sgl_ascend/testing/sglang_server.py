"""Start and stop the real `python -m sglang.launch_server` on a CPU host (the tests and bench/).

The server runs in its own process group with SGLang's CPU engine (see README "SGLang on a CPU
host"); `stop` kills the whole group, scheduler and detokenizer included.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
from typing import Dict, Optional, Sequence

CPU_FLAGS = ["--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
             "--disable-cuda-graph", "--max-total-tokens", "4096", "--mem-fraction-static", "0.05"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_path: str, port: int, log, extra_args: Sequence[str] = (),
          env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """The server on 127.0.0.1:port, its output to the open file `log`."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", "127.0.0.1",
           "--port", str(port), *CPU_FLAGS, *extra_args]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1", **(env or {})})


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)
    # Children (scheduler, detokenizer) live in the same session; make sure none is left.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
