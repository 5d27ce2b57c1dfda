"""The frozen cloud model pi_c and its persistent answer cache (SPEC.md section 1; DESIGN.md cloud.py).

The cloud sees the prompt x alone (task.cloud_messages) and is treated as deterministic: each
prompt reaches it at most once, across a whole run including crash and resume, because every
answer is appended (flushed and fsynced) to a JSONL cache and served from there afterwards,
also to other processes sharing the file (CloudCache).

Backends share one small interface, `complete(task, examples) -> list[str]`; a backend may put
an exception in place of a text to report that this one prompt failed (never cached, retried on
the next run); one may also offer `complete_each(task, examples, receive)`, calling
receive(index, text or its CloudError) in the calling thread as each answer arrives, so that
Cloud.ask caches it at once (HttpBackend does). Backends:
OracleBackend (a simulation, for synthetic tasks), HttpBackend (OpenAI-compatible
/v1/chat/completions on urllib), LocalBackend (a larger local checkpoint).
A new backend: a class with that method, registered in BACKENDS; its `name` (default: the
registry key) and `model_name` are stored with each cached answer, and a cache holding answers
from another name or model_name is refused, so model_name must change whenever the answers would.

CLI: python cloud.py --task tiny_countdown --split train --backend oracle
     --cache runs/NAME/cloud_cache.jsonl   (the file the run NAME reads)
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import queue
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

try:
    import fcntl  # Linux / macOS: file locks between processes sharing a cache file
except ImportError:  # Windows: no locking (see CloudCache)
    fcntl = None

from tasks import TASKS, Task, construct


class CloudError(RuntimeError):
    """A cloud request failed. Messages never contain the API key."""


class CloudBatchError(CloudError):
    """No request can succeed until this is fixed, so the whole batch stops: the key or the
    account (CloudAuthError), or a server never reached through every retry (refused, unknown
    host: base_url or the server is wrong, not a passing glitch).
    answers: set by HttpBackend.complete to what did arrive, one entry per prompt (a text, a
    CloudError, or None where no answer came), so that Cloud.ask can still cache those texts."""
    answers: list | None = None


class CloudAuthError(CloudBatchError):
    """401/403 (the key refused) or 402 / 429 insufficient_quota (the account cannot pay)."""


# ----------------------------------------------------------------------------------------------
# The cache

RECORD_FIELDS = {"task": str, "key": str, "prompt_sha256": str, "answer": str, "verdict": bool,
                 "backend": str, "model": str}
LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")  # half a UTF-16 pair (Cloud._record)


def prompt_digest(messages) -> str:
    """sha256 of the exact messages sent to the cloud, stored to catch a cache reused across
    a changed prompt template."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def check_appendable(path) -> None:
    """A ValueError now, before long work, if the cache file `path` cannot be appended to, or,
    not there yet, cannot be made (the first new answer would fail to be cached)."""
    if not os.path.exists(path):
        from model import check_writable  # lazy, as below
        check_writable(os.path.dirname(os.path.abspath(path)), "cloud cache directory")
        return
    try:
        open(path, "ab").close()
    except OSError as e:
        raise ValueError(f"cloud cache {path} cannot be appended to ({e.strerror}): make it "
                         f"writable, then run the same command again") from None


