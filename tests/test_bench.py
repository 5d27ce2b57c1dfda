"""bench.py's command line (the benchmark itself is run by hand, never timed in tests)."""
import json
import os
import socket

import pytest

import bench


@pytest.mark.parametrize("args, message", [
    (["sample", "--model", "bad"], "invalid choice: 'bad'"),
    (["sample", "--reps", "0"], "'0' is not allowed: an integer >= 1"),
    (["sample", "--device", "tpu"], "--device='tpu' is not allowed; use cpu"),
    (["sample", "--device", "cuda:99"], "--device='cuda:99' is not allowed; use cpu"),
    (["sample", "--dtype", "fp16"], "invalid choice: 'fp16' (choose from 'fp32', 'bf16')"),
    (["graphs"], "graphs compares CUDA-graph with eager decoding: it needs --device cuda (got "
                 "--device cpu)"),
    (["graphs", "--arch", "gpt2"], "invalid choice: 'gpt2'"),
    (["graphs", "--new", "0"], "'0' is not allowed: an integer >= 1"),
])
def test_bad_arguments_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_failed_memory_measurement_is_reported_not_fatal(monkeypatch):
    """The child that measures memory failed (say, no /proc/self/clear_refs): its last error
    line is reported in place of the number, and the rates and ratio still print."""
    import subprocess
    import types
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: types.SimpleNamespace(
        returncode=1, stdout="", stderr="Traceback ...\nPermissionError: clear_refs\n"))
    assert bench.peak_memory("ours", "random-qwen2", "cpu") == \
        "unavailable (PermissionError: clear_refs)"


def test_without_transformers_the_comparison_is_a_one_line_error(monkeypatch):
    def no_transformers(*args):
        raise ImportError("No module named 'transformers'")
    monkeypatch.setattr(bench, "bench_sample", no_transformers)
    with pytest.raises(SystemExit) as e:
        bench.main(["sample"])
    assert e.value.code == ("bench.py: No module named 'transformers'; the comparison needs "
                            "transformers: pip install -r requirements-dev.txt")


