"""cloud.py: the kill-safe cache, one call per prompt, the oracle simulation, the HTTP client
against a fake endpoint on 127.0.0.1, and the local backend with a fake model."""
import hashlib
import json
import os
import shutil
import random
import re
import signal
import socket
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cloud import (Cloud, CloudAuthError, CloudBatchError, CloudCache, CloudError, HttpBackend, LocalBackend,  # noqa: E402
                   OracleBackend, chat_completions_url, make_cloud)
from tasks import CountdownTask, Example, TinyCountdownTask  # noqa: E402


@pytest.fixture(scope="module")
def task():
    return TinyCountdownTask(n_train=600, n_test=50, seed=7)


class CountingBackend:
    """The oracle, recording every example key it is asked about."""
    name = "oracle"

    def __init__(self, fail_keys=()):
        self.oracle = OracleBackend()
        self.model_name = self.oracle.model_name
        self.sent, self.fail_keys = [], set(fail_keys)

    def complete(self, task, examples):
        self.sent.extend(ex.key for ex in examples)
        texts = self.oracle.complete(task, examples)
        return [CloudError("simulated outage") if ex.key in self.fail_keys else t for ex, t in zip(examples, texts)]


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


# ----------------------------------------------------------------------------------------------
# Cache and Cloud

def test_each_prompt_sent_once_and_answers_in_order(task, tmp_path):
    a, b, c, d = task.examples("train")[:4]
    backend = CountingBackend()
    cloud = Cloud(backend, CloudCache(tmp_path / "cache.jsonl"), "oracle", backend.model_name)
    answers = cloud.ask(task, [a, b, a, c, b])
    assert backend.sent == [a.key, b.key, c.key]
    assert cloud.calls_made == 3 and cloud.served_from_cache == 2 and cloud.failures == 0
    expected = {ex.key: OracleBackend().complete(task, [ex])[0] for ex in (a, b, c)}
    assert [x.text for x in answers] == [expected[k] for k in (a.key, b.key, a.key, c.key, b.key)]
    assert [x.cached for x in answers] == [False, False, True, False, True]
    assert all(x.correct == task.cloud_correct(ex, x.text) for x, ex in zip(answers, [a, b, a, c, b]))
    again = cloud.ask(task, [a, d])
    assert backend.sent == [a.key, b.key, c.key, d.key]
    assert again[0].cached and not again[1].cached
    assert cloud.calls_made == 4 and cloud.served_from_cache == 3
    records = [json.loads(line) for line in _lines(tmp_path / "cache.jsonl")]
    assert [r["key"] for r in records] == [a.key, b.key, c.key, d.key]
    assert all(r["backend"] == "oracle" and r["task"] == "tiny_countdown" for r in records)
    assert all(set(r) >= {"answer", "verdict", "model"} for r in records)


def test_uncached_prompts_go_in_chunks_each_cached_as_it_arrives(task, tmp_path):
    """5 uncached prompts (and a repeat and a cached one) with chunk=2: batches of 2, 2, 1,
    progress after each; a refused key in the third batch keeps the first two batches."""
    examples = task.examples("train")[:6]
    path = tmp_path / "cache.jsonl"
    Cloud(CountingBackend(), CloudCache(path), "oracle", OracleBackend().model_name).ask(task, examples[:1])
    batches, seen = [], []

    class Recording(CountingBackend):
        def complete(self, task, batch):
            batches.append([ex.key for ex in batch])
            if len(batches) == 3:
                raise CloudAuthError("HTTP 401")
            return super().complete(task, batch)

    backend = Recording()
    cloud = Cloud(backend, CloudCache(path), "oracle", backend.model_name)
    with pytest.raises(CloudAuthError):
        cloud.ask(task, examples + examples[1:2], progress=lambda d, t: seen.append((d, t)), chunk=2)
    assert batches == [[ex.key for ex in examples[1:3]], [ex.key for ex in examples[3:5]],
                       [examples[5].key]]
    assert seen == [(2, 5), (4, 5)]
    assert [json.loads(line)["key"] for line in _lines(path)] == [ex.key for ex in examples[:5]]


def test_resume_reuses_answers(task, tmp_path):
    path = tmp_path / "cache.jsonl"
    examples = task.examples("train")[:20]
    first = Cloud(CountingBackend(), CloudCache(path), "oracle", OracleBackend().model_name).ask(task, examples)
    backend = CountingBackend()
    resumed = Cloud(backend, CloudCache(path), "oracle", backend.model_name)
    second = resumed.ask(task, examples)
    assert backend.sent == [] and resumed.calls_made == 0 and resumed.served_from_cache == 20
    assert [x.text for x in second] == [x.text for x in first]
    assert [x.correct for x in second] == [x.correct for x in first]


def test_cache_survives_torn_last_line(task, tmp_path):
    path = tmp_path / "cache.jsonl"
    examples = task.examples("train")[:7]
    Cloud(CountingBackend(), CloudCache(path), "oracle", OracleBackend().model_name).ask(task, examples[:5])
    with open(path, "a", encoding="utf-8") as f:  # a crash in the middle of writing record 6
        f.write('{"task": "tiny_countdown", "key": "' + examples[5].key + '", "prompt_sha256": "ab')
    cache = CloudCache(path)
    assert len(cache) == 5 and cache.ignored_torn_line
    backend = CountingBackend()
    cloud = Cloud(backend, cache, "oracle", backend.model_name)
    cloud.ask(task, examples)
    assert backend.sent == [examples[5].key, examples[6].key]  # nothing else lost
    lines = _lines(path)
    assert len(lines) == 7 and all(json.loads(line) for line in lines)
    assert path.read_bytes().endswith(b"\n")
    assert len(CloudCache(path)) == 7 and not CloudCache(path).ignored_torn_line


def test_a_full_disk_appending_to_the_cache_names_the_file(task, tmp_path, monkeypatch):
    """A failed write or fsync names no file: the error now says which cache could not take the
    answers (train.py and eval.py print it as their one-line error)."""
    import cloud as cloud_module
    path = tmp_path / "cache.jsonl"
    examples = task.examples("train")[:3]
    Cloud(CountingBackend(), CloudCache(path), "oracle", OracleBackend().model_name).ask(task, examples[:2])

    def fsync(fd):
        raise OSError(28, "No space left on device")

    full = types.ModuleType("os")
    full.__dict__.update(os.__dict__, fsync=fsync)
    monkeypatch.setattr(cloud_module, "os", full)  # cloud.py's os only
    cloud = Cloud(CountingBackend(), CloudCache(path), "oracle", OracleBackend().model_name)
    with pytest.raises(OSError) as exc:
        cloud.ask(task, examples)
    assert str(exc.value) == f"[Errno 28] No space left on device: '{path}'"


def test_cache_whole_last_record_without_newline(task, tmp_path):
    path = tmp_path / "cache.jsonl"
    examples = task.examples("train")[:3]
    Cloud(CountingBackend(), CloudCache(path), "oracle", OracleBackend().model_name).ask(task, examples[:2])
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # the crash lost only the final "\n"
    cache = CloudCache(path)
    assert len(cache) == 2
    Cloud(CountingBackend(), cache, "oracle", OracleBackend().model_name).ask(task, examples)
    assert len(_lines(path)) == 3 and len(CloudCache(path)) == 3


def test_cache_corrupt_middle_line_is_an_error(task, tmp_path):
    path = tmp_path / "cache.jsonl"
    Cloud(CountingBackend(), CloudCache(path), "oracle", OracleBackend().model_name).ask(task, task.examples("train")[:3])
    lines = _lines(path)
    lines[1] = lines[1][:40]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cache\.jsonl:2: corrupt"):
        CloudCache(path)
    lines[1] = json.dumps({"task": "t", "key": "k"})  # valid JSON, missing fields
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cache\.jsonl:2: .*'prompt_sha256'"):
        CloudCache(path)


def _record(key, answer, task_name="tiny_countdown"):
    return {"task": task_name, "key": key, "prompt_sha256": "", "answer": answer, "verdict": False,
            "backend": "oracle", "model": "m"}


def test_cache_load_first_answer_wins(tmp_path):
    path = tmp_path / "cache.jsonl"
    lines = [_record("k1", "first"), _record("k2", "other"), _record("k1", "second"),
             _record("k1", "other task", task_name="t2")]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    cache = CloudCache(path)
    assert len(cache) == 3
    assert cache.get("tiny_countdown", "k1")["answer"] == "first"
    assert cache.get("t2", "k1")["answer"] == "other task"  # the task name is part of the key