class CloudCache:
    """Persistent JSONL cache, one record per (task name, example key): the cloud's answer text,
    its verdict, the backend and the model name (never a secret). path=None: in memory only.

    Kill safety: each append is one write of whole lines, flushed and fsynced. A torn or corrupt
    LAST line (a crash mid-write) is ignored on reading and cut off by the next append; a
    corrupt earlier line is an error naming it.

    Several processes may share one file (train.py, eval.py and `python cloud.py` can all write
    runs/NAME/cloud_cache.jsonl): appends use O_APPEND under an exclusive flock, and under that
    lock the writer first reads what others appended since it last looked, so it never
    duplicates their keys and repairs a torn end only if the file still has one. refresh()
    (Cloud.ask calls it before deciding what to send) takes in other processes' answers too.
    Two processes asking the same new prompt at the same moment may both send it; the file
    keeps the first answer. Without fcntl (Windows) there is no locking between processes."""

    def __init__(self, path=None):
        self.path = Path(path) if path is not None else None
        self.records: dict[tuple[str, str], dict] = {}
        self._size = 0         # bytes of the file read so far: always just past a whole line
        self._line_count = 0   # lines in those bytes, for error messages
        self._file_id = None   # (device, inode) of the file those bytes were read from
        self._lock = threading.Lock()
        self.ignored_torn_line = False
        if self.path is not None and self.path.exists():
            with self._locked_file("rb") as f:
                _, self.ignored_torn_line = self._read_new(f)

    @contextmanager
    def _locked_file(self, mode: str, exclusive: bool = False):
        """The cache file, open in `mode` and flock-ed (shared, or exclusive) until closed."""
        with open(self.path, mode) as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield f

    def _read_new(self, f) -> tuple[bytes, bool]:
        """Take in the records appended (by anyone) since byte self._size, and move _size past
        the last whole line. Call with the file locked. Returns (the bytes left after _size,
        torn): b"" when the file ends in a newline; else a torn (partial or corrupt) last line,
        torn=True, or a whole record that lost its newline (taken in; torn=False)."""
        stat = os.fstat(f.fileno())
        end, file_id = stat.st_size, (stat.st_dev, stat.st_ino)
        if file_id != self._file_id or end < self._size:
            # a new file (deleted or replaced while in use) or a shorter one: read it from the
            # start; answers already taken in stay in memory, first answer winning as always
            self._size = self._line_count = 0
            self._file_id = file_id
        f.seek(self._size)
        data = f.read(end - self._size)
        lines = data.split(b"\n")
        consumed = 0
        for i, raw in enumerate(lines[:-1]):  # whole lines; lines[-1] lacks its "\n" (often b"")
            record, problem = self._parse(raw)
            if problem is not None:
                if b"".join(lines[i + 1:]).strip():
                    raise ValueError(f"{self.path}:{self._line_count + 1}: corrupt cloud cache record ({problem}); "
                                     f"only a torn last line is repaired automatically")
                return data[consumed:], True  # a corrupt last line, newline and all
            self._take(record)
            consumed += len(raw) + 1
            self._size += len(raw) + 1
            self._line_count += 1
        tail = data[consumed:]
        record, problem = self._parse(tail)
        self._take(record)
        return tail, problem is not None

    def _take(self, record: dict | None) -> None:
        """Hold a record read from the file (None: a blank line); a key's first answer wins."""
        if record is not None:
            self.records.setdefault((record["task"], record["key"]), record)

    @staticmethod
    def _parse(raw: bytes) -> tuple[dict | None, str | None]:
        """(record, None) for a good line, (None, None) for a blank one, else (None, the problem)."""
        if not raw.strip():
            return None, None
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return None, f"not valid JSON ({e})"
        problem = CloudCache._record_problem(record)
        return (None, problem) if problem else (record, None)

    @staticmethod
    def _record_problem(record) -> str | None:
        if not isinstance(record, dict):
            return "not a JSON object"
        for name, kind in RECORD_FIELDS.items():
            if not isinstance(record.get(name), kind):
                return f"field {name!r} missing or not a {kind.__name__}"
        return None

    def __len__(self):
        return len(self.records)

    def get(self, task_name: str, key: str) -> dict | None:
        return self.records.get((task_name, key))

    def refresh(self) -> None:
        """Take in the records other processes appended since this cache last read the file."""
        if self.path is None:
            return
        with self._lock:
            if self.path.exists():
                with self._locked_file("rb") as f:
                    self._read_new(f)

    def put(self, task_name: str, key: str, answer: str, verdict: bool, backend: str, model: str,
            prompt_sha256: str = "") -> None:
        self.put_many([{"task": task_name, "key": key, "prompt_sha256": prompt_sha256, "answer": answer,
                        "verdict": bool(verdict), "backend": backend, "model": model}])

    def put_many(self, records: list[dict]) -> None:
        """Append records (one write, one fsync). A key already cached, by this process or by
        another one, keeps its first answer."""
        for record in records:
            problem = self._record_problem(record)
            if problem is not None:
                raise ValueError(f"bad cloud cache record: {problem}")
        with self._lock:
            if self.path is None:
                for r in self._fresh(records):
                    self.records[(r["task"], r["key"])] = r
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._append(records)
            except OSError as e:  # e.g. a full disk: a failed write() names no file; say which
                from model import reraise_naming  # lazy, as below: only this error path
                reraise_naming(e, self.path)

    def _append(self, records: list[dict]) -> None:
        with self._locked_file("a+b", exclusive=True) as f:  # O_APPEND
            tail, torn = self._read_new(f)  # others' records first: never write a key twice
            fresh = self._fresh(records)
            if not fresh:
                return
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh).encode("utf-8")
            if torn:      # checked under the lock: cut exactly the torn bytes after the last good line
                f.truncate(self._size)
            elif tail:    # a whole last record whose "\n" was lost
                text = b"\n" + text
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            self._read_new(f)  # take in what was just written, as any other writer would

    def _fresh(self, records: list[dict]) -> list[dict]:
        """The records whose key is not cached yet; a key repeated in `records` keeps its first."""
        fresh, seen = [], set()
        for r in records:
            k = (r["task"], r["key"])
            if k not in self.records and k not in seen:
                seen.add(k)
                fresh.append(r)
        return fresh


# ----------------------------------------------------------------------------------------------
# Backends

def _number(value, kind=float) -> float:
    """value as a number for a range check, or NaN (which fails every check) when it is not one
    of `kind` (int: an integer; float: any real number); True / False are not numbers here."""
    ok = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
    return value if ok else float("nan")


class OracleBackend:
    """A SIMULATED strong cloud model for synthetic tasks (not a real LLM): for each prompt it is
    correct with probability p_correct, decided by a generator seeded from
    sha256(f"{seed}:{task.name}:{example.key}"), so the same prompt always gets the same text.
    Wrong answers are task.oracle_answer(example, False, rng): plausible, but wrong."""
    name = "oracle"

    def __init__(self, p_correct: float = 0.95, seed: int = 0):
        if not 0 <= _number(p_correct) <= 1:
            raise ValueError(f"oracle p_correct={p_correct!r} must be a number in [0, 1]")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"oracle seed={seed!r} is not allowed; an integer")
        self.p_correct, self.seed = float(p_correct), seed
        self.model_name = f"oracle(p_correct={self.p_correct},seed={self.seed})"

    def rng_for(self, task, example) -> random.Random:
        digest = hashlib.sha256(f"{self.seed}:{task.name}:{example.key}".encode("utf-8")).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def check_fits(self, task, examples) -> None:
        """The task must write the simulated answers: an error when a run starts, not at the
        first help call."""
        if type(task).oracle_answer is Task.oracle_answer:
            raise ValueError(f"the oracle backend needs task {task.name!r} ({type(task).__name__}) "
                             f"to implement oracle_answer(example, correct, rng); it does not")

    def complete(self, task, examples) -> list[str]:
        texts = []
        for example in examples:
            rng = self.rng_for(task, example)
            texts.append(task.oracle_answer(example, rng.random() < self.p_correct, rng))
        return texts


