"""scripts/reproduce_tiny.sh, with `python` replaced by a stub that logs its arguments: which
train.py / eval.py commands it runs, in which order its settings come, where OUT points."""
import os
import shutil
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "reproduce_tiny.sh")
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(tmp_path, *args, out=None):
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "python").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls.txt"}\n')
    (stub / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}"}
    if out is not None:
        env["OUT"] = out
    done = subprocess.run(["bash", SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    calls = (tmp_path / "calls.txt").read_text().splitlines() if done.returncode == 0 else []
    return done, calls


def test_extra_arguments_come_before_each_runs_own_settings(tmp_path):
    done, calls = run_script(tmp_path, "rl.steps=5", out="rel")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "rel"   # OUT is relative to where the script is called from
    assert calls == [
        f"train.py rl.steps=5 name=tiny-gapg out_dir={out}",
        f"train.py rl.steps=5 name=tiny-gapg-seed1 out_dir={out} seed=1 warm_start.seed=0",
        f"train.py rl.steps=5 name=tiny-task-only out_dir={out} task.allow_help=false",
        f"train.py rl.steps=5 name=tiny-collab out_dir={out} rl.algo=dr_grpo rl.filter=none",
        f"eval.py {out}/tiny-gapg {out}/tiny-gapg-seed1 {out}/tiny-collab --task-tuned "
        f"{out}/tiny-task-only --out {out}/tiny-report"]


@pytest.mark.parametrize("arg", ["seed=3", "name=x", "out_dir=elsewhere", "task.allow_help=true",
                                 "task={name: tiny_countdown, allow_help: false}", "rl.algo=grpo",
                                 "rl.filter=mixed", "warm_start.seed=2", "my.yaml"])
def test_settings_that_set_the_four_runs_apart_are_refused(tmp_path, arg):
    done, _ = run_script(tmp_path, "rl.steps=5", arg)
    assert done.returncode == 2
    assert f"reproduce_tiny.sh: {arg} is not allowed" in done.stderr
    assert not (tmp_path / "calls.txt").exists()   # nothing was started
