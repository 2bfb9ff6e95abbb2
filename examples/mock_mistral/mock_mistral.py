#!/usr/bin/env python3
"""A faithful mock of the Mistral API for ShieldKey's demo and tests (Python stdlib only).

Endpoints (shapes as recorded from api.mistral.ai, see the README):
  POST /v1/chat/completions   non-stream JSON, or SSE with `stream: true`: `data: {...}` chunks with
                              the `p` padding field, usage on the chunk with finish_reason, then
                              `data: [DONE]`
  POST /v1/fim/completions    same shapes as chat
  POST /v1/agents/completions same shapes as chat; the request names an `agent_id` instead of a
                              model, the response carries the agent's model (behaviour
                              `agent_model`, default mistral-medium-latest)
  POST /v1/embeddings         usage with completion_tokens 0
  GET  /v1/models
Auth: exactly `Authorization: Bearer <one of the --key values>`, else 401 {"detail":"Invalid API Key"}.

Usage is deterministic: prompt_tokens = characters of the prompt text // 4 + 1; completion_tokens =
min(max_tokens, 16) (16 without max_tokens), unless a behaviour overrides it.

Control API for tests (not under /v1, no auth):
  GET  /__mock/requests   every request received: {method, path, headers (lower-case), body}
  POST /__mock/reset      forget requests and behaviour
  POST /__mock/behaviour  merge into the behaviour: usage {...}, stream_chunks N, chunk_delay_ms N,
                          status N (reply with a Mistral error), abort_after_chunks N (drop the
                          connection mid-stream), service_tier
  POST /__mock/alerts     accepts (and records) budget alert webhooks
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import string
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODELS = ["mistral-small-latest", "mistral-large-latest", "mistral-medium-latest", "codestral-latest",
          "mistral-embed", "ministral-8b-latest"]


class State:
    def __init__(self, keys: list[str]):
        self.keys = set(keys)
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.behaviour: dict = {}

    def record(self, entry: dict) -> None:
        with self.lock:
            self.requests.append(entry)

    def current(self) -> dict:
        with self.lock:
            return dict(self.behaviour)


def words(n: int) -> list[str]:
    return [random.choice(["one", " two", " three", " four", " five"]) for _ in range(max(1, n))]


def prompt_text(req: dict) -> str:
    if "messages" in req:
        parts = []
        for m in req["messages"]:
            c = m.get("content")
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p.get("text", "") for p in c if isinstance(p, dict))
        return "".join(parts)
    if "prompt" in req:
        return str(req.get("prompt", "")) + str(req.get("suffix") or "")
    inputs = req.get("input", req.get("inputs", ""))
    return "".join(inputs) if isinstance(inputs, list) else str(inputs)


def usage_for(req: dict, behaviour: dict, embeddings: bool = False) -> dict:
    prompt = len(prompt_text(req)) // 4 + 1
    completion = 0 if embeddings else min(req.get("max_tokens") or 16, 16)
    forced = behaviour.get("usage") or {}
    prompt = forced.get("prompt_tokens", prompt)
    completion = forced.get("completion_tokens", completion)
    usage = {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}
    if not embeddings:
        usage["prompt_tokens_details"] = {"cached_tokens": forced.get("cached_tokens", 0)}
        usage["service_tier"] = behaviour.get("service_tier", "standard")
    return usage


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mock-mistral"
    state: State  # set on the subclass

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle's algorithm and the
        # peer's delayed ACK add ~40 ms to every response on a kept-alive connection.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # --- plumbing -----------------------------------------------------------------------------
    def read_body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def send_json(self, status: int, doc, extra: dict | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def error(self, status: int, message: str, type_: str = "invalid_request_error", code: str = "3000") -> None:
        self.send_json(status, {"object": "error", "message": message, "type": type_, "param": None, "code": code})

    def authorized(self) -> bool:
        auth = self.headers.get("authorization", "")
        if auth.startswith("Bearer ") and auth[len("Bearer "):] in self.state.keys:
            return True
        self.send_json(401, {"detail": "Invalid API Key"})
        return False

    def handle_any(self, method: str) -> None:
        body = self.read_body()
        path = self.path.split("?", 1)[0]
        if path.startswith("/__mock/"):
            return self.control(method, path, body)
        self.state.record({"method": method, "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()},
                           "body": body.decode("utf-8", "replace")})
        if not self.authorized():
            return
        behaviour = self.state.current()
        if behaviour.get("status"):
            return self.error(int(behaviour["status"]), "Service unavailable (mock)", "server_error", "1000")
        routes = {("GET", "/v1/models"): self.models,
                  ("POST", "/v1/chat/completions"): self.chat,
                  ("POST", "/v1/fim/completions"): self.chat,
                  ("POST", "/v1/agents/completions"): self.chat,
                  ("POST", "/v1/embeddings"): self.embeddings}
        route = routes.get((method, path))
        if route is None:
            return self.send_json(404, {"detail": "Not Found"})
        if method == "GET":
            return route(None, behaviour)
        try:
            req = json.loads(body)
            assert isinstance(req, dict)
        except (ValueError, AssertionError):
            return self.error(400, "Invalid JSON body")
        if path == "/v1/agents/completions":
            # An agent request names the agent; the agent's model answers.
            if not isinstance(req.get("agent_id"), str):
                return self.send_json(422, {"detail": [{"type": "missing", "loc": ["body", "agent_id"], "msg": "Field required"}]})
            req = {**req, "model": behaviour.get("agent_model", "mistral-medium-latest")}
        if not isinstance(req.get("model"), str):
            return self.send_json(422, {"detail": [{"type": "missing", "loc": ["body", "model"], "msg": "Field required"}]})
        try:
            route(req, behaviour)
        except (BrokenPipeError, ConnectionResetError):
            # The proxy went away mid-response (its client aborted): what a real upstream sees.
            self.close_connection = True

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    # --- control API --------------------------------------------------------------------------
    def control(self, method: str, path: str, body: bytes) -> None:
        if path == "/__mock/requests" and method == "GET":
            with self.state.lock:
                return self.send_json(200, list(self.state.requests))
        if path == "/__mock/reset" and method == "POST":
            with self.state.lock:
                self.state.requests.clear()
                self.state.behaviour.clear()
            return self.send_json(200, {"ok": True})
        if path == "/__mock/behaviour" and method == "POST":
            with self.state.lock:
                self.state.behaviour.update(json.loads(body or b"{}"))
                return self.send_json(200, dict(self.state.behaviour))
        if path == "/__mock/alerts" and method == "POST":
            self.state.record({"method": method, "path": path,
                               "headers": {k.lower(): v for k, v in self.headers.items()},
                               "body": body.decode("utf-8", "replace")})
            return self.send_json(200, {"ok": True})
        self.send_json(404, {"detail": "Not Found"})

    # --- API ----------------------------------------------------------------------------------
    def models(self, _req, _behaviour) -> None:
        created = int(time.time())
        self.send_json(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "mistralai",
             "capabilities": {"completion_chat": not m.endswith("embed")}} for m in MODELS]})

    def chat(self, req: dict, behaviour: dict) -> None:
        usage = usage_for(req, behaviour)
        ident = uuid.uuid4().hex
        created = int(time.time())
        if req.get("stream"):
            return self.stream(req, behaviour, usage, ident, created)
        text = "".join(words(usage["completion_tokens"]))
        self.send_json(200, {
            "id": ident, "created": created, "model": req["model"], "usage": usage,
            "object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "tool_calls": None, "content": text}}]})

    def stream(self, req: dict, behaviour: dict, usage: dict, ident: str, created: int) -> None:
        n = int(behaviour.get("stream_chunks", 3))
        delay = int(behaviour.get("chunk_delay_ms", 0)) / 1000
        abort_after = behaviour.get("abort_after_chunks")
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def chunk(doc) -> None:
            data = b"data: " + (doc if isinstance(doc, bytes) else json.dumps(doc).encode()) + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": req["model"]}
        chunk({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        for i in range(n):
            if abort_after is not None and i >= int(abort_after):
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            if delay:
                time.sleep(delay)
            last = i == n - 1
            doc = {**base, "choices": [{"index": 0, "delta": {"content": "".join(words(1))},
                                        "finish_reason": "stop" if last else None}],
                   "p": "".join(random.choices(string.ascii_lowercase, k=random.randint(1, 20)))}
            if last:
                doc["usage"] = usage
            chunk(doc)
        chunk(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def embeddings(self, req: dict, behaviour: dict) -> None:
        inputs = req.get("input", req.get("inputs"))
        if not isinstance(inputs, (str, list)):
            return self.send_json(422, {"detail": [{"type": "missing", "loc": ["body", "input"], "msg": "Field required"}]})
        inputs = [inputs] if isinstance(inputs, str) else inputs
        self.send_json(200, {
            "id": uuid.uuid4().hex, "object": "list", "model": req["model"],
            "data": [{"object": "embedding", "embedding": [round(random.uniform(-1, 1), 6) for _ in range(8)],
                      "index": i} for i in range(len(inputs))],
            "usage": usage_for(req, behaviour, embeddings=True)})


def serve(port: int, keys: list[str], host: str = "127.0.0.1") -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"state": State(keys)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--key", action="append", default=[], help="an accepted real key (repeatable)")
    parser.add_argument("--key-file", action="append", default=[],
                        help="a file holding an accepted key (repeatable; keeps it out of `ps`)")
    args = parser.parse_args()
    keys = args.key + [open(f).read().strip() for f in args.key_file]
    if not keys:
        parser.error("give at least one --key or --key-file")
    server = serve(args.port, keys, args.host)
    print(f"mock-mistral listening on {args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