def chat_completions_url(base_url: str) -> str:
    """{base}/v1/chat/completions, whether base_url ends in /v1 or already is that endpoint; a
    base_url that is no http(s)://host[:port] address is a ValueError (else each request would
    fail alike, retried: a port that is no number, a space, user:password@ urllib cannot send)."""
    try:
        parts = urllib.parse.urlsplit(base_url.strip())
        parts.port  # read: a ValueError when it is no number in 0..65535
        usable = (parts.scheme in ("http", "https") and parts.hostname and parts.username is None
                  and not re.search("[\x00-\x20\x7f]", parts.geturl()))
    except ValueError:  # a port out of 0..65535 or no number, an unclosed [IPv6
        usable = False
    if not usable:
        shown = base_url if "@" not in base_url else "(not shown: it holds a user name)"
        raise ValueError(f"http cloud backend: base_url={shown!r} (allowed: an http:// or "
                         f"https:// address, e.g. https://api.deepseek.com, without spaces or "
                         f"user:password@; the key goes in the api_key_env variable)")
    path = parts.path.rstrip("/")   # a query (?api-version=...) stays after it
    if not path.endswith("/chat/completions"):
        path = (path if path.endswith("/v1") else path + "/v1") + "/chat/completions"
    return urllib.parse.urlunsplit(parts._replace(path=path))


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: urllib would send the Authorization header on to the new
    address (and turn the POST into a GET). The 3xx comes back as an HTTPError instead."""

    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def _retry_after_seconds(value) -> float | None:
    """Retry-After as seconds (the HTTP-date form is ignored: plain backoff is used instead)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 else None


# a response body longer than this is no answer (8,192 tokens of text are well under 1 MB)
MAX_BODY_BYTES = 16 << 20
# what reading a response can raise besides CloudError: retried like a dropped connection.
# OSError covers timeouts, resets and TLS errors; ValueError and OverflowError come from
# http.client on garbled framing (a negative or astronomically large chunk or length)
TRANSPORT_ERRORS = (OSError, urllib.error.URLError, http.client.HTTPException, ValueError,
                    OverflowError)


