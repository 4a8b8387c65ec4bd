"""Start the real `python -m sglang.launch_server` on this CPU host and talk to it (tests only).

One server per checkpoint; the process group is always killed when the context exits. Flags are
the CPU engine's (see README "SGLang on a CPU host").
"""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Dict, List, Sequence

from sgl_ascend.testing.sglang_server import free_port, start, stop

START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120


class ServerError(RuntimeError):
    pass


class Server:
    def __init__(self, url: str, log_path: str):
        self.url, self.log_path = url, log_path

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def complete(self, prompt_ids: Sequence[int], max_tokens: int, top_logprobs: int = 2) -> Dict:
        """Greedy /v1/completions; returns token_ids, token_logprobs and top_logprobs."""
        body = {"model": "default", "prompt": list(prompt_ids), "max_tokens": max_tokens,
                "temperature": 0, "logprobs": top_logprobs, "return_token_ids": True, "ignore_eos": True}
        request = urllib.request.Request(f"{self.url}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            choice = json.load(response)["choices"][0]
        return {"token_ids": choice["token_ids"], "token_logprobs": choice["logprobs"]["token_logprobs"],
                "text": choice["text"]}


    def metrics(self) -> Dict[str, float]:
        """SGLang's Prometheus gauges (server started with --enable-metrics), e.g.
        sglang:max_total_num_tokens, sglang:kv_cache_memory_usage_gb, sglang:weight_memory_usage_gb."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=REQUEST_TIMEOUT_S) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("sglang:") and " " in line:
                name, _, value = line.rpartition(" ")
                values.setdefault(name.split("{")[0], float(value))
        return values


@contextlib.contextmanager
def launch(model_path: str, extra_args: Sequence[str] = (), env: Dict[str, str] = None,
           start_timeout: int = START_TIMEOUT_S):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="sglang-server-", suffix=".log", delete=False)
    process = start(model_path, port, log, extra_args, env)
    server = Server(f"http://127.0.0.1:{port}", log.name)
    try:
        _wait_ready(process, server, start_timeout)
        yield server
    finally:
        stop(process)
        log.close()


def _wait_ready(process: subprocess.Popen, server: Server, timeout: int) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health_generate", timeout=30) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1)
    raise ServerError(f"server not ready after {timeout}s:\n{server.log_tail()}")


def run_launcher(args: List[str], timeout: int = 180) -> subprocess.CompletedProcess:
    """Run `python -m sglang.launch_server ARGS` to completion (for --help and start-up errors)."""
    return subprocess.run([sys.executable, "-m", "sglang.launch_server", *args], capture_output=True,
                          text=True, timeout=timeout, start_new_session=True,
                          env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1"})