def test_put_many_stores_and_writes_each_key_once(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = CloudCache(path)
    cache.put_many([_record("a", "a1"), _record("b", "b1"), _record("a", "a2")])  # a repeat within one call
    assert [(r["key"], r["answer"]) for r in map(json.loads, _lines(path))] == [("a", "a1"), ("b", "b1")]
    assert cache.get("tiny_countdown", "a")["answer"] == "a1" and len(cache) == 2
    cache.put_many([_record("b", "b2"), _record("c", "c1")])  # a repeat across calls
    cache.put("tiny_countdown", "a", "a3", True, "oracle", "m")
    assert [(r["key"], r["answer"]) for r in map(json.loads, _lines(path))] == [("a", "a1"), ("b", "b1"), ("c", "c1")]
    assert [cache.get("tiny_countdown", k)["answer"] for k in "abc"] == ["a1", "b1", "c1"]
    reloaded = CloudCache(path)  # the file and the memory agree
    assert {k: r["answer"] for k, r in reloaded.records.items()} == {k: r["answer"] for k, r in cache.records.items()}
    memory = CloudCache(None)
    memory.put_many([_record("a", "a1"), _record("a", "a2")])
    memory.put_many([_record("a", "a3")])
    assert len(memory) == 1 and memory.get("tiny_countdown", "a")["answer"] == "a1"


def test_failures_are_reported_not_cached_and_retried(task, tmp_path):
    path = tmp_path / "cache.jsonl"
    a, b = task.examples("train")[:2]
    flaky = CountingBackend(fail_keys={b.key})
    cloud = Cloud(flaky, CloudCache(path), "oracle", flaky.model_name)
    answers = cloud.ask(task, [a, b, b])
    assert answers[0].error is None
    assert answers[1].error and "simulated outage" in answers[1].error
    assert answers[1].text == "" and answers[1].correct is False and answers[2].error
    assert cloud.failures == 1 and cloud.calls_made == 2
    assert [json.loads(line)["key"] for line in _lines(path)] == [a.key]
    healthy = CountingBackend()
    retry = Cloud(healthy, CloudCache(path), "oracle", healthy.model_name)
    (answer,) = retry.ask(task, [b])
    assert healthy.sent == [b.key] and answer.error is None and not answer.cached
    assert len(CloudCache(path)) == 2


def test_kept_failures_are_served_again_not_retried(task):
    a, b = task.examples("train")[:2]
    flaky = CountingBackend(fail_keys={b.key})
    cloud = Cloud(flaky, CloudCache(None), "oracle", flaky.model_name)
    cloud.ask(task, [a, b])
    flaky.fail_keys = set()          # the backend has recovered; a plain Cloud retries b
    assert cloud.ask(task, [b])[0].error is None and flaky.sent == [a.key, b.key, b.key]
    flaky = CountingBackend(fail_keys={b.key})
    cloud = Cloud(flaky, CloudCache(None), "oracle", flaky.model_name)
    cloud.failed = {}                # eval.py's setting: b's failure stands for the process
    first = cloud.ask(task, [a, b])
    flaky.fail_keys = set()
    again = cloud.ask(task, [b, a])
    assert flaky.sent == [a.key, b.key]
    assert again[0] == first[1] and "simulated outage" in again[0].error
    assert again[0].correct is False and again[1].error is None and again[1].cached
    assert cloud.failures == 1 and cloud.calls_made == 2 and list(cloud.failed) == [(task.name, b.key)]


def test_a_kept_failure_stands_when_another_process_caches_that_prompt_meanwhile(task, tmp_path):
    """eval.py's report counts one verdict per prompt: a failure it kept is not replaced by an
    answer that another process (train.py's evaluation, say) cached for that prompt later."""
    path = tmp_path / "cache.jsonl"
    a, b = task.examples("train")[:2]
    flaky = CountingBackend(fail_keys={b.key})
    cloud = Cloud(flaky, CloudCache(path), "oracle", flaky.model_name)
    cloud.failed = {}
    first = cloud.ask(task, [a, b])
    healthy = CountingBackend()
    Cloud(healthy, CloudCache(path), "oracle", healthy.model_name).ask(task, [b])  # the other process
    assert len(CloudCache(path)) == 2
    again = cloud.ask(task, [b])
    assert again[0] == first[1] and again[0].error and again[0].correct is False
    assert flaky.sent == [a.key, b.key]


def test_cache_from_another_backend_is_refused(task, tmp_path):
    path = tmp_path / "cache.jsonl"
    ex = task.examples("train")[0]
    make_cloud({"backend": "oracle", "p_correct": 0.95}, cache_path=path).ask(task, [ex])
    other = make_cloud({"backend": "oracle", "p_correct": 0.5}, cache_path=path)
    with pytest.raises(ValueError, match="separate cache file"):
        other.ask(task, [ex])
    record = json.loads(path.read_text(encoding="utf-8"))
    record["prompt_sha256"] = "0" * 64  # as if the prompt template had changed since
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="for a different prompt"):
        make_cloud({"backend": "oracle", "p_correct": 0.95}, cache_path=path).ask(task, [ex])


def test_make_cloud_errors(tmp_path):
    with pytest.raises(ValueError, match="'gpt'.*'http'"):
        make_cloud({"backend": "gpt"})
    with pytest.raises(ValueError, match="p_corect"):
        make_cloud({"backend": "oracle", "p_corect": 0.9})
    with pytest.raises(ValueError, match="p_correct"):
        make_cloud(backend="oracle", p_correct=1.5)
    cloud = make_cloud(backend="http", base_url="http://127.0.0.1:9", model="m", cache_path=tmp_path / "c.jsonl")
    assert isinstance(cloud.backend, HttpBackend) and cloud.model_name == "m"


# ----------------------------------------------------------------------------------------------
# The oracle simulation

def documented_draw(seed, task_name, key):
    """The oracle's first draw for a prompt, written out from OracleBackend's docstring: a
    generator seeded from sha256(f"{seed}:{task.name}:{example.key}") (first 8 bytes, big-endian)."""
    digest = hashlib.sha256(f"{seed}:{task_name}:{key}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).random()


def test_oracle_deterministic_per_prompt(task):
    examples = task.examples("train")[:40]
    one = OracleBackend(seed=3).complete(task, examples)
    assert one == OracleBackend(seed=3).complete(task, examples)
    assert one[::-1] == OracleBackend(seed=3).complete(task, examples[::-1])  # batch order irrelevant
    assert one[5] == OracleBackend(seed=3).complete(task, [examples[5]])[0]
    assert one != OracleBackend(seed=4).complete(task, examples)


def test_oracle_draws_depend_on_task_name(task):
    """Same prompt keys under another task name: the docstring seeds with task.name too, so the
    draws are independent (agreement ~ 1/2 at p=0.5, not 1) and each follows its own name."""
    renamed = TinyCountdownTask(n_train=600, n_test=50, seed=7)
    renamed.name = "tiny_countdown_v2"
    examples, again = task.examples("train"), renamed.examples("train")
    assert [ex.key for ex in again] == [ex.key for ex in examples]  # identical prompt keys
    oracle = OracleBackend(p_correct=0.5, seed=0)
    first = [task.cloud_correct(ex, t) for ex, t in zip(examples, oracle.complete(task, examples))]
    second = [renamed.cloud_correct(ex, t) for ex, t in zip(again, oracle.complete(renamed, again))]
    assert first == [documented_draw(0, "tiny_countdown", ex.key) < 0.5 for ex in examples]
    assert second == [documented_draw(0, "tiny_countdown_v2", ex.key) < 0.5 for ex in again]
    agree = sum(a == b for a, b in zip(first, second)) / len(examples)
    assert abs(agree - 0.5) < 4 * (0.25 / len(examples)) ** 0.5  # 600 prompts: within 0.08


@pytest.mark.parametrize("p", [0.95, 0.5])
def test_oracle_correctness_rate(task, p):
    examples = task.examples("train")[:600]
    texts = OracleBackend(p_correct=p, seed=0).complete(task, examples)
    rate = sum(task.cloud_correct(ex, t) for ex, t in zip(examples, texts)) / len(examples)
    assert abs(rate - p) < 4 * (p * (1 - p) / len(examples)) ** 0.5 + 0.005


def test_oracle_extremes(task):
    examples = task.examples("test")
    assert all(task.cloud_correct(ex, t) for ex, t in zip(examples, OracleBackend(1.0).complete(task, examples)))
    assert not any(task.cloud_correct(ex, t) for ex, t in zip(examples, OracleBackend(0.0).complete(task, examples)))
    countdown = CountdownTask(n_train=0, n_test=200, seed=1)
    cd = countdown.examples("test")
    for p in (1.0, 0.0):  # Countdown's correct answers verify and its wrong ones never do
        verdicts = [countdown.cloud_correct(ex, t) for ex, t in zip(cd, OracleBackend(p).complete(countdown, cd))]
        assert verdicts == [p == 1.0] * len(cd)
    verdicts = [countdown.cloud_correct(ex, t) for ex, t in zip(cd, OracleBackend(0.95).complete(countdown, cd))]
    # the docstring's contract: correct exactly when the prompt's first draw is below p_correct
    assert verdicts == [documented_draw(0, "countdown", ex.key) < 0.95 for ex in cd]
    assert 0.88 < sum(verdicts) / len(cd) < 1.0


# ----------------------------------------------------------------------------------------------
# HTTP client against a fake OpenAI-compatible endpoint

class FakeEndpoint:
    """A scripted chat-completions server on 127.0.0.1: each request pops the next scripted
    response (status, body, headers, delay seconds); when the script is empty it answers 200
    with the reversed user message, after delay_for[that message] seconds (default 0.02).
    hold: an optional threading.Barrier every request waits at (counted as in flight) before it
    is answered; if it breaks (times out), the request gets a 500 "barrier broken".
    A scripted header X-Declared-Length replaces the Content-Length sent: larger than the body,
    it makes a response cut off (the connection closes after the body); X-Trickle sends the body
    a byte at a time, that many seconds apart; X-Keep-Alive "N,S" sends N blank lines S seconds
    apart before the body. interrupt_at: when that
    many requests have arrived, SIGINT goes to the main thread (Ctrl-C with them under way)."""

    def __init__(self):
        self.script, self.requests, self.lock = [], [], threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.hold, self.delay_for, self.interrupt_at = None, {}, None
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    step = endpoint.script.pop(0) if endpoint.script else None
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                    if len(endpoint.requests) == endpoint.interrupt_at:
                        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                counted = True
                try:
                    if endpoint.hold is not None:
                        try:
                            endpoint.hold.wait()
                        except threading.BrokenBarrierError:
                            step = (500, "barrier broken", {}, 0)
                    if step is None:
                        content = body["messages"][-1]["content"]
                        time.sleep(endpoint.delay_for.get(content, 0.02))
                        step = (200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content[::-1]}}]}), {}, 0)
                    status, payload, headers, delay = step
                    time.sleep(delay)
                    data = payload.encode("utf-8")
                    headers = dict(headers)
                    blanks, every = map(float, headers.pop("X-Keep-Alive", "0,0").split(","))
                    data = b"\n" * int(blanks) + data
                    length = headers.pop("X-Declared-Length", len(data))
                    trickle = float(headers.pop("X-Trickle", 0))
                    with endpoint.lock:  # no longer in flight once the answer starts: the client
                        endpoint.in_flight -= 1  # may send its next request before we return
                        counted = False
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(length))
                    self.end_headers()
                    for _ in range(int(blanks)):
                        self.wfile.write(data[:1])
                        self.wfile.flush()
                        data = data[1:]
                        time.sleep(every)
                    if trickle:
                        for i in range(len(data)):
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                            time.sleep(trickle)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    if counted:
                        with endpoint.lock:
                            endpoint.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    server = FakeEndpoint()
    yield server
    server.close()


def ok(content):
    return (200, json.dumps({"choices": [{"message": {"content": content}}]}), {}, 0)


def make_backend(url, **kwargs):
    settings = dict(model="cloud-model", api_key_env="TEST_CLOUD_KEY", timeout=2, retries=3, backoff=0.01)
    settings.update(kwargs)
    backend = HttpBackend(url, **settings)
    backend.slept = []
    backend.sleep = backend.slept.append  # record the waits instead of waiting
    return backend


MESSAGES = [{"role": "user", "content": "07,03,12|033="}]


def test_urls():
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("https://api.x.com/v1/") == "https://api.x.com/v1/chat/completions"
    # the whole endpoint, as some providers document it, is not doubled
    assert chat_completions_url("https://h/v1/chat/completions/") == "https://h/v1/chat/completions"
    assert chat_completions_url("https://h/openai?api-version=2") == \
        "https://h/openai/v1/chat/completions?api-version=2"
    assert chat_completions_url(" http://h/v1 ") == "http://h/v1/chat/completions"
    for bad in ("localhost:8000", "api.deepseek.com", "ftp://h", "http://", "http://:8000"):
        with pytest.raises(ValueError, match=f"base_url={bad!r} \\(allowed: an http:// or https://"):
            HttpBackend(bad, "m")