class HttpBackend:
    """An OpenAI-compatible chat endpoint: POST {base_url}/v1/chat/completions.

    The API key is read from the environment variable `api_key_env` at each request (no header
    when unset, e.g. a local vLLM server); it is never logged, stored or put in an error message.
    Timeouts (`timeout` is the seconds the connection and each wait for the answer may take, and the
    seconds the body may take from its first byte that is not blank), connection errors, bodies cut
    off, 408, 429 and 5xx are retried up to `retries` times with exponential backoff and jitter (429
    and 503 wait the Retry-After seconds they give); 401/403 (the key), 402 or 429
    insufficient_quota (the account), and refused connections or an unknown host on every retry of a
    request before any request got an HTTP response (a wrong base_url, no server) stop the batch
    (CloudBatchError); a redirect, other 4xx, malformed JSON (or JSON Python cannot read), a body
    over MAX_BODY_BYTES and missing/empty choices fail that prompt at once; garbled framing and TLS
    errors are retried (TRANSPORT_ERRORS).
    An answer cut at max_tokens (finish_reason "length", even with no content left, as a
    reasoning model gives when its reasoning used every token) is an answer: cached and scored
    as it stands, so it is not paid for again; `truncated` counts them and the first is noted.
    Up to `concurrency` requests run in parallel threads; results keep the input order."""
    name = "http"

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.0,
                 max_tokens: int = 2048, timeout: float = 60, retries: int = 5, concurrency: int = 8,
                 backoff: float = 1.0, max_wait: float = 600.0):
        if not (base_url and isinstance(base_url, str) and model and isinstance(model, str)):
            raise ValueError(f"http cloud backend needs base_url and model, both strings (got "
                             f"base_url={base_url!r}, model={model!r})")
        problems = [f"{name}={value!r} (allowed: {allowed})" for name, value, ok, allowed in [
            ("concurrency", concurrency, _number(concurrency, int) >= 1, "an integer >= 1"),
            ("retries", retries, _number(retries, int) >= 0, "an integer >= 0"),
            ("max_tokens", max_tokens, _number(max_tokens, int) >= 1, "an integer >= 1"),
            # sockets take no wait past TIMEOUT_MAX (inf: an OverflowError at every request)
            ("timeout", timeout, 0 < _number(timeout) <= threading.TIMEOUT_MAX,
             f"seconds > 0, at most {threading.TIMEOUT_MAX:.0f}"),
            ("temperature", temperature, _number(temperature) >= 0, "a number >= 0"),
            ("backoff", backoff, _number(backoff) >= 0, "seconds >= 0"),
            ("max_wait", max_wait, _number(max_wait) >= 0, "seconds >= 0"),
            ("api_key_env", api_key_env, isinstance(api_key_env, str) and api_key_env != "",
             "the name of an environment variable")] if not ok]
        if problems:
            raise ValueError("http cloud backend: " + "; ".join(problems))
        self.url = chat_completions_url(base_url)
        self.model = self.model_name = model
        self.api_key_env = api_key_env
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.timeout, self.retries, self.concurrency = float(timeout), int(retries), int(concurrency)
        self.backoff, self.max_wait = float(backoff), float(max_wait)
        self.sleep = None  # the backoff wait (tests replace it); None: the batch's stop.wait
        self.truncated, self._lock = 0, threading.Lock()
        self.reached = False  # some request got an HTTP response: the address is right
        if not os.environ.get(api_key_env):  # fine for a local server; a forgotten key shows now
            print(f"note: http cloud: the environment variable {api_key_env} is not set, so "
                  f"requests to {self.url} carry no API key", file=sys.stderr)

    def _scrub(self, raw: bytes, key: str | None, limit: int, cut: bool = False) -> str:
        """A response body for an error message: the key hidden (before cutting to `limit`
        characters, so no part of it is left), on one line. cut: `raw` is only the start of the
        body, so it may end in the key's first characters: those are hidden too."""
        text = raw.decode("utf-8", "replace")
        if key:
            text = text.replace(key, "***")
            if cut:
                text = next((text[:-n] + "***" for n in range(len(key) - 1, 0, -1)
                             if text.endswith(key[:n])), text)
        return " ".join(text.split())[:limit]

    def chat(self, messages: list[dict], stop: threading.Event | None = None) -> str:
        """One request with retries; returns the answer text or raises CloudError. Once `stop` is
        set, no attempt is made and a backoff wait ends."""
        stop = stop or threading.Event()
        key = os.environ.get(self.api_key_env) or None
        if key and not (key.isascii() and key.isprintable()):  # http.client would refuse it,
            # its error quoting the whole header, the key with it
            raise CloudAuthError(f"the API key in {self.api_key_env} holds a character that is "
                                 f"not printable ASCII (a line ending from a file, a bad paste?)")
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        last_error, unreachable = "", 0
        for attempt in range(self.retries + 1):
            if stop.is_set():
                raise CloudError(f"interrupted: not sent to {self.url}")
            wait = None
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with _OPENER.open(request, timeout=self.timeout) as response:
                    self.reached = True
                    raw = self._read_body(response)
                return self._parse(raw, key)
            except urllib.error.HTTPError as e:
                self.reached = True
                try:
                    raw = e.read(1 << 16)
                    full = self._scrub(raw, key, 1 << 16, cut=len(raw) == 1 << 16)
                except TRANSPORT_ERRORS:  # the error body itself cut off or garbled
                    full = "(the error body was cut off)"
                finally:
                    e.close()  # its connection, now rather than when collected
                detail = full[:300]
                if e.code in (401, 403):
                    state = "is set" if key else "is NOT set"
                    raise CloudAuthError(f"HTTP {e.code} from {self.url}: the API key was refused; check the "
                                         f"environment variable {self.api_key_env} (it {state}). Server said: {detail}") from None
                if e.code == 402 or (e.code == 429 and "insufficient_quota" in full):
                    raise CloudAuthError(f"HTTP {e.code} from {self.url}: the account cannot pay for "
                                         f"requests (balance or quota); no request can succeed until "
                                         f"that is fixed. Server said: {detail}") from None
                if 300 <= e.code < 400:
                    where = self._scrub(str(e.headers.get("Location")).encode(), key, 300)
                    raise CloudError(f"HTTP {e.code} from {self.url}: redirected to {where}; "
                                     f"redirects are not followed (the API key would go along): "
                                     f"set base_url to the address that answers") from None
                if e.code not in (408, 429) and e.code < 500:
                    raise CloudError(f"HTTP {e.code} from {self.url} (not retried): {detail}") from None
                last_error = f"HTTP {e.code}: {detail}"
                if e.code in (429, 503):  # jittered, so parallel requests do not retry as one
                    wait = _retry_after_seconds(e.headers.get("Retry-After"))
                    wait = None if wait is None else wait * (1 + 0.25 * random.random())
            except TRANSPORT_ERRORS as e:
                last_error = self._scrub(f"{type(e).__name__}: {e}".encode(), key, 300)
                reason = getattr(e, "reason", e)
                unreachable += isinstance(reason, (ConnectionRefusedError, socket.gaierror))
            if attempt < self.retries:
                if wait is None:
                    wait = self.backoff * 2 ** attempt * (0.5 + random.random())
                # TIMEOUT_MAX: a wait longer than threading can take (max_wait=inf and a server's
                # Retry-After of years) would be an OverflowError crashing the batch
                (self.sleep or stop.wait)(min(wait, self.max_wait, threading.TIMEOUT_MAX))
        if unreachable == self.retries + 1 and not self.reached:
            raise CloudBatchError(f"{self.url}: not reached in {unreachable} attempts ({last_error}); "
                                  f"no request can succeed until it is: is the server running, "
                                  f"is base_url right?")
        raise CloudError(f"{self.url}: gave up after {self.retries + 1} attempts; last error: {last_error}")

    def _read_body(self, response) -> bytes:
        """The body, read a piece at a time up to MAX_BODY_BYTES: a server that sends without
        end (or announces a terabyte) fails this prompt instead of filling the memory. From its
        first byte that is not blank, the body must come within `timeout` seconds (a timeout,
        retried): the socket's timeout holds for one read, so a server trickling the answer a
        byte at a time could hold the request for ever. Blank lines before it do not count:
        some servers send them to keep the connection open while the answer is generated."""
        parts, size, deadline = [], 0, None
        while piece := response.read1(1 << 16):
            if deadline is None and piece.strip():
                deadline = time.monotonic() + self.timeout
            elif deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the body took over timeout={self.timeout:g} s to arrive")
            size += len(piece)
            if size > MAX_BODY_BYTES:
                raise CloudError(f"response from {self.url} is longer than {MAX_BODY_BYTES} "
                                 f"bytes; not read further (an answer is far shorter)")
            parts.append(piece)
        if response.length:  # the connection closed before the Content-Length was read
            raise http.client.IncompleteRead(b"".join(parts), response.length)
        return b"".join(parts)

    def _parse(self, raw: bytes, key: str | None) -> str:
        snippet = self._scrub(raw[:4096], key, 200, cut=len(raw) > 4096)
        try:  # utf-8-sig: a byte-order mark before the JSON is no error
            payload = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: JSONDecodeError,
            # and an integer past Python's 4300-digit limit; RecursionError: nesting too deep
            raise CloudError(f"malformed JSON from {self.url}: {snippet!r}") from None
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list) or not choices:
            raise CloudError(f"response from {self.url} has no choices: {snippet!r}")
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content as parts, [{"type": "text", "text": ...}, ...]
            content = "".join(part["text"] for part in content if isinstance(part, dict)
                              and part.get("type") == "text" and isinstance(part.get("text"), str))
        if choice.get("finish_reason") == "length":  # cut at max_tokens: the answer it gave
            with self._lock:
                self.truncated += 1
                first = self.truncated == 1
            if first:
                print(f"note: http cloud: an answer was cut at max_tokens={self.max_tokens} "
                      f"(finish_reason length); cut answers are cached and scored as they stand; "
                      f"a larger max_tokens serves prompts not yet cached", file=sys.stderr)
            return content if isinstance(content, str) else ""
        if not isinstance(content, str) or not content.strip():
            raise CloudError(f"response from {self.url} has an empty choices[0].message.content: {snippet!r}")
        return content

    def complete_each(self, task, examples, receive):
        """Send the prompts, `concurrency` at a time, and call receive(index, answer text or its
        CloudError) in this thread as each answer arrives (Cloud.ask caches it there and then).
        A CloudBatchError (the key, the account, a server never reached) stops the batch: nothing more is sent or
        retried, the requests under way are still received, then it is raised. Ctrl-C (here or
        in receive) likewise: those requests are paid for, so their answers are received before
        the KeyboardInterrupt goes on; a second Ctrl-C stops waiting for them."""
        stop = threading.Event()  # this batch's: no new request, no retry
        todo, arrived = queue.SimpleQueue(), queue.SimpleQueue()
        for i, example in enumerate(examples):
            todo.put((i, task.cloud_messages(example)))

        def work():
            while not stop.is_set():
                try:
                    i, messages = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    arrived.put((i, self.chat(messages, stop)))
                except BaseException as e:  # a CloudError, or a bug: raised in the caller
                    if isinstance(e, CloudBatchError):  # at once: this worker's next prompt
                        stop.set()                      # went out before the caller could
                    arrived.put((i, e))

        # daemon threads: a second Ctrl-C need not wait for their connections to close
        workers = [threading.Thread(target=work, daemon=True)
                   for _ in range(min(self.concurrency, len(examples)))]
        refused = []

        def receive_all():
            while any(w.is_alive() for w in workers) or not arrived.empty():
                try:
                    i, answer = arrived.get(timeout=0.05)  # a short wait: Ctrl-C lands between
                except queue.Empty:
                    continue
                if isinstance(answer, CloudBatchError):
                    stop.set()
                    refused.append(answer)
                elif isinstance(answer, BaseException) and not isinstance(answer, CloudError):
                    raise answer
                elif isinstance(answer, str) or not stop.is_set():  # not: "stopped, not sent"
                    try:
                        receive(i, answer)
                    except KeyboardInterrupt:  # before it was cached, maybe: receive it again
                        arrived.put((i, answer))
                        raise
        try:
            for w in workers:
                w.start()
            receive_all()
        except KeyboardInterrupt:
            stop.set()
            print(f"\ninterrupted: waiting for the {sum(w.is_alive() for w in workers)} requests "
                  f"under way so that their answers are cached (Ctrl-C again to stop waiting)",
                  file=sys.stderr)
            receive_all()
            raise
        finally:
            stop.set()  # whatever ended the wait: nothing more is sent, nothing retried
        if refused:
            raise refused[0]

    def complete(self, task, examples) -> list:
        """Answer texts in input order; a prompt that failed gets its CloudError instead."""
        texts = [None] * len(examples)
        try:
            self.complete_each(task, examples, texts.__setitem__)
        except CloudBatchError as error:
            error.answers = texts  # None where no answer came
            raise
        return texts


