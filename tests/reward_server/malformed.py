"""Generated malformed requests for the reward server's fuzz tests (in-process and through the real CLI).

Each case is one raw HTTP request (bytes on a fresh connection) that a correct server must answer with a 4xx JSON
error: malformed HTTP (request line, Content-Length, headers, method), malformed bodies (non-UTF-8, invalid JSON,
wrong types of every field, missing or unknown fields, ragged rows, negative, out-of-vocabulary or huge token ids,
unparsable GSM8K references, too many samples) and, with ``stalls=True``, requests that stop in their request line
or headers while the client waits (labels 'stall:...': 408 once the server's read timeout has passed).
"""

from __future__ import annotations

import http.client
import json
import random
import socket

TEXT_FIELDS = ("prompts", "responses", "references")
ID_FIELDS = ("prompt_token_ids", "response_token_ids", "references")
NOT_A_LIST = [None, True, 0, -5, 1.5, "text", {"a": 1}]
NOT_A_STRING = [None, 1, 2.5, True, [], {}, ["x"]]
NOT_A_ROW = [None, 1, "12", {}, True]


def request(method: str, path: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None,
            content_length: str | None = "auto", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if content_length == "auto":
        lines.append(f"Content-Length: {len(body)}")
    elif content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def send(port: int, data: bytes, half_close: bool = False, timeout: float = 30.0) -> tuple[int, dict, bytes]:
    """(status, headers, body) of the server's answer to ``data`` on a fresh connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, dict(resp.getheaders()), resp.read()


def _good_text(rng: random.Random) -> dict:
    n = rng.randint(1, 3)
    answers = [rng.randint(0, 99) for _ in range(n)]
    return {"prompts": [f"q{i}" for i in range(n)], "responses": [f"#### {a}" for a in answers],
            "references": [str(a) for a in answers]}


def _good_ids(rng: random.Random, vocab: int) -> dict:
    n = rng.randint(1, 3)
    return {"prompt_token_ids": [[rng.randrange(vocab) for _ in range(rng.randint(1, 4))] for _ in range(n)],
            "response_token_ids": [[rng.randrange(vocab) for _ in range(rng.randint(1, 4))] for _ in range(n)],
            "references": [str(rng.randint(0, 9)) for _ in range(n)]}


def _bad_token(rng: random.Random, vocab: int) -> object:
    return rng.choice([-1, -rng.randint(2, 10**6), vocab, vocab + rng.randint(1, 10**6), 10**30, -(10**30), 1.0,
                       3.5, True, False, "5", None, [1], {}])


def _mutated_body(rng: random.Random, vocab: int) -> tuple[str, dict | list | str | int | None]:
    ids = rng.random() < 0.5
    body = _good_ids(rng, vocab) if ids else _good_text(rng)
    fields = ID_FIELDS if ids else TEXT_FIELDS
    field = rng.choice(fields)
    kind = rng.choice(["drop", "not_a_list", "element", "ragged", "unknown", "both", "not_an_object",
                       "bad_reference", "token"])
    if kind == "drop":
        del body[field]
    elif kind == "not_a_list":
        body[field] = rng.choice(NOT_A_LIST)
    elif kind == "element":
        row = rng.randrange(len(body[field]))
        body[field][row] = rng.choice(NOT_A_ROW if field.endswith("_ids") else NOT_A_STRING)
    elif kind == "ragged":
        if len(body[field]) > 1 and rng.random() < 0.5:
            body[field].pop()
        else:
            body[field].append(body[field][0])
    elif kind == "unknown":
        body[rng.choice(["reference", "response", "extra", "prompts_ids", ""])] = []
    elif kind == "both":
        other = _good_text(rng) if ids else _good_ids(rng, vocab)
        key = rng.choice(["prompts", "responses"] if ids else ["prompt_token_ids", "response_token_ids"])
        body[key] = other[key]
    elif kind == "not_an_object":
        return kind, rng.choice([[body], 7, "a string", None, True, []])
    elif kind == "bad_reference":
        body["references"][rng.randrange(len(body["references"]))] = rng.choice(
            ["", "seventy-two", "#### x", "1e5", "nan", "72 apples", "####"])
    elif kind == "token":
        if not ids:
            return "token", {**_good_ids(rng, vocab), "response_token_ids": [[_bad_token(rng, vocab)]],
                             "prompt_token_ids": [[1]], "references": ["1"]}
        name = rng.choice(["prompt_token_ids", "response_token_ids"])
        row = body[name][rng.randrange(len(body[name]))]
        row[rng.randrange(len(row))] = _bad_token(rng, vocab)
    return f"{kind}:{field}", body


def _stalled(rng: random.Random, json_ct: list[tuple[str, str]]) -> tuple[str, bytes]:
    """A request that stops before its headers end (the client keeps the connection open and waits)."""
    full = request(rng.choice(["POST", "GET"]), rng.choice(["/score", "/health"]), b"", json_ct)
    head = full[: full.index(b"\r\n")]
    which = rng.choice(["line", "line_only", "headers", "no_blank_line"])
    if which == "line":  # the request line itself is cut, anywhere
        return f"stall:{which}", head[: rng.randint(1, len(head))]
    if which == "line_only":
        return f"stall:{which}", head + b"\r\n"
    if which == "headers":  # cut inside a header line
        return f"stall:{which}", full[: rng.randint(len(head) + 3, len(full) - 5)]
    return f"stall:{which}", full[:-2]  # every header line, but never the blank line that ends them


def malformed_requests(seed: int, count: int, vocab: int, max_samples: int, auth: list[tuple[str, str]] | None = None,
                       stalls: bool = False) -> list[tuple[str, bytes, bool]]:
    """``count`` (label, raw request, half_close) cases from a seeded generator; ``stalls`` adds stalled requests
    (each waits out the server's read timeout: send them concurrently)."""
    rng = random.Random(seed)
    json_ct = [("Content-Type", "application/json"), *(auth or [])]
    good = json.dumps({"prompts": ["q"], "responses": ["#### 1"], "references": ["1"]}).encode()
    cases = []
    for _ in range(count):
        if stalls:
            kind = rng.choices(["body", "json_text", "http", "stall"], weights=[5, 2, 3, 0.5])[0]
        else:
            kind = rng.choices(["body", "json_text", "http"], weights=[5, 2, 3])[0]
        if kind == "stall":
            cases.append((*_stalled(rng, json_ct), False))
        elif kind == "body":
            label, body = _mutated_body(rng, vocab)
            cases.append((label, request("POST", "/score", json.dumps(body).encode(), json_ct), False))
        elif kind == "json_text":
            which = rng.choice(["truncated", "not_utf8", "utf16", "constant", "deep", "huge_int", "random_bytes",
                                "too_many"])
            if which == "truncated":
                text = json.dumps(_good_text(rng)).encode()
                data = text[: rng.randrange(len(text))]
            elif which == "not_utf8":
                text = bytearray(json.dumps(_good_text(rng)).encode())
                text.insert(rng.randrange(len(text)), rng.choice([0xFF, 0xFE, 0xC3, 0x80]))
                data = bytes(text)
            elif which == "utf16":
                data = json.dumps(_good_text(rng)).encode("utf-16")
            elif which == "constant":
                data = json.dumps(_good_text(rng)).replace('"q0"', rng.choice(["NaN", "Infinity", "-Infinity"]),
                                                           1).encode()
            elif which == "deep":
                depth = rng.choice([5000, 50000])
                data = ('{"prompts": ' + "[" * depth + "]" * depth + "}").encode()
            elif which == "huge_int":
                data = ('{"prompt_token_ids": [[' + "9" * rng.randint(5000, 20000) + ']], "response_token_ids": '
                        '[[1]], "references": ["1"]}').encode()
            elif which == "random_bytes":
                data = b"{" + rng.randbytes(rng.randint(1, 200))
            else:
                n = max_samples + rng.randint(1, 5)
                data = json.dumps({"prompts": ["q"] * n, "responses": ["1"] * n, "references": ["1"] * n}).encode()
            cases.append((f"json:{which}", request("POST", "/score", data, json_ct), False))
        else:
            which = rng.choice(["content_length", "two_lengths", "no_length", "chunked", "short_body",
                                "too_big", "content_type", "path", "method", "request_line", "version",
                                "many_headers", "long_header", "long_path", "get_path"])
            half_close = False
            if which == "content_length":
                value = rng.choice(["abc", "-1", "1.5", "0x10", "", " ", "1 2", "+5", "9" * 30, "\xb3", "1e3"])
                data = request("POST", "/score", good, json_ct, content_length=value)
            elif which == "two_lengths":
                data = request("POST", "/score", good, [*json_ct, ("Content-Length", str(len(good) + 3))])
            elif which == "no_length":
                data = request("POST", "/score", b"", json_ct, content_length=None)
            elif which == "chunked":
                data = request("POST", "/score", b"%x\r\n" % len(good) + good + b"\r\n0\r\n\r\n",
                               [*json_ct, ("Transfer-Encoding", "chunked")], content_length=None)
            elif which == "short_body":  # declared longer than sent, then the client closes its side
                data = request("POST", "/score", good[:5], json_ct, content_length=str(len(good)))
                half_close = True
            elif which == "too_big":
                data = request("POST", "/score", b"", json_ct, content_length=str(rng.choice([10**9, 10**17])))
            elif which == "content_type":
                ctype = rng.choice(["text/plain", "application/jsonx", "multipart/form-data", ""])
                data = request("POST", "/score", good, [("Content-Type", ctype), *(auth or [])])
            elif which == "path":
                data = request("POST", rng.choice(["/scores", "/", "/score/x", "/health"]), good, json_ct)
            elif which == "method":
                data = request(rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "FOO", "TRACE"]), "/score", good,
                               json_ct)
            elif which == "request_line":
                line = rng.choice(["garbage", "GET", "POST /score HTTP/1.1 extra", "GET  HTTP/1.1", "\x00\x01"])
                data = (line + "\r\nHost: x\r\n\r\n").encode("latin-1")
            elif which == "version":
                data = request("GET", "/health", version=rng.choice(["HTTP/1.x", "HTTP/1", "HTTP/0.9", "HTTQ/1.1",
                                                                     "HTTP/1.1.1"]), headers=auth)
            elif which == "many_headers":
                data = request("POST", "/score", good, [*json_ct, *[(f"X-{i}", "v") for i in range(120)]])
            elif which == "long_header":
                data = request("POST", "/score", good, [*json_ct, ("X-Long", "v" * 70000)])
            elif which == "long_path":
                data = request("GET", "/" + "a" * 70000, headers=auth)
            else:
                data = request("GET", rng.choice(["/nope", "/score", "/healthz", "/metrics/x"]), headers=auth)
            cases.append((f"http:{which}", data, half_close))
    return cases
