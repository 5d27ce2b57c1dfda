"""bench.py's command line (the benchmark itself is run by hand, never timed in tests)."""
import pytest

import bench


@pytest.mark.parametrize("args, message", [
    (["sample", "--model", "bad"], "invalid choice: 'bad'"),
    (["sample", "--reps", "0"], "'0' is not allowed: an integer >= 1"),
    (["sample", "--device", "tpu"], "--device='tpu' is not allowed; use cpu"),
    (["sample", "--device", "cuda:99"], "--device='cuda:99' is not allowed; use cpu"),
])
def test_bad_arguments_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
