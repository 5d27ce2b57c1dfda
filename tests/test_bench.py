"""bench.py's command line (the benchmark itself is run by hand, never timed in tests)."""
import pytest

import bench


@pytest.mark.parametrize("args, message", [
    (["sample", "--model", "bad"], "invalid choice: 'bad'"),
    (["sample", "--reps", "0"], "'0' is not allowed: an integer >= 1"),
    (["sample", "--device", "tpu"], "--device='tpu' is not allowed; use cpu"),
    (["sample", "--device", "cuda:99"], "--device='cuda:99' is not allowed; use cpu"),
    (["sample", "--dtype", "fp16"], "invalid choice: 'fp16' (choose from 'fp32', 'bf16')"),
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