class LocalBackend:
    """A larger local checkpoint (model.py / sample.py), greedy decoding. Chat tasks are
    formatted with the tokenizer's chat format; raw-text tasks send their prompt as is. A prompt
    that does not fit the model's context with max_new_tokens fails alone (a CloudError in its
    place); check_fits() finds such prompts before a run starts. The weights at `path` are taken
    to be fixed: model_name (the cache's identity) names the path and the settings that change
    the answers, max_new_tokens and the weights' dtype."""
    name = "local"

    def __init__(self, path: str, max_new_tokens: int = 1024, device=None, dtype=None, batch_size: int = 16):
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"local cloud backend: path={path!r} is not allowed; give the checkpoint directory")
        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if not _number(value, int) >= 1:
                raise ValueError(f"local cloud backend: {name}={value!r} is not allowed; an integer >= 1")
        self.path = str(path)
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        import torch
        from model import weights_dtype  # lazy: only this backend needs torch and model.py
        try:  # a typo: an error now (a device this machine lacks: check_fits, when a run starts)
            torch.device(device or "cpu")
        except RuntimeError:
            raise ValueError(f"local cloud backend: device={device!r} is not allowed; use cpu, "
                             f"cuda or cuda:N") from None
        self.device, self.dtype = device, dtype
        weights = str(weights_dtype(dtype, device)).removeprefix("torch.")
        self.model_name = (f"{os.path.normpath(self.path)} (greedy, max_new_tokens="
                           f"{self.max_new_tokens}, {weights})")
        self.model = self.tokenizer = self.context = None

    def prompt_ids(self, task, examples) -> list[list[int]]:
        """The prompts as the cloud model reads them. Loads the tokenizer and reads the context
        length from config.json; the weights load on the first request."""
        from model import ModelConfig, load_tokenizer, read_json  # lazy: only this backend needs them
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.path)
            config = ModelConfig.from_hf(read_json(os.path.join(self.path, "config.json")))
            self.context = config.max_position_embeddings
        if self.tokenizer.chat_format is None and not all(isinstance(ex.prompt, str) for ex in examples):
            # said here, naming this checkpoint, not as the tokenizer's advice to a caller
            why = ("has a chat template in a markup other than ChatML (<|im_start|>) or Llama-3 "
                   "(<|start_header_id|>), the formats written here"
                   if self.tokenizer.special_tokens.get("chat_template")
                   else "has no chat template (a raw-text model)")
            raise ValueError(f"local cloud backend: the checkpoint {self.path} {why}, but task "
                             f"{task.name!r} sends the cloud chat messages; give a chat (instruct) "
                             f"checkpoint of the Qwen2 / SmolLM2 or Llama-3 families")
        return [self.tokenizer.prompt_ids(ex.prompt if isinstance(ex.prompt, str)
                                          else task.cloud_messages(ex)) for ex in examples]

    def _too_long(self, ids) -> str | None:
        if len(ids) + self.max_new_tokens <= self.context:
            return None
        return (f"a prompt of {len(ids)} tokens plus the local cloud's max_new_tokens="
                f"{self.max_new_tokens} exceeds its context (max_position_embeddings={self.context} "
                f"in {self.path})")

    def check_fits(self, task, examples) -> None:
        """A ValueError when this machine lacks the device, or naming the longest prompt when a
        prompt will not fit (see _too_long)."""
        from model import resolve_device
        if self.device is not None:
            try:
                resolve_device(self.device, name="device")
            except ValueError as e:
                raise ValueError(f"local cloud backend: {e}") from None
        longest = max(self.prompt_ids(task, examples), key=len, default=[])
        why = self._too_long(longest)
        if why:
            room = self.context - len(longest)
            raise ValueError(why + (f"; lower its max_new_tokens to at most {room}" if room > 0
                                    else ": the prompt alone fills the context"))

    def complete(self, task, examples) -> list:
        import torch
        from model import load_pretrained
        from sample import generate
        prompts = self.prompt_ids(task, examples)
        if self.model is None:
            self.model = load_pretrained(self.path, dtype=self.dtype, device=self.device)
        tok = self.tokenizer
        eos = set(tok.eos_ids)
        stop_ids = list(tok.eos_ids)
        for stop in task.stop_texts:
            ids = tok.encode(stop)
            if len(ids) == 1 and ids[0] not in stop_ids:
                stop_ids.append(ids[0])
        answers = [None if (why := self._too_long(p)) is None else CloudError(why) for p in prompts]
        fitting = [i for i, answer in enumerate(answers) if answer is None]
        # a caller's autocast (train.py's bf16-mixed rollout) must not change the cloud's answers
        with torch.no_grad(), torch.autocast(torch.device(self.device or "cpu").type, enabled=False):
            for start in range(0, len(fitting), self.batch_size):
                rows = fitting[start:start + self.batch_size]
                out = generate(self.model, [prompts[i] for i in rows], n=1,
                               max_new_tokens=self.max_new_tokens, temperature=0.0,
                               stop_ids=stop_ids, seed=0)
                for row, i in enumerate(rows):
                    ids = out.tokens[row, :int(out.lengths[row])].tolist()
                    if ids and ids[-1] in eos:
                        ids = ids[:-1]
                    answers[i] = tok.decode(ids)
        return answers


