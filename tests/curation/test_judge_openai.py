"""The OpenAI-compatible judge backend against a real local HTTP server speaking /v1/chat/completions.

The fake server reads directives from the prompt text (``key=value`` words): ``yes``/``no`` set the two
label logprobs (so margins are known exactly), ``id`` names an item for counting attempts, ``fail=CODE:N``
fails the first N attempts with CODE, ``sleep``/``hold`` delay the answer, ``drop`` leaves labels out of
top_logprobs, ``yes_token`` renames the yes token, ``badjson``/``noshape`` break the response, and
``image=WxH`` makes it check that every image is a PNG data URL of that size.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from assay.curation.judge.openai_backend import OpenAIScorer, margin_from_top_logprobs
from assay.curation.judge.scoring import JudgeItem, Scorer, p_yes_from_margin


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.attempts: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _done(self) -> None:
        """The request stops counting as in flight before its answer goes out: a client that
        bounds its concurrency may send the next request the moment it reads this answer."""
        if getattr(self, "_counted", False):
            self._counted = False
            with self.server.state.lock:  # type: ignore[attr-defined]
                self.server.state.in_flight -= 1  # type: ignore[attr-defined]

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self._done()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout test)
            pass

    def do_POST(self):
        state: _State = self.server.state  # type: ignore[attr-defined]
        if self.path != "/v1/chat/completions":
            return self._send(404, b'{"error": "not found"}')
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state.lock:
            state.requests.append(body)
            state.headers.append(dict(self.headers))
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        self._counted = True
        try:
            self._answer(state, body)
        finally:
            self._done()

    def _answer(self, state: _State, body: dict) -> None:
        content = body["messages"][0]["content"]
        text = " ".join(p["text"] for p in content if p["type"] == "text")
        d = dict(word.split("=", 1) for word in text.split() if "=" in word)
        with state.lock:
            attempt = state.attempts[d.get("id", text)] = state.attempts.get(d.get("id", text), 0) + 1
        if "hold" in d:
            time.sleep(float(d["hold"]))
        if "sleep" in d:
            state.stop.wait(float(d["sleep"]))
        if "fail" in d:
            code, times = (int(x) for x in d["fail"].split(":"))
            if attempt <= times:
                headers = {"Retry-After": d["retry_after"]} if "retry_after" in d else {}
                return self._send(code, b'{"error": "nope %d"}' % code, headers)
        if "image" in d:
            want = tuple(int(x) for x in d["image"].split("x"))
            for part in (p for p in content if p["type"] == "image_url"):
                prefix, _, b64 = part["image_url"]["url"].partition(",")
                im = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
                if prefix != "data:image/png;base64" or im.format != "PNG" or im.size != want:
                    return self._send(400, f"bad image {prefix} {im.format} {im.size}".encode())
        if "badjson" in d:
            return self._send(200, b'{"choices": [not json')
        if "noshape" in d:
            return self._send(200, b'{"choices": []}')
        labels = {d.get("yes_token", "yes"): float(d.get("yes", -1.0)), "no": float(d.get("no", -1.0))}
        drop = d.get("drop", "")
        if drop in ("yes", "both"):
            labels.pop(d.get("yes_token", "yes"))
        if drop in ("no", "both"):
            labels.pop("no")
        top = [{"token": t, "logprob": lp} for t, lp in {**labels, "maybe": -5.0, "the": -6.5}.items()]
        top.sort(key=lambda e: -e["logprob"])
        top = top[: body["top_logprobs"]]
        response = {
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": top[0]["token"]},
                    "logprobs": {
                        "content": [
                            {"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}
                        ]
                    },
                    "finish_reason": "length",
                }
            ],
        }
        self._send(200, json.dumps(response).encode())


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = _State()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"  # type: ignore[attr-defined]
    try:
        yield httpd
    finally:
        httpd.state.stop.set()  # type: ignore[attr-defined]
        httpd.shutdown()
        httpd.server_close()


def _item(text: str, images=(), labels=("yes", "no")) -> JudgeItem:
    parts = [{"type": "text", "text": text}] + [{"type": "image"} for _ in images]
    return JudgeItem(parts=parts, images=list(images), labels=labels)


def _scorer(server, sleeps: list[float] | None = None, **kw) -> OpenAIScorer:
    kw.setdefault("timeout", 5.0)
    return OpenAIScorer(server.url, "judge-model", sleep=(sleeps if sleeps is not None else []).append, **kw)


def test_margin_p_yes_and_request_shape(server):
    scorer = _scorer(server, top_logprobs=5, extra_body={"top_k": 1})
    assert isinstance(scorer, Scorer)
    assert scorer.model_id == f"judge-model@{server.url}"
    scores = scorer.score([_item("yes=-0.25 no=-1.75"), _item("yes=-3.0 no=-0.5")])
    assert [s.ok for s in scores] == [True, True]
    assert scores[0].margin == pytest.approx(1.5, abs=1e-12)
    assert scores[0].p_yes == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert scores[1].margin == pytest.approx(-2.5, abs=1e-12) and scores[1].p_yes < 0.5
    body = server.state.requests[0]
    assert body["model"] == "judge-model" and body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["top_k"] == 1
    assert body["messages"][0]["role"] == "user" and len(body["messages"]) == 1
    assert scorer.score([]) == []


def test_order_is_kept(server):
    margins = [i / 4 - 2 for i in range(12)]
    scores = _scorer(server, concurrency=3).score([_item(f"yes={m} no=0") for m in margins])
    assert [s.margin for s in scores] == pytest.approx(margins)


def test_images_are_sent_as_png_data_urls(server, tmp_path):
    im = Image.new("RGB", (7, 5), (200, 10, 10))
    png, bmp = io.BytesIO(), io.BytesIO()
    im.save(png, format="PNG")
    im.save(bmp, format="BMP")
    (tmp_path / "a.png").write_bytes(png.getvalue())
    images = [im, png.getvalue(), bmp.getvalue(), "a.png", {"bytes": None, "path": str(tmp_path / "a.png")}]
    item = JudgeItem(
        parts=[{"type": "text", "text": "image=7x5 yes=0 no=-1"}]
        + [{"type": "image"}, {"type": "text", "text": "and"}] * len(images),
        images=images,
    )
    broken = _item("yes=0 no=-1", images=[b"not an image"])
    scores = _scorer(server, image_root=tmp_path).score([item, broken])
    assert scores[0].ok, scores[0].error
    assert scores[0].margin == pytest.approx(1.0)
    content = server.state.requests[0]["messages"][0]["content"]
    assert [p["type"] for p in content] == ["text"] + ["image_url", "text"] * len(images)
    assert not scores[1].ok and "cannot build request" in scores[1].error
    assert len(server.state.requests) == 1  # the broken item never reached the server


def test_concurrency_is_bounded(server):
    scores = _scorer(server, concurrency=4).score([_item(f"id={i} hold=0.1 yes=0 no=0") for i in range(20)])
    assert all(s.ok for s in scores)
    assert 1 < server.state.max_in_flight <= 4


def test_retries_503_with_backoff_then_succeeds(server):
    sleeps: list[float] = []
    scores = _scorer(server, sleeps, backoff=1.0).score([_item("id=a fail=503:2 yes=-1 no=-2")])
    assert scores[0].ok and scores[0].margin == pytest.approx(1.0)
    assert server.state.attempts["a"] == 3
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.5 and 1.0 <= sleeps[1] <= 3.0


def test_429_honours_retry_after(server):
    sleeps: list[float] = []
    scores = _scorer(server, sleeps).score([_item("id=a fail=429:1 retry_after=7 yes=-1 no=-2")])
    assert scores[0].ok and server.state.attempts["a"] == 2 and sleeps == [7.0]


def test_gives_up_after_max_retries(server):
    sleeps: list[float] = []
    scores = _scorer(server, sleeps, max_retries=2).score([_item("id=a fail=500:99")])
    assert not scores[0].ok and "HTTP 500" in scores[0].error and "nope 500" in scores[0].error
    assert "after 3 attempts" in scores[0].error
    assert server.state.attempts["a"] == 3 and len(sleeps) == 2


def test_no_retry_on_400(server):
    sleeps: list[float] = []
    scores = _scorer(server, sleeps).score([_item("id=a fail=400:99"), _item("id=b yes=0 no=-1")])
    assert not scores[0].ok and "HTTP 400" in scores[0].error and "nope 400" in scores[0].error
    assert scores[1].ok
    assert server.state.attempts["a"] == 1 and sleeps == []


def test_timeout_is_an_error_and_the_run_goes_on(server):
    sleeps: list[float] = []
    items = [_item("id=slow sleep=3 yes=0 no=0")] + [_item(f"id={i} yes=0 no=-1") for i in range(4)]
    start = time.monotonic()
    scores = _scorer(server, sleeps, timeout=0.3, max_retries=1, concurrency=2).score(items)
    assert time.monotonic() - start < 2.5
    assert not scores[0].ok and "timed out" in scores[0].error
    assert server.state.attempts["slow"] == 2 and len(sleeps) == 1  # a timeout is retried
    assert all(s.ok and s.margin == pytest.approx(1.0) for s in scores[1:])


def test_connection_refused_is_an_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    scorer = OpenAIScorer(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, sleep=sleeps.append)
    scores = scorer.score([_item("yes=0 no=0")])
    assert not scores[0].ok and "connection error" in scores[0].error and len(sleeps) == 2


def test_one_missing_label_is_bounded_by_the_smallest_logprob(server):
    scores = _scorer(server).score([_item("yes=-0.5 no=-1 drop=no"), _item("yes=-0.5 no=-1 drop=yes")])
    assert scores[0].margin == pytest.approx(-0.5 - -6.5)  # no <= -6.5, the smallest shown
    assert scores[1].margin == pytest.approx(-6.5 - -1.0)


def test_both_labels_missing_is_an_error(server):
    scores = _scorer(server).score([_item("drop=both")])
    assert scores[0].error == "neither label in top_logprobs"


def test_malformed_responses_are_errors(server):
    scores = _scorer(server).score([_item("badjson=1"), _item("noshape=1"), _item("yes=0 no=-2")])
    assert not scores[0].ok and "unparseable JSON" in scores[0].error and "not json" in scores[0].error
    assert not scores[1].ok and "top_logprobs" in scores[1].error
    assert scores[2].margin == pytest.approx(2.0)


def test_label_tokens_are_exact_with_leading_space_variants(server):
    scores = _scorer(server).score(
        [
            _item("yes_token=Ġyes yes=-0.5 no=-1"),
            _item("yes_token=_yes yes=-0.5 no=-1"),
            _item("yes_token=Yes yes=-0.5 no=-1"),
        ]
    )
    assert scores[0].margin == pytest.approx(0.5)  # "Ġyes" counts as "yes"
    assert scores[1].margin == pytest.approx(-6.5 - -1.0)  # "_yes" is not a variant: bounded
    assert scores[2].margin == pytest.approx(-6.5 - -1.0)  # no case folding: "Yes" is not "yes"
    top = [
        {"token": "yes", "logprob": -2.0},
        {"token": " yes", "logprob": -0.1},
        {"token": "no", "logprob": -1.0},
    ]
    assert margin_from_top_logprobs(top, ("yes", "no")).margin == pytest.approx(-1.0)  # exact token first
    top = [{"token": " Yes", "logprob": -0.1}, {"token": " No", "logprob": -0.6}]
    assert margin_from_top_logprobs(top, ("Yes", "No")).p_yes == pytest.approx(p_yes_from_margin(0.5))


def test_api_key_is_sent_and_not_shown(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    scorer = _scorer(server)
    assert scorer.score([_item("yes=0 no=0")])[0].ok
    assert server.state.headers[0]["Authorization"] == "Bearer sk-secret"
    assert "sk-secret" not in repr(scorer)
    monkeypatch.delenv("OPENAI_API_KEY")
    assert _scorer(server).score([_item("yes=0 no=0")])[0].ok
    assert "Authorization" not in server.state.headers[1]