def test_an_unfinished_smollm2_directory_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")   # a conversion that stopped part way
    monkeypatch.setenv("SMOLLM2_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        bench.smollm2_dir()
    assert e.value.code.startswith(f"bench.py: SmolLM2: {tmp_path} exists but lacks ")
    assert "\n" not in e.value.code


def test_the_warm_up_runs_at_the_timed_size(monkeypatch, capsys):
    """Each implementation's first call (the untimed warm-up) generates as many tokens as the
    timed runs: a shorter one left transformers' slow first full-length generate on CUDA inside
    the timed runs (2,334 against 20,285 tok/s on an H200)."""
    import types
    calls = []

    def fake_run(name):
        def run(model, prompts, n, new, *args):
            calls.append((name, n, new))
            return 1.0, len(prompts) * n * new
        return run
    monkeypatch.setattr(bench, "setup", lambda model: ("unused", [[1, 2], [3]], 4, 16))
    monkeypatch.setattr(bench, "stops", lambda model, path: ((), 0))
    fake_model = types.SimpleNamespace(eval=lambda: fake_model, num_params=lambda: 10)
    monkeypatch.setattr(bench, "load_pretrained", lambda *a, **k: fake_model)
    monkeypatch.setattr(bench, "load_hf", lambda *a, **k: fake_model)
    monkeypatch.setattr(bench, "matmul_params", lambda model: 10)
    monkeypatch.setattr(bench, "matmul_peaks", lambda device, dtype: {"a @ b": 1e9})
    monkeypatch.setattr(bench, "peak_memory", lambda *a: 2**20)
    monkeypatch.setattr(bench, "run_ours", fake_run("ours"))
    monkeypatch.setattr(bench, "run_hf", fake_run("transformers"))
    bench.main(["sample", "--reps", "2"])
    assert calls == [("ours", 4, 16), ("transformers", 4, 16)] * 3
    assert capsys.readouterr().out.splitlines()[-1] == (
        "ours 128 tok/s, transformers 128 tok/s, ratio ours/transformers = 1.00x")


@pytest.mark.gpu
@pytest.mark.skipif(not bench.torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_without_an_index_runs(monkeypatch):
    """--device cuda (no index) reaches the benchmark; torch.cuda.set_device refuses a device
    without an index, which stopped bench.py before it measured anything."""
    seen = []
    monkeypatch.setattr(bench, "bench_sample", lambda args: seen.append(args.device))
    bench.main(["sample", "--device", "cuda"])
    assert seen == ["cuda"]


@pytest.mark.gpu
@pytest.mark.skipif(not bench.torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphs_benchmark_runs_and_prints_its_ratio(capsys):
    bench.main(["graphs", "--device", "cuda", "--arch", "qwen2.5-0.5b", "--prompts", "2",
                "--n", "2", "--new", "8", "--reps", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("random qwen2.5-0.5b: 0.49B parameters, bf16, 2 prompts")
    assert out[-1].startswith("graphs ") and "ratio graphs/eager = " in out[-1]


def test_random_models_have_the_public_shapes():
    """Parameter counts of the public checkpoints (tied embeddings), built on the meta device."""
    counts = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304,
              "qwen2.5-3b": 3_085_938_688, "llama-3.2-1b": 1_235_814_400,
              "llama-3.2-3b": 3_212_749_824}
    for arch, count in counts.items():
        assert bench.random_model(arch, "meta").num_params() == count, arch


def test_the_memory_child_counts_the_generate_call_alone(monkeypatch, capsys):
    """peak_bytes is the growth during the generate call: memory taken before it (the model,
    the tokenizer that stops() loads for a chat model) is under the baseline."""
    import types
    rss = {"now": 100 << 20, "peak": 100 << 20}

    def grow(mib):
        rss["now"] += mib << 20
        rss["peak"] = max(rss["peak"], rss["now"])

    def fake_stops(model, path):
        grow(30)  # the tokenizer
        return [2], 0

    def fake_generate(*args):
        grow(7)
        rss["now"] -= 7 << 20  # freed again: only the peak keeps it
        return 1.0, 1

    class ClearRefs:  # "5" resets the peak mark to the current RSS
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            assert text == "5"
            rss["peak"] = rss["now"]
    monkeypatch.setattr(bench, "setup", lambda model: ("unused", [[1, 2]], 1, 4))
    monkeypatch.setattr(bench, "load_pretrained", lambda *a, **k: types.SimpleNamespace())
    monkeypatch.setattr(bench, "stops", fake_stops)
    monkeypatch.setattr(bench, "run_ours", fake_generate)
    monkeypatch.setattr(bench, "open", lambda path, mode: ClearRefs(), raising=False)
    monkeypatch.setattr(bench, "proc_status_bytes",
                        lambda field: rss["now"] if field == "VmRSS" else rss["peak"])
    bench.memory_child("ours", "smollm2", "cpu")
    assert json.loads(capsys.readouterr().out) == {"peak_bytes": 7 << 20}


def test_model_flops_count_the_tokens_each_run_generated(monkeypatch, capsys):
    """2 * matmul parameters per prompt token and per generated token, over the run's time:
    worked by hand for 2 prompts of 100 tokens, 1e8 matmul parameters, 1 s per run. Ours stops
    every row at eos half way (64 of 4 x 16 x 2 = 128 tokens): 2e8 * (200 + 64) = 52.8 GFLOP/s;
    transformers runs to the end: 2e8 * (200 + 128) = 65.6 GFLOP/s."""
    import types
    monkeypatch.setattr(bench, "setup", lambda model: ("unused", [[1] * 100, [2] * 100], 4, 16))
    monkeypatch.setattr(bench, "stops", lambda model, path: ((), 0))
    fake_model = types.SimpleNamespace(eval=lambda: fake_model, num_params=lambda: 10)
    monkeypatch.setattr(bench, "load_pretrained", lambda *a, **k: fake_model)
    monkeypatch.setattr(bench, "load_hf", lambda *a, **k: fake_model)
    monkeypatch.setattr(bench, "matmul_params", lambda model: 10 ** 8)
    monkeypatch.setattr(bench, "matmul_peaks",
                        lambda device, dtype: {"a @ b": 1e11, "packed": 5e10})
    monkeypatch.setattr(bench, "peak_memory", lambda *a: 2**20)
    monkeypatch.setattr(bench, "run_ours", lambda *a: (1.0, 64))
    monkeypatch.setattr(bench, "run_hf", lambda *a: (1.0, 128))
    bench.main(["sample", "--reps", "1"])
    out = capsys.readouterr().out
    # the peak is the faster product: fractions are of 100 GFLOP/s, not 50
    assert "fp32 matmul peak: 100.0 GFLOP/s (the faster of: a @ b 100.0, packed 50.0)" in out
    assert "ours: 64 tok/s, model FLOP/s 52.8 G = 52.8% of matmul peak" in out
    assert "transformers: 128 tok/s, model FLOP/s 65.6 G = 65.6% of matmul peak" in out


def test_the_peak_times_the_packed_product_exactly_where_generate_packs(monkeypatch):
    """The packed product is timed only where generate() would use it (sample.can_pack): off
    through torch.backends.mkldnn, torch's own product alone."""
    import sample
    cpu = bench.torch.device("cpu")
    rates = bench.matmul_peaks(cpu, n=64, reps=1)
    want = {"torch a @ b"} | ({"oneDNN packed weights"}
                              if sample.can_pack(cpu, bench.torch.float32) else set())
    assert set(rates) == want and all(r > 0 for r in rates.values())
    monkeypatch.setattr(bench.torch.backends.mkldnn, "enabled", False)
    assert set(bench.matmul_peaks(cpu, n=64, reps=1)) == {"torch a @ b"}


@pytest.mark.parametrize("args, message", [
    (["sample", "smollm2"], "argument 'smollm2' is not allowed: sample takes options only"),
    (["sample", "--new", "8"], "--new is an option of graphs, not of sample"),
    (["sample", "--n", "1"], "--n is an option of graphs, not of sample"),
    (["sample", "--arch", "qwen2.5-3b"], "--arch is an option of graphs, not of sample"),
    (["graphs", "--model", "smollm2"], "--model is an option of sample, not of graphs"),
    (["_memory"], "_memory None is not allowed: ours or hf"),
    (["_memory", "ourz"], "_memory 'ourz' is not allowed: ours or hf"),
])
def test_arguments_a_benchmark_would_ignore_are_usage_errors(args, message, monkeypatch, capsys):
    """`sample smollm2` (for --model smollm2) or `sample --new 8` ran the default workload
    without a word; `_memory` without ours/hf measured transformers."""
    def ran(*a):
        raise AssertionError("the benchmark ran")
    for name in ("bench_sample", "bench_graphs", "memory_child"):
        monkeypatch.setattr(bench, name, ran)
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_random_model_save_cut_short_is_not_taken_for_a_whole_one(tmp_path, monkeypatch):
    """Ctrl-C while the random benchmark model is saved: the next run saves it again, instead
    of loading the cut model.safetensors it left."""
    def save_cut_short(path):
        os.makedirs(path, exist_ok=True)  # as save_pretrained does
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write("{}")
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"cut")
        raise KeyboardInterrupt

    def save(path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"whole")
    monkeypatch.setattr(bench.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(bench, "random_qwen2_dir", save_cut_short)
    with pytest.raises(KeyboardInterrupt):
        bench.setup("random-qwen2")
    monkeypatch.setattr(bench, "random_qwen2_dir", save)
    path = bench.setup("random-qwen2")[0]
    assert open(os.path.join(path, "model.safetensors"), "rb").read() == b"whole"
    assert os.listdir(tmp_path) == ["bench_random_qwen2"]  # nothing else left behind


def test_a_random_model_save_killed_outright_leaves_nothing_after_the_next_run(tmp_path,
                                                                                monkeypatch):
    """kill -9 during the save leaves PATH.tmp.PID@HOST: the next setup removes it (a live
    writer's stays) and saves the model again."""
    host = socket.gethostname()
    path = tmp_path / "bench_random_qwen2"
    dead, alive = f"{path}.tmp.4194399@{host}", f"{path}.tmp.{os.getppid()}@{host}"  # > max PID
    for d in (dead, alive):
        os.makedirs(d)
        open(os.path.join(d, "model.safetensors"), "wb").close()

    def save(work):
        assert work == f"{path}.tmp.{os.getpid()}@{host}"
        os.makedirs(work, exist_ok=True)
        with open(os.path.join(work, "model.safetensors"), "wb") as f:
            f.write(b"whole")
    monkeypatch.setattr(bench.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(bench, "random_qwen2_dir", save)
    assert bench.setup("random-qwen2")[0] == str(path)
    assert sorted(os.listdir(tmp_path)) == sorted(["bench_random_qwen2", os.path.basename(alive)])
    assert open(path / "model.safetensors", "rb").read() == b"whole"