BACKENDS = {"oracle": OracleBackend, "http": HttpBackend, "local": LocalBackend}


# ----------------------------------------------------------------------------------------------
# The cloud: cache first, then the backend

@dataclass(frozen=True)
class CloudAnswer:
    """The cloud's answer to one prompt. cached: served without a new call. error: set when the
    call failed (then text is "" and correct is False; nothing was cached)."""
    text: str
    correct: bool
    cached: bool
    error: str | None = None


class Cloud:
    """Answers prompts from the cache, sending each uncached distinct prompt to the backend once
    (SPEC section 1), and records the verdict task.cloud_correct with the answer. The verdict an
    answer is given is worked out again for each example it answers: the cache is keyed by the
    prompt, and two examples with one prompt (a question repeated with another answer, a data
    file corrected since) need not share a reference answer. (The cached verdict is for people
    reading the file.)"""

    def __init__(self, backend, cache: CloudCache, backend_name: str | None = None, model_name: str | None = None):
        self.backend, self.cache = backend, cache
        self.backend_name = backend_name or getattr(backend, "name", type(backend).__name__)
        self.model_name = model_name or getattr(backend, "model_name", "")
        self.calls_made = self.served_from_cache = self.failures = 0
        self.first_error: str | None = None  # what the first failed call said, for summaries
        # None: a failed prompt is asked again next time (training: it stays out of the update
        # and is retried when next sampled). A dict: its failure is kept, (task, key) -> answer,
        # and served again for the rest of the process (eval.py: one verdict per prompt per report)
        self.failed: dict | None = None

    def check_cache(self) -> None:
        """A ValueError when the cache file already holds answers of another backend or model
        (a reused run directory, an edited cloud section): said at once, not at the first
        prompt that meets one."""
        mine = (self.backend_name, self.model_name)
        for record in self.cache.records.values():
            if (record["backend"], record["model"]) != mine:
                raise ValueError(f"cloud cache {self.cache.path} holds answers of backend "
                                 f"{record['backend']!r}, model {record['model']!r}; this cloud is "
                                 f"backend {mine[0]!r}, model {mine[1]!r}")

    def _cached(self, task, example, digest: str) -> dict | None:
        record = self.cache.get(task.name, example.key)
        if record is None:
            return None
        mine = (self.backend_name, self.model_name, digest)
        theirs = (record["backend"], record["model"], record["prompt_sha256"])
        if mine != theirs:
            other_prompt = " for a different prompt" if digest != theirs[2] else ""
            raise ValueError(f"cloud cache {self.cache.path} answered {example.key} with backend "
                             f"{theirs[0]!r}, model {theirs[1]!r}{other_prompt}; this run uses backend "
                             f"{mine[0]!r}, model {mine[1]!r}: use a separate cache file")
        return record

    def ask(self, task, examples, progress=None, chunk: int = 64) -> list[CloudAnswer]:
        """One answer per example, in order. The uncached prompts are cached as their answers
        arrive, so an interrupted batch keeps what came: one by one from a backend with
        complete_each (http), else `chunk` prompts per complete() call. progress(done, total),
        when given, follows those prompts."""
        answers: list[CloudAnswer | None] = [None] * len(examples)
        pending: dict[str, tuple] = {}  # key -> (example, digest, [positions])
        self.cache.refresh()  # answers another process (train.py / eval.py / cloud.py) cached meanwhile
        for i, example in enumerate(examples):
            if example.key in pending:
                pending[example.key][2].append(i)
                continue
            digest = prompt_digest(task.cloud_messages(example))
            # a failure kept for the process comes first: an answer another process cached for
            # this prompt since then must not change a verdict eval.py has already counted
            if self.failed is not None and (task.name, example.key) in self.failed:
                answers[i] = self.failed[(task.name, example.key)]
            elif (record := self._cached(task, example, digest)) is not None:
                answers[i] = CloudAnswer(record["answer"], record["verdict"], cached=True)
                self.served_from_cache += 1
            else:
                pending[example.key] = (example, digest, [i])
        items = list(pending.items())
        each = getattr(self.backend, "complete_each", None)
        if each is not None and items:
            done = 0

            def receive(i, text):
                nonlocal done
                _, (example, _, positions) = items[i]
                if answers[positions[0]] is not None:  # handed on again after a Ctrl-C
                    return
                self._check_texts([example], [text])
                self._record(task, dict([items[i]]), [text], answers)
                done += 1
                if progress:
                    progress(done, len(items))
            each(task, [ex for ex, _, _ in pending.values()], receive)
            return self._scored(task, examples, answers)
        for start in range(0, len(items), chunk):
            part = dict(items[start:start + chunk])
            batch = [example for example, _, _ in part.values()]
            try:
                texts = self.backend.complete(task, batch)
            except CloudBatchError as error:  # the batch stopped; still cache the answers that came
                if error.answers is not None and len(error.answers) == len(batch):
                    self._record(task, part, error.answers, answers)
                raise
            if len(texts) != len(batch):
                raise RuntimeError(f"cloud backend returned {len(texts)} answers for {len(batch)} prompts")
            self._check_texts(batch, texts)
            self._record(task, part, texts, answers)
            if progress:
                progress(start + len(batch), len(items))
        return self._scored(task, examples, answers)

    def _check_texts(self, examples, texts) -> None:
        """Each answer a backend gives is a str, or an exception for a call that failed."""
        for example, text in zip(examples, texts):
            if not isinstance(text, (str, BaseException)):
                raise RuntimeError(f"cloud backend {self.backend_name!r} answered {example.key} "
                                   f"with {text!r} ({type(text).__name__}); an answer must be a "
                                   f"str, or an exception for a failed call")

    @staticmethod
    def _scored(task, examples, answers: list) -> list:
        """Each answer with the verdict against its own example (a failed call stays wrong; an
        answer a Ctrl-C left out stays None)."""
        return [a if a is None or a.error is not None
                else replace(a, correct=bool(task.cloud_correct(example, a.text)))
                for example, a in zip(examples, answers)]

    def _record(self, task, pending: dict, texts: list, answers: list) -> None:
        """Cache the backend's answers, then put CloudAnswers at their positions. A text None
        (never answered) is skipped. The answer given is the one the cache keeps: when another
        process cached this prompt first, its answer, so a prompt has one answer everywhere
        (checked as a cached answer is: another cloud's, or another prompt's, is a ValueError)."""
        # JSON may escape half of a UTF-16 pair alone ("\ud83d"), json.loads keeps it, and no
        # UTF-8 file (the cache) can hold it: it becomes U+FFFD, as a decoder makes of a broken
        # character (whichever backend gave it)
        texts = [LONE_SURROGATE_RE.sub("\ufffd", t) if isinstance(t, str) else t for t in texts]
        self.cache.put_many([
            {"task": task.name, "key": example.key, "prompt_sha256": digest, "answer": text,
             "verdict": bool(task.cloud_correct(example, text)), "backend": self.backend_name,
             "model": self.model_name}
            for (example, digest, _), text in zip(pending.values(), texts) if isinstance(text, str)])
        for (example, digest, positions), text in zip(pending.values(), texts):
            if text is None:
                continue
            self.calls_made += 1
            if isinstance(text, BaseException):
                self.failures += 1
                answer = CloudAnswer("", False, cached=False, error=f"{type(text).__name__}: {text}")
                self.first_error = self.first_error or answer.error
                if self.failed is not None:
                    self.failed[(task.name, example.key)] = answer
            else:  # checked as a cached answer is: another process's may be another cloud's
                kept = self._cached(task, example, digest)
                answer = CloudAnswer(kept["answer"], kept["verdict"], cached=False)
            answers[positions[0]] = answer
            for j in positions[1:]:  # a repeat within this call costs no new call
                self.served_from_cache += 1
                answers[j] = CloudAnswer(answer.text, answer.correct, cached=True, error=answer.error)


