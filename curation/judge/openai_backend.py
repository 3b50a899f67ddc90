"""The OpenAI-compatible judge backend: one chat completions request per item (``vllm serve`` and alike).

``OpenAIScorer(base_url, model)`` POSTs each :class:`JudgeItem` to ``{base_url}/chat/completions`` as
ONE user message (text parts as ``text``, image parts as ``image_url`` data URLs), asking for a single
token with ``temperature=0``, ``logprobs=true`` and ``top_logprobs=N``, and reads the two labels from
``choices[0].logprobs.content[0].top_logprobs``. Log-probabilities normalised over the vocabulary
give the same margin as logits (see :mod:`curation.judge.scoring`).

Label tokens are found by their token string, exactly: the label as written, else the label after a
leading space (``" yes"`` or the byte-level BPE ``"Ġyes"``), the highest logprob among those variants
when no exact token is listed. Case is never folded: a ``"Yes"`` token is not ``"yes"``; the template's
``labels`` say which to read. When exactly one label is absent from the top list, its logprob is at
most the smallest one listed, and that bound is used (the margin then leans against the absent label,
never for it). When both are absent the item gets an error Score.

Requests run on a thread pool of ``concurrency`` workers. Connection errors, timeouts, HTTP 429 and
5xx are retried up to ``max_retries`` times with exponential backoff and jitter (``Retry-After`` is
honoured when the server sends one); other 4xx are not retried. ``timeout`` applies to each socket
operation of a request (connect, each read). Only the standard library is used (no torch, no
requests); PIL is imported only to re-encode images that are not already PNG or JPEG bytes.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from assay.curation.judge.scoring import JudgeItem, Score, checked_score

_RETRY_AFTER_MAX_S = 120.0  # a Retry-After longer than this is capped


def _image_bytes(value: Any, root: str | os.PathLike | None = None) -> tuple[bytes, str]:
    """(bytes, mime type) of an image cell: PIL, raw bytes, a path (relative under ``root``) or {bytes, path}.

    PNG and JPEG bytes are sent as they are; anything else is re-encoded as PNG with PIL.
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        value = path.read_bytes()
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            return data, "image/png"
        if data.startswith(b"\xff\xd8\xff"):
            return data, "image/jpeg"
    from PIL import Image

    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    if not isinstance(value, Image.Image):
        raise TypeError(f"cannot read an image from {type(value).__name__}")
    buf = io.BytesIO()
    value.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), "image/png"


def _image_url(value: Any, root: str | os.PathLike | None = None) -> str:
    if isinstance(value, str) and value.startswith("data:"):
        return value
    data, mime = _image_bytes(value, root)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _label_logprob(top: dict[str, float], label: str) -> float | None:
    """The label's logprob among ``top`` (token -> logprob): exact token, else a leading-space variant."""
    if label in top:
        return top[label]
    found = [top[t] for t in (" " + label, "Ġ" + label) if t in top]
    return max(found) if found else None


def margin_from_top_logprobs(top_logprobs: Any, labels: tuple[str, str]) -> Score:
    """A Score from one position's ``top_logprobs`` list ([{token, logprob}, ...]); see the module docstring."""
    if not isinstance(top_logprobs, list) or not top_logprobs:
        return Score(error="response has no top_logprobs")
    top: dict[str, float] = {}
    for entry in top_logprobs:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            return Score(error=f"malformed top_logprobs entry: {str(entry)[:200]}")
        lp = entry.get("logprob")
        if isinstance(lp, bool) or not isinstance(lp, (int, float)):
            return Score(error=f"malformed logprob in top_logprobs entry: {str(entry)[:200]}")
        # The same string may come from two token ids; keep the likelier.
        top[entry["token"]] = max(float(lp), top.get(entry["token"], -math.inf))
    yes, no = (_label_logprob(top, label) for label in labels)
    if yes is None and no is None:
        return Score(error="neither label in top_logprobs")
    floor = min(top.values())
    return checked_score(floor if yes is None else yes, floor if no is None else no)


