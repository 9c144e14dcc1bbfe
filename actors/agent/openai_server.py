"""An OpenAI-compatible chat-completions endpoint in front of the rollout engine, for black-box agents.

    server = agent_server()                    # one per process: 127.0.0.1, an ephemeral port, a daemon thread
    base_url = server.open(token, backend)     # http://127.0.0.1:PORT/episode/<token>/v1, one per episode
    server.close(token)

Under an episode's base_url:
    POST /chat/completions   {"model", "messages", "max_tokens"?, "stop"?, "tools"?, ...}  -> a chat.completion
    GET  /models             -> the one model served

The episode's identity is the random token in the path (an agent needs nothing but its base_url; another local
process cannot guess a live episode's). The backend (actors/agent/blackbox.py) renders the request, submits it to
the engine's step loop and blocks the handler's thread until the completion is back.

What a request may ask for: ``messages`` (roles system, developer, user, assistant, tool; content a string, text
parts, or null beside ``tool_calls``), ``tools`` (rendered by the chat template), ``max_tokens`` or
``max_completion_tokens`` (capped by rollout.max_new_tokens and the episode's budget), ``stop`` (a string or up to 4).
Refused with a 400 naming the field: ``n`` other than 1, ``stream``, a ``response_format`` other than text. Ignored,
because the rollout samples from the policy exactly as the learner scores it: ``temperature``, ``top_p``,
``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``seed`` and the like (logged once per run). Every error
is OpenAI's ``{"error": {"message": ...}}`` with ``x-should-retry: false``, so the openai client raises it at once
instead of retrying. Tool calls come back as text in ``content`` (no ``tool_calls`` parsing): the agent reads them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20
READ_TIMEOUT_S = 30.0
"""A client that stalls in the middle of sending its request holds its handler thread this long at most."""
ROLES = ("system", "developer", "user", "assistant", "tool")
REFUSED = {"n": "one completion per request (the group is rollout.samples_per_prompt episodes)",
           "stream": "streaming is not supported; call without stream=True"}
IGNORED = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "repetition_penalty",
           "logit_bias", "seed", "min_p")
_PATH = re.compile(r"^/episode/([A-Za-z0-9_-]{8,64})/v1/(chat/completions|models)/?$")


class RequestError(Exception):
    """A request the endpoint answers with ``status`` and OpenAI's error object carrying ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    model: str = ""
    ignored: list[str] = field(default_factory=list)
    """Sampling settings the request carried that the rollout ignores (see the module docstring)."""


def _text(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI's content parts: text only
        parts = []
        for i, p in enumerate(content):
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise RequestError(400, f"{where}.content[{i}] must be a text part ({{'type': 'text', 'text': ...}}); "
                                        "only text is served")
            parts.append(p["text"])
        return "".join(parts)
    raise RequestError(400, f"{where}.content must be a string or a list of text parts, not {type(content).__name__}")


def normalize_message(m: Any, i: int) -> dict[str, Any]:
    """A request's message as the chat template takes it: role, content (text), and name, tool_calls or
    tool_call_id where set. Fields the openai client adds as null (refusal, audio, ...) are dropped, so a message
    the agent copied from a response compares equal to the text it holds."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise RequestError(400, f"{where} must be an object with 'role' and 'content'")
    if m.get("role") not in ROLES:
        raise RequestError(400, f"{where}.role={m.get('role')!r} must be one of {', '.join(ROLES)}")
    out: dict[str, Any] = {"role": m["role"], "content": _text(m.get("content"), where)}
    for key in ("name", "tool_calls", "tool_call_id"):
        if m.get(key):
            out[key] = m[key]
    if out["content"] is None and "tool_calls" not in out:
        raise RequestError(400, f"{where}.content is missing")
    return out


def parse_chat_request(body: Any) -> ChatRequest:
    """A chat-completions request body -> ChatRequest; RequestError(400) naming the field otherwise."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list")
    if body.get("n", 1) != 1:
        raise RequestError(400, f"n={body['n']!r}: {REFUSED['n']}")
    if body.get("stream"):
        raise RequestError(400, f"stream: {REFUSED['stream']}")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError(400, "response_format: only text is served (constrained decoding would change the "
                                "distribution the learner scores)")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise RequestError(400, f"max_tokens={max_tokens!r} must be a positive integer")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop must be a string or a list of up to 4 non-empty strings")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RequestError(400, "tools must be a list of objects ({'type': 'function', 'function': {...}})")
    model = body.get("model")
    return ChatRequest([normalize_message(m, i) for i, m in enumerate(messages)], tools or None, max_tokens, stop,
                       model if isinstance(model, str) else "",
                       [k for k in IGNORED if body.get(k) is not None])