class NoCloud:
    """A stand-in with Cloud's ask() for statistics that need only local verdicts (warm-start
    checks, router labels): every help call counts as unanswered, nothing is sent anywhere."""

    def ask(self, task, examples):
        return [CloudAnswer("", False, False) for _ in examples]


def make_cloud(cfg: dict | None = None, cache_path=None, cache: CloudCache | None = None,
               **kwargs) -> Cloud:
    """Build a Cloud from {"backend": "oracle"|"http"|"local", <that backend's arguments>}; unknown
    backend names or arguments are errors listing what is allowed. cache: an opened CloudCache;
    else one at cache_path (None: in memory)."""
    settings = {**(cfg or {}), **kwargs}
    name = settings.pop("backend", "oracle")
    if name not in BACKENDS:
        raise ValueError(f"cloud backend={name!r} is not allowed; use one of {sorted(BACKENDS)}")
    if not callable(getattr(BACKENDS[name], "complete", None)):
        raise ValueError(f"cloud backend {name!r} ({BACKENDS[name].__name__}) has no method "
                         f"complete(task, examples) -> list[str], which every backend needs")
    backend = construct(f"cloud backend {name!r}", BACKENDS[name], settings)
    return Cloud(backend, cache if cache is not None else CloudCache(cache_path),
                 getattr(backend, "name", name))


# ----------------------------------------------------------------------------------------------
# CLI: prefill the cache for a whole dataset