def test_a_base_url_no_request_could_use_is_refused_at_construction():
    """Not retried, prompt after prompt, as an InvalidURL (or a DNS error) at each request."""
    for bad in ("http://localhost:800O", "http://localhost:99999", "http://[::1",
                "http://local host:8000/v1"):
        with pytest.raises(ValueError, match=re.escape(f"base_url={bad!r} (allowed: an http://")):
            HttpBackend(bad, "m")
    with pytest.raises(ValueError, match="user:password@") as e:  # urllib sends no such login
        HttpBackend("https://me:hunter2@api.x.com/v1", "m")
    assert "hunter2" not in str(e.value)
    assert chat_completions_url("http://[::1]:8000") == "http://[::1]:8000/v1/chat/completions"


def test_http_an_api_key_with_a_line_ending_is_refused_without_showing_it(endpoint, task,
                                                                          monkeypatch):
    """KEY=$(cat key.txt) keeps a Windows file's \\r: http.client's error would quote the whole
    Authorization header; the key is refused before, by name, never shown."""
    monkeypatch.setenv("TEST_CLOUD_KEY", "sk-secret-777\r")
    with pytest.raises(CloudAuthError) as err:
        make_backend(endpoint.url).complete(task, task.examples("test")[:2])
    assert "TEST_CLOUD_KEY holds a character that is not printable ASCII" in str(err.value)
    assert "secret" not in str(err.value) and endpoint.requests == []


def test_http_a_server_never_reached_stops_the_batch(task, monkeypatch):
    """Refused connections on every retry before any request got through: base_url or the
    server is wrong, so the batch stops after the first prompt instead of retrying each one
    (4 prompts x 2 attempts). Once the server has answered, such failures are passing: that
    prompt alone fails."""
    import cloud as cloud_module
    attempts = []

    def refused(request, timeout):
        attempts.append(request.full_url)
        raise cloud_module.urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(cloud_module._OPENER, "open", refused)
    backend = make_backend("http://127.0.0.1:9", retries=1, concurrency=1, backoff=0.2)
    backend.sleep = None    # the real backoff wait, which the batch's stop ends
    with pytest.raises(CloudBatchError, match=r"not reached in 2 attempts .*is the server running"):
        backend.complete(task, task.examples("test")[:4])
    assert 2 <= len(attempts) <= 3   # the first prompt's two, at most one of the next prompt's
    backend.reached = True     # it answered earlier in this process
    backend.sleep = backend.slept.append
    answers = backend.complete(task, task.examples("test")[:2])
    assert [type(a) for a in answers] == [CloudError, CloudError] and len(attempts) <= 3 + 4
    assert "gave up after 2 attempts" in str(answers[0])


def test_http_success(endpoint, monkeypatch):
    monkeypatch.setenv("TEST_CLOUD_KEY", "sk-test-123")
    endpoint.script = [ok("[007*003=021,021+012=033]")]
    backend = make_backend(endpoint.url + "/v1/", temperature=0.0, max_tokens=64)
    assert backend.chat(MESSAGES) == "[007*003=021,021+012=033]"
    (request,) = endpoint.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test-123"
    assert request["body"] == {"model": "cloud-model", "messages": MESSAGES, "temperature": 0.0, "max_tokens": 64}


def test_http_no_key_sends_no_header(endpoint, monkeypatch, capsys):
    """Allowed (a local server needs no key), but said when the backend is made, so a forgotten
    key shows before the first request rather than as a 401 after a model has loaded."""
    monkeypatch.delenv("TEST_CLOUD_KEY", raising=False)
    endpoint.script = [ok("hi")]
    backend = make_backend(endpoint.url)
    assert "TEST_CLOUD_KEY is not set" in capsys.readouterr().err
    assert backend.chat(MESSAGES) == "hi"
    assert "Authorization" not in endpoint.requests[0]["headers"]
    monkeypatch.setenv("TEST_CLOUD_KEY", "sk-test-123")
    make_backend(endpoint.url)
    assert "not set" not in capsys.readouterr().err


def test_http_500_then_success(endpoint):
    endpoint.script = [(500, "boom", {}, 0), (503, "busy", {}, 0), ok("fine")]
    backend = make_backend(endpoint.url, backoff=0.5)
    assert backend.chat(MESSAGES) == "fine"
    assert len(endpoint.requests) == 3
    assert len(backend.slept) == 2
    assert 0.25 <= backend.slept[0] <= 0.75 and 0.5 <= backend.slept[1] <= 1.5  # 0.5 * 2^k, jittered


@pytest.mark.parametrize("status", [429, 503])
def test_http_429_and_503_honour_retry_after(endpoint, status):
    """The seconds the server asks for, plus up to a quarter more (so parallel requests told
    the same do not all come back at once)."""
    endpoint.script = [(status, "slow down", {"Retry-After": "2"}, 0), ok("done")]
    backend = make_backend(endpoint.url)
    assert backend.chat(MESSAGES) == "done"
    assert len(backend.slept) == 1 and 2.0 <= backend.slept[0] <= 2.5


@pytest.mark.parametrize("step", [
    (408, "request timeout", {}, 0),
    (500, "an error body the connection cuts short", {"X-Declared-Length": "4096"}, 0),
    (200, '{"choices": [{"message": {"content": "cut sh', {"X-Declared-Length": "4096"}, 0),
], ids=["408", "5xx-body-cut-off", "200-body-cut-off"])
def test_http_transient_failures_are_retried(endpoint, step):
    endpoint.script = [step, ok("fine")]
    backend = make_backend(endpoint.url)
    assert backend.chat(MESSAGES) == "fine"
    assert len(endpoint.requests) == 2 and len(backend.slept) == 1


@pytest.mark.parametrize("status, body, needle", [
    (402, '{"error": {"message": "Insufficient Balance"}}', "HTTP 402 .*cannot pay"),
    (429, '{"error": {"message": "You exceeded your current quota", "type": "insufficient_quota"}}',
     "HTTP 429 .*cannot pay"),
])
def test_http_an_account_that_cannot_pay_stops_the_batch(endpoint, task, status, body, needle):
    endpoint.script = [(status, body, {}, 0)] * 3
    with pytest.raises(CloudAuthError, match=needle):
        make_backend(endpoint.url).chat(MESSAGES)
    assert len(endpoint.requests) == 1  # not retried
    with pytest.raises(CloudAuthError):
        make_backend(endpoint.url, concurrency=1).complete(task, task.examples("test")[:6])
    # the batch stopped at its first prompt: at most the next, which the one worker may have
    # taken before the refusal was read, went out too (not the other 4)
    assert len(endpoint.requests) <= 1 + 2


def test_http_no_part_of_the_key_reaches_an_error_message(endpoint, monkeypatch):
    """The key in a long body straddling the point where error text is cut: hidden first."""
    secret = "sk-SECRETKEY-0123456789"
    monkeypatch.setenv("TEST_CLOUD_KEY", secret)
    long_body = "x" * 290 + secret
    for step in [(400, long_body, {}, 0), (500, long_body, {}, 0),
                 (200, "y" * 190 + secret, {}, 0)]:
        endpoint.script = [step] * 4
        with pytest.raises(CloudError) as e:
            make_backend(endpoint.url).chat(MESSAGES)
        assert secret[:6] not in str(e.value), str(e.value)


def test_http_redirects_are_not_followed(endpoint, monkeypatch):
    """urllib would follow a 302 to another host as a GET, with the Authorization header."""
    other = FakeEndpoint()
    try:
        monkeypatch.setenv("TEST_CLOUD_KEY", "sk-test-123")
        where = other.url + "/v1/chat/completions"
        endpoint.script = [(302, "", {"Location": where}, 0), ok("never")]
        with pytest.raises(CloudError, match=f"HTTP 302 .*redirected to {where}.*base_url"):
            make_backend(endpoint.url).chat(MESSAGES)
        assert len(endpoint.requests) == 1 and other.requests == []
    finally:
        other.close()


def test_http_an_answer_cut_at_max_tokens_is_cached_as_given(endpoint, task, tmp_path, capsys):
    """finish_reason "length": the text the cloud gave, or "" when its reasoning used every
    token (content null), is its answer: cached and scored (wrong here), not asked again."""
    def cut(content):
        return (200, json.dumps({"choices": [{"message": {"content": content},
                                              "finish_reason": "length"}]}), {}, 0)
    examples = task.examples("test")[:2]
    endpoint.script = [cut("[007*003=02"), cut(None)]
    backend = make_backend(endpoint.url, concurrency=1)
    cloud = Cloud(backend, CloudCache(tmp_path / "c.jsonl"), "http", "cloud-model")
    answers = cloud.ask(task, examples)
    assert [a.text for a in answers] == ["[007*003=02", ""] and not any(a.correct for a in answers)
    assert [a.error for a in answers] == [None, None] and len(cloud.cache) == 2
    assert backend.truncated == 2 and capsys.readouterr().err.count("cut at max_tokens") == 1
    assert [a.cached for a in cloud.ask(task, examples)] == [True, True]
    assert len(endpoint.requests) == 2


def test_http_ctrl_c_keeps_the_answers_under_way(endpoint, task, tmp_path, capsys):
    """Ctrl-C with 2 requests under way and 4 queued: the 4 are never sent, the 2 answers are
    cached when they arrive, then the KeyboardInterrupt goes on; asking again sends the 4."""
    examples = task.examples("test")[:6]
    endpoint.delay_for = {ex.prompt: 1.0 for ex in examples}
    endpoint.interrupt_at = 2
    path = tmp_path / "c.jsonl"
    cloud = Cloud(make_backend(endpoint.url, concurrency=2, retries=0), CloudCache(path), "http",
                  "cloud-model")
    with pytest.raises(KeyboardInterrupt):
        cloud.ask(task, examples)
    assert "waiting for the 2 requests under way" in capsys.readouterr().err
    assert len(endpoint.requests) == 2
    assert sorted(r["key"] for r in map(json.loads, _lines(path))) == \
        sorted(ex.key for ex in examples[:2])
    endpoint.delay_for, endpoint.interrupt_at = {}, None
    assert [a.cached for a in cloud.ask(task, examples)] == [True] * 2 + [False] * 4
    assert len(endpoint.requests) == 6


