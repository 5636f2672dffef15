"""A tiny local stand-in for an OpenAI-compatible chat-completions server (tests only).

``FakeOpenAI(script)`` serves ``POST /v1/chat/completions`` on 127.0.0.1 (a free port) in
a background thread. ``script(body, n)`` receives the parsed request body and the
1-based request count and returns a ``Reply``: canned text, an HTTP error (with
Retry-After), a delay (to trigger client timeouts), a malformed body or empty content.
The server counts requests and records the most requests it ever had in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """What the fake server answers to one request.

    ``content`` becomes the assistant message (None sends ``"content": null``), one choice
    per ``n`` the request asked for; a list gives each choice its own text (a shorter list
    than ``n`` plays a server that ignores ``n``);
    ``status`` != 200 sends an OpenAI-style error body; ``raw`` replaces the whole body
    (for malformed JSON); ``delay`` sleeps before answering.
    """

    content: str | list[str] | None = "ok"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    raw: bytes | None = None


def ok(content: str) -> Reply:
    return Reply(content=content)


def echo_last_user(body: dict[str, Any], n: int) -> Reply:
    """Default script: answer with the last user message."""
    return Reply(content=body["messages"][-1]["content"])


Script = Callable[[dict[str, Any], int], Reply]


class FakeOpenAI:
    """Context manager running the fake server; ``base_url`` is what clients need."""

    def __init__(self, script: Script = echo_last_user):
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.auth_headers: list[str] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # A short poll interval makes shutdown() (which waits for the next poll) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with fake._lock:
                    fake.requests.append(body)
                    fake.auth_headers.append(self.headers.get("Authorization", ""))
                    n = len(fake.requests)
                    fake._in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake._in_flight)
                try:
                    reply = fake.script(body, n)
                    time.sleep(reply.delay)
                    if reply.raw is not None:
                        self._send_bytes(reply.status, reply.raw, reply.headers)
                    elif reply.status != 200:
                        error = {"message": f"fake error {reply.status}", "type": "fake"}
                        self._send(reply.status, {"error": error}, reply.headers)
                    else:
                        self._send(200, _completion(body, reply.content), reply.headers)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with fake._lock:
                        fake._in_flight -= 1

            def _send(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
                self._send_bytes(status, json.dumps(obj).encode(), headers or {})

            def _send_bytes(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _completion(body: dict[str, Any], content: str | list[str] | None) -> dict[str, Any]:
    """A chat.completion body; usage counts words (prompt: every message's text)."""
    texts = content if isinstance(content, list) else [content] * int(body.get("n", 1))
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion = sum(len((t or "").split()) for t in texts)
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "fake"),
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            for i, text in enumerate(texts)
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    }
