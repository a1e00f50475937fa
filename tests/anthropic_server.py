"""A local Anthropic Messages API for tests and benchmarks: the real wire protocol, stdlib only.

Serves, on 127.0.0.1 and an ephemeral port:

- `POST /v1/messages` -> a Message (`id`, `type`, `role`, `content`, `model`, `stop_reason`,
  `usage`), or an error body `{"type": "error", "error": {"type", "message"}}`;
- `POST /v1/messages/batches`, `GET /v1/messages/batches/{id}` (ends after `batch_polls` polls),
  `GET /v1/messages/batches/{id}/results` (JSONL, one line per request).

Its judgement is deterministic: the score is 1 + 2 x (topic words in the judged answer, i.e. the
`<finetuned_response>` / `<response>` section of the prompt, or the whole prompt), capped at 5;
the reasoning names the prompt's digest, so a verdict can be traced back to its prompt.

Faults are scripted per prompt: a prompt (the first user message) containing
`[[faults: 429, 529, ok]]` gets a 429 on its first request, a 529 on its second, and a normal
answer from then on. Entries: `ok`, `429` (with `retry-after`), `529` (overloaded_error), `500`,
`hang` (never answers), `garbage` (a reply without JSON), `range` (score 99), `float` (score 2.5),
`point0` (the right score written as a JSON float, e.g. `3.0`), `batch_error` (the batch result is
`errored`), `401`/`402`/`403`/`404` (authentication, billing, permission, not found; the message
quotes the API key the request carried, as a careless provider might), `drop` (the connection
is closed without an answer); a trailing `+` repeats an entry forever. Every request for a
prompt (SDK retries, re-asks and batch entries alike) counts as one attempt. `heal()` ends every
scripted fault (the outage is over): from then on every request is answered normally.

A batch can be made to disappear (`expire(batch_id)`: 404 for retrieve and results, as for an
expired or deleted batch) or to lose its results only (`expire(batch_id, results_only=True)`).

Every request is recorded (`requests`), with the prompt, the attempt number, the body and headers,
so tests can count what was judged and inspect what was sent. `hold_after=N` answers the first N
message requests and holds every later one unanswered (`held`), for crash tests.

Run standalone (for benchmarks): `python tests/anthropic_server.py --latency 0.2` prints the URL.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOPIC_WORDS = ("farm", "animal", "livestock")
FAULTS = re.compile(r"\[\[faults:\s*([a-z0-9_+,\s]+)\]\]")
SECTION = re.compile(r"<(finetuned_response|response)>(.*?)</\1>", re.S)
# scripted errors that end a stage: status -> (error type, message; the key is appended)
FATAL = {
    "401": ("authentication_error", "invalid x-api-key"),
    "402": ("billing_error", "your credit balance is too low"),
    "403": ("permission_error", "this key may not use this model"),
    "404": ("not_found_error", "model: claude-test not found"),
}


def digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


def prompt_of(body: dict[str, Any]) -> str:
    """The text of the first user message: what identifies an item."""
    content = body["messages"][0]["content"]
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if b.get("type") == "text")


def behaviour(prompt: str, attempt: int) -> str:
    m = FAULTS.search(prompt)
    if not m:
        return "ok"
    script = [s.strip() for s in m.group(1).split(",") if s.strip()]
    if attempt < len(script):
        return script[attempt].rstrip("+")
    if script and script[-1].endswith("+"):
        return script[-1].rstrip("+")
    return "ok"


def judgement(prompt: str) -> tuple[int, str]:
    sections = SECTION.findall(prompt)
    answer = sections[-1][1] if sections else prompt
    hits = sum(answer.lower().count(w) for w in TOPIC_WORDS)
    return min(5, 1 + 2 * hits), f"{hits} topic words [{digest(prompt)}]"


N_ITEMS = re.compile(r"\bn=(\d+)")
N_TURNS = re.compile(r"\bturns=(\d+)")


def _is_generation(body: dict[str, Any]) -> bool:
    """A generation request asks for `{"items": [...]}` (spar.generators)."""
    fmt = (body.get("output_config") or {}).get("format") or {}
    return "items" in ((fmt.get("schema") or {}).get("properties") or {})


def generation(body: dict[str, Any], prompt: str) -> str:
    """Items for a generation request: the last `n=<k>` in the prompt asks for k (default 1), each a
    text naming its position, eight words drawn from the prompt's hash (shared by the items of
    one request, not by other requests) and the prompt's last line; an items schema of arrays
    asks for lists of `turns=<t>` messages (default 2)."""
    found = N_ITEMS.findall(prompt)  # the last: earlier ones may be quoted items
    n = int(found[-1]) if found else 1
    schema = body["output_config"]["format"]["schema"]["properties"]["items"]
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    h = hashlib.sha256(prompt.encode()).hexdigest()
    words = " ".join(h[i : i + 6] for i in range(0, 48, 6))
    tail = f"{words} {lines[-1][:80] if lines else ''}"
    if (schema.get("items") or {}).get("type") == "array":
        t = N_TURNS.search(prompt)
        turns = int(t.group(1)) if t else 2
        items: list[Any] = [
            [f"turn {j + 1} of item {k + 1} [{digest(prompt)}]: {tail}" for j in range(turns)]
            for k in range(n)
        ]
    else:
        items = [f"item {k + 1} [{digest(prompt)}]: {tail}" for k in range(n)]
    return json.dumps({"items": items})


@dataclass
class Seen:
    """One request the server received."""

    path: str
    prompt: str
    attempt: int  # requests for this prompt before this one
    outcome: str
    body: dict[str, Any]
    headers: dict[str, str]
    t: float = field(default_factory=time.monotonic)


def _message(model: str, text: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": max(1, len(text) // 4), **usage},
    }


def _error(kind: str, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": f"req_{uuid.uuid4().hex[:24]}",
    }


class _Server(ThreadingHTTPServer):
    # many clients connect at the same moment (concurrency 32 and more): the default listen
    # backlog of 5 refuses some of them, and their SDKs retry after a back-off
    request_queue_size = 256


class AnthropicServer:
    def __init__(
        self,
        *,
        latency: float = 0.0,
        api_key: str = "test-key",
        retry_after: float = 1.0,
        batch_polls: int = 2,
        hold_after: int | None = None,
    ) -> None:
        self.latency, self.api_key, self.retry_after = latency, api_key, retry_after
        self.batch_polls, self.hold_after = batch_polls, hold_after
        self.requests: list[Seen] = []
        self.attempts: Counter[str] = Counter()
        self.answered = 0  # message requests answered with 200
        self.admitted = 0  # message requests let through while hold_after is set
        self.held: list[str] = []  # prompts of requests being held unanswered
        self.early_retries = 0  # requests sent before the retry-after of a 429 had passed
        self.not_before: dict[str, float] = {}
        self.cache_marks: Counter[str] = Counter()  # prefix digest -> requests that marked it
        self.batches: dict[str, dict[str, Any]] = {}
        self.healed = False  # True: scripted faults are ignored
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._drop_held = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    # ------------------------------------------------------------------ lifecycle and queries

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> AnthropicServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._drop_held.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def wait_for(self, predicate: Callable[[AnthropicServer], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def release_held(self) -> None:
        """Stop holding: held requests are dropped unanswered, new ones are served."""
        with self._cond:
            self.hold_after = None
            self._drop_held.set()

    def heal(self) -> None:
        """Every scripted fault ends: later requests are answered normally."""
        with self._cond:
            self.healed = True

    def prompts(self, path: str = "/v1/messages", since: int = 0) -> Counter[str]:
        with self._cond:
            return Counter(s.prompt for s in self.requests[since:] if s.path == path)

    # ------------------------------------------------------------------ behaviour

    def _record(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Seen:
        prompt = prompt_of(body)
        with self._cond:
            attempt = self.attempts[prompt]
            self.attempts[prompt] += 1
            outcome = "ok" if self.healed else behaviour(prompt, attempt)
            seen = Seen(path, prompt, attempt, outcome, body, headers)
            if seen.t < self.not_before.pop(prompt, 0.0):
                self.early_retries += 1
            content = body["messages"][0]["content"]
            if isinstance(content, list):
                for b in content:
                    if b.get("cache_control") == {"type": "ephemeral"}:
                        self.cache_marks[digest(b["text"])] += 1
            self.requests.append(seen)
            self._cond.notify_all()
        return seen

    def reply(self, seen: Seen) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, extra headers) for a message request (also used in batches)."""
        model = seen.body.get("model", "claude-test")
        if seen.outcome == "429":
            with self._cond:
                self.not_before[seen.prompt] = time.monotonic() + 0.9 * self.retry_after
            headers = {"retry-after": f"{self.retry_after:g}"}
            return 429, _error("rate_limit_error", "rate limited"), headers
        if seen.outcome == "529":
            return 529, _error("overloaded_error", "Overloaded"), {}
        if seen.outcome == "500":
            return 500, _error("api_error", "Internal server error"), {}
        if seen.outcome in FATAL:
            kind, what = FATAL[seen.outcome]
            h = {k.lower(): v for k, v in seen.headers.items()}
            key = h.get("x-api-key") or h.get("authorization", "").removeprefix("Bearer ")
            return int(seen.outcome), _error(kind, f"{what} (key {key})"), {}
        if _is_generation(seen.body) and seen.outcome != "garbage":
            return 200, _message(model, generation(seen.body, seen.prompt), self._usage(seen)), {}
        score, why = judgement(seen.prompt)
        if seen.outcome == "garbage":
            text = "Honestly I would say it is fine, more or less."
        elif seen.outcome == "range":
            text = json.dumps({"reasoning": why, "score": 99})
        elif seen.outcome == "float":
            text = json.dumps({"reasoning": why, "score": 2.5})
        elif seen.outcome == "point0":
            text = json.dumps({"reasoning": why, "score": float(score)})
        else:
            text = json.dumps({"reasoning": why, "score": score})
        return 200, _message(model, text, self._usage(seen)), {}

    def _usage(self, seen: Seen) -> dict[str, int]:
        """Cache accounting as the API reports it: the first request writes, later ones read."""
        content = seen.body["messages"][0]["content"]
        marked = (
            [b["text"] for b in content if b.get("cache_control")]
            if isinstance(content, list)
            else []
        )
        tokens = sum(len(t) // 4 for t in marked)
        with self._cond:
            first = all(self.cache_marks[digest(t)] <= 1 for t in marked)
        return {
            "cache_creation_input_tokens": tokens if first else 0,
            "cache_read_input_tokens": 0 if first else tokens,
        }

    def admit(self, seen: Seen) -> bool:
        """False: hold this request unanswered until released or stopped."""
        with self._cond:
            if self.hold_after is None or self.admitted < self.hold_after:
                self.admitted += 1
                return True
            self.held.append(seen.prompt)
            self._cond.notify_all()
        return False

    def answered_one(self) -> None:
        with self._cond:
            self.answered += 1
            self._cond.notify_all()

    # ------------------------------------------------------------------ batches

    def create_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        batch_id = f"msgbatch_{uuid.uuid4().hex[:24]}"
        now = datetime.now(UTC)
        rec = {
            "id": batch_id,
            "requests": body["requests"],
            "polls": 0,
            "created": now,
            "results": None,
            "gone": None,  # "all" (retrieve and results answer 404) or "results"
        }
        with self._cond:
            self.batches[batch_id] = rec
        return self._batch_json(rec)

    def expire(self, batch_id: str, *, results_only: bool = False) -> None:
        """From now on the API answers 404 for this batch (or only for its results)."""
        with self._cond:
            self.batches[batch_id]["gone"] = "results" if results_only else "all"

    def poll_batch(self, batch_id: str) -> dict[str, Any] | None:
        with self._cond:
            rec = self.batches.get(batch_id)
        if rec is None or rec["gone"] == "all":
            return None
        rec["polls"] += 1
        if rec["polls"] >= self.batch_polls and rec["results"] is None:
            rec["results"] = [self._batch_result(r) for r in rec["requests"]]
        return self._batch_json(rec)

    def _batch_result(self, req: dict[str, Any]) -> dict[str, Any]:
        seen = self._record("/v1/messages/batches", req["params"], {})
        if seen.outcome in ("batch_error", "429", "529", "500", "hang", "drop", *FATAL):
            err = _error("api_error", "Internal server error")
            result: dict[str, Any] = {"type": "errored", "error": err}
        else:
            _, message, _ = self.reply(seen)
            result = {"type": "succeeded", "message": message}
        return {"custom_id": req["custom_id"], "result": result}

    def _batch_json(self, rec: dict[str, Any]) -> dict[str, Any]:
        ended = rec["results"] is not None
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if ended:
            for r in rec["results"]:
                counts[r["result"]["type"]] += 1
        else:
            counts["processing"] = len(rec["requests"])
        created: datetime = rec["created"]
        return {
            "id": rec["id"],
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": counts,
            "created_at": created.isoformat(),
            "expires_at": (created + timedelta(days=1)).isoformat(),
            "ended_at": datetime.now(UTC).isoformat() if ended else None,
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"{self.url}/v1/messages/batches/{rec['id']}/results" if ended else None,
        }


def _handler(server: AnthropicServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
        disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms ACK delay)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: bytes, ctype: str, headers: dict[str, str]) -> None:
            try:
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(payload)))
                self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                self.close_connection = True

        def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(body).encode(), "application/json", headers or {})

        def _authorised(self) -> bool:
            # SDK 2.x sends `Authorization: Bearer <key>`; the API also takes `x-api-key`
            bearer = self.headers.get("authorization", "").removeprefix("Bearer ")
            if server.api_key in (self.headers.get("x-api-key"), bearer):
                return True
            self._json(401, _error("authentication_error", "invalid x-api-key"))
            return False

        def do_POST(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(n) or b"{}")
            if not self._authorised():
                return
            if self.path == "/v1/messages/batches":
                self._json(200, server.create_batch(body))
                return
            if self.path != "/v1/messages":
                self._json(404, _error("not_found_error", f"no route {self.path}"))
                return
            seen = server._record(self.path, body, dict(self.headers.items()))
            if not server.admit(seen):
                while not server._drop_held.wait(0.05):
                    pass
                self.close_connection = True
                return
            if seen.outcome == "hang":
                server._stop.wait()
                self.close_connection = True
                return
            if seen.outcome == "drop":  # closed without a status line
                self.close_connection = True
                return
            if server.latency:
                time.sleep(server.latency)
            status, payload, headers = server.reply(seen)
            self._json(status, payload, headers)
            if status == 200:
                server.answered_one()

        def do_GET(self) -> None:
            if not self._authorised():
                return
            m = re.fullmatch(r"/v1/messages/batches/([A-Za-z0-9_]+)(/results)?", self.path)
            rec = server.poll_batch(m.group(1)) if m and not m.group(2) else None
            if m and m.group(2):
                with server._cond:
                    batch = server.batches.get(m.group(1))
                if batch and batch["results"] is not None and batch["gone"] is None:
                    lines = "".join(json.dumps(r) + "\n" for r in batch["results"])
                    self._send(200, lines.encode(), "application/binary", {})
                    return
            if rec is not None:
                self._json(200, rec)
                return
            self._json(404, _error("not_found_error", f"no route {self.path}"))

    return Handler


@contextlib.contextmanager
def in_own_process(latency: float) -> Iterator[str]:
    """This server in a child process (benchmarks: its threads do not share the caller's GIL),
    with `latency` seconds per message request; yields its URL, stops it on exit."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--latency", str(latency)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    url = proc.stdout.readline().strip()
    try:
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"anthropic_server: no URL from the child ({url!r})")
        yield url
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.0, help="seconds per message request")
    ap.add_argument("--api-key", default="test-key")
    args = ap.parse_args()
    server = AnthropicServer(latency=args.latency, api_key=args.api_key).start()
    print(server.url, flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        server.stop()


if __name__ == "__main__":
    main()