@pytest.mark.parametrize("where", ["progress", "cache write"])
def test_http_ctrl_c_while_an_answer_is_cached_keeps_the_others(endpoint, task, tmp_path,
                                                               monkeypatch, where):
    """Ctrl-C landing in Cloud.ask's own work, after the first answer is written (in the
    progress report) or before (in the cache write), winds down the same way: that answer and
    the other request under way are both cached."""
    examples = task.examples("test")[:6]
    endpoint.delay_for = {ex.prompt: 0.5 for ex in examples}
    endpoint.delay_for[examples[0].prompt] = 0.05
    interrupts = [1]

    def interrupt_once():
        if interrupts:
            interrupts.pop()
            raise KeyboardInterrupt
    real_put_many = CloudCache.put_many

    def put_many(self, records):
        if where == "cache write":
            interrupt_once()
        real_put_many(self, records)
    monkeypatch.setattr(CloudCache, "put_many", put_many)
    progress = (lambda done, total: interrupt_once()) if where == "progress" else None
    path = tmp_path / "c.jsonl"
    cloud = Cloud(make_backend(endpoint.url, concurrency=2, retries=0), CloudCache(path), "http",
                  "cloud-model")
    with pytest.raises(KeyboardInterrupt):
        cloud.ask(task, examples, progress)
    # cached: every request sent, i.e. the first, the one under way and, when its worker took
    # it before the interrupt was read, the next; the other 3 or 4 were never sent
    sent = {q["body"]["messages"][-1]["content"] for q in endpoint.requests}
    assert len(sent) in (2, 3) and cloud.calls_made == len(sent)  # each answer recorded once
    assert sorted(json.loads(line)["key"] for line in _lines(path)) == \
        sorted(ex.key for ex in examples if ex.prompt in sent)


def test_http_a_bug_in_a_request_is_raised_not_a_missing_answer(endpoint, task, monkeypatch):
    """An exception that is no CloudError (a bug, a MemoryError) reaches the caller, as it
    would without threads; an API key that cannot go into a header is a CloudAuthError."""
    backend = make_backend(endpoint.url, concurrency=2)

    def broken(raw, key):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(backend, "_parse", broken)
    cloud = Cloud(backend, CloudCache(None), "http", "cloud-model")
    with pytest.raises(ZeroDivisionError, match="a bug"):
        cloud.ask(task, task.examples("test")[:5])
    monkeypatch.setenv("TEST_CLOUD_KEY", "sk-abc\u2026")  # a pasted ellipsis
    with pytest.raises(CloudAuthError, match="TEST_CLOUD_KEY holds a character that is not printable ASCII"):
        make_backend(endpoint.url).complete(task, task.examples("test")[:3])


def test_http_a_second_ctrl_c_stops_waiting_and_nothing_is_retried(endpoint, task, tmp_path):
    """The second Ctrl-C ends the wait for the requests under way at once; they fail (500) and
    are not retried after it, and the backend serves a later batch normally."""
    examples = task.examples("test")[:4]
    endpoint.script = [(500, "down", {}, 3.0)] * 2
    endpoint.interrupt_at = 2
    backend = make_backend(endpoint.url, concurrency=2, retries=3)
    backend.sleep = None  # the real, interruptible backoff wait
    cloud = Cloud(backend, CloudCache(tmp_path / "c.jsonl"), "http", "cloud-model")
    second = threading.Timer(0.2, signal.pthread_kill,
                             (threading.main_thread().ident, signal.SIGINT))
    start = time.time()
    second.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            cloud.ask(task, examples)
    finally:
        second.cancel()
    assert time.time() - start < 2.0 and len(cloud.cache) == 0
    time.sleep(3.5)  # the two 500s arrive meanwhile: no retry follows them
    assert len(endpoint.requests) == 2
    endpoint.interrupt_at = None
    assert [a.text for a in cloud.ask(task, examples[:1])] == [examples[0].prompt[::-1]]


def test_prefill_cli_ctrl_c_says_what_is_cached(endpoint, task, tmp_path, capsys):
    import cloud
    examples = TinyCountdownTask(n_train=20).examples("train")[:4]
    endpoint.delay_for = {ex.prompt: 1.0 for ex in examples}
    endpoint.interrupt_at = 2
    cache = tmp_path / "c.jsonl"
    code = cloud.main(["--task", "tiny_countdown", "--n-train", "20", "--limit", "4",
                       "--backend", "http", "--base-url", endpoint.url, "--model", "m",
                       "--api-key-env", "TEST_CLOUD_KEY", "--concurrency", "2",
                       "--cache", str(cache)])
    assert code == 130 and len(_lines(cache)) == 2
    assert "interrupted: 2 new answers are cached" in capsys.readouterr().err


def test_http_timeout_is_retried(endpoint):
    endpoint.script = [ok("late"), ok("on time")]
    endpoint.script[0] = (200, endpoint.script[0][1], {}, 0.6)  # slower than the client's timeout
    backend = make_backend(endpoint.url, timeout=0.2)
    start = time.time()
    assert backend.chat(MESSAGES) == "on time"
    assert len(endpoint.requests) == 2 and len(backend.slept) == 1
    assert time.time() - start < 2


def test_http_gives_up_and_reports_per_prompt(endpoint, task):
    endpoint.script = [(500, "down", {}, 0)] * 3
    backend = make_backend(endpoint.url, retries=2)
    with pytest.raises(CloudError, match="gave up after 3 attempts.*HTTP 500"):
        backend.chat(MESSAGES)
    endpoint.script = [(502, "down", {}, 0)] * 2
    ex = task.examples("test")[0]
    cloud = Cloud(make_backend(endpoint.url, retries=1), CloudCache(None), "http", "cloud-model")
    (answer,) = cloud.ask(task, [ex])
    assert answer.error and "502" in answer.error and cloud.failures == 1 and len(cloud.cache) == 0


@pytest.mark.parametrize("payload,needle", [
    ("this is not json", "malformed JSON"),
    ('{"choices": []}', "no choices"),
    ('{"id": 1}', "no choices"),
    ('{"choices": [{"message": {"content": null}}]}', "empty"),
    ('{"choices": [{"message": {"content": "  "}}]}', "empty"),
    ('{"choices": [{"text": "old api"}]}', "empty"),
])
def test_http_bad_responses_are_clear_errors(endpoint, payload, needle):
    endpoint.script = [(200, payload, {}, 0)]
    with pytest.raises(CloudError, match=needle):
        make_backend(endpoint.url).chat(MESSAGES)
    assert len(endpoint.requests) == 1  # not retried


@pytest.mark.parametrize("status", [400, 404, 422])
def test_http_client_errors_not_retried(endpoint, status):
    endpoint.script = [(status, '{"error": "context too long"}', {}, 0), ok("a retry got through")]
    backend = make_backend(endpoint.url)
    with pytest.raises(CloudError, match=f"HTTP {status} .*not retried.*context too long"):
        backend.chat(MESSAGES)
    assert len(endpoint.requests) == 1 and backend.slept == []


def test_http_connection_error_is_retried():
    with socket.socket() as s:  # a port nobody listens on once this closes: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = make_backend(f"http://127.0.0.1:{port}", retries=2)
    with pytest.raises(CloudBatchError, match="not reached in 3 attempts.*URLError"):
        backend.chat(MESSAGES)     # never reached: it stops a batch (the test below)
    assert len(backend.slept) == 2


def test_http_401_names_env_var_and_hides_key(endpoint, monkeypatch, task):
    secret = "sk-very-secret-987"
    monkeypatch.setenv("TEST_CLOUD_KEY", secret)
    endpoint.script = [(401, f'{{"error": "Incorrect API key provided: {secret}"}}', {}, 0)]
    with pytest.raises(CloudAuthError) as err:
        make_backend(endpoint.url).chat(MESSAGES)
    assert "TEST_CLOUD_KEY" in str(err.value) and secret not in str(err.value)
    assert len(endpoint.requests) == 1
    endpoint.script = [(401, "no", {}, 0)] * 3
    with pytest.raises(CloudAuthError):  # stops the whole batch
        make_backend(endpoint.url, concurrency=1).complete(task, task.examples("test")[:3])


def test_http_concurrency_and_order(endpoint, task):
    """The server holds each request until 3 are in flight together (a barrier; a timeout breaks
    it so fewer parallel requests fail fast instead of hanging), then answers the first of each
    three last: results must still come back in input order."""
    examples = task.examples("test")[:12]
    endpoint.hold = threading.Barrier(3, timeout=10)
    endpoint.delay_for = {ex.prompt: 0.04 * (2 - i % 3) for i, ex in enumerate(examples)}
    backend = make_backend(endpoint.url, concurrency=3, retries=0, timeout=15)
    texts = backend.complete(task, examples)
    assert texts == [ex.prompt[::-1] for ex in examples]  # the fake echoes the prompt reversed
    assert not endpoint.hold.broken and endpoint.max_in_flight == 3 and len(endpoint.requests) == 12


# ----------------------------------------------------------------------------------------------
# Local backend with a fake model.py / sample.py