class _Failure(Exception):
    """A request that failed for good (after retries or not retryable); the message is the Score's error."""


class OpenAIScorer:
    """A judge served behind an OpenAI-compatible chat completions endpoint (see the module docstring).

    ``base_url`` is the API root (``http://host:8000/v1``); ``model`` the served model name;
    ``api_key`` defaults to ``$OPENAI_API_KEY`` (sent as a bearer token, never logged or shown);
    ``extra_body`` is merged into every request's JSON (e.g. vLLM's own sampling parameters);
    ``image_root`` resolves relative image paths; ``sleep`` is injectable for tests.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        top_logprobs: int = 20,
        model_id: str | None = None,
        extra_body: dict[str, Any] | None = None,
        image_root: str | os.PathLike | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be at least 0, not {max_retries}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.top_logprobs = top_logprobs
        self.model_id = model_id or f"{model}@{self.base_url}"
        self.extra_body = dict(extra_body or {})
        self.image_root = image_root
        self._sleep = sleep
        self._random = random.Random()
        self._random_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIScorer(model_id={self.model_id!r}, concurrency={self.concurrency})"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def score(self, items: Sequence[JudgeItem]) -> list[Score]:
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(self._score_one, items))

    def request_body(self, item: JudgeItem) -> dict[str, Any]:
        """The chat completions JSON for one item."""
        content: list[dict[str, Any]] = []
        images = iter(item.images)
        for part in item.parts:
            if part.get("type") == "image":
                url = _image_url(next(images), self.image_root)
                content.append({"type": "image_url", "image_url": {"url": url}})
            elif part.get("type") == "text":
                content.append({"type": "text", "text": part["text"]})
            else:
                raise ValueError(f"unknown content part type {part.get('type')!r}")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        body.update(self.extra_body)
        return body

    def _score_one(self, item: JudgeItem) -> Score:
        try:
            body = self.request_body(item)
        except Exception as e:  # a broken image or part: this item only
            return Score(error=f"cannot build request: {type(e).__name__}: {e}")
        try:
            raw = self._post(json.dumps(body).encode("utf-8"))
        except _Failure as e:
            return Score(error=str(e))
        except Exception as e:  # never raise for one item
            return Score(error=f"request failed: {type(e).__name__}: {e}")
        try:
            response = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return Score(error=f"unparseable JSON response: {raw[:200]!r}")
        try:
            top = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            return Score(
                error=f"response lacks choices[0].logprobs.content[0].top_logprobs: {str(response)[:200]}"
            )
        return margin_from_top_logprobs(top, item.labels)

    def _post(self, data: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            retry_after: float | None = None
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    return resp.read()
            except urllib.error.HTTPError as e:
                text = _body_text(e)
                error = f"HTTP {e.code} from {self.url}: {text[:200]}"
                if e.code != 429 and e.code < 500:
                    raise _Failure(error) from None
                retry_after = _retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
            except TimeoutError:
                error = f"timed out after {self.timeout}s"
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, TimeoutError):
                    error = f"timed out after {self.timeout}s"
                else:
                    error = f"connection error: {reason}"
            except (OSError, http.client.HTTPException) as e:
                error = f"connection error: {type(e).__name__}: {e}"
            if attempt + 1 == attempts:
                raise _Failure(f"{error} (after {attempts} attempts)")
            self._sleep(retry_after if retry_after is not None else self._backoff_delay(attempt))
        raise AssertionError("unreachable")

    def _backoff_delay(self, attempt: int) -> float:
        with self._random_lock:
            jitter = 0.5 + self._random.random()
        return self.backoff * (2**attempt) * jitter


def _body_text(e: urllib.error.HTTPError) -> str:
    try:
        return e.read().decode("utf-8", "replace")
    except Exception:
        return ""
    finally:
        e.close()


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), capped; None when absent or bad."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), _RETRY_AFTER_MAX_S)