class Backend(Protocol):
    model_name: str

    def complete(self, token: str, request: ChatRequest) -> dict[str, Any]:
        """The chat.completion object for ``request`` of episode ``token`` (blocks); RequestError to refuse."""
        ...


def error_body(message: str, status: int) -> dict[str, Any]:
    kind = "not_found_error" if status == 404 else "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class _Handler(BaseHTTPRequestHandler):
    server_version = "oirl-agent"
    timeout = READ_TIMEOUT_S
    agents: AgentServer

    def _route(self) -> tuple[Backend, str, str] | None:
        m = _PATH.match(self.path.split("?", 1)[0])
        backend = self.agents.backend(m.group(1)) if m else None
        if m is None or backend is None:
            self._reply(404, error_body(f"no live episode at {self.path}: each episode has its own base_url "
                                        "(http://127.0.0.1:PORT/episode/<id>/v1), valid while the episode runs", 404))
            return None
        return backend, m.group(1), m.group(2)

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            return
        backend, _token, what = route
        if what != "models":
            self._reply(405, error_body("use POST for chat/completions", 405))
            return
        self._reply(200, {"object": "list", "data": [{"id": backend.model_name, "object": "model", "created": 0,
                                                      "owned_by": "oirl"}]})

    def do_POST(self) -> None:
        route = self._route()
        if route is None:
            return
        backend, token, what = route
        if what != "chat/completions":
            self._reply(405, error_body("use GET for models", 405))
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._reply(411, error_body("a Content-Length header is required", 411))
            return
        if not 0 < length <= MAX_BODY_BYTES:
            self._reply(413, error_body(f"the body must be 1 to {MAX_BODY_BYTES} bytes, not {length}", 413))
            return
        try:
            body = json.loads(self.rfile.read(length))
            self._reply(200, backend.complete(token, parse_chat_request(body)))
        except (ValueError, UnicodeDecodeError) as e:
            self._reply(400, error_body(f"the body is not JSON: {e}", 400))
        except RequestError as e:
            self._reply(e.status, error_body(str(e), e.status))

    def _reply(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status != 200:
            self.send_header("x-should-retry", "false")  # the openai client would retry 408/409/429/5xx otherwise
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.debug("%s " + fmt, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class AgentServer:
    """The process's endpoint: routes each episode's token to the backend that runs it."""

    def __init__(self) -> None:
        self._routes: dict[str, Backend] = {}
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"agents": self})
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, name="oirl-agent-http", daemon=True).start()
        # An HTTP(S)_PROXY in the environment would send the agents' loopback calls to the proxy.
        for var in ("NO_PROXY", "no_proxy"):
            hosts = [h for h in os.environ.get(var, "").split(",") if h]
            if "127.0.0.1" not in hosts:
                os.environ[var] = ",".join(hosts + ["127.0.0.1"])
        logger.info("agent endpoint on http://127.0.0.1:%d", self.port)

    def open(self, token: str, backend: Backend) -> str:
        with self._lock:
            assert token not in self._routes, f"episode token {token} is already open"
            self._routes[token] = backend
        return f"http://127.0.0.1:{self.port}/episode/{token}/v1"

    def close(self, token: str) -> None:
        with self._lock:
            self._routes.pop(token, None)

    def backend(self, token: str) -> Backend | None:
        with self._lock:
            return self._routes.get(token)


_SERVER: AgentServer | None = None
_SERVER_LOCK = threading.Lock()


def agent_server() -> AgentServer:
    """The process's endpoint, started on first use (a rollout worker starts it at its first black-box batch)."""
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None:
            _SERVER = AgentServer()
        return _SERVER