def fake_local_model(monkeypatch, answer, eos=True):
    """Stand-ins for the `model` and `sample` modules LocalBackend imports: a character
    tokenizer (EOS id 0) and a generate that writes answer(prompt ids) for every row, followed by
    EOS when `eos` (else the row reads as cut off at max_new_tokens). Returns the dict in which
    the calls are recorded."""
    import torch

    class CharTokenizer:
        eos_ids = [0]
        chat_format = "fake"  # it renders chat messages, in its own markup (apply_chat)

        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

        def apply_chat(self, messages, add_generation_prompt=True):
            assert add_generation_prompt
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

        def prompt_ids(self, prompt):  # as model.Tokenizer's: raw text as is, messages as chat
            return self.encode(prompt if isinstance(prompt, str) else self.apply_chat(prompt))

    calls = {}

    def load_pretrained(path, dtype=None, device=None):
        calls["load"] = (path, dtype, device)
        return "fake-model"

    def generate(model, prompts, n=1, max_new_tokens=16, temperature=1.0, stop_ids=(), seed=0):
        calls.setdefault("generate", []).append({"prompts": prompts, "temperature": temperature,
                                                 "stop_ids": list(stop_ids), "max_new_tokens": max_new_tokens})
        tokens = torch.zeros(len(prompts), max_new_tokens, dtype=torch.long)
        lengths = torch.zeros(len(prompts), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids = [ord(c) for c in answer(prompt)] + ([0] if eos else [])
            tokens[row, :len(ids)] = torch.tensor(ids)
            lengths[row] = len(ids)
        return types.SimpleNamespace(tokens=tokens, lengths=lengths)

    import model
    monkeypatch.setitem(sys.modules, "model", types.SimpleNamespace(
        load_pretrained=load_pretrained, load_tokenizer=lambda path: CharTokenizer(),
        ModelConfig=model.ModelConfig, read_json=model.read_json, weights_dtype=model.weights_dtype,
        resolve_device=model.resolve_device, check_writable=model.check_writable,
        status_line=model.status_line))
    monkeypatch.setitem(sys.modules, "sample", types.SimpleNamespace(generate=generate))
    return calls


@pytest.fixture
def ckpt(tmp_path):
    """A directory that passes LocalBackend's check (it has a config.json, a context of 4096
    tokens); the fake model stands in for what would be loaded from it."""
    from model import ModelConfig
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text(
        json.dumps(ModelConfig(max_position_embeddings=4096).to_hf()))
    return str(tmp_path / "big")


def test_local_backend_with_fake_model(monkeypatch, task, ckpt):
    calls = fake_local_model(monkeypatch, lambda prompt: f"echo{len(prompt)}")
    backend = LocalBackend(ckpt, max_new_tokens=16, batch_size=2)
    examples = task.examples("test")[:3]
    texts = backend.complete(task, examples)
    assert calls["load"] == (ckpt, None, None)
    assert texts == [f"echo{len(ex.prompt)}" for ex in examples]  # EOS stripped
    first = calls["generate"][0]
    assert first["prompts"] == [[ord(c) for c in ex.prompt] for ex in examples[:2]]  # raw prompt, no chat
    assert first["temperature"] == 0.0 and first["max_new_tokens"] == 16
    assert sorted(first["stop_ids"]) == sorted([0, ord("A"), ord("H")])
    assert len(calls["generate"]) == 2  # batches of 2

    countdown = CountdownTask(n_train=0, n_test=1, seed=0)
    (ex,) = countdown.examples("test")
    (text,) = backend.complete(countdown, [ex])
    chat = "".join(f"<{m['role']}>{m['content']}" for m in countdown.cloud_messages(ex)) + "<assistant>"
    assert calls["generate"][-1]["prompts"] == [[ord(c) for c in chat]]
    assert calls["generate"][-1]["stop_ids"] == [0]
    assert text == f"echo{len(chat)}"


@pytest.mark.parametrize("args, message", [
    (["--task", "tiny_countdown", "--p-correct", "2"], "oracle p_correct=2.0 must be a number"),
    (["--task", "tiny_countdown", "--backend", "http"], "http cloud backend needs base_url"),
    (["--task", "tiny_countdown", "--n-test", "-1"], "n_test=-1 must be an integer >= 0"),
])
def test_prefill_cli_errors_are_one_line(tmp_path, args, message):
    import cloud
    with pytest.raises(SystemExit) as e:
        cloud.main(args + ["--cache", str(tmp_path / "c.jsonl")])
    assert isinstance(e.value.code, str) and message in e.value.code and "\n" not in e.value.code
    with pytest.raises(SystemExit) as e:  # argparse: usage, status 2
        cloud.main(["--task", "tiny_countdown", "--chunk", "0"])
    assert e.value.code == 2


def test_prefill_cli_names_its_own_option_for_a_missing_math_file(capsys):
    import cloud
    with pytest.raises(SystemExit) as e:  # argparse: usage, status 2
        cloud.main(["--task", "math", "--split", "test", "--data-train", "t.jsonl"])
    assert e.value.code == 2
    assert "--task math --split test needs --data-test" in capsys.readouterr().err


def test_prefill_cli_fills_the_cache(tmp_path, capsys):
    import cloud
    cache = tmp_path / "c.jsonl"
    assert cloud.main(["--task", "tiny_countdown", "--limit", "5", "--cache", str(cache)]) == 0
    assert len(cache.read_text().splitlines()) == 5
    assert "5 prompts, calls made 5" in capsys.readouterr().out
    # another cloud's answers do not join them: no run could read the file then
    with pytest.raises(SystemExit) as e:
        cloud.main(["--task", "tiny_countdown", "--split", "test", "--limit", "5",
                    "--p-correct", "0.5", "--cache", str(cache)])
    assert "holds answers of backend 'oracle'" in e.value.code
    assert len(cache.read_text().splitlines()) == 5


def test_prefill_cli_a_cache_that_cannot_be_appended_to_sends_nothing(endpoint, monkeypatch,
                                                                       tmp_path):
    """A read-only cache file failed at the first answer to arrive: every request under way
    was paid for and lost (none could be cached), and asked again once fixed. Now the prefill
    says so before it sends anything, as train.py and eval.py do."""
    import builtins
    import cloud
    monkeypatch.setenv("TEST_CLOUD_KEY", "sk-x")
    cache = tmp_path / "c.jsonl"
    cache.write_text("")
    real_open = builtins.open

    def read_only_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and \
                os.path.abspath(file) == str(cache):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only_open)
    with pytest.raises(SystemExit) as e:
        cloud.main(["--task", "tiny_countdown", "--limit", "6", "--backend", "http",
                    "--base-url", endpoint.url, "--model", "m", "--api-key-env", "TEST_CLOUD_KEY",
                    "--concurrency", "3", "--cache", str(cache)])
    assert endpoint.requests == []  # not one paid for
    assert e.value.code == (f"cloud.py: cloud cache {cache} cannot be appended to (Permission "
                            f"denied): make it writable, then run the same command again")


def test_prefill_cli_a_cache_that_cannot_be_made_sends_nothing(endpoint, monkeypatch, tmp_path):
    """A new cache file whose directory cannot be made (here a file stands where a parent
    directory would go) failed at the first answer, every request under way lost with it."""
    import cloud
    monkeypatch.setenv("TEST_CLOUD_KEY", "sk-x")
    (tmp_path / "blocker").write_text("")
    cache = tmp_path / "blocker" / "runs" / "c.jsonl"
    with pytest.raises(SystemExit) as e:
        cloud.main(["--task", "tiny_countdown", "--limit", "6", "--backend", "http",
                    "--base-url", endpoint.url, "--model", "m", "--api-key-env", "TEST_CLOUD_KEY",
                    "--concurrency", "3", "--cache", str(cache)])
    assert endpoint.requests == []
    assert e.value.code == (f"cloud.py: cloud cache directory {str(cache.parent)!r} cannot be "
                            f"written: {tmp_path / 'blocker'} is not a directory")


@pytest.mark.parametrize("args, owner", [(["--base-url", "http://h", "--model", "m"], "http"),
                                         (["--backend", "http", "--path", "ckpt"], "local"),
                                         (["--backend", "local", "--seed", "3"], "oracle")])
def test_prefill_cli_refuses_an_option_of_another_backend(tmp_path, capsys, args, owner):
    """--base-url without --backend http (the default is oracle) wrote simulated answers."""
    import cloud
    with pytest.raises(SystemExit) as e:
        cloud.main(["--task", "tiny_countdown", "--limit", "5", "--cache", str(tmp_path / "c.jsonl"),
                    *args])
    assert e.value.code == 2 and not (tmp_path / "c.jsonl").exists()
    backend = args[1] if args[0] == "--backend" else "oracle"
    assert f"is an option of the {owner} backend, not of --backend {backend}" in capsys.readouterr().err


def test_http_retry_after_is_capped_by_max_wait(endpoint):
    endpoint.script = [(429, "slow down", {"Retry-After": "86400"}, 0), ok("done")]
    backend = make_backend(endpoint.url, max_wait=5.0)
    assert backend.chat(MESSAGES) == "done"
    assert backend.slept == [5.0]


def test_http_no_cap_on_waits_and_a_retry_after_of_years_is_a_wait_not_a_crash(endpoint):
    """max_wait=inf passes the settings check; the wait threading cannot take was an
    OverflowError out of the batch, not a wait the batch's stop ends."""
    endpoint.script = [(429, "busy", {"Retry-After": "99999999999"}, 0)]
    backend = make_backend(endpoint.url, max_wait=float("inf"))
    backend.sleep = None  # the real wait, on the batch's stop event
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(CloudError, match="interrupted: not sent"):
        backend.chat(MESSAGES, stop)


def test_http_negative_retry_after_falls_back_to_backoff(endpoint):
    endpoint.script = [(429, "slow down", {"Retry-After": "-5"}, 0), ok("done")]
    backend = make_backend(endpoint.url, backoff=0.5)
    assert backend.chat(MESSAGES) == "done"
    assert len(backend.slept) == 1 and 0.25 <= backend.slept[0] <= 0.75  # backoff, not -5 s


def test_http_403_is_an_auth_error(endpoint, monkeypatch):
    monkeypatch.setenv("TEST_CLOUD_KEY", "sk-x")
    endpoint.script = [(403, "forbidden", {}, 0)]
    with pytest.raises(CloudAuthError, match="TEST_CLOUD_KEY"):
        make_backend(endpoint.url).chat(MESSAGES)
    assert len(endpoint.requests) == 1


def test_cache_refuses_answers_to_a_changed_cloud_prompt(tmp_path, monkeypatch):
    import tasks
    countdown = CountdownTask(n_train=0, n_test=2, seed=0)
    examples = countdown.examples("test")
    path = tmp_path / "c.jsonl"
    make_cloud({"backend": "oracle"}, cache_path=path).ask(countdown, examples)
    # the cloud's system message changes; the device prompt (example.prompt) does not
    monkeypatch.setattr(tasks, "CLOUD_TEMPLATE1_SYSTEM", tasks.CLOUD_TEMPLATE1_SYSTEM + " Be brief.")
    with pytest.raises(ValueError, match="for a different prompt"):
        make_cloud({"backend": "oracle"}, cache_path=path).ask(countdown, examples)


def test_backend_answer_count_must_match_the_prompts(task):
    class Surplus:
        name, model_name = "oracle", "m"

        def complete(self, task, examples):
            return OracleBackend().complete(task, examples) + ["a surplus answer"]

    cloud = Cloud(Surplus(), CloudCache(None), "oracle", "m")
    with pytest.raises(RuntimeError, match="2 answers for 1 prompts"):
        cloud.ask(task, task.examples("train")[:1])
    assert len(cloud.cache) == 0


def test_local_backend_fails_only_the_prompts_that_do_not_fit_its_context(tmp_path):
    """A real checkpoint of a 24-token context: with max_new_tokens=10, the 13-token tiny
    prompts fit (13 + 10 <= 24) and a 15-token one does not; it fails alone, uncached, and
    check_fits names it before any request."""
    tiny = TinyCountdownTask(n_train=1, n_test=2)
    tiny_cloud_checkpoint(tmp_path / "cloud", context=24)
    ok = tiny.examples("test")
    long = Example("long", ok[0].prompt + "00", ok[0].data)  # 15 characters, 15 tokens
    cloud = make_cloud({"backend": "local", "path": str(tmp_path / "cloud"), "max_new_tokens": 10})
    answers = cloud.ask(tiny, [ok[0], long, ok[1]])
    assert [a.error is None for a in answers] == [True, False, True]
    assert answers[1].error == (f"CloudError: a prompt of 15 tokens plus the local cloud's max_new_tokens=10 "
                                f"exceeds its context (max_position_embeddings=24 in {tmp_path / 'cloud'})")
    assert len(cloud.cache) == 2 and cloud.failures == 1
    cloud.backend.check_fits(tiny, ok)
    with pytest.raises(ValueError, match="a prompt of 15 tokens .* lower its max_new_tokens to at most 9$"):
        cloud.backend.check_fits(tiny, ok + [long])
    longer = Example("longer", ok[0].prompt + "0" * 11, ok[0].data)  # 24 tokens: no room at all
    with pytest.raises(ValueError, match=r"a prompt of 24 tokens .*\): the prompt alone fills the context$"):
        cloud.backend.check_fits(tiny, [longer])


