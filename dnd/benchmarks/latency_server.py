"""A local OpenAI-compatible chat server that answers every request after a fixed latency.

Real users reach their LLM over an API, where a request costs about a second of waiting
and little compute; on a small machine a local model hides that regime behind its own
compute. ``dnd bench describe --llm-latency 1.0`` points the ``openai`` backend at this
server to measure it: requests are answered concurrently (one thread each, no limit), each
after ``latency`` seconds, with a deterministic reply (no model):

- a merge request ("Concepts: a, b, ...") gets its first concept;
- any other request gets the first numbered line of its last message ("1. a red circle on
  a grey background"), which the summariser cuts to its subject, else the message's first
  five words.

Usage is reported in words (prompt: the messages' words; completion: the reply's), so the
work counters have tokens to count.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "latency-server"


def reply_for(messages: list[dict[str, str]]) -> str:
    """The server's deterministic reply to a chat (module docstring)."""
    text = str(messages[-1].get("content", "")) if messages else ""
    if text.startswith("Concepts: "):
        return text.removeprefix("Concepts: ").split(",")[0].strip()
    numbered = re.search(r"^\s*1[.)]\s*(.+)$", text, flags=re.MULTILINE)
    if numbered:
        return numbered.group(1).strip()
    return " ".join(text.split()[:5])


class LatencyServer:
    """``with LatencyServer(latency=1.0) as server:`` serves ``server.base_url`` (an
    OpenAI-compatible ``/v1``) on a free local port until the block ends. ``requests``:
    chat requests answered; ``max_in_flight``: the most answered at once."""

    def __init__(self, latency: float = 1.0):
        if latency < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {latency}")
        self.latency = float(latency)
        self.requests = 0
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running; use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> LatencyServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server API)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    messages = list(body["messages"])
                except (ValueError, KeyError, TypeError) as e:
                    self._send(400, {"error": {"message": f"bad request: {e}"}})
                    return
                server._enter()
                try:
                    time.sleep(server.latency)
                    self._send(200, _completion(messages, int(body.get("n") or 1)))
                finally:
                    server._leave()

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:  # quiet: no line per request
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def _enter(self) -> None:
        with self._lock:
            self.requests += 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1


def _completion(messages: list[dict[str, str]], n: int) -> dict[str, Any]:
    """An OpenAI chat-completion body with ``n`` identical choices."""
    reply = reply_for(messages)
    prompt_words = sum(len(str(m.get("content", "")).split()) for m in messages)
    return {"id": "chatcmpl-latency", "object": "chat.completion", "created": 0,
            "model": MODEL,
            "choices": [{"index": i, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply}}
                        for i in range(n)],
            "usage": {"prompt_tokens": prompt_words,
                      "completion_tokens": n * len(reply.split()),
                      "total_tokens": prompt_words + n * len(reply.split())}}