# the prefill's backend options: name -> (default, type, help); each belongs to one backend
PREFILL_OPTIONS = {
    "oracle": {"p_correct": (0.95, float, "its p_correct"), "seed": (0, int, "its seed")},
    "http": {"base_url": (None, str, "the server address"), "model": (None, str, "model name"),
             "api_key_env": ("OPENAI_API_KEY", str, "NAME of the env var holding the key"),
             "temperature": (0.0, float, "sampling temperature"),
             "max_tokens": (2048, int, "tokens an answer may take"),
             "timeout": (60.0, float, "seconds for each wait, and for the answer's body"),
             "retries": (5, int, "retries of a failed request"),
             "concurrency": (8, int, "requests at a time")},
    "local": {"path": (None, str, "checkpoint directory"),
              "max_new_tokens": (1024, int, "tokens an answer may take"),
              "device": (None, str, "cpu or cuda, as the run's cloud.device (default cpu)"),
              "dtype": (None, str, "the weights' dtype, as the run's cloud.dtype: float32, "
                                   "bfloat16 or float16 (default float32 on CPU, bfloat16 on CUDA)")},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Prefill the cloud answer cache for a dataset split.")
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="the task, as task.name")
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="which split (default %(default)s)")
    p.add_argument("--backend", default="oracle", choices=sorted(BACKENDS),
                   help="as cloud.backend (default %(default)s)")
    p.add_argument("--cache", default="runs/cloud_cache.jsonl",
                   help="cache file (JSONL) (default %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--chunk", type=int, default=64,
                   help="prompts per backend call, cached after each (http: each answer is cached as it "
                        "arrives, concurrency at a time; default %(default)s)")
    # task options (as the run's task section sets them)
    p.add_argument("--data-train", help="math: train JSONL (task.path_train)")
    p.add_argument("--data-test", help="math: test JSONL (task.path_test)")
    p.add_argument("--math-kind", default="math", choices=["math", "gsm8k"],
                   help="math: task.kind (default %(default)s)")
    p.add_argument("--n-train", type=int, help="countdown tasks: task.n_train (default: the task's)")
    p.add_argument("--n-test", type=int, help="countdown tasks: task.n_test")
    p.add_argument("--task-seed", type=int, help="countdown tasks: task.seed")
    # backend options (as the run's cloud section sets them); one of another backend is an error
    for backend, options in PREFILL_OPTIONS.items():
        for name, (default, kind, text) in options.items():
            shown = "" if default is None else f" (default {default})"
            p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                           help=f"{backend}: {text}{shown}")
    args = p.parse_args(argv)
    for backend, options in PREFILL_OPTIONS.items():
        given = [name for name in options if getattr(args, name) is not None]
        if backend != args.backend and given:
            p.error(f"--{given[0].replace('_', '-')} is an option of the {backend} backend, not "
                    f"of --backend {args.backend}")
        for name, (default, _, _) in options.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
    if args.dtype not in (None, "float32", "bfloat16", "float16"):
        p.error(f"--dtype {args.dtype} is not allowed: float32, bfloat16 or float16")
    if args.chunk < 1:
        p.error(f"--chunk {args.chunk} is not allowed: an integer >= 1")
    if args.limit is not None and args.limit < 0:
        p.error(f"--limit {args.limit} is not allowed: an integer >= 0")
    if args.task == "math" and not getattr(args, f"data_{args.split}"):
        p.error(f"--task math --split {args.split} needs --data-{args.split}: the {args.split} JSONL "
                f"(the run's task.path_{args.split})")
    if args.backend == "local" and not args.path:
        p.error("--backend local needs --path: the checkpoint directory of the cloud model")
    if args.backend == "local" and args.max_new_tokens < 1:
        p.error(f"--max-new-tokens {args.max_new_tokens} is not allowed: an integer >= 1")
    try:
        return prefill(args)
    except (ValueError, OSError, CloudError) as e:  # bad settings, a missing file, a refused API key
        sys.exit(f"cloud.py: {e}")


def prefill(args) -> int:
    from model import status_line  # lazy, as this module's other imports of model.py
    from tasks import make_task
    if args.task == "math":
        task = make_task("math", path_train=args.data_train, path_test=args.data_test, kind=args.math_kind)
    else:
        options = {"n_train": args.n_train, "n_test": args.n_test, "seed": args.task_seed}
        task = make_task(args.task, **{k: v for k, v in options.items() if v is not None})
    # the chosen backend's options (main() filled in their defaults); a backend added to
    # BACKENDS without options here gets none
    settings = {name: getattr(args, name) for name in PREFILL_OPTIONS.get(args.backend, {})}
    cloud = make_cloud({"backend": args.backend, **settings}, cache_path=args.cache)
    cloud.check_cache()  # a cache holding another cloud's answers: no run could read it whole
    check_appendable(args.cache)  # else the first answer fails, and the requests under way are lost

    examples = task.examples(args.split)[:args.limit]
    check = getattr(cloud.backend, "check_fits", None)  # the local one: its device and context
    if check is not None:
        check(task, examples)
    start, shown = time.time(), []

    def progress(done, total):  # over the prompts not yet cached
        shown.append(True)
        elapsed = time.time() - start
        line = (f"{done}/{total} asked  calls {cloud.calls_made}  cached {cloud.served_from_cache}  "
                f"failures {cloud.failures}  elapsed {elapsed:.0f}s  "
                f"eta {elapsed / done * (total - done):.0f}s")
        status_line(line, sys.stderr)
    try:
        correct = sum(a.correct for a in cloud.ask(task, examples, progress, chunk=args.chunk))
    except KeyboardInterrupt:
        print(f"\ninterrupted: {cloud.calls_made - cloud.failures} new answers are cached in "
              f"{args.cache}; the same command asks the rest", file=sys.stderr)
        return 130
    except (ValueError, OSError, CloudError):  # main() prints it: on a line of its own
        if shown:
            print(file=sys.stderr)
        raise
    print(file=sys.stderr)
    cut = getattr(cloud.backend, "truncated", 0)
    print(f"task {task.name} split {args.split}: {len(examples)} prompts, calls made {cloud.calls_made}, "
          f"served from cache {cloud.served_from_cache}, failures {cloud.failures}, "
          + (f"cut at max_tokens {cut}, " if cut else "")
          + f"cloud correct {correct}/{len(examples)}; cache {args.cache}")
    if cloud.first_error:
        print(f"first failure: {cloud.first_error}", file=sys.stderr)
    return 1 if cloud.failures else 0


if __name__ == "__main__":
    sys.exit(main())