def tiny_cloud_checkpoint(path, context=24):
    from model import ModelConfig, Transformer, build_char_tokenizer, save_pretrained
    tok = build_char_tokenizer(TinyCountdownTask(n_train=1, n_test=1).alphabet)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=context, eos_token_id=1)).init_weights(0)
    save_pretrained(model, str(path), tok)
    return str(path)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_local_backend_answers_the_same_under_a_callers_autocast(tmp_path, monkeypatch, dtype):
    """train.py samples under bf16 autocast in bf16-mixed runs and asks the cloud from there:
    the cloud's answers must not change (float16 weights crashed, float32 ones were rounded)."""
    import torch
    import sample
    path = tiny_cloud_checkpoint(tmp_path / "cloud", context=64)
    tiny = TinyCountdownTask(n_train=1, n_test=8)
    real, autocast_on = sample.generate, []

    def generate(*args, **kwargs):  # the tiny model's answers may survive bf16 rounding: look
        autocast_on.append(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", generate)
    plain = LocalBackend(path, max_new_tokens=40, dtype=dtype).complete(tiny, tiny.examples("test"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = LocalBackend(path, max_new_tokens=40, dtype=dtype).complete(tiny, tiny.examples("test"))
    assert inside == plain and all(len(text) > 5 for text in plain)
    assert autocast_on == [False, False]


def test_local_backend_checks_its_device_before_a_run(tmp_path, monkeypatch):
    """A typo at once; a device this machine lacks when a run starts (check_fits), so that a
    run's cached answers can still be read on a machine without it."""
    import torch
    with pytest.raises(ValueError, match=r"^local cloud backend: device='gpu' is not allowed; "
                                         r"use cpu, cuda or cuda:N$"):
        LocalBackend(tiny_cloud_checkpoint(tmp_path / "c"), device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backend = LocalBackend(str(tmp_path / "c"), max_new_tokens=4, device="cuda:1")
    tiny = TinyCountdownTask(n_train=1, n_test=1)
    with pytest.raises(ValueError, match=r"^local cloud backend: device='cuda:1' is not allowed; "
                                         r"use cpu \(no CUDA device is available here\)$"):
        backend.check_fits(tiny, tiny.examples("test"))


def test_local_backend_cache_identity_names_the_settings_that_change_its_answers(ckpt):
    import torch
    a = LocalBackend(ckpt, max_new_tokens=16)
    assert a.model_name == f"{ckpt} (greedy, max_new_tokens=16, float32)"
    assert LocalBackend(os.path.join(ckpt, ".", ""), max_new_tokens=16).model_name == a.model_name
    assert LocalBackend(ckpt, max_new_tokens=32).model_name != a.model_name
    for kwargs in ({"dtype": "bfloat16"}, {"dtype": torch.bfloat16}, {"device": "cuda:0"}):
        assert LocalBackend(ckpt, max_new_tokens=16, **kwargs).model_name.endswith(
            "max_new_tokens=16, bfloat16)")


def test_prefill_cli_fills_a_local_cloud_cache_a_cuda_run_can_read(tmp_path, monkeypatch, ckpt):
    """--device / --dtype give the prefilled answers the identity of the run's cloud section."""
    import cloud
    import torch
    fake_local_model(monkeypatch, lambda prompt: "[007*003=021,021+012=033]")
    cache = tmp_path / "c.jsonl"
    with pytest.raises(SystemExit) as e:  # no GPU here: one line, before anything is sent
        cloud.main(["--task", "tiny_countdown", "--backend", "local", "--path", ckpt,
                    "--device", "cuda", "--limit", "2", "--cache", str(cache)])
    assert e.value.code.startswith("cloud.py: local cloud backend: device='cuda' is not allowed")
    monkeypatch.setattr(sys.modules["model"], "resolve_device",  # as if there were one
                        lambda device, name: torch.device(device))
    assert cloud.main(["--task", "tiny_countdown", "--backend", "local", "--path", ckpt,
                       "--device", "cuda", "--limit", "2", "--cache", str(cache)]) == 0
    run_cloud = make_cloud({"backend": "local", "path": ckpt, "device": "cuda"}, cache_path=cache)
    run_cloud.check_cache()
    assert len(run_cloud.cache) == 2 and run_cloud.model_name.endswith("bfloat16)")


def test_local_backend_keeps_the_last_token_when_no_eos(monkeypatch, task, ckpt):
    # a row that hit max_new_tokens: its last token is part of the answer, not an EOS
    fake_local_model(monkeypatch, lambda prompt: "[007*003=021,021+012=033]", eos=False)
    backend = LocalBackend(ckpt, max_new_tokens=32)
    assert backend.complete(task, task.examples("test")[:2]) == ["[007*003=021,021+012=033]"] * 2


def test_local_backend_ignores_multi_token_stop_texts(monkeypatch, ckpt):
    calls = fake_local_model(monkeypatch, lambda prompt: "[007*003=021,021+012=033]")
    backend = LocalBackend(ckpt, max_new_tokens=32)
    tiny = TinyCountdownTask(n_train=1, n_test=1)
    tiny.stop_texts = ("A", "<stop>")  # "<stop>" is 6 tokens here: it cannot be a stop id
    backend.complete(tiny, tiny.examples("test"))
    assert sorted(calls["generate"][-1]["stop_ids"]) == [0, ord("A")]


# ----------------------------------------------------------------------------------------------
# Several processes on one cache file (train.py, eval.py and `python cloud.py` may share it)

def _file_keys(path):
    return [json.loads(line)["key"] for line in _lines(path)]


def test_two_writers_after_a_torn_line_lose_nothing(tmp_path):
    """Both caches load a file whose last line is torn; the first to append repairs it; the
    second must neither cut the first one's records nor write a key twice."""
    path = tmp_path / "cache.jsonl"
    whole = json.dumps(_record("k1", "a1")) + "\n"
    path.write_text(whole + json.dumps(_record("k9", "lost"))[:30], encoding="utf-8")  # a crash mid-write
    train, ev = CloudCache(path), CloudCache(path)
    assert train.ignored_torn_line and ev.ignored_torn_line and len(train) == len(ev) == 1
    train.put_many([_record("k2", "a2"), _record("k3", "a3")])
    assert _file_keys(path) == ["k1", "k2", "k3"]
    ev.put_many([_record("k4", "a4")])
    expected = "".join(json.dumps(_record(k, a)) + "\n" for k, a in [("k1", "a1"), ("k2", "a2"), ("k3", "a3"), ("k4", "a4")])
    assert path.read_text(encoding="utf-8") == expected  # the torn bytes cut once, nothing else lost
    assert ev.get("tiny_countdown", "k2")["answer"] == "a2"  # ev took in train's records
    ev.put_many([_record("k3", "another answer")])  # train's answer came first and stays
    assert path.read_text(encoding="utf-8") == expected
    assert ev.get("tiny_countdown", "k3")["answer"] == "a3"
    train.put_many([_record("k5", "a5")])
    assert _file_keys(path) == ["k1", "k2", "k3", "k4", "k5"] and len(train) == 5


@pytest.mark.parametrize("end, kept", [
    ('{"task": "tiny_countdown", "key": "k2", "answer": "h\u00e9', ""),  # torn mid-line (and mid-character)
    ('{"task": "tiny_countdown", "key": "k2"}\n', ""),                    # a corrupt last line
    (json.dumps(_record("k2", "a2")), json.dumps(_record("k2", "a2")) + "\n"),  # whole, lost its "\n"
])
def test_end_left_by_another_writer_is_repaired_exactly(tmp_path, end, kept):
    """The cache loaded a clean file; another process then crashed mid-append. The next append
    cuts exactly the torn bytes (or restores a lost newline) and keeps every whole record."""
    path = tmp_path / "cache.jsonl"
    first = json.dumps(_record("k1", "a1")) + "\n"
    path.write_text(first, encoding="utf-8")
    cache = CloudCache(path)
    assert not cache.ignored_torn_line
    with open(path, "ab") as f:
        f.write(end.encode("utf-8"))
    cache.put_many([_record("k3", "a3")])
    assert path.read_text(encoding="utf-8") == first + kept + json.dumps(_record("k3", "a3")) + "\n"
    assert (cache.get("tiny_countdown", "k2") is not None) == bool(kept)
    assert len(CloudCache(path)) == 2 + bool(kept) and not CloudCache(path).ignored_torn_line


def test_cloud_serves_answers_another_process_cached(task, tmp_path):
    path = tmp_path / "cache.jsonl"
    a, b = task.examples("train")[:2]
    backend_train, backend_eval = CountingBackend(), CountingBackend()
    train = Cloud(backend_train, CloudCache(path), "oracle", backend_train.model_name)
    ev = Cloud(backend_eval, CloudCache(path), "oracle", backend_eval.model_name)  # both loaded an empty file
    train.ask(task, [a])
    answers = ev.ask(task, [a, b])
    assert backend_train.sent == [a.key] and backend_eval.sent == [b.key]  # a went to the cloud once
    assert answers[0].cached and answers[0].text == OracleBackend().complete(task, [a])[0]
    assert _file_keys(path) == [a.key, b.key]


def test_a_prompt_asked_by_two_processes_at_once_has_the_first_answer_everywhere(task, tmp_path):
    """Both processes send the prompt (neither had seen the other's answer); the file keeps the
    first answer, and the second process returns that one too, not its own."""
    path = tmp_path / "cache.jsonl"
    a = task.examples("train")[0]

    class Fixed(CountingBackend):
        def __init__(self, text):
            super().__init__()
            self.text = text

        def complete(self, task, examples):
            self.sent.extend(ex.key for ex in examples)
            return [self.text for _ in examples]

    first, second = Fixed("ANSWER-A"), Fixed("ANSWER-B")
    cloud_a = Cloud(first, CloudCache(path), "oracle", first.model_name)
    cloud_b = Cloud(second, CloudCache(path), "oracle", second.model_name)
    real_refresh = cloud_b.cache.refresh
    cloud_b.cache.refresh = lambda: None        # b decides to send before a's answer lands
    assert cloud_a.ask(task, [a])[0].text == "ANSWER-A"
    answer = cloud_b.ask(task, [a])[0]
    cloud_b.cache.refresh = real_refresh
    assert second.sent == [a.key] and answer.text == "ANSWER-A" and not answer.cached
    assert cloud_b.ask(task, [a])[0].text == "ANSWER-A" and _file_keys(path) == [a.key]


def test_a_cache_file_deleted_or_replaced_in_use_is_read_afresh(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = CloudCache(path)
    cache.put_many([_record("k1", "a1"), _record("k2", "a2")])
    path.unlink()                                   # deleted: the next append starts a new file
    cache.put_many([_record("k3", "a3")])
    assert _file_keys(path) == ["k3"] and cache.get("tiny_countdown", "k1")["answer"] == "a1"
    # replaced by a longer file (another inode): read from its start, not from the old offset
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(_record(k, k + "!")) + "\n" for k in ("z1", "z2", "k3")))
    os.replace(other, path)
    cache.refresh()
    assert cache.get("tiny_countdown", "z1")["answer"] == "z1!"
    assert cache.get("tiny_countdown", "k3")["answer"] == "a3"     # the first answer still wins
    cache.put_many([_record("z2", "again"), _record("k4", "a4")])
    assert _file_keys(path) == ["z1", "z2", "k3", "k4"]             # z2 not written twice


WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from cloud import CloudCache
cache = CloudCache({path!r})
time.sleep(max(0.0, {start} - time.time()))
for i in range({n}):
    cache.put_many([{{"task": "t", "key": "w{w}-%d" % i, "prompt_sha256": "", "answer": "x" * 3000,
                     "verdict": True, "backend": "oracle", "model": "m"}}])
"""


def test_concurrent_processes_keep_every_record(tmp_path):
    """Four processes that all loaded a file with a torn end append at the same time: every
    record arrives whole, exactly once (3 kB lines, so unlocked writes would interleave)."""
    import subprocess
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps(_record("k0", "a0")) + "\n" + '{"task": "t", "ke', encoding="utf-8")
    root, start, n = os.path.dirname(os.path.dirname(os.path.abspath(__file__))), time.time() + 1.0, 40
    procs = [subprocess.Popen([sys.executable, "-c", WRITER.format(root=root, path=str(path), start=start, n=n, w=w)])
             for w in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    keys = _file_keys(path)  # every line parses
    assert sorted(keys) == sorted(["k0"] + [f"w{w}-{i}" for w in range(4) for i in range(n)])
    assert path.read_bytes().endswith(b"\n")


def test_http_answers_are_cached_as_they_arrive_not_after_the_slowest(endpoint, task, tmp_path):
    """One slow prompt among six, two requests at a time: each fast answer is in the cache file
    (and counted by progress) while the slow one is still out, so neither throughput nor an
    interruption waits on it."""
    examples = task.examples("test")[:6]
    endpoint.delay_for = {examples[0].prompt: 0.8}
    path = tmp_path / "cache.jsonl"
    cloud = Cloud(make_backend(endpoint.url, concurrency=2, retries=0), CloudCache(path), "http",
                  "cloud-model")
    seen = []
    answers = cloud.ask(task, examples, progress=lambda d, t: seen.append((d, t, len(_lines(path)))))
    assert [a.text for a in answers] == [ex.prompt[::-1] for ex in examples]
    assert seen == [(d, 6, d) for d in range(1, 7)]          # one record per answer, as it came
    assert json.loads(_lines(path)[-1])["key"] == examples[0].key  # the slow one came last


# ----------------------------------------------------------------------------------------------
# Settings checked at construction; one-line CLI errors

@pytest.mark.parametrize("kwargs, message", [
    ({"backoff": -1.0}, "backoff=-1.0 (allowed: seconds >= 0)"),
    ({"max_wait": -0.5}, "max_wait=-0.5 (allowed: seconds >= 0)"),
    ({"max_tokens": 0}, "max_tokens=0 (allowed: an integer >= 1)"),
    ({"temperature": -0.1}, "temperature=-0.1 (allowed: a number >= 0)"),
    ({"temperature": float("nan")}, "temperature=nan (allowed: a number >= 0)"),
    ({"timeout": 0}, f"timeout=0 (allowed: seconds > 0, at most {threading.TIMEOUT_MAX:.0f})"),
    # no limit is no number a socket takes: each request failed, retried, as an OverflowError
    ({"timeout": float("inf")},
     f"timeout=inf (allowed: seconds > 0, at most {threading.TIMEOUT_MAX:.0f})"),
    ({"concurrency": 0}, "concurrency=0 (allowed: an integer >= 1)"),
    ({"concurrency": "abc"}, "concurrency='abc' (allowed: an integer >= 1)"),
    ({"concurrency": None}, "concurrency=None (allowed: an integer >= 1)"),
    ({"retries": 1.5}, "retries=1.5 (allowed: an integer >= 0)"),
    ({"timeout": [1]}, "timeout=[1] (allowed: seconds > 0"),
    ({"backoff": True}, "backoff=True (allowed: seconds >= 0)"),
    ({"api_key_env": 5}, "api_key_env=5 (allowed: the name of an environment variable)"),
])
def test_http_settings_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError) as e:
        HttpBackend("http://127.0.0.1:9", "m", **kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"path": None}, "path=None is not allowed"),
    ({"path": ""}, "path='' is not allowed"),
    ({"path": "/ckpt", "max_new_tokens": 0}, "max_new_tokens=0 is not allowed; an integer >= 1"),
    ({"path": "/ckpt", "batch_size": -2}, "batch_size=-2 is not allowed; an integer >= 1"),
])
def test_local_settings_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError) as e:
        make_cloud(backend="local", **kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize("extra, message", [
    ([], "--backend local needs --path"),
    (["--path", "/ckpt/big", "--max-new-tokens", "0"], "--max-new-tokens 0 is not allowed: an integer >= 1"),
])
def test_prefill_cli_local_settings_checked_before_loading(monkeypatch, tmp_path, capsys, extra, message):
    import cloud
    calls = fake_local_model(monkeypatch, lambda prompt: "never")
    with pytest.raises(SystemExit) as e:
        cloud.main(["--task", "tiny_countdown", "--backend", "local", "--cache", str(tmp_path / "c.jsonl")] + extra)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert calls == {} and not (tmp_path / "c.jsonl").exists()  # no model loaded, nothing written


def test_auth_error_keeps_the_answers_that_arrived(endpoint, task, tmp_path):
    path = tmp_path / "cache.jsonl"
    examples = task.examples("test")[:3]
    endpoint.script = [ok("first answer")] + [(401, "no", {}, 0)] * 2
    cloud = Cloud(make_backend(endpoint.url, concurrency=1, retries=0), CloudCache(path), "http", "cloud-model")
    with pytest.raises(CloudAuthError):
        cloud.ask(task, examples)
    assert [(r["key"], r["answer"]) for r in map(json.loads, _lines(path))] == [(examples[0].key, "first answer")]
    assert CloudCache(path).get(task.name, examples[1].key) is None


def test_prefill_cli_auth_error_is_one_line(endpoint, monkeypatch, tmp_path, capsys):
    import cloud
    monkeypatch.setenv("TEST_CLOUD_KEY", "sk-secret-55")
    cache = tmp_path / "c.jsonl"
    endpoint.script = [ok("first answer")] + [(401, '{\n  "error": "invalid key sk-secret-55"\n}', {}, 0)] * 2
    with pytest.raises(SystemExit) as e:
        cloud.main(["--task", "tiny_countdown", "--limit", "3", "--backend", "http", "--base-url", endpoint.url,
                    "--model", "m", "--api-key-env", "TEST_CLOUD_KEY", "--retries", "0", "--concurrency", "1",
                    "--cache", str(cache)])
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message
    assert "HTTP 401" in message and "TEST_CLOUD_KEY" in message and "sk-secret-55" not in message
    assert [json.loads(line)["answer"] for line in _lines(cache)] == ["first answer"]
    # the progress line shown before the error is ended, so the error gets a line of its own
    err = capsys.readouterr().err
    assert "1/3 asked" in err and err.endswith("\n")


def test_prefill_cli_says_why_calls_failed(endpoint, monkeypatch, tmp_path, capsys):
    """A 400 (a wrong --model, say) is no retry and no auth error: the summary counts it and
    shows what the server said."""
    import cloud
    monkeypatch.setenv("TEST_CLOUD_KEY", "sk-x")
    endpoint.script = [ok("an answer"), (400, '{"error": "model nope does not exist"}', {}, 0)]
    code = cloud.main(["--task", "tiny_countdown", "--limit", "2", "--backend", "http",
                       "--base-url", endpoint.url, "--model", "nope", "--api-key-env",
                       "TEST_CLOUD_KEY", "--retries", "0", "--concurrency", "1",
                       "--cache", str(tmp_path / "c.jsonl")])
    err = capsys.readouterr().err
    assert code == 1 and "first failure: CloudError: " in err and "HTTP 400" in err
    assert "model nope does not exist" in err


def test_a_local_backend_run_is_served_from_its_cache_without_the_model(tmp_path, monkeypatch, ckpt):
    """The checkpoint is read only when a prompt is not cached: a finished run whose answers
    are all cached can be evaluated after its cloud checkpoint has moved away."""
    calls = fake_local_model(monkeypatch, lambda prompt: "[007*003=021,021+012=033]")
    tiny = TinyCountdownTask(n_train=3, n_test=3)
    path = tmp_path / "c.jsonl"
    make_cloud({"backend": "local", "path": ckpt}, cache_path=path).ask(tiny, tiny.examples("test"))
    calls.clear()
    shutil.rmtree(ckpt)
    cloud = make_cloud({"backend": "local", "path": ckpt}, cache_path=path)
    assert len(cloud.ask(tiny, tiny.examples("test"))) == 3
    assert cloud.served_from_cache == 3 and calls == {}


def test_a_new_backend_needs_only_complete(tmp_path, monkeypatch, capsys):
    """A registered class with just complete(): make_cloud files its answers under its registry
    name (and model_name ""), and the prefill command runs it with no settings."""
    import cloud

    class Echo:
        def complete(self, task, examples):
            return [f"echo {ex.key}" for ex in examples]

    monkeypatch.setitem(cloud.BACKENDS, "echo", Echo)
    c = make_cloud({"backend": "echo"}, cache_path=tmp_path / "a.jsonl")
    examples = TinyCountdownTask(n_train=3, n_test=3).examples("test")
    assert [a.text for a in c.ask(TinyCountdownTask(n_train=3, n_test=3), examples)] == [
        f"echo {ex.key}" for ex in examples]
    records = [json.loads(line) for line in _lines(tmp_path / "a.jsonl")]
    assert {(r["backend"], r["model"]) for r in records} == {("echo", "")}
    assert cloud.main(["--task", "tiny_countdown", "--backend", "echo", "--limit", "4",
                       "--cache", str(tmp_path / "b.jsonl")]) == 0
    assert len(_lines(tmp_path / "b.jsonl")) == 4
    with pytest.raises(ValueError, match=r"cloud backend 'echo' has no argument\(s\) \['x'\]; "
                                         r"allowed: \[\]"):
        make_cloud({"backend": "echo", "x": 1})


@pytest.mark.parametrize("answer", [7, None, b"7"])
def test_a_backend_answer_that_is_not_text_is_named(answer, tmp_path, monkeypatch):
    """complete() gives a str (or an exception) per prompt: anything else failed as a TypeError
    inside the cache ('NoneType' object is not subscriptable), or (None) came back as no answer
    at all, to fail later in the rollout."""
    import cloud

    class Numbers:
        def complete(self, task, examples):
            return ["[ok]"] + [answer] * (len(examples) - 1)

    monkeypatch.setitem(cloud.BACKENDS, "numbers", Numbers)
    c = make_cloud({"backend": "numbers"}, cache_path=tmp_path / "a.jsonl")
    task = TinyCountdownTask(n_train=3, n_test=3)
    examples = task.examples("test")
    with pytest.raises(RuntimeError, match=re.escape(
            f"cloud backend 'numbers' answered {examples[1].key} with {answer!r} "
            f"({type(answer).__name__}); an answer must be a str, or an exception for a failed call")):
        c.ask(task, examples)


def test_http_an_answer_with_half_a_surrogate_pair_is_cached(endpoint, task, tmp_path):
    """JSON can escape half of a UTF-16 pair alone ("\\ud83d"); json.loads keeps it, and writing
    the answer to the UTF-8 cache raised UnicodeEncodeError, which stopped the run. It becomes
    U+FFFD; a whole escaped pair stays the character it encodes."""
    examples = task.examples("test")[:2]
    endpoint.script = [(200, '{"choices": [{"message": {"content": "7 \\ud83d"}}]}', {}, 0),
                       (200, '{"choices": [{"message": {"content": "8 \\ud83d\\ude00"}}]}', {}, 0)]
    cloud = Cloud(make_backend(endpoint.url, concurrency=1), CloudCache(tmp_path / "c.jsonl"),
                  "http", "cloud-model")
    assert [a.text for a in cloud.ask(task, examples)] == ["7 \ufffd", "8 \U0001f600"]
    reread = Cloud(make_backend(endpoint.url), CloudCache(tmp_path / "c.jsonl"), "http",
                   "cloud-model")
    assert [(a.text, a.cached) for a in reread.ask(task, examples)] == [("7 \ufffd", True),
                                                                         ("8 \U0001f600", True)]


def test_http_a_body_trickled_past_the_timeout_is_a_timeout(endpoint):
    """The socket's timeout holds for one read, so a body sent a byte every 0.05 s kept a request
    with timeout=0.5 for as long as the server liked (here 2.4 s, then it was answered). The
    whole body now has `timeout` seconds; past that, the attempt is a timeout and retried."""
    answer = ok("7")[1]
    endpoint.script = [(200, answer, {"X-Trickle": "0.05"}, 0), ok("fine")]
    start = time.monotonic()
    assert make_backend(endpoint.url, timeout=0.5).chat(MESSAGES) == "fine"
    assert time.monotonic() - start < 0.5 * len(answer) * 0.05
    assert len(endpoint.requests) == 2
    endpoint.script = [(200, answer, {"X-Trickle": "0.05"}, 0)]
    with pytest.raises(CloudError, match=r"TimeoutError: the body took over timeout=0.5 s"):
        make_backend(endpoint.url, timeout=0.5, retries=0).chat(MESSAGES)
    # blank lines sent to keep the connection open while the answer is generated do not count
    endpoint.script = [(200, answer, {"X-Keep-Alive": "8,0.15"}, 0)]  # 1.2 s of them
    assert make_backend(endpoint.url, timeout=0.5, retries=0).chat(MESSAGES) == "7"


@pytest.mark.parametrize("payload, answer", [
    ("\ufeff" + json.dumps({"choices": [{"message": {"content": "7"}}]}), "7"),  # a BOM first
    (json.dumps({"choices": [{"message": {"content": [{"type": "text", "text": "7 "},
                                                      {"type": "image_url"},
                                                      {"type": "text", "text": "apples"}]}}]}),
     "7 apples"),                                                       # content as parts
])
def test_http_answers_in_other_accepted_shapes(endpoint, payload, answer):
    endpoint.script = [(200, payload, {}, 0)]
    assert make_backend(endpoint.url).chat(MESSAGES) == answer


@pytest.mark.parametrize("payload", [
    "[" * 100000 + "]" * 100000,                                        # RecursionError inside
    '{"choices": [{"message": {"content": "7"}}], "usage": ' + "9" * 5000 + "}",  # 4300 digits
])
def test_http_json_python_cannot_read_fails_the_prompt_not_the_run(endpoint, payload):
    """json.loads raised RecursionError / ValueError (Python's integer-digit limit) past the
    backend's handler, which ended the run; now the prompt fails, not retried."""
    endpoint.script = [(200, payload, {}, 0)]
    with pytest.raises(CloudError, match="malformed JSON from "):
        make_backend(endpoint.url).chat(MESSAGES)
    assert len(endpoint.requests) == 1


def test_http_a_body_without_end_is_not_read_into_memory(endpoint):
    """A body longer than MAX_BODY_BYTES fails the prompt (it was read whole into memory: a
    server streaming without end filled it), and a Content-Length of a terabyte over a short
    body is a cut-off answer, retried (it was one allocation of the announced size)."""
    from cloud import MAX_BODY_BYTES
    endpoint.script = [(200, "x" * (MAX_BODY_BYTES + 1), {}, 0)]
    with pytest.raises(CloudError, match=f"longer than {MAX_BODY_BYTES} bytes; not read"):
        make_backend(endpoint.url).chat(MESSAGES)
    assert len(endpoint.requests) == 1
    endpoint.script = [(200, '{"choices": [', {"X-Declared-Length": str(10 ** 12)}, 0),
                       ok("fine")]
    assert make_backend(endpoint.url).chat(MESSAGES) == "fine"


def test_an_answer_is_scored_against_the_example_it_answers(tmp_path):
    """The cache is keyed by the prompt, and its recorded verdict was served as the answer's
    verdict: a data file corrected since (2 + 2 was '#### 5') kept the old verdict, and a question
    given twice with two answers got the first one's verdict twice."""
    from tasks import MathTask

    def gsm8k(name, answer):
        path = tmp_path / name
        path.write_text(json.dumps({"question": "What is 2+2?", "answer": f"#### {answer}"}) + "\n")
        return MathTask(path_train=str(path), path_test=str(path), kind="gsm8k")

    cache = tmp_path / "c.jsonl"
    typo, fixed = gsm8k("typo.jsonl", 5), gsm8k("fixed.jsonl", 4)
    first = Cloud(OracleBackend(1.0), CloudCache(cache)).ask(typo, typo.examples("test"))
    assert [(a.correct, a.cached) for a in first] == [(True, False)]
    assert typo.cloud_correct(typo.examples("test")[0], first[0].text)
    # the same prompt after the file was fixed: the cached answer (5) is wrong now
    again = Cloud(OracleBackend(1.0), CloudCache(cache)).ask(fixed, fixed.examples("test"))
    assert [(a.text, a.correct, a.cached) for a in again] == [(first[0].text, False, True)]
    # both versions in one call, asked fresh: one call, each scored against its own answer
    both = typo.examples("test") + fixed.examples("test")
    backend = CountingBackend()
    backend.oracle = OracleBackend(1.0)
    answers = Cloud(backend, CloudCache(tmp_path / "fresh.jsonl")).ask(typo, both)
    assert len(backend.sent) == 1
    assert [(a.correct, a.cached) for a in answers] == [(True, False), (False, True)]


@pytest.mark.parametrize("template, why", [
    (None, "has no chat template \\(a raw-text model\\)"),
    ("{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}",
     "has a chat template in a markup other than ChatML"),
])
def test_local_backend_without_a_usable_chat_template_names_its_checkpoint(tmp_path, template, why):
    """A chat task's cloud on a checkpoint that cannot format chat messages: one error, before a
    run starts, naming the cloud's checkpoint (the tokenizer's own message told a caller to
    "give the prompt as a string" and did not say which model it was about)."""
    import re
    path = tiny_cloud_checkpoint(tmp_path / "c", context=4096)
    if template is not None:
        conf = json.load(open(os.path.join(path, "tokenizer_config.json")))
        json.dump({**conf, "chat_template": template}, open(os.path.join(path, "tokenizer_config.json"), "w"))
    countdown = CountdownTask(n_train=0, n_test=2, seed=0)
    backend = LocalBackend(path, max_new_tokens=4)
    message = (rf"^local cloud backend: the checkpoint {re.escape(path)} {why}.*, but task "
               r"'countdown' sends the cloud chat messages; give a chat \(instruct\) checkpoint")
    with pytest.raises(ValueError, match=message):
        backend.check_fits(countdown, countdown.examples("test"))
    with pytest.raises(ValueError, match=message):
        backend.complete(countdown, countdown.examples("test"))
    tiny = TinyCountdownTask(n_train=1, n_test=2)  # raw-text prompts: nothing to format
    assert len(backend.complete(tiny, tiny.examples("test"))) == 2


def test_http_no_part_of_the_key_reaches_an_error_message_where_the_body_is_cut(endpoint,
                                                                               monkeypatch):
    """Only the start of a body is read into an error message (4 KiB of an answer, 64 KiB of an
    error); a key straddling that point, after whitespace the message folds away, stays hidden;
    so does a key in a redirect's Location."""
    secret = "sk-SECRETKEY-0123456789"
    monkeypatch.setenv("TEST_CLOUD_KEY", secret)
    for step in [(200, " " * (4096 - 6) + secret, {}, 0),
                 (400, " " * ((1 << 16) - 6) + secret, {}, 0),
                 (500, " " * ((1 << 16) - 6) + secret, {}, 0),
                 (302, "", {"Location": f"http://elsewhere/?key={secret}"}, 0)]:
        endpoint.script = [step] * 4
        with pytest.raises(CloudError) as e:
            make_backend(endpoint.url).chat(MESSAGES)
        assert secret[:4] not in str(e.value), str(e.value)


def test_an_answer_another_cloud_cached_meanwhile_is_not_served(task, tmp_path):
    """Another process with another cloud (here: another oracle seed) caches the same prompt
    while this one waits for its own answer: that answer is not this cloud's, so it is refused
    as a cached one would be, never served as this cloud's answer."""
    path = tmp_path / "cache.jsonl"
    a = task.examples("train")[0]
    other = Cloud(OracleBackend(seed=1), CloudCache(path), "oracle", OracleBackend(seed=1).model_name)

    class Racing(CountingBackend):
        def complete(self, task, examples):
            other.cache.put_many([{"task": task.name, "key": a.key, "prompt_sha256": "",
                                   "answer": "OTHER", "verdict": False, "backend": "oracle",
                                   "model": other.model_name}])
            return super().complete(task, examples)

    backend = Racing()
    mine = Cloud(backend, CloudCache(path), "oracle", backend.model_name)
    with pytest.raises(ValueError, match="separate cache file"):
        mine.ask(task, [a])
