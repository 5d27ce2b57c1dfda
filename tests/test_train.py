"""train.py: a tiny end-to-end run, config and setup errors, exact resume after a crash, a
crash mid-save or Ctrl-C, the non-finite guard."""
import builtins
import dataclasses
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import threading
import types

import pytest
import torch
import yaml
from safetensors.torch import load_file

import algo
import train
from devices import CUDA, DEVICES

TINY = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
        "model.num_key_value_heads=1", "model.intermediate_size=64",
        "task.n_train=300", "task.n_test=20", "warm_start.steps=15", "warm_start.batch_size=32",
        "rl.prompts_per_step=4", "rl.group_size=4", "eval.n=10", "eval.every=2",
        "sampling.max_new_tokens=40", "samples_per_step=2"]


def tiny_args(tmp_path, *extra):
    return TINY + [f"out_dir={tmp_path / 'runs'}",
                   f"warm_start.cache_dir={tmp_path / 'warm'}"] + list(extra)


def read_rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.mark.parametrize("device", DEVICES)
def test_three_step_end_to_end(device, tmp_path, capsys):
    final = train.main(tiny_args(tmp_path, "name=smoke", "rl.steps=3", f"device={device}"))
    run = tmp_path / "runs" / "smoke"
    rows = read_rows(run)
    assert [r["train/step"] for r in rows] == [1, 2, 3, 3]
    for key in ("reward/mean", "route/help_ratio", "route/local_acc", "filter/d1", "filter/d2",
                "filter/d2_dropped", "filter/zero_variance", "route/len_help", "route/len_answer",
                "route/clipped_ratio", "perf/cloud_calls", "perf/cloud_cached", "perf/sample_s",
                "perf/update_s", "perf/tokens_per_s", "perf/cloud_s", "train/loss"):
        assert key in rows[0], key
    assert "eval/acc_capped" in rows[1] and "eval/acc_capped" in rows[3]
    # per step: at most one cloud call per prompt, evaluation calls not counted
    assert all(0 <= r["perf/cloud_calls"] + r["perf/cloud_cached"] <= 4 for r in rows[:3])
    assert ("perf/peak_mem_gb" in rows[0]) == (device == "cuda")
    if device == "cuda":  # pytorch#196678: cuDNN attention's NaN query gradients in torch 2.13
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert 0 <= final["acc_capped"] <= 1 and final["n"] == 10
    assert os.path.exists(run / "checkpoint" / "model.safetensors")
    assert os.path.exists(run / "checkpoint" / "trainer_state.pt")
    assert os.path.exists(run / "final_eval.json") and os.path.exists(run / "cloud_cache.jsonl")
    samples = [json.loads(line) for line in open(run / "samples.jsonl")]
    assert len(samples) == 6 and all(s["response"] for s in samples)
    saved = train.load_config([str(run / "config.yaml")])
    assert saved.rl.steps == 3 and saved.model.hidden_size == 32
    out = capsys.readouterr().out
    assert "acc @cap" in out and "cloud only" in out
    # the cloud-only row has no device responses: no local-answer statistics (as eval.py's row)
    row = next(line for line in out.splitlines() if line.startswith("cloud only (no cap)"))
    cells = row.split()[-6:]   # call ratio, local acc, cond. local, acc @cap, uncapped, answered
    assert cells[:3] == ["1.000", "0.000", "–"] and cells[3] == cells[4] and cells[5] == "–"
    assert "warm start: greedy on 20 test prompts" in out  # the split's size, not a fixed 500
    # resuming the finished run does not evaluate (and log) it a second time
    assert train.main([f"resume={run}"]) == final
    assert "already complete" in capsys.readouterr().out
    assert [r["train/step"] for r in read_rows(run)] == [1, 2, 3, 3]
    # a crash between writing final_eval.json and logging its row: the resume logs it
    rows = read_rows(run)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    assert train.main([f"resume={run}"]) == final and read_rows(run) == rows
    assert "note: eval.budget" not in out  # 0.3 is what rho = 3/7 trains for
    assert "SPEC 10's ablation" not in out
    # a second run reuses the cached warm start; its budget, set by hand, does not match rho,
    # and alpha_c = alpha_a is the equal-weights ablation, run with a note
    train.main(tiny_args(tmp_path, "name=again", "rl.steps=1", f"device={device}", "rl.rho=1",
                         "eval.budget=0.3", "reward.alpha_a=0.5", "reward.alpha_c=0.5"))
    out = capsys.readouterr().out
    assert "warm start: reusing" in out and "note: eval.budget=0.3" in out and "= 0.5; eval.budget=null" in out
    assert "note: reward.alpha_c = reward.alpha_a = 0.5 is SPEC 10's ablation" in out


@pytest.mark.parametrize("override, message", [
    ("rl.nonsense=1", "unknown config key 'rl.nonsense'"),
    ("bogus=1", "allowed here: name, seed"),
    ("rl.steps=ten", "rl.steps='ten': expected an integer"),
    ("rl.algo=ppo", "allowed: ['gapg', 'grpo', 'dr_grpo', 'da_grpo'"),  # a fork may add more
    ("rl.filter=some", "rl.filter='some'"),
    ("model.gradient_checkpointing=maybe", "expected a boolean"),
    ("rl.group_size=1", "rl.group_size=1"),
    ("reward.alpha_c=2", "alpha_c"),
    ("rl.steps.x=1", "no sub-keys"),
    ("rl=3", "is a section"),
    ("device=tpu", "device='tpu'"),
    ("rl.dual_init=-1", "rl.dual_init=-1"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        train.load_config([override])


@pytest.mark.parametrize("override, hint", [
    ("steps=5", "did you mean 'warm_start.steps' or 'rl.steps'?"),   # a key of a section
    ("rl.max_new_tokens=5", "did you mean 'sampling.max_new_tokens'?"),  # of another section
    ("rl.stepz=5", "did you mean 'rl.steps'?"),
    ("modle.path=x", "did you mean 'model.path'?"),
    ("--rl.steps=5", "did you mean 'rl.steps'? (no leading dashes)"),
])
def test_an_unknown_key_names_the_key_it_may_be(override, hint):
    with pytest.raises(train.ConfigError) as e:
        train.load_config([override])
    assert str(e.value).startswith(f"unknown config key {override.split('=')[0]!r}; allowed here: ")
    assert str(e.value).endswith(hint)


def test_an_unknown_key_in_a_file_names_the_key_it_may_be(tmp_path):
    (tmp_path / "a.yaml").write_text("rl.steps: 3\n")
    with pytest.raises(train.ConfigError, match=r"write it nested: rl: \{steps: \.\.\.\}$"):
        train.load_config([str(tmp_path / "a.yaml")])


@pytest.mark.parametrize("section, key", [("task", "name"), ("cloud", "backend")])
def test_a_section_given_a_plain_value_suggests_a_mapping_it_accepts(section, key):
    """The hint's mapping must name the key that section selects by: following it for cloud
    with {name: ...} would be refused again (the backends take no `name`)."""
    with pytest.raises(train.ConfigError) as e:
        train.load_config([f"{section}=x"])
    assert f"{section}={{{key}: ...}}" in str(e.value)
    cfg = train.load_config([f"{section}={{{key}: {'oracle' if section == 'cloud' else 'tiny_countdown'}}}"])
    assert list(getattr(cfg, section)) == [key]


def test_config_casts_and_fractions():
    cfg = train.load_config(["rl.rho=3/7", "rl.lr=1e-5", "rl.betas=[0.8, 0.9]",
                             "task.n_train=123", "model.gradient_checkpointing=true"])
    assert cfg.rl.rho == 3 / 7 and cfg.rl.lr == 1e-5 and cfg.rl.betas == [0.8, 0.9]
    assert cfg.task["n_train"] == 123 and cfg.model.gradient_checkpointing is True


def test_config_file_values(tmp_path):
    # PyYAML reads 1e-4 (no decimal point) and 3/7 as strings: numbers all the same
    (tmp_path / "a.yaml").write_text("rl: {lr: 1e-4, rho: 3/7}\n")
    cfg = train.load_config([str(tmp_path / "a.yaml")])
    assert cfg.rl.lr == 1e-4 and cfg.rl.rho == 3 / 7
    for text, message in [("seed: true\n", "seed=True: expected an integer"),
                          ("warm_start: {seed: false}\n", "warm_start.seed=False: expected an int"),
                          ("rl: {lr: fast}\n", "rl.lr='fast': expected a number"),
                          ("resume: runs/x\nrl: {steps: 3}\n", "resume is not a file setting")]:
        (tmp_path / "b.yaml").write_text(text)
        with pytest.raises(train.ConfigError, match=message):
            train.load_config([str(tmp_path / "b.yaml")])


def test_a_files_empty_section_sets_nothing(tmp_path):
    (tmp_path / "a.yaml").write_text("name: x\nrl:\n#  steps: 5\ntask:\ncloud:\n")
    cfg = train.load_config([str(tmp_path / "a.yaml")])
    assert cfg.name == "x" and cfg.rl == train.RLSection()
    assert cfg.task == train.Config().task and cfg.cloud == train.Config().cloud
    with pytest.raises(train.ConfigError, match="rl is a section"):
        train.load_config(["rl=null"])   # on the command line it sets nothing: an error


def test_the_evaluation_budget_follows_rho_unless_set():
    """SPEC 7: the cap is floor(N rho / (1 + rho)); eval.budget: null (the default) gives it."""
    assert train.load_config([]).eval.budget == 0.3                      # rho = 3/7
    assert train.load_config(["rl.rho=1/4"]).eval.budget == 0.2
    assert train.load_config(["rl.rho=1"]).eval.budget == 0.5
    assert train.load_config(["rl.rho=1/4", "eval.budget=0.35"]).eval.budget == 0.35
    assert train.load_config(["eval.budget=null", "rl.rho=0"]).eval.budget == 0.0
    with pytest.raises(ValueError, match="eval.budget=2.0: must be a number in .0, 1.* or null"):
        train.load_config(["eval.budget=2"])


def test_the_evaluation_budget_reads_numbers_as_other_float_keys_do(tmp_path):
    assert train.load_config(["eval.budget=3/10"]).eval.budget == 0.3
    assert train.load_config(["eval.budget=1e-1"]).eval.budget == 0.1
    (tmp_path / "a.yaml").write_text("eval: {budget: 1e-1}\n")  # PyYAML: the string '1e-1'
    assert train.load_config([str(tmp_path / "a.yaml")]).eval.budget == 0.1
    (tmp_path / "b.yaml").write_text("eval: {budget: 3/10}\nrl: {rho: 1}\n")
    assert train.load_config([str(tmp_path / "b.yaml")]).eval.budget == 0.3
    # null on the command line restores the default over a file's number: rho / (1 + rho)
    assert train.load_config([str(tmp_path / "b.yaml"), "eval.budget=null"]).eval.budget == 0.5
    for value in ("abc", "[0.3]", "1/0", "none"):
        with pytest.raises(train.ConfigError, match=f"eval.budget='{re.escape(value)}': expected "
                                                    r"a number \(or a fraction like 3/7\), or null "
                                                    r"for rho / \(1 \+ rho\)$"):
            train.load_config([f"eval.budget={value}"])
    # a YAML list reads its numbers as the float keys do ('1e-3' is a string to PyYAML)
    (tmp_path / "c.yaml").write_text("rl: {betas: [0.9, 1e-3]}\n")
    assert train.load_config([str(tmp_path / "c.yaml")]).rl.betas == [0.9, 0.001]
    assert train.load_config(["rl.betas=[0.8, 1e-3]"]).rl.betas == [0.8, 0.001]
    (tmp_path / "e.yaml").write_text("rl: {betas: [0.9, 0]}\n")   # ints before: still numbers
    assert train.load_config([str(tmp_path / "e.yaml"), "rl.betas=[0.8, 1e-3]"]).rl.betas == [0.8, 0.001]
    for text, message in (("rl: {steps: many}", "rl.steps='many': expected an integer"),
                          ("rl: {lr: true}", "rl.lr=True: expected a number (or a fraction like 3/7)"),
                          ("eval: {budget: true}", "eval.budget=True: expected a number (or a "
                                                   "fraction like 3/7), or null for rho / (1 + rho)")):
        (tmp_path / "d.yaml").write_text(text + "\n")
        with pytest.raises(train.ConfigError, match=f"^{re.escape(message)}$"):
            train.load_config([str(tmp_path / "d.yaml")])


def test_seeds_are_what_torch_accepts():
    largest = 2**63 - 1
    torch.manual_seed(largest)           # fine for torch ...
    with pytest.raises(ValueError):
        torch.manual_seed(2**64)         # ... and this is not: refused as a config error instead
    assert train.load_config([f"seed={largest}", f"warm_start.seed={largest}"]).seed == largest
    with pytest.raises(train.ConfigError, match=r"^seed=9223372036854775808: must be an integer"):
        train.load_config([f"seed={2**63}"])
    assert train.load_config(["warm_start.seed=-1"]).warm_start.seed == -1


@pytest.mark.parametrize("override, message", [
    ("rl.rho=1/0", "rl.rho='1/0': expected a number"),
    ("rl.rho=nan", "rl.rho=nan: must be a finite number >= 0"),
    ("warm_start.warmup=0", "warm_start.warmup=0: must be an integer >= 1"),
    ("warm_start.p_help=1.5", "warm_start.p_help=1.5: must be a number in [0, 1]"),
    ("sampling.top_p=0.9", "sampling.top_p=0.9: must be 1 in training"),
    ("sampling.top_k=5", "sampling.top_k=5: must be 0 in training"),
    ("sampling.temperature=1e-7", "sampling.temperature=1e-07: must be a finite number >= 1e-6"),
    ("rl.micro_batch_size=-1", "rl.micro_batch_size=-1: must be an integer >= 0"),
    ("rl.betas=abc", "rl.betas='abc': must be a list of two numbers in [0, 1)"),
    ("rl.betas=[0.9]", "rl.betas=[0.9]: must be a list of two numbers"),
    ("rl.betas=[0.9", "rl.betas='[0.9': not a valid YAML value"),
    ("rl.weight_decay=-1", "rl.weight_decay=-1.0: must be a finite number >= 0"),
    ("rl.grad_clip=-1", "rl.grad_clip=-1.0: must be a finite number >= 0"),
    ("rl.time_limit_min=-1", "rl.time_limit_min=-1.0: must be a finite number >= 0"),
    ("eval.n=-3", "eval.n=-3: must be an integer >= 0"),
    ("eval.every=-1", "eval.every=-1: must be an integer >= 0"),
    ("samples_per_step=-1", "samples_per_step=-1: must be an integer >= 0"),
    ("name=", "name='': must be a directory name"),
    ("model.hidden_size=30", "model.hidden_size=30 with model.num_attention_heads=2"),
    ("model.num_key_value_heads=3", "model.num_key_value_heads=3"),
    ("--foo", "unknown option '--foo'"),
    ("seed=99999999999999999999", "seed=99999999999999999999: must be an integer in [0, 2**63)"),
    ("seed=-1", "seed=-1: must be an integer in [0, 2**63)"),
    ("warm_start.seed=-2", "warm_start.seed=-2: must be an integer in [0, 2**63), or -1 for"),
    # found when the task is built, still before the warm start
    ("eval.n=21", "eval.n=21: the test split has only 20 prompts"),
    ("rl.prompts_per_step=301", "rl.prompts_per_step=301: the training split has only 300 "
                                "prompts and a step takes each at most once; use "
                                "rl.prompts_per_step <= 300"),
    # tiny prompts are 13 tokens ("06,06,11|132=")
    ("sampling.max_prompt_tokens=12", "sampling.max_prompt_tokens=12: every training prompt is "
                                      "longer"),
    ("task.n_test=0", "needs a non-empty train and test split"),
    ("model.max_position_embeddings=30", "model.max_position_embeddings=30: prompts take up to"),
    # a tiny answer is 35 tokens ("[006+006=012,012*011=132]" + a 9-character check + "A")
    ("sampling.max_new_tokens=34", "sampling.max_new_tokens=34: the task's answers take up to 35 "
                                   "tokens (its sampled warm-start traces); must be at least 35"),
    ("task.n_numbers=4", "sampling.max_new_tokens=40: the task's answers take up to 47 tokens"),
    ("task.colour=red", "task 'tiny_countdown' has no argument(s) ['colour']"),
    ("task.name=foo", "task.name='foo': allowed: tiny_countdown, countdown, math"),
    ("cloud.backend=nope", "cloud backend='nope' is not allowed"),
    ("cloud.p_correct=2", "oracle p_correct=2 must be a number in [0, 1]"),
    # the cache is the run's own cloud_cache.jsonl: a cache_path setting is no setting
    ("cloud.cache_path=elsewhere.jsonl", "cloud backend 'oracle' has no argument(s) ['cache_path']"),
    ("model.path=/no/such/dir", "model.path='/no/such/dir' is not a directory"),
    ("task.allow_help=maybe", "allow_help='maybe' must be true or false"),
    ("task={name: tiny_countdown, allow_help: 'no'}", "allow_help='no' must be true or false"),
    ("task.ops=/", "'ops': '/'"),  # too few distinct problems: the task settings are named
    ("cloud={backend: http}", "cloud backend 'http' needs the argument(s) ['base_url', 'model']"),
    ("cloud={backend: oracle, seed: abc}", "cloud backend 'oracle' with {'seed': 'abc'}"),
    ("cloud={backend: local, path: /no/such}", "cloud.path='/no/such' has no config.json"),
    ("cloud={backend: http, base_url: 'http://127.0.0.1:9', model: m, api_key_env: 5}",
     "api_key_env=5 (allowed: the name of an environment variable)"),
    ("cloud={backend: http, base_url: 'http://127.0.0.1:9', model: m, concurrency: abc}",
     "concurrency='abc' (allowed: an integer >= 1)"),
    ("out_dir=/proc/no/such", "out_dir '/proc/no/such/bad' cannot be written"),
    ("warm_start.cache_dir=RUN", "lies in warm_start.cache_dir"),
    ("warm_start.cache_dir=RUN/..", "lies in warm_start.cache_dir"),   # out_dir inside the cache
    ("warm_start.cache_dir=/proc/no/such", "warm_start.cache_dir '/proc/no/such' cannot be"),
])
def test_bad_settings_are_one_line_errors_before_the_warm_start(override, message, tmp_path):
    override = override.replace("RUN", str(tmp_path / "runs" / "bad"))  # the run's own directory
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=bad", override))
    text = str(exc.value.code)
    assert text.startswith("config error: ") and message in text and "\n" not in text
    assert not (tmp_path / "warm").exists() and not (tmp_path / "runs").exists()


def test_task_and_cloud_overrides_are_judged_by_the_task_or_backend_not_the_files_type(tmp_path):
    """Task and cloud entries have no declared type: the value a file wrote (an integer 1) does
    not make 0.9 an error; the backend or task checks what it gets."""
    path = tmp_path / "c.yaml"
    path.write_text("cloud: {backend: oracle, p_correct: 1, seed: 0}\n"
                    "task: {name: tiny_countdown, n_train: 300, ops: '+-*'}\n")
    read = lambda *o: train.load_config([str(path), *o])
    assert read("cloud.p_correct=0.9").cloud["p_correct"] == 0.9
    assert read("cloud.p_correct=9/10").cloud["p_correct"] == 0.9
    assert read("cloud.p_correct=1e-1").cloud["p_correct"] == 0.1      # YAML would keep "1e-1"
    assert read("task.n_train=2e3").task["n_train"] == 2000.0
    assert read("task.ops=+-").task["ops"] == "+-"     # an entry the file gave as text stays text
    assert read("task.number_range=[1, 9]").task["number_range"] == [1, 9]
    assert read("cloud.extra=null").cloud["extra"] is None
    assert read("task.ops=null").task["ops"] is None         # a text entry can be unset too
    assert read("cloud.extra=nan").cloud["extra"] == "nan"   # text, not Python's float("nan")
    with pytest.raises(train.ConfigError, match="the key 'seed' is given twice"):
        read("task={name: tiny_countdown, seed: 1, seed: 2}")


def test_a_files_task_and_cloud_numbers_in_exponent_form_are_numbers(tmp_path):
    """PyYAML keeps 1e-1 as text; the override cloud.p_correct=1e-1 is a number, and so is the
    same value written in a config file (else the backend refuses '1e-1')."""
    path = tmp_path / "c.yaml"
    path.write_text("cloud: {backend: oracle, p_correct: 1e-1}\n"
                    "task: {name: tiny_countdown, n_train: 3e2, number_range: [1, 2e1]}\n")
    cfg = train.load_config([str(path)])
    assert cfg.cloud["p_correct"] == 0.1 and cfg.task["number_range"] == [1, 20.0]
    assert cfg.task["n_train"] == 300.0
    assert train.load_config(["task.number_range=[1, 2e1]"]).task["number_range"] == [1, 20.0]
    # text that reads as such a number stays text through the run's config.yaml
    cfg = train.load_config(["name=1e5", "cloud.note=2e3", "warm_start.cache_dir=4E-2"])
    assert cfg.name == "1e5" and cfg.cloud["note"] == 2000.0 and cfg.warm_start.cache_dir == "4E-2"
    (tmp_path / "saved.yaml").write_text(
        train.yaml.dump(train.config_dict(cfg), Dumper=train.ConfigDumper, sort_keys=False))
    assert train.load_config([str(tmp_path / "saved.yaml")]) == cfg


def test_the_written_config_yaml_loads_back_the_same_config(tmp_path):
    args = tiny_args(tmp_path, "name=1e5", "rl.steps=1", "eval.every=0", "rl.lr=3e-5",
                     "task.seed=3")
    cfg = train.load_config(args)
    with pytest.raises(KeyboardInterrupt):  # stop after the config is written, before training
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train, "warm_start", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
            train.Trainer(cfg)
    saved = tmp_path / "runs" / "1e5" / "config.yaml"
    assert train.load_config([str(saved)]) == cfg


def test_a_local_cloud_too_short_for_its_max_new_tokens_is_an_error_before_the_warm_start(tmp_path):
    from model import ModelConfig, Transformer, build_char_tokenizer, save_pretrained
    from tasks import TinyCountdownTask
    tok = build_char_tokenizer(TinyCountdownTask(n_train=1, n_test=1).alphabet)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=40, eos_token_id=1)).init_weights(0)
    save_pretrained(model, str(tmp_path / "cloud"), tok)
    with pytest.raises(SystemExit) as exc:  # tiny prompts are 13 tokens: 13 + 30 > 40
        train.main(tiny_args(tmp_path, "name=bad", f"cloud={{backend: local, path: {tmp_path / 'cloud'}, "
                                                   f"max_new_tokens: 30}}"))
    assert str(exc.value.code) == (
        f"config error: cloud: a prompt of 13 tokens plus the local cloud's max_new_tokens=30 "
        f"exceeds its context (max_position_embeddings=40 in {tmp_path / 'cloud'}); lower its "
        f"max_new_tokens to at most 27")
    assert not (tmp_path / "warm").exists()


def test_a_cloud_cache_of_another_cloud_is_an_error_before_the_warm_start(tmp_path):
    """A run name reused (its first attempt stopped before a checkpoint) with another cloud: its
    cloud_cache.jsonl holds the first cloud's answers."""
    from cloud import make_cloud
    from tasks import TinyCountdownTask
    cache = tmp_path / "runs" / "cc" / "cloud_cache.jsonl"
    os.makedirs(cache.parent)
    tiny = TinyCountdownTask(n_train=300, n_test=20)
    make_cloud({"backend": "oracle", "p_correct": 0.95}, cache_path=cache).ask(
        tiny, tiny.examples("train")[:2])
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=cc", "cloud.p_correct=0.5"))
    assert str(exc.value.code) == (
        f"config error: cloud cache {cache} holds answers of backend 'oracle', model "
        f"'oracle(p_correct=0.95,seed=0)'; this cloud is backend 'oracle', model "
        f"'oracle(p_correct=0.5,seed=0)': set the cloud section back to what this run used, or "
        f"start a new run (name=...)")
    assert not (tmp_path / "warm").exists()


def refuse_writes(monkeypatch, path):
    """`path` as on a read-only mount: chmod for a user, and open() refusing to write it for
    root (who writes past chmod)."""
    os.chmod(path, 0o444)
    real_open = builtins.open

    def read_only_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and \
                os.path.abspath(file) == os.path.abspath(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only_open)


def test_a_cloud_cache_that_cannot_be_appended_to_is_an_error_before_training(tmp_path, straight,
                                                                             monkeypatch):
    """A read-only cloud_cache.jsonl failed at the first cloud call (after the warm start, or
    mid-RL on a resume); a fresh start and a resume now say so at once, in one line."""
    run = tmp_path / "runs" / "cc"
    shutil.copytree(straight / "runs" / "straight", run)
    cache = run / "cloud_cache.jsonl"
    refuse_writes(monkeypatch, cache)
    message = (f"error: cloud cache {cache} cannot be appended to (Permission denied): "
               f"make it writable, then run the same command again")
    with pytest.raises(SystemExit) as exc:
        train.main([f"resume={run}"])
    assert exc.value.code == message
    shutil.rmtree(run / "checkpoint")  # as if its first attempt stopped before a checkpoint
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=cc"))
    assert exc.value.code == message and not (tmp_path / "warm").exists()


def test_setup_errors_are_one_line_errors(tmp_path, monkeypatch):
    for leftover in ("checkpoint", "checkpoint.old"):  # a run, or one that crashed mid-save
        os.makedirs(tmp_path / "runs" / "taken" / leftover)
        taken = re.escape(str(tmp_path / "runs" / "taken"))
        with pytest.raises(SystemExit, match=f"config error: {taken} already holds a run; "
                                             f"resume it with resume={taken}, or choose"):
            train.main(tiny_args(tmp_path, "name=taken"))
        os.rmdir(tmp_path / "runs" / "taken" / leftover)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="config error: device='cuda' but no CUDA device is "
                                         "available; use device=cpu or device=auto"):
        train.main(tiny_args(tmp_path, "name=gpu", "device=cuda"))


def test_a_missing_smollm2_directory_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where .cache/smollm2 does not exist
    with pytest.raises(SystemExit, match=r"model.path='.cache/smollm2' is not a directory "
                                         r"\(python scripts/get_smollm2.py makes it\)"):
        train.main(tiny_args(tmp_path, "name=s", "model.path=.cache/smollm2"))


def test_a_missing_data_file_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="config error: task .*'name': 'math'.*: "
                                         "/no/train.jsonl: no such data file"):
        train.main(tiny_args(tmp_path, "name=m", f"model.path={tmp_path}",
                             "task={name: math, path_train: /no/train.jsonl, path_test: /no/t}"))


def test_an_unloadable_model_path_is_a_one_line_error(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for files, message in [({}, "config.json"),
                           ({"config.json": "{"}, "broken/config.json: not valid JSON")]:
        for name, text in files.items():
            (broken / name).write_text(text)
        with pytest.raises(SystemExit) as exc:
            train.main(tiny_args(tmp_path, "name=b", f"model.path={broken}"))
        text = str(exc.value.code)
        assert text.startswith(f"config error: cannot load the model from {broken}: ")
        assert message in text and "\n" not in text


def test_training_prompts_over_max_prompt_tokens_are_left_out(capsys):
    import string

    from model import build_char_tokenizer
    from tasks import Example
    tok = build_char_tokenizer(string.printable)  # one token per character
    examples = [Example(key=p, prompt=p, data={}) for p in ("abc", "abcdef", "ab", "abcd")]
    lengths = train.prompt_lengths(examples, tok)
    assert lengths == {"abc": 3, "abcdef": 6, "ab": 2, "abcd": 4}
    assert train.drop_long_prompts(examples, lengths, 0) is examples
    assert [ex.prompt for ex in train.drop_long_prompts(examples, lengths, 4)] == ["abc", "ab", "abcd"]
    assert "left out 1 of 4 training prompts" in capsys.readouterr().out
    assert train.drop_long_prompts(examples, lengths, 6) == examples
    with pytest.raises(train.ConfigError, match="max_prompt_tokens=1: every training prompt"):
        train.drop_long_prompts(examples, lengths, 1)
    assert len(train.drop_long_prompts(examples, lengths, 4, per_step=3)) == 3
    with pytest.raises(train.ConfigError, match=r"max_prompt_tokens=4 leaves 3 training prompts, "
                                                r"fewer than rl.prompts_per_step=4; .* <= 3"):
        train.drop_long_prompts(examples, lengths, 4, per_step=4)


def test_bad_files_and_help(tmp_path, capsys):
    (tmp_path / "torn.yaml").write_text("rl: {steps: 3\n")
    (tmp_path / "list.yaml").write_text("- rl.steps=3\n")
    (tmp_path / "twice.yaml").write_text("rl: {steps: 2}\nseed: 1\nrl: {lr: 0.1}\n")
    (tmp_path / "twice_inside.yaml").write_text("rl:\n  steps: 2\n  steps: 3\n")
    (tmp_path / "merged.yaml").write_text("base: &b {steps: 2, lr: 0.1}\nrl:\n  <<: *b\n  steps: 3\n")
    with pytest.raises(train.ConfigError, match="unknown config key 'base'"):  # the merge reads
        train.load_config([str(tmp_path / "merged.yaml")])   # (no "<<" given twice); base is no key
    for argv, message in [([str(tmp_path / "torn.yaml")], "torn.yaml is not valid YAML: "),
                          ([str(tmp_path / "list.yaml")], "must hold a mapping (name: ..., rl: "
                                                          "{...}, ...), not a list"),
                          ([str(tmp_path / "twice.yaml")], "the key 'rl' is given twice"),
                          ([str(tmp_path / "twice_inside.yaml")], "the key 'steps' is given twice"),
                          ([str(tmp_path)], "does not exist or is not a file"),
                          ([str(tmp_path / "none.yaml")], "does not exist or is not a file"),
                          ([f"resume={tmp_path}"], "no config.yaml there, so not a run directory")]:
        with pytest.raises(SystemExit) as exc:
            train.main(argv)
        assert str(exc.value.code).startswith("config error: ") and message in exc.value.code
        assert "\n" not in exc.value.code
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as exc:
            train.main([flag])
        assert exc.value.code == 0
        assert "python train.py resume=runs/NAME" in capsys.readouterr().out



@pytest.mark.parametrize("text, message", [
    ("yes: 1\n", "config key True is not a name"),
    ("rl: {1: 2}\n", "config key 'rl.1' is not a name"),
    ("eval:\n  ~: 0.3\n", "config key 'eval.None' is not a name"),
    ("task: {name: tiny_countdown, 3: x}\n", "config key 'task.3' is not a name"),
    ("cloud: {backend: oracle, on: 1}\n", "config key 'cloud.True' is not a name"),
])
def test_a_files_key_that_yaml_reads_as_no_name_is_a_one_line_error(text, message, tmp_path):
    """YAML reads a key like `yes:`, `on:`, `~:` or `1:` as a boolean, null or number: a one-line
    error naming it, not a traceback (or a TypeError when the task is built)."""
    (tmp_path / "a.yaml").write_text(text)
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, str(tmp_path / "a.yaml")))
    assert str(exc.value.code).startswith(f"config error: {message}")
    assert "\n" not in str(exc.value.code)
    assert not (tmp_path / "runs").exists()

# checkpoints at steps 2 and 4; no prompt filter, so that every step updates the weights (the
# tiny config's filter keeps no prompt, and a resume that replayed or skipped a step would
# still give the warm start's weights)
STRAIGHT = ["rl.steps=4", "save_every=2", "eval.every=0", "rl.filter=none"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run and its warm start, which the interrupted runs below share."""
    root = tmp_path_factory.mktemp("straight")
    train.main(tiny_args(root, "name=straight", *STRAIGHT))
    return root


def crash_args(tmp_path, straight, name):
    return tiny_args(tmp_path, *STRAIGHT, f"warm_start.cache_dir={straight / 'warm'}",
                     f"name={name}")


def assert_continued_exactly(run, straight):
    updated = [r["train/step"] for r in read_rows(straight / "runs" / "straight")[:-1]
               if r["train/skipped"] == ""]
    assert updated == [1, 2, 3, 4]  # the weights this compares moved at every step
    a = load_file(straight / "runs" / "straight" / "checkpoint" / "model.safetensors")
    b = load_file(run / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train/step"] for r in read_rows(run)] == [1, 2, 3, 4, 4]  # each step logged once


def test_resume_is_exact(tmp_path, straight, monkeypatch):
    real_step = train.Trainer.rl_step

    def crash_after_checkpoint(self):
        if self.step == 3:  # killed in step 4 (e.g. a second Ctrl-C): the last checkpoint
            # holds step 2, so step 3 is lost and logged again by the resumed run
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(train.Trainer, "rl_step", crash_after_checkpoint)
    with pytest.raises(SystemExit) as exc:
        train.main(crash_args(tmp_path, straight, "crashed"))
    assert exc.value.code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # train() restored it
    run = tmp_path / "runs" / "crashed"
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(train.Trainer, "rl_step", real_step)
    train.main([f"resume={run}"])
    assert_continued_exactly(run, straight)


def test_resume_errors_point_to_the_runs_config_yaml(tmp_path, straight):
    """A resumed run takes no overrides: its errors name its own config.yaml, not the
    placeholder runs/NAME, and a setting error says where to change it."""
    run = tmp_path / "runs" / "edited"
    shutil.copytree(straight / "runs" / "straight", run)
    with pytest.raises(SystemExit) as exc:
        train.main([f"resume={run}", "rl.steps=8"])
    assert exc.value.code == (f"config error: resume={run} takes no config file or other "
                              f"overrides; to change a setting (e.g. rl.steps, to train longer), "
                              f"edit {run / 'config.yaml'}, then resume")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["sampling"]["temperature"] = -1.0
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exc:
        train.main([f"resume={run}"])
    assert "sampling.temperature=-1.0" in exc.value.code
    assert exc.value.code.endswith(f"(a resumed run takes its settings from "
                                   f"{run / 'config.yaml'}: change them there)")


def test_resume_errors_about_the_run_directory_do_not_point_to_config_yaml(tmp_path, straight,
                                                                          monkeypatch):
    """Only a setting is changed in config.yaml: an unwritable run directory or a damaged cloud
    cache says what it is, without that hint (out_dir was not given: it is the run directory)."""
    import model
    run = tmp_path / "ro"
    shutil.copytree(straight / "runs" / "straight", run)
    real_temp = model.tempfile.NamedTemporaryFile

    def read_only(*args, dir=None, **kwargs):  # as a read-only mount (root writes past chmod)
        if os.path.samefile(dir, run):
            raise PermissionError(13, "Permission denied")
        return real_temp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(model.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(SystemExit) as exc:
        train.main([f"resume={run}"])
    assert exc.value.code == (f"error: run directory '{run}' cannot be written: no new "
                              f"file can be made in {run} (Permission denied)")
    monkeypatch.setattr(model.tempfile, "NamedTemporaryFile", real_temp)
    cache = run / "cloud_cache.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    assert len(lines) > 2
    cache.write_text("".join(lines[:1] + ["{torn\n"] + lines[1:]))
    with pytest.raises(SystemExit) as exc:
        train.main([f"resume={run}"])
    assert exc.value.code.startswith(f"error: {cache}:2: corrupt cloud cache record")
    assert exc.value.code.endswith("only a torn last line is repaired automatically")


def test_resume_needs_no_writable_warm_start_cache_dir(tmp_path, straight, capsys):
    """A resume loads its checkpoint and never the warm start: a warm_start.cache_dir that
    cannot be written (e.g. a read-only mount) is no reason to refuse it."""
    run = tmp_path / "moved"
    shutil.copytree(straight / "runs" / "straight", run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["warm_start"]["cache_dir"] = "/proc/no/such"  # not even root can create it
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    final = json.loads((run / "final_eval.json").read_text())
    assert train.main([f"resume={run}"]) == final
    assert "already complete" in capsys.readouterr().out


def test_resume_applies_an_edited_learning_rate_and_refuses_another_optimizer(tmp_path, straight,
                                                                             capsys):
    """config.yaml's rl.lr / betas / weight_decay hold after a resume (the optimizer state's own
    would silently win); its state cannot become another optimizer's."""
    run = tmp_path / "edited"
    shutil.copytree(straight / "runs" / "straight", run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["rl"].update(steps=5, lr=0.05, betas=[0.8, 0.99])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    train.main([f"resume={run}"])
    out = capsys.readouterr().out
    assert "resume: rl.lr=0.05 from config.yaml (the checkpoint was saved with 0.0001)" in out
    assert "resume: rl.betas=(0.8, 0.99) from config.yaml" in out and "weight_decay" not in out
    group = torch.load(run / "checkpoint" / "trainer_state.pt",
                       weights_only=True)["optimizer"]["param_groups"][0]
    assert group["lr"] == 0.05 and tuple(group["betas"]) == (0.8, 0.99)
    cfg["rl"].update(steps=6, optimizer="sgd")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        train.main([f"resume={run}"])
    assert str(exc.value.code) == (f"config error: rl.optimizer='sgd': the checkpoint in {run} was "
                                   f"trained with 'adamw', whose state cannot carry over; set it "
                                   f"back, or start a new run (name=...)")


class _TouchOnLoad:
    """Unpickling this would create `path`: stands in for code hidden in a shared run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_resume_refuses_a_trainer_state_that_carries_code(tmp_path, straight):
    """trainer_state.pt is read with weights_only: tensors, numbers and containers. A run
    directory from elsewhere cannot run code through it; the resume stops with one line."""
    run = tmp_path / "shared"
    shutil.copytree(straight / "runs" / "straight", run)
    marker = tmp_path / "code_ran"
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)
    torch.save({**state, "step": _TouchOnLoad(str(marker))}, run / "checkpoint" / "trainer_state.pt")
    with pytest.raises(SystemExit) as exc:
        train.main([f"resume={run}"])
    assert str(exc.value.code) == (
        f"config error: cannot resume from {run / 'checkpoint' / 'trainer_state.pt'}: it holds "
        "objects other than tensors, numbers and containers (Unsupported global: GLOBAL getattr); "
        "resume only run directories you trust")
    assert not marker.exists()
    (run / "checkpoint" / "trainer_state.pt").write_bytes(b"")  # e.g. a full disk
    with pytest.raises(SystemExit) as exc:
        train.main([f"resume={run}"])
    assert "trainer_state.pt: not a readable trainer state (EOFError" in str(exc.value.code)


@pytest.mark.parametrize("signum, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_saves_after_the_current_step(tmp_path, straight, monkeypatch, capsys, signum,
                                             name):
    real_step = train.Trainer.rl_step

    def ctrl_c_during_step_3(self):
        if self.step == 2:
            signal.raise_signal(signum)
        return real_step(self)

    monkeypatch.setattr(train.Trainer, "rl_step", ctrl_c_during_step_3)
    with pytest.raises(SystemExit) as exc:
        train.main(crash_args(tmp_path, straight, "ctrl_c"))
    assert exc.value.code == 128 + signum    # 130 for Ctrl-C, 143 for SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    run = tmp_path / "runs" / "ctrl_c"
    assert f"stopped by {name}: checkpoint saved at step 3" in capsys.readouterr().out
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 3
    assert [r["train/step"] for r in read_rows(run)] == [1, 2, 3]
    monkeypatch.setattr(train.Trainer, "rl_step", real_step)
    train.main([f"resume={run}"])
    assert_continued_exactly(run, straight)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads fds' paths from /proc")
def test_each_checkpoint_swap_is_made_durable(tmp_path, straight, fsync_log):
    """After checkpoint.tmp becomes the checkpoint, the run directory is fsynced: a crash of the
    machine then cannot bring back the state before the swap (a checkpoint whose .old is gone)."""
    log = fsync_log
    train.main(crash_args(tmp_path, straight, "durable"))
    run = str(tmp_path / "runs" / "durable")
    swaps = [i for i, e in enumerate(log) if e == ("replace", os.path.join(run, "checkpoint"))]
    assert len(swaps) == 2  # the saves of steps 2 and 4
    assert all(log[i + 1] == ("fsync", run) for i in swaps)


def test_a_crash_mid_save_never_loses_the_checkpoint(tmp_path, straight, monkeypatch):
    real_replace, swaps = os.replace, []

    def crash_on_swap(crash_at):
        """os.replace that crashes on the crash_at-th move of checkpoint.tmp into place, i.e.
        after the old checkpoint became checkpoint.old and before the new one took its place."""
        def replace(src, dst):
            if str(src).endswith("checkpoint.tmp"):
                swaps.append(src)
                if len(swaps) == crash_at:
                    raise RuntimeError("simulated crash")
            return real_replace(src, dst)
        swaps.clear()
        monkeypatch.setattr(os, "replace", replace)

    run = tmp_path / "runs" / "mid_save"
    crash_on_swap(2)  # the step-4 save
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(crash_args(tmp_path, straight, "mid_save"))
    assert not (run / "checkpoint").exists() and (run / "checkpoint.old").exists()
    monkeypatch.setattr(os, "replace", real_replace)
    trainer = train.Trainer(train.load_config([f"resume={run}"]))
    assert trainer.step == 2  # from checkpoint.old, which is the checkpoint again
    assert (run / "checkpoint").exists() and not (run / "checkpoint.old").exists()
    crash_on_swap(1)  # the same save crashes again: the step-2 checkpoint is still there
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    state = torch.load(run / "checkpoint.old" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    monkeypatch.setattr(os, "replace", real_replace)
    train.main([f"resume={run}"])
    assert_continued_exactly(run, straight)
    # a kill at the end of a save (deleting checkpoint.old) or in an atomic write leaves
    # leftovers: the next start removes them, but not the file of a process still writing it
    shutil.copytree(run / "checkpoint", run / "checkpoint.old")
    (run / "checkpoint.old" / "model.safetensors").unlink()  # half deleted
    dead, alive = run / "metrics.jsonl.tmp.4194399", run / f"config.yaml.tmp.{os.getppid()}@{socket.gethostname()}"
    users = run / "notes.tmp.4194399"  # named like one, but no file train.py writes: kept
    for path, text in [(dead, '{"train/st'), (alive, "name: "), (users, "mine")]:
        path.write_text(text)
    train.Trainer(train.load_config([f"resume={run}"]))
    assert not (run / "checkpoint.old").exists() and not dead.exists()
    assert alive.exists() and users.exists()
    alive.unlink()
    users.unlink()
    # save() itself deletes checkpoint.old only once a new checkpoint has taken its place
    real_replace(run / "checkpoint", run / "checkpoint.old")
    crash_on_swap(1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.save()
    state = torch.load(run / "checkpoint.old" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and (run / "checkpoint.old" / "model.safetensors").exists()


@pytest.mark.parametrize("failure, said", [
    (OSError(errno.ENOSPC, "No space left on device"), "[Errno 28] No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 960"),
     "[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 960"),  # torch's
])
def test_a_save_that_cannot_be_written_stops_with_one_line(tmp_path, straight, monkeypatch,
                                                           failure, said):
    """A full disk at the step-4 save: one line saying the step-2 checkpoint is intact and how to
    go on (no torch traceback); the partial checkpoint.tmp is gone, and the resume is exact."""
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04")  # what fitted
            raise failure
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as exc:
        train.main(crash_args(tmp_path, straight, "full"))
    run = tmp_path / "runs" / "full"
    assert exc.value.code == (f"\ncannot save the checkpoint of step 4 to "
                              f"{run / 'checkpoint.tmp'} ({said}); the checkpoint of step 2 is "
                              f"intact; once fixed, continue with: python train.py resume={run}")
    assert not (run / "checkpoint.tmp").exists()
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    train.main([f"resume={run}"])
    assert_continued_exactly(run, straight)


class _FullDisk(io.StringIO):
    """A file on a full disk: every write fails, as a real one does, naming no file."""

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_log_that_cannot_be_appended_to_stops_with_one_line(tmp_path, straight, monkeypatch):
    """A full disk while logging step 3 (outside save()) was a traceback: now one line naming
    metrics.jsonl, the checkpoint still intact, and how to go on; the resume is exact."""
    real_open = builtins.open

    def full_at_step_3(path, mode="r", *args, **kwargs):
        if (str(path).endswith("metrics.jsonl") and mode == "a" and os.path.exists(path)
                and len(read_rows(run)) == 2):
            return _FullDisk()
        return real_open(path, mode, *args, **kwargs)

    run = tmp_path / "runs" / "full_log"
    monkeypatch.setattr(train, "open", full_at_step_3, raising=False)  # train.py's open only
    with pytest.raises(SystemExit) as exc:
        train.main(crash_args(tmp_path, straight, "full_log"))
    assert exc.value.code == (f"\n[Errno 28] No space left on device: '{run / 'metrics.jsonl'}'; "
                              f"the checkpoint of step 2 is intact; once fixed, continue with: "
                              f"python train.py resume={run}")
    monkeypatch.undo()
    train.main([f"resume={run}"])
    assert_continued_exactly(run, straight)


def test_a_full_disk_writing_the_warm_start_stops_with_one_line(tmp_path, monkeypatch):
    """The warm start's save, before RL: one line naming the file, and no partial copy left."""
    real_write = train.atomic_write_text

    def full_at_warm_start_json(path, text):  # model.safetensors was written before it
        if path.endswith("warm_start.json"):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_write(path, text)

    monkeypatch.setattr(train, "atomic_write_text", full_at_warm_start_json)
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=no_room", "warm_start.steps=1"))
    assert re.fullmatch(r"error: \[Errno 28\] No space left on device: '.*warm_start\.json'; "
                        r"nothing to resume \(a warm start is cached only once complete\): once "
                        r"fixed, run the same command again", exc.value.code), exc.value.code
    assert os.listdir(tmp_path / "warm") == []


def test_a_resume_first_removes_the_checkpoint_tmp_of_a_killed_save(tmp_path, straight,
                                                                    monkeypatch):
    """A save killed mid-write leaves a whole checkpoint.tmp; on a full disk the resume's first
    write (cutting metrics.jsonl back) needs that space: it goes before anything is written."""
    run = tmp_path / "killed"
    shutil.copytree(straight / "runs" / "straight", run)
    shutil.copytree(run / "checkpoint", run / "checkpoint.tmp")
    seen, real_write = [], train.atomic_write_text

    def write(path, text):
        seen.append((run / "checkpoint.tmp").exists())
        real_write(path, text)

    monkeypatch.setattr(train, "atomic_write_text", write)
    train.main([f"resume={run}"])
    assert seen and not any(seen) and not (run / "checkpoint.tmp").exists()


def test_a_checkpoint_old_that_cannot_be_deleted_stops_with_one_line(tmp_path, straight,
                                                                      monkeypatch):
    """save() deleted checkpoint.old ignoring errors; the next save's swap then crashed with
    'Directory not empty'. Now a .old left in place is a one-line error naming it."""
    real_rmtree = shutil.rmtree

    def rmtree(path, ignore_errors=False, **kwargs):
        if str(path).endswith("checkpoint.old"):  # e.g. a subdirectory that cannot be written
            if not ignore_errors:
                raise PermissionError(13, "Permission denied", str(path))
            return
        return real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(SystemExit) as exc:  # at the step-4 save, checkpoint.old holds step 2
        train.main(crash_args(tmp_path, straight, "stuck"))
    run = tmp_path / "runs" / "stuck"
    said = (f"\n{run / 'checkpoint.old'} could not be deleted, and a save needs its place: "
            f"delete it; the checkpoint of step 4 is intact; once fixed, continue with: "
            f"python train.py resume={run}")
    assert exc.value.code == said
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 4
    # the next save, before its swap: checkpoint.old is still there, the checkpoint is intact
    trainer = train.Trainer(train.load_config([f"resume={run}"]))
    with pytest.raises(train.SaveError) as exc:
        trainer.save()
    assert (f"\n{exc.value}; {trainer.kept()}; once fixed, continue with: python train.py "
            f"resume={run}") == said
    assert (run / "checkpoint").exists() and (run / "checkpoint.old").exists()
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    real_rmtree(run / "checkpoint.old")  # what the message asks
    train.main([f"resume={run}"])
    assert_continued_exactly(run, straight)


def test_resume_before_the_first_checkpoint(tmp_path, monkeypatch):
    def crash(self):
        raise RuntimeError("simulated crash")

    real_step = train.Trainer.rl_step
    monkeypatch.setattr(train.Trainer, "rl_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):  # a bug keeps its traceback
        train.main(tiny_args(tmp_path, "name=early", "rl.steps=1"))
    run = tmp_path / "runs" / "early"
    with pytest.raises(SystemExit, match=f"config error: resume={re.escape(str(run))}: no "
                                         f"checkpoint yet .*start it afresh with: python train.py "
                                         f"{re.escape(str(run / 'config.yaml'))}"):
        train.main([f"resume={run}"])
    monkeypatch.setattr(train.Trainer, "rl_step", real_step)
    train.main([str(run / "config.yaml")])  # what the message suggests works
    assert [r["train/step"] for r in read_rows(run)] == [1, 1]


def test_interrupted_before_the_first_checkpoint_suggests_starting_afresh(tmp_path, monkeypatch,
                                                                        capsys):
    def second_ctrl_c(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "rl_step", second_ctrl_c)
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=early", "rl.steps=1", "save_every=100"))
    run = tmp_path / "runs" / "early"
    assert exc.value.code == 130
    # resume=... would fail (no checkpoint yet); the config.yaml starts it again
    assert f"interrupted; continue with: python train.py {run / 'config.yaml'}" \
        in capsys.readouterr().err


def test_sigterm_during_the_final_evaluation_stops_with_a_message(tmp_path, straight,
                                                                  monkeypatch, capsys):
    """Outside the RL loop (the warm start, the final evaluation) SIGTERM stops the run as a
    Ctrl-C does: the message, and 143; before, the process died without a word."""
    def terminated(self):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train.Trainer, "evaluate", terminated)   # eval.every=0: only the final
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        train.main(crash_args(tmp_path, straight, "term"))
    run = tmp_path / "runs" / "term"
    assert exc.value.code == 143
    assert f"interrupted; continue with: python train.py resume={run}" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before   # main() restored it
    assert not (run / "final_eval.json").exists()


def test_ctrl_c_during_the_time_limit_save_stops_without_the_final_evaluation(
        tmp_path, straight, monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock["now"]))
    real_step, real_save = train.Trainer.rl_step, train.Trainer.save

    def minute_step(self):
        clock["now"] += 60.0
        return real_step(self)

    def save(self):
        real_save(self)
        if self.time_limited:  # the time limit's checkpoint is being written: Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train.Trainer, "rl_step", minute_step)
    monkeypatch.setattr(train.Trainer, "save", save)
    with pytest.raises(SystemExit) as exc:
        train.main(crash_args(tmp_path, straight, "limit") + ["rl.time_limit_min=1.5"])
    run = tmp_path / "runs" / "limit"
    assert exc.value.code == 130 and not (run / "final_eval.json").exists()
    assert [r["train/step"] for r in read_rows(run)] == [1, 2]   # no final evaluation row
    monkeypatch.setattr(train.Trainer, "save", real_save)
    final = train.main([f"resume={run}"])   # finished by the limit: resuming evaluates it
    assert [r["train/step"] for r in read_rows(run)] == [1, 2, 2] and final


def test_a_run_trained_longer_keeps_the_evaluation_at_its_old_last_step(tmp_path, straight):
    """Raising rl.steps of a finished run: its final evaluation at step 2 was also the periodic
    one a longer run logs at step 2 (eval.every=2); it stays, in step 2's row, as a run trained
    4 steps in one go has it."""
    args = crash_args(tmp_path, straight, "short") + ["eval.every=2"]
    train.main([a if a != "rl.steps=4" else "rl.steps=2" for a in args])
    run = tmp_path / "runs" / "short"
    final_row = read_rows(run)[-1]
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["rl"]["steps"] = 4
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    train.main([f"resume={run}"])
    train.main(crash_args(tmp_path, straight, "long") + ["eval.every=2"])
    rows, straight_rows = read_rows(run), read_rows(tmp_path / "runs" / "long")
    assert [r["train/step"] for r in rows] == [1, 2, 3, 4, 4]
    evals = lambda row: {k: v for k, v in row.items() if k.startswith("eval/")}
    assert evals(rows[1]) == evals(final_row) == evals(straight_rows[1]) != {}
    assert [sorted(evals(r)) == [] for r in rows[2:4]] == [True, True]


def test_a_finished_run_whose_final_eval_json_was_deleted_logs_its_final_row_once(tmp_path,
                                                                                   straight):
    """Resuming it evaluates it again: metrics.jsonl ends as the uninterrupted run's, with one
    final row (not the old one and a new one), and no eval/* keys added to step 4's row (under
    eval.every=2, which evaluates step 4 only when training goes on)."""
    run = tmp_path / "finished"
    shutil.copytree(straight / "runs" / "straight", run)
    rows, final = read_rows(run), json.loads((run / "final_eval.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["eval"]["every"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "final_eval.json").unlink()
    assert train.main([f"resume={run}"]) == final
    assert read_rows(run) == rows and [r["train/step"] for r in rows] == [1, 2, 3, 4, 4]


def test_a_log_line_damaged_before_the_last_is_an_error_naming_it(tmp_path, straight):
    """truncate_log cuts off a torn last line (a crash mid-append) in silence; a damaged line
    before it is not a crash's: it stops the resume with file:line instead of vanishing."""
    log = tmp_path / "metrics.jsonl"
    rows = [{"train/step": 1, "train/loss": 0.5}, {"train/step": 2, "train/loss": 0.25}]
    good = "".join(json.dumps(r) + "\n" for r in rows)
    log.write_text(good + "\n" + '{"train/step": 3, "train/lo')  # a blank line, then a torn one
    train.truncate_log(str(log), 2)
    assert log.read_text() == good
    for bad, problem in [(b'{"train/st\n', "not valid JSON"), (b"[3]\n", "not a JSON object"),
                         (b"\xff\n", "not valid JSON")]:  # (not UTF-8)
        log.write_bytes(good.encode() + bad + good.encode())
        with pytest.raises(ValueError, match=re.escape(f"{log}:3: corrupt log line ({problem}")):
            train.truncate_log(str(log), 2)
    run = tmp_path / "damaged"
    shutil.copytree(straight / "runs" / "straight", run)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2] + ["{torn\n"] + lines[2:]))
    with pytest.raises(SystemExit) as exc:
        train.main([f"resume={run}"])
    assert exc.value.code.startswith(f"error: {run / 'metrics.jsonl'}:3: corrupt log line "
                                     f"(not valid JSON (")
    assert exc.value.code.endswith("only a torn last line is repaired automatically: fix or "
                                   "delete that line, then resume")


@pytest.mark.parametrize("loss, grad", [
    (float("nan"), float("nan")),  # both poisoned
    (0.5, float("nan")),           # a finite loss, but a NaN gradient
    (float("inf"), 0.1),           # finite gradients, but an infinite loss
])
def test_non_finite_step_is_skipped(loss, grad, tmp_path, monkeypatch):
    # filter none: every prompt is selected, so the update always runs
    trainer = train.Trainer(train.load_config(tiny_args(tmp_path, "name=nan", "rl.steps=1",
                                                        "rl.filter=none")))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def poisoned(model, *args, **kwargs):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.1)
        next(model.parameters()).grad.view(-1)[0] = grad  # one entry is enough
        return loss

    monkeypatch.setattr(algo, "update_policy", poisoned)
    row = trainer.rl_step()
    assert row["filter/selected"] == 4 and row["train/skipped"] == "non_finite"
    # written as null, not NaN / Infinity, which strict JSON does not have
    assert row["train/loss"] == (None if loss != loss or abs(loss) == float("inf") else loss)
    assert (row["train/grad_norm"] is None) == (grad != grad)  # NaN: the only non-finite gradient
    json.dumps(row, allow_nan=False)
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not trainer.opt.state  # the optimizer never stepped on the poisoned gradient


def test_skipped_non_finite_steps_are_said_on_the_console(tmp_path, monkeypatch, capsys):
    """Not only in metrics.jsonl: the progress line counts them and the run ends with a note."""
    def poisoned(model, *args, **kwargs):
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        return float("nan")
    monkeypatch.setattr(algo, "update_policy", poisoned)
    train.main(tiny_args(tmp_path, "name=nan", "rl.steps=2", "rl.filter=none", "rl.lr=0.05"))
    out = capsys.readouterr().out
    assert "| non-finite, skipped 1" in out and "| non-finite, skipped 2" in out
    assert ("note: 2 RL steps were skipped, their loss or gradient NaN or inf (train/skipped = "
            "non_finite in metrics.jsonl): the weights may have diverged; a smaller rl.lr (now "
            "0.05) or rl.grad_clip may help") in out
    monkeypatch.undo()
    train.main(tiny_args(tmp_path, "name=fine", "rl.steps=2"))
    assert "non-finite" not in capsys.readouterr().out


def test_step_whose_coefficients_are_all_zero_says_so(tmp_path, monkeypatch):
    # prompts are selected, but every response's coefficient is 0 (e.g. all-correct groups):
    # the update computes nothing, and the log must not call it an ordinary step
    trainer = train.Trainer(train.load_config(tiny_args(tmp_path, "name=zero", "rl.steps=1",
                                                        "rl.filter=none")))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    monkeypatch.setattr(algo, "group_advantages", lambda rewards, *a, **k: torch.zeros_like(rewards))
    row = trainer.rl_step()
    assert row["filter/selected"] == 4 and row["train/skipped"] == "zero_coefficients"
    assert row["train/loss"] == 0.0 and row["train/grad_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert not trainer.opt.state


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", ["countdown-qwen2.5-3b.yaml", "math-qwen2.5-1.5b.yaml"])
def test_gpu_recipes_run_on_a_tiny_model_of_the_same_family(config, device, tmp_path,
                                                            monkeypatch):
    """The GPU recipes exactly as written, except: a tiny random Qwen2 model with a
    character-level ChatML tokenizer (so no prompt-length limit), a few prompts, and the oracle
    cloud; on the CPU, and on CUDA where there is one. Random weights never answer right, so
    every reward is 0 and no prompt would be selected: rl.filter=none and fixed +-1 coefficients
    make both steps update, so the recipe's backward (autocast, gradient checkpointing, micro-
    batches), AdamW step and bf16 sampler sync all run."""
    import string

    from model import ModelConfig, Transformer, build_char_tokenizer, save_pretrained
    tok = build_char_tokenizer(string.printable)
    tok.chat_format = "chatml"
    cfg = ModelConfig(model_type="qwen2", vocab_size=tok.vocab_size, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=4096)
    save_pretrained(Transformer(cfg).init_weights(0), str(tmp_path / "qwen2-tiny"), tok)
    for split in ("train", "test"):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(4):
                f.write(json.dumps({"problem": f"What is {i} + {i}?",
                                    "solution": f"It is $\\boxed{{{2 * i}}}$."}) + "\n")
    recipe = os.path.join(os.path.dirname(train.__file__), "configs", config)
    cfg = train.load_config([recipe, f"model.path={tmp_path / 'qwen2-tiny'}", f"device={device}",
                             "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=2",
                             "sampling.max_new_tokens=8", "eval.n=2", "eval.every=0",
                             "rl.micro_batch_size=1", f"out_dir={tmp_path / 'runs'}",
                             "sampling.max_prompt_tokens=0"])  # characters: no limit
    assert cfg.precision == "bf16-mixed" and cfg.model.gradient_checkpointing
    cfg.cloud = {"backend": "oracle"}  # no network in tests
    if cfg.task["name"] == "math":
        cfg.task.update(path_train=str(tmp_path / "train.jsonl"),
                        path_test=str(tmp_path / "test.jsonl"))
    else:
        cfg.task.update(n_train=20, n_test=4)
    cfg.rl.filter = "none"

    def alternating(rewards, *args, **kwargs):  # centred, as GAPG's coefficients are
        coef = torch.ones(rewards.shape)
        coef[:, 1::2] = -1.0
        return coef

    monkeypatch.setattr(algo, "group_advantages", alternating)
    trainer = train.Trainer(cfg)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    final = trainer.train()
    assert trainer.step == 2 and final["n"] == 2
    rows = [r for r in read_rows(tmp_path / "runs" / cfg.name) if "train/skipped" in r]
    assert [r["train/skipped"] for r in rows] == ["", ""]  # both steps updated
    assert any(not torch.equal(start[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.sampler_model is not trainer.model  # bf16 sampler copy, fp32 master weights
    assert next(trainer.sampler_model.parameters()).dtype == torch.bfloat16
    assert next(trainer.model.parameters()).dtype == torch.float32
    # the sampler samples the updated policy: its weights are the master weights, rounded
    for p, q in zip(trainer.sampler_model.parameters(), trainer.model.parameters()):
        assert torch.equal(p, q.to(torch.bfloat16))
    rows = read_rows(tmp_path / "runs" / cfg.name)
    assert [r["train/step"] for r in rows] == [1, 2, 2]


def test_prompts_whose_cloud_call_failed_are_left_out_of_the_update(tmp_path, monkeypatch):
    from cloud import CloudAnswer
    trainer = train.Trainer(train.load_config(tiny_args(
        tmp_path, "name=down", "rl.prompts_per_step=8", "rl.filter=none", "rl.steps=1")))
    monkeypatch.setattr(trainer.cloud, "ask", lambda task, examples: [
        CloudAnswer("", False, False, error="CloudError: HTTP 503") for _ in examples])
    seen = []
    real_update = algo.update_policy

    def spy(model, ro, coef, selected, *a, **k):
        seen.append((ro, selected))
        return real_update(model, ro, coef, selected, *a, **k)
    monkeypatch.setattr(algo, "update_policy", spy)
    row = trainer.rl_step()
    ro = trainer.last_rollout
    failed = ro.cloud_asked.nonzero().flatten().tolist()  # every prompt that asked: its call failed
    assert failed and row["filter/cloud_failed"] == len(failed) and ro.cloud_failed.sum() == len(failed)
    kept = [p for p in range(8) if p not in failed]
    assert row["filter/selected"] == len(kept)  # filter "none" selects all 8; the failed ones leave
    assert kept and seen[0][1].tolist() == kept


def test_ctrl_c_during_the_warm_start_exits_cleanly_and_the_run_can_start_again(
        tmp_path, monkeypatch, capsys):
    real_warm_start = train.warm_start

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "warm_start", interrupted)
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=early", "rl.steps=1"))
    err = capsys.readouterr().err
    assert exc.value.code == 130
    assert "nothing to resume" in err and "run the same command again" in err
    monkeypatch.setattr(train, "warm_start", real_warm_start)
    train.main(tiny_args(tmp_path, "name=early", "rl.steps=1"))  # not "already holds a run"
    run = tmp_path / "runs" / "early"
    assert [r["train/step"] for r in read_rows(run)] == [1, 1]
    # Ctrl-C while a resume loads its checkpoint: the checkpoint is there, and says so
    monkeypatch.setattr(train, "load_pretrained", interrupted)
    with pytest.raises(SystemExit) as exc:
        train.main([f"resume={run}"])
    err = capsys.readouterr().err
    assert exc.value.code == 130 and "the run's checkpoint is unchanged" in err
    assert "nothing to resume" not in err


def test_step_prompts_cover_each_epoch_once():
    examples = list(range(12))
    for k in (3, 4, 5):
        per_epoch = len(examples) // k
        for epoch in range(2):
            seen = [x for step in range(epoch * per_epoch, (epoch + 1) * per_epoch)
                    for x in train.step_prompts(examples, 0, step, k)]
            assert len(seen) == len(set(seen)) == per_epoch * k   # no prompt twice in an epoch
        assert train.step_prompts(examples, 0, 0, k) != train.step_prompts(examples, 0, per_epoch, k)


def test_rollout_metrics_by_hand():
    import types
    ro = types.SimpleNamespace(
        help=torch.tensor([[True, False], [False, False], [True, True]]),
        local_ok=torch.tensor([[False, True], [False, False], [False, False]]),
        cloud_ok=torch.tensor([True, False, False]), cloud_asked=torch.tensor([True, False, True]),
        cloud_failed=torch.zeros(3, dtype=torch.bool),
        lengths=torch.tensor([4, 6, 8, 10, 2, 2]), finished=torch.tensor([1, 1, 1, 0, 1, 1]).bool(),
        rewards=torch.tensor([[0.4, 1.0], [0.0, 0.0], [0.0, 0.0]]), components={})
    m = train.Trainer.rollout_metrics(None, ro)
    assert m["route/cloud_acc"] == 0.5          # asked for prompts 0 (right) and 2 (wrong) only
    assert m["route/help_ratio"] == 0.5 and m["route/local_acc"] == pytest.approx(1 / 6)
    assert m["route/len_help"] == pytest.approx((4 + 2 + 2) / 3)
    assert m["route/len_answer"] == pytest.approx((6 + 8 + 10) / 3)
    assert m["route/clipped_ratio"] == pytest.approx(1 / 6)
    assert m["reward/mean"] == pytest.approx(1.4 / 6)
    # nothing asked: no cloud accuracy and no help-call length to report (0.0 would read as
    # "the cloud was always wrong"); every response a help call: no answer length
    for help in (torch.zeros(3, 2, dtype=torch.bool), torch.ones(3, 2, dtype=torch.bool)):
        ro.help, ro.cloud_asked = help, help.any(dim=1)
        m = train.Trainer.rollout_metrics(None, ro)
        asked = bool(help.any())
        assert (m["route/cloud_acc"] is None) is not asked
        assert (m["route/len_help"] is None) is not asked and (m["route/len_answer"] is None) is asked


def test_shares_are_exact_so_a_help_rate_at_da_grpos_target_leaves_its_dual_at_zero():
    """6 help calls of 20 is 0.3 exactly (a float32 mean gave 0.30000001), so DA-GRPO's dual
    ascent max(0, dual + eta * (rate - tau)) stays at 0 when the rate equals tau = 0.3."""
    import types
    help = torch.zeros(5, 4, dtype=torch.bool)
    help.view(-1)[:6] = True
    ro = types.SimpleNamespace(
        help=help, local_ok=~help, cloud_ok=torch.zeros(5, dtype=torch.bool),
        cloud_asked=torch.zeros(5, dtype=torch.bool), cloud_failed=torch.zeros(5, dtype=torch.bool),
        lengths=torch.ones(20), finished=help.view(-1).clone(), rewards=torch.zeros(5, 4),
        components={})
    m = train.Trainer.rollout_metrics(None, ro)
    assert m["route/help_ratio"] == 0.3 and m["route/local_acc"] == 0.7
    assert m["route/clipped_ratio"] == 0.7
    assert algo.update_dual(0.0, m["route/help_ratio"], 0.3, 0.5) == 0.0


def test_cloud_accuracy_leaves_out_failed_cloud_calls():
    """route/cloud_acc is the cloud's accuracy on the prompts it answered: a call that failed
    (counted in filter/cloud_failed) is not a wrong answer of the cloud's."""
    ro = types.SimpleNamespace(
        help=torch.tensor([[True, False], [True, True], [True, False]]),
        local_ok=torch.zeros(3, 2, dtype=torch.bool),
        cloud_ok=torch.tensor([True, False, False]), cloud_asked=torch.tensor([True, True, True]),
        cloud_failed=torch.tensor([False, True, False]),   # prompt 1: no answer came
        lengths=torch.tensor([4, 6, 8, 10, 2, 2]), finished=torch.ones(6, dtype=torch.bool),
        rewards=torch.zeros(3, 2), components={})
    m = train.Trainer.rollout_metrics(None, ro)
    assert m["route/cloud_acc"] == 0.5          # answered: prompt 0 (right) and 2 (wrong)
    ro.cloud_failed = torch.tensor([False, True, True])
    assert train.Trainer.rollout_metrics(None, ro)["route/cloud_acc"] == 1.0
    ro.cloud_failed = torch.ones(3, dtype=torch.bool)  # nothing answered: nothing to average
    assert train.Trainer.rollout_metrics(None, ro)["route/cloud_acc"] is None


def test_bf16_mixed_sampler_follows_the_updated_weights(tmp_path):
    """bf16-mixed samples from a bf16 copy: after each update it must hold the new weights."""
    trainer = train.Trainer(train.load_config(tiny_args(
        tmp_path, "name=mixed", "precision=bf16-mixed", "rl.steps=8", "rl.lr=0.01", "eval.n=2",
        "rl.filter=none", "device=cpu")))
    before = [p.clone() for p in trainer.sampler_model.parameters()]
    updates = 0
    while trainer.step < 8 and updates < 2:
        updates += not trainer.rl_step()["train/skipped"]
        trainer.step += 1
    assert updates == 2
    after = list(trainer.sampler_model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    for p, q in zip(after, trainer.model.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.detach().to(torch.bfloat16))


def test_resume_restores_the_da_grpo_dual_variable(tmp_path, straight):
    trainer = train.Trainer(train.load_config(crash_args(tmp_path, straight, "dual") + [
        "rl.algo=da_grpo", "rl.dual_init=0.2", "rl.dual_eta=0.5", "rl.dual_tau=0.0"]))
    first = trainer.rl_step()
    trainer.step += 1
    trainer.save()
    # lambda_1 = max(0, lambda_0 + eta * (help ratio of step 1 - tau)), worked from the logged ratio
    assert first["route/help_ratio"] > 0   # tau = 0 with any help call moves lambda
    assert trainer.dual == pytest.approx(0.2 + 0.5 * first["route/help_ratio"])
    resumed = train.Trainer(train.load_config([f"resume={tmp_path / 'runs' / 'dual'}"]))
    assert resumed.step == 1 and resumed.dual == pytest.approx(0.2 + 0.5 * first["route/help_ratio"])
    second = resumed.rl_step()   # the next step starts from the restored lambda_1, not lambda_0
    assert second["train/dual"] == pytest.approx(
        0.2 + 0.5 * first["route/help_ratio"] + 0.5 * second["route/help_ratio"])


def test_a_time_limited_run_is_finished_until_its_config_asks_for_more(tmp_path, straight,
                                                                       monkeypatch, capsys):
    """README: a run stopped by rl.time_limit_min counts as finished, and resuming a finished run
    only prints its final evaluation. Training that does go on (rl.steps raised in its
    config.yaml) first removes the old final evaluation: final_eval.json and its row."""
    clock, calls = {"now": 0.0, "per_step": 60.0, "crash": False}, []
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock["now"]))
    real_step = train.Trainer.rl_step

    def timed_step(self):  # each step takes a minute of the fake clock
        calls.append(self.step)
        if clock["crash"]:
            raise RuntimeError("simulated crash")
        clock["now"] += clock["per_step"]
        return real_step(self)

    monkeypatch.setattr(train.Trainer, "rl_step", timed_step)
    run = tmp_path / "runs" / "limited"
    final = train.main(crash_args(tmp_path, straight, "limited") + ["rl.time_limit_min=1.5"])
    assert "rl.time_limit_min=1.5 reached at step 2" in capsys.readouterr().out
    assert calls == [0, 1] and [r["train/step"] for r in read_rows(run)] == [1, 2, 2]
    assert json.loads((run / "final_eval.json").read_text()) == final
    # resumed: finished, so no step is trained and nothing is logged again
    assert train.main([f"resume={run}"]) == final and calls == [0, 1]
    assert "already complete (2 steps, stopped by rl.time_limit_min)" in capsys.readouterr().out
    assert [r["train/step"] for r in read_rows(run)] == [1, 2, 2]
    # a crash between the time limit's checkpoint and the final evaluation: only evaluated
    rows = read_rows(run)
    (run / "final_eval.json").unlink()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    assert train.main([f"resume={run}"]) == final and calls == [0, 1] and read_rows(run) == rows
    # rl.steps raised: training goes on, and the old final evaluation is gone before it starts
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["rl"]["steps"] = 5
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    clock["crash"] = True
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main([f"resume={run}"])
    assert calls == [0, 1, 2]
    assert not (run / "final_eval.json").exists()     # eval.py: not finished, not time-limited
    assert [r["train/step"] for r in read_rows(run)] == [1, 2]
    assert all("train/loss" in r for r in read_rows(run))
    clock.update(crash=False, per_step=0.0)
    train.main([f"resume={run}"])
    assert calls == [0, 1, 2, 2, 3, 4]
    assert [r["train/step"] for r in read_rows(run)] == [1, 2, 3, 4, 5, 5]
    assert (run / "final_eval.json").exists()
    # the checkpoint deleted and the run started again under its name: no stale final state
    shutil.rmtree(run / "checkpoint")
    clock["crash"] = True
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(crash_args(tmp_path, straight, "limited"))
    assert not (run / "final_eval.json").exists() and read_rows(run) == []


def test_sample_time_leaves_out_the_wait_for_the_cloud(tmp_path, monkeypatch):
    """perf/cloud_s is the time the step's cloud call took; perf/sample_s and perf/tokens_per_s
    are the rest of the rollout. A fake clock: 3 s of sampling, 10 s in the cloud."""
    trainer = train.Trainer(train.load_config(tiny_args(
        tmp_path, "name=clock", "rl.prompts_per_step=8", "rl.steps=1")))
    clock = [100.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: clock[0]))
    real_ask, real_rollout, asked = trainer.cloud.ask, algo.rollout, []

    def slow_ask(task, examples):
        asked.append(len(examples))
        clock[0] += 10
        return real_ask(task, examples)

    def rollout(*args, **kwargs):
        clock[0] += 3
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(trainer.cloud, "ask", slow_ask)
    monkeypatch.setattr(algo, "rollout", rollout)
    row = trainer.rl_step()
    assert asked == [row["perf/cloud_calls"] + row["perf/cloud_cached"]] and asked[0] > 0
    assert row["perf/cloud_s"] == 10 and row["perf/sample_s"] == 3
    assert row["perf/tokens_per_s"] == int(trainer.last_rollout.lengths.sum()) / 3


@pytest.mark.parametrize("device", [CUDA])
def test_peak_memory_is_each_steps_own(device, tmp_path, monkeypatch):
    trainer = train.Trainer(train.load_config(tiny_args(tmp_path, "name=mem", "rl.steps=2",
                                                        f"device={device}")))
    real_rollout = algo.rollout

    def rollout_with_a_gib(*args, **kwargs):  # step 1 only: 1 GiB more, freed at once
        if trainer.step == 0:
            torch.empty(2**30, dtype=torch.uint8, device=device)
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(algo, "rollout", rollout_with_a_gib)
    first = trainer.rl_step()
    trainer.step += 1
    second = trainer.rl_step()
    assert first["perf/peak_mem_gb"] >= 1 > 0.5 > second["perf/peak_mem_gb"]


def test_failed_cloud_calls_are_reported_on_the_console(tmp_path, capsys):
    """A cloud that answers every request with HTTP 500: the run still finishes, and the
    console says how many calls failed instead of showing 0.000 as a real cloud accuracy."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Down(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(500)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"down")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Down)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        down = (f"cloud={{backend: http, base_url: 'http://127.0.0.1:{server.server_port}', "
                f"model: m, retries: 0, timeout: 2}}")
        train.main(tiny_args(tmp_path, "name=down", "rl.steps=2", down))
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    failed = int(re.search(r"note: (\d+) cloud calls failed in this run", out).group(1))
    assert failed >= 10 and "10 of the 10 cloud-only answers" in out
    assert "the first failure: CloudError: " in out and "HTTP 500: down" in out  # and why
    assert "evaluation 10/10" in out        # the final evaluation's progress


def test_a_cloud_never_reached_stops_the_run_with_one_line(tmp_path):
    """Nothing listens on the port: a wrong base_url or no server, not a passing failure; the run
    stops at the first help call's batch, saying how to go on, instead of training without a
    cloud."""
    with socket.socket() as s:  # a port nobody listens on once this closes: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"cloud={{backend: http, base_url: 'http://127.0.0.1:{port}', model: m, retries: 0}}"
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=down", "rl.steps=2", dead))
    run = tmp_path / "runs" / "down"
    assert exc.value.code.startswith(f"\ncloud error: http://127.0.0.1:{port}/v1/chat/completions: "
                                     f"not reached in 1 attempts")
    assert exc.value.code.endswith(f"once fixed, continue with: python train.py "
                                   f"{run / 'config.yaml'}")


@pytest.mark.parametrize("refuse_from_step, again", [(0, "{run}/config.yaml"),
                                                     (1, "resume={run}")])
def test_a_refused_api_key_stops_with_one_line_saying_how_to_go_on(tmp_path, monkeypatch,
                                                                    refuse_from_step, again):
    """Refused in step 1 there is no checkpoint yet: start afresh; refused after step 1 (saved
    with save_every=1): resume."""
    import cloud
    real_step = train.Trainer.rl_step

    def refused(self, task, examples):
        raise cloud.CloudAuthError("HTTP 401 from the cloud: check OPENAI_API_KEY")

    def step(self):
        if self.step >= refuse_from_step:
            monkeypatch.setattr(cloud.OracleBackend, "complete", refused)
        return real_step(self)
    monkeypatch.setattr(train.Trainer, "rl_step", step)
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=key", "rl.steps=3", "save_every=1", "eval.every=0",
                             "rl.prompts_per_step=8", "rl.group_size=8"))
    run = tmp_path / "runs" / "key"
    assert str(exc.value.code).strip() == (
        "cloud error: HTTP 401 from the cloud: check OPENAI_API_KEY; once fixed, continue with: "
        "python train.py " + again.format(run=run))


def test_a_config_file_that_is_not_utf8_is_a_one_line_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# r\u00e9glage\nrl: {steps: 3}\n".encode("latin-1"))
    with pytest.raises(SystemExit, match=f"config error: config file {path} is not UTF-8 text "
                                         r"\(invalid continuation byte at byte 3\); save it as UTF-8"):
        train.main([str(path)])


def test_a_killed_warm_starts_partial_save_is_removed(tmp_path):
    """out.tmp.PID@HOST of a process of this host that no longer runs is removed by the next warm
    start, whatever settings it was saving (another key's stayed for ever); one of a running
    process (here the parent) or of another host is left alone."""
    cfg = train.load_config(tiny_args(tmp_path, "name=w"))
    out = os.path.join(cfg.warm_start.cache_dir, train.warm_start_key(cfg, train.load_task(cfg)[0]))
    host = socket.gethostname()
    dead, alive = out + f".tmp.4194399@{host}", out + f".tmp.{os.getppid()}@{host}"  # > max PID
    other_dead = os.path.join(cfg.warm_start.cache_dir, f"0123abcd.tmp.4194398@{host}")
    elsewhere = out + ".tmp.4194399@another-host"
    for d in (dead, alive, other_dead, elsewhere):
        os.makedirs(d)
    train.warm_start(cfg, train.load_task(cfg)[0], torch.device("cpu"))
    assert not os.path.exists(dead) and not os.path.exists(other_dead)
    assert os.path.isdir(alive) and os.path.isdir(elsewhere)
    assert os.path.exists(os.path.join(out, "warm_start.json"))


def test_a_warm_start_cache_miss_says_why(tmp_path, capsys):
    """A new warm start while others are cached says that none has these settings; the first
    one, with nothing cached, and a cache hit say nothing of the kind."""
    def run(*extra):
        cfg = train.load_config(tiny_args(tmp_path, "name=w", *extra))
        train.warm_start(cfg, train.load_task(cfg)[0], torch.device("cpu"))
        return capsys.readouterr().out
    first = run()
    assert "none of the" not in first and "from scratch" in first
    assert "none of the 1 cached in " in run("warm_start.steps=14")
    again = run()
    assert "warm start: reusing" in again and "none of the" not in again


@pytest.mark.skipif(os.name == "nt", reason="warm starts are locked through fcntl (not on Windows)")
def test_a_warm_start_another_process_is_training_is_waited_for_then_reused(tmp_path, straight,
                                                                            capsys):
    """Runs of one seed started side by side share a warm start: while another process holds
    its lock (training it), this one waits, then reuses what that one saved, training nothing
    (each trained it before, and the last to finish replaced the cache under the others)."""
    import subprocess
    import sys
    cfg = train.load_config(tiny_args(tmp_path, "name=w"))
    out = os.path.join(cfg.warm_start.cache_dir, train.warm_start_key(cfg, train.load_task(cfg)[0]))
    (built,) = [p for p in (straight / "warm").iterdir() if (p / "warm_start.json").exists()]
    os.makedirs(cfg.warm_start.cache_dir)
    other = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, shutil, sys, time
with open({out + ".lock"!r}, "a") as lock:
    fcntl.lockf(lock, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(1)
    shutil.copytree({str(built)!r}, {out!r})
"""], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline() == "locked\n"
    try:
        assert train.warm_start(cfg, train.load_task(cfg)[0], torch.device("cpu")) == out
    finally:
        other.wait()
    said = capsys.readouterr().out
    assert f"another process is training {out}; waiting for it" in said
    assert f"warm start: reusing {out}" in said and "from scratch" not in said


def pretrained_char_model(path, chat_format, max_positions):
    import string

    from model import ModelConfig, Transformer, build_char_tokenizer, save_pretrained
    tok = build_char_tokenizer(string.printable)
    tok.chat_format = chat_format
    cfg = ModelConfig(model_type="qwen2", vocab_size=tok.vocab_size, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=max_positions)
    save_pretrained(Transformer(cfg).init_weights(0), str(path), tok)
    return path


@pytest.mark.parametrize("chat_format, max_positions, message", [
    (None, 4096, "config error: model.path='{path}': this tokenizer has no chat format"),
    ("chatml", 256, "config error: max_position_embeddings of {path}=256: prompts take up to"),
])
def test_a_pretrained_model_that_cannot_take_the_prompts_is_a_config_error(
        tmp_path, chat_format, max_positions, message):
    """Countdown's chat prompts need a chat format, and prompt + sampling.max_new_tokens must fit
    the model's context: both are found before step 1, and nothing is trained."""
    path = pretrained_char_model(tmp_path / "m", chat_format, max_positions)
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=p", f"model.path={path}",
                             "task={name: countdown, n_train: 20, n_test: 4}", "eval.n=4"))
    text = str(exc.value.code)
    assert text.startswith(message.format(path=path)) and "\n" not in text
    assert not os.path.exists(tmp_path / "runs" / "p" / "metrics.jsonl")


def test_gpu_footprint_checks_the_task_before_building_the_checkpoint(tmp_path):
    """A recipe whose data files are missing (relative paths, run from an empty directory) is a
    one-line error before the 0.5B-parameter checkpoint is built, not a traceback after it."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.abspath(train.__file__))
    tok = pretrained_char_model(tmp_path / "tok", "chatml", 4096)
    out = subprocess.run([sys.executable, os.path.join(root, "scripts", "gpu_footprint.py"),
                          os.path.join(root, "configs", "math-qwen2.5-1.5b.yaml"), "--arch",
                          "qwen2.5-0.5b", "--tokenizer", str(tok), "--device", "cpu"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert re.fullmatch(r"config error: task \{.*'name': 'math'.*\}: "
                        r"data/math_lighteval/train.jsonl: no such data file\n", out.stderr)


class ShoutedTinyTask:
    """Builders of TinyCountdownTask variants a forker might write (registered by the tests)."""

    @staticmethod
    def with_completion(suffix):
        from tasks import TinyCountdownTask

        class Variant(TinyCountdownTask):
            def warm_start_completion(self, example, rng, p_correct=0.7, p_help=0.2):
                return super().warm_start_completion(example, rng, p_correct, p_help) + suffix
        return Variant


def test_a_new_from_scratch_task_is_checked_against_its_alphabet(tmp_path, monkeypatch):
    """A registered task with warm-start traces may train from scratch; a trace character
    outside its alphabet (the character tokenizer would read it as <pad>) is a config error."""
    from tasks import TASKS
    monkeypatch.setitem(TASKS, "tiny_countdown", ShoutedTinyTask.with_completion("!"))
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=a"))
    assert str(exc.value.code) == ("config error: task 'tiny_countdown': its prompts, stop/banned "
                                   "texts or warm-start traces use '!', which are not in its "
                                   "alphabet '0123456789,|=[]+-*#AH'")
    assert not (tmp_path / "warm").exists()


def test_a_task_without_warm_start_traces_cannot_train_from_scratch(tmp_path):
    with pytest.raises(SystemExit, match=r"config error: model.path is empty \(train from "
                                         r"scratch\), which task 'countdown' does not support "
                                         r"\(it has no warm-start traces; from scratch: "
                                         r"tiny_countdown\)"):
        train.main(tiny_args(tmp_path, "name=c", "task={name: countdown}"))


def test_the_warm_start_cache_key_follows_the_tasks_traces(monkeypatch):
    """Editing a task's trace format gives a new warm start instead of reusing a stale one."""
    from tasks import TASKS
    cfg = train.load_config(TINY)
    key = train.warm_start_key(cfg, train.load_task(cfg)[0])
    assert train.warm_start_key(cfg, train.load_task(cfg)[0]) == key   # deterministic
    monkeypatch.setitem(TASKS, "tiny_countdown", ShoutedTinyTask.with_completion("A"))
    assert train.warm_start_key(cfg, train.load_task(cfg)[0]) != key


def test_a_task_setting_written_out_at_its_default_keeps_the_warm_start_key():
    """default.yaml writes every tiny_countdown setting out at its default: leaving them out
    builds the same warm start, so it must find the same cache entry, not train a second one."""
    def key(*overrides):
        cfg = train.load_config(list(overrides))
        return train.warm_start_key(cfg, train.load_task(cfg)[0])
    written_out = key()  # configs/default.yaml
    assert key("task={name: tiny_countdown}") == written_out
    assert key("task.n_train=19999") != written_out
    assert key("task={name: tiny_countdown, seed: 1}") != written_out


@pytest.mark.parametrize("missing", ["local_correct", "cloud_correct", "oracle_answer"])
def test_a_task_missing_part_of_its_interface_is_a_config_error_before_the_warm_start(
        missing, tmp_path, monkeypatch):
    """A registered task that leaves one of the methods a run calls at Task's NotImplementedError
    (oracle_answer: with the oracle cloud) is named at the start, not as a bare
    NotImplementedError after the warm start or at the first help call."""
    from tasks import TASKS, Task, TinyCountdownTask
    monkeypatch.setitem(TASKS, "tiny_countdown", type(
        "Partial", (TinyCountdownTask,), {missing: getattr(Task, missing)}))
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=p"))
    assert str(exc.value.code).startswith("config error: ")
    assert f"'tiny_countdown' (Partial)" in str(exc.value.code) and missing in str(exc.value.code)
    assert not (tmp_path / "warm").exists()


def test_a_task_whose_init_takes_no_allow_help_is_a_config_error(tmp_path, monkeypatch):
    """eval.py rebuilds a run's task with allow_help=False: a task that cannot take it trained
    to the end and then failed in eval.py."""
    from tasks import TASKS, TinyCountdownTask

    class NoAllowHelp(TinyCountdownTask):
        def __init__(self, n_train=20000, n_test=500):
            super().__init__(n_train=n_train, n_test=n_test)
    monkeypatch.setitem(TASKS, "tiny_countdown", NoAllowHelp)
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=h", "task={name: tiny_countdown, n_train: 300, "
                                                 "n_test: 20}"))
    assert str(exc.value.code).startswith("config error: task 'tiny_countdown' (NoAllowHelp) "
                                          "does not implement __init__(..., allow_help)")


def test_a_backend_without_complete_is_a_config_error_before_the_warm_start(tmp_path, monkeypatch):
    import cloud

    class Misnamed:
        def answer(self, task, examples):
            return ["" for _ in examples]
    monkeypatch.setitem(cloud.BACKENDS, "misnamed", Misnamed)
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=b", "cloud={backend: misnamed}"))
    assert str(exc.value.code) == ("config error: cloud backend 'misnamed' (Misnamed) has no method "
                                   "complete(task, examples) -> list[str], which every backend needs")
    assert not (tmp_path / "warm").exists()


@pytest.mark.parametrize("override, section", [("task.name=math", "task={name: ..., ...}"),
                                               ("cloud.backend=local", "cloud={backend: ..., ...}")])
def test_switching_task_or_backend_by_one_key_says_to_replace_the_section(override, section,
                                                                          tmp_path):
    with pytest.raises(SystemExit) as exc:
        train.main(tiny_args(tmp_path, "name=s", "model.path=" + str(tmp_path), override))
    assert "has no argument(s)" in str(exc.value.code)
    assert f"replace the section whole, '{section}'" in str(exc.value.code)


# ----------------------------------------------------------------------------- rl_step's wiring
# rl_step hands the CONFIGURED rl.algo, rl.rho and rl.filter to group_advantages / filter_prompts,
# updates on the filter's S, and steps the optimizer once. Scripted verdicts (below) replace the
# rollout's, so S and the coefficients are known by hand; the sampled tokens stay real, so the
# update runs through the model as in training.

# Eight prompts, G = 4. Rewards as SPEC 3 v3 gives them (alpha_a = 1, alpha_c = 0.25).
T, F = True, False
SCRIPT = [  # (local_ok, help, cloud_ok, cloud_failed, rewards)
    ([T, F, F, F], [F, F, F, F], F, F, [1, 0, 0, 0]),              # 0: D1, mixed
    ([T, T, F, F], [F, F, T, T], T, F, [1, 1, 0.25, 0.25]),        # 1: D1, mixed
    ([T, T, T, T], [F, F, F, F], F, F, [1, 1, 1, 1]),              # 2: D1 all correct (not mixed)
    ([F, F, F, F], [T, F, F, F], T, F, [0.25, 0, 0, 0]),           # 3: D2 candidate
    ([F, F, F, F], [T, T, F, F], T, F, [0.25, 0.25, 0, 0]),        # 4: D2 candidate
    ([F, F, F, F], [T, F, F, F], F, F, [0, 0, 0, 0]),              # 5: help, cloud wrong: neither
    ([F, F, F, F], [F, F, F, F], F, F, [0, 0, 0, 0]),              # 6: all wrong: neither
    ([T, F, F, F], [F, T, F, F], F, T, [1, 0, 0, 0]),              # 7: cloud call failed: left out
]
Z = [0, 0, 0, 0]
# gapg: (r_i - rbar) / (G - 1), G - 1 = 3
GAPG = [[1 / 4, -1 / 12, -1 / 12, -1 / 12],   # rbar 1/4: (3/4, -1/4) / 3
        [1 / 8, 1 / 8, -1 / 8, -1 / 8],       # rbar 5/8: (+-3/8) / 3
        Z,                                    # all equal: 0
        [1 / 16, -1 / 48, -1 / 48, -1 / 48],  # rbar 1/16: (3/16, -1/16) / 3
        [1 / 24, 1 / 24, -1 / 24, -1 / 24],   # rbar 1/8: (+-1/8) / 3
        Z, Z,
        [1 / 4, -1 / 12, -1 / 12, -1 / 12]]   # as prompt 0 (S leaves it out, not the coefficients)
# dr_grpo: r_i - rbar
DR_GRPO = [[3 / 4, -1 / 4, -1 / 4, -1 / 4], [3 / 8, 3 / 8, -3 / 8, -3 / 8], Z,
           [3 / 16, -1 / 16, -1 / 16, -1 / 16], [1 / 8, 1 / 8, -1 / 8, -1 / 8], Z, Z,
           [3 / 4, -1 / 4, -1 / 4, -1 / 4]]
# grpo: (r_i - rbar) / std, std with Bessel's correction:
#   prompt 0: var = (9/16 + 3/16) / 3 = 1/4, std 1/2        -> (3/4, -1/4) / (1/2) = (3/2, -1/2)
#   prompt 1: var = 4 (3/8)^2 / 3 = 3/16, std sqrt(3)/4     -> (3/8) / (sqrt(3)/4) = sqrt(3)/2
#   prompt 3: var = (9/256 + 3/256) / 3 = 1/64, std 1/8     -> (3/16, -1/16) * 8 = (3/2, -1/2)
#   prompt 4: var = 4 (1/8)^2 / 3 = 1/48, std 1/(4 sqrt(3)) -> (1/8) 4 sqrt(3) = sqrt(3)/2
S3 = 3 ** 0.5 / 2
GRPO = [[3 / 2, -1 / 2, -1 / 2, -1 / 2], [S3, S3, -S3, -S3], Z, [3 / 2, -1 / 2, -1 / 2, -1 / 2],
        [S3, S3, -S3, -S3], Z, Z, [3 / 2, -1 / 2, -1 / 2, -1 / 2]]
# da_grpo with lambda = 1/2: (r_i - rbar) - 1/2 (c_i - cbar), c_i = 1 for a help call
DA_GRPO = [[3 / 4, -1 / 4, -1 / 4, -1 / 4],     # no help call: as dr_grpo
           [5 / 8, 5 / 8, -5 / 8, -5 / 8],      # c - cbar = (-1/2, -1/2, 1/2, 1/2): 3/8 + 1/4
           Z,                                   # no help call, equal rewards
           [-3 / 16, 1 / 16, 1 / 16, 1 / 16],   # c - cbar = (3/4, -1/4): 3/16 - 3/8, -1/16 + 1/8
           [-1 / 8, -1 / 8, 1 / 8, 1 / 8],      # c - cbar = (+-1/2): 1/8 - 1/4
           [-3 / 8, 1 / 8, 1 / 8, 1 / 8],       # rewards equal; c - cbar = (3/4, -1/4) times -1/2
           Z,
           [7 / 8, -5 / 8, -1 / 8, -1 / 8]]     # c - cbar = (-1/4, 3/4, -1/4, -1/4): 3/4 + 1/8, ...


@pytest.fixture(scope="module")
def wiring_warm(tmp_path_factory):
    """One warm start, cached, that the wiring tests' Trainers reuse (rl settings are not in its
    cache key)."""
    root = tmp_path_factory.mktemp("wiring")
    train.Trainer(train.load_config(tiny_args(root, "name=warm")))
    return root / "warm"


def scripted_trainer(tmp_path, warm, monkeypatch, *overrides):
    """A Trainer of 8 prompts x G = 4 whose rollouts carry SCRIPT's verdicts and rewards, and a
    spy on algo.update_policy (as train.py calls it) recording coef, selected and the gradient
    it left, then the list of those records."""
    trainer = train.Trainer(train.load_config(tiny_args(
        tmp_path, "name=wiring", "rl.prompts_per_step=8", "rl.group_size=4",
        f"warm_start.cache_dir={warm}", *overrides)))
    real_rollout, real_update, seen = algo.rollout, algo.update_policy, []

    def scripted(*args, **kwargs):
        ro = real_rollout(*args, **kwargs)
        assert ro.help.shape == (8, 4)
        local_ok, help, cloud_ok, failed, rewards = zip(*SCRIPT)
        help = torch.tensor(help)
        return dataclasses.replace(
            ro, local_ok=torch.tensor(local_ok), help=help, cloud_ok=torch.tensor(cloud_ok),
            cloud_asked=help.any(dim=1), cloud_failed=torch.tensor(failed),
            rewards=torch.tensor(rewards, dtype=torch.float32), components={})

    def spy(model, ro, coef, selected, *args, **kwargs):
        loss = real_update(model, ro, coef, selected, *args, **kwargs)
        seen.append({"coef": coef.detach().cpu().clone(), "selected": selected.tolist(),
                     "grad": {n: p.grad.detach().clone() for n, p in model.named_parameters()
                              if p.grad is not None}})
        return loss

    monkeypatch.setattr(algo, "rollout", scripted)
    monkeypatch.setattr(algo, "update_policy", spy)
    return trainer, seen


@pytest.mark.parametrize("algo_kind, rule, rho, extra, selected, coef", [
    # any_correct: D1 = {0, 1, 2}; D2 candidates {3, 4}
    ("gapg", "any_correct", "1/4", [], [0, 1, 2], GAPG),              # cap floor(3/4) = 0
    ("gapg", "any_correct", "1", [], [0, 1, 2, 3, 4], GAPG),          # cap 3 >= 2: both kept
    ("dr_grpo", "any_correct", "1", [], [0, 1, 2, 3, 4], DR_GRPO),
    ("da_grpo", "any_correct", "1", ["rl.dual_init=0.5"], [0, 1, 2, 3, 4], DA_GRPO),
    # mixed: D1 = {0, 1} (the all-correct group 2 drops out)
    ("grpo", "mixed", "1", [], [0, 1, 3, 4], GRPO),                   # cap 2 >= 2: both kept
    ("dr_grpo", "mixed", "1/4", [], [0, 1], DR_GRPO),                 # cap floor(2/4) = 0 (as 3/7)
])
def test_rl_step_uses_the_configured_algo_rho_and_filter(tmp_path, wiring_warm, monkeypatch,
                                                         algo_kind, rule, rho, extra, selected,
                                                         coef):
    """SPEC 5-6 as configured, not as defaulted: the update gets rl.algo's coefficients (worked
    by hand above) and S = D1 u D2 of rl.filter under rl.rho's cap floor(rho |D1|). Each rho
    makes the cap forced (0, or at least the 2 candidates). The default 3/7 would give another S
    in every row but the last (cap floor(9/7) = 1 for any_correct, floor(6/7) = 0 for mixed). Prompts 5 and 6 (cloud did not fail) and
    7 (failed, excluded) are never in S."""
    trainer, seen = scripted_trainer(tmp_path, wiring_warm, monkeypatch, f"rl.algo={algo_kind}",
                                     f"rl.filter={rule}", f"rl.rho={rho}", *extra)
    row = trainer.rl_step()
    assert len(seen) == 1 and seen[0]["selected"] == selected
    assert torch.allclose(seen[0]["coef"], torch.tensor(coef, dtype=torch.float32),
                          rtol=1e-4, atol=1e-6)
    n_d1 = 3 if rule == "any_correct" else 2
    assert row["filter/d1"] == n_d1 and row["filter/d2_candidates"] == 2
    assert row["filter/d2"] == len(selected) - n_d1
    assert row["filter/selected"] == len(selected) and row["filter/cloud_failed"] == 1
    assert row["train/skipped"] == ""


def test_rl_step_steps_the_optimizer_once_on_the_update_gradient(tmp_path, wiring_warm,
                                                                  monkeypatch):
    """SPEC 5: one optimizer step per freshly sampled batch. With plain SGD (no weight decay, no
    clipping) the weights move by exactly -lr * the gradient update_policy accumulated; lr = 1/2,
    a power of two, so lr * grad is exact and the check is torch.equal."""
    trainer, seen = scripted_trainer(tmp_path, wiring_warm, monkeypatch, "rl.optimizer=sgd",
                                     "rl.lr=0.5", "rl.rho=1")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    row = trainer.rl_step()
    assert row["train/skipped"] == "" and len(seen) == 1
    grad = seen[0]["grad"]
    assert grad and max(float(g.abs().max()) for g in grad.values()) > 1e-3  # a real step
    for n, p in trainer.model.named_parameters():
        expected = before[n] - 0.5 * grad[n] if n in grad else before[n]
        assert torch.equal(p.detach(), expected), n


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through /proc")
def test_run_log_appends_rows_and_holds_no_file_open(tmp_path):
    """Rows are appended as JSON lines, and no handle on the logs outlives a call (they were
    held open for the whole run and closed only when the log object was collected)."""
    def open_logs():
        names = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                names.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # the directory's own descriptor, closed by now
                pass
        return [n for n in names if n.startswith(str(tmp_path))]

    log = train.RunLog(str(tmp_path), total_steps=2)
    assert (tmp_path / "metrics.jsonl").read_text() == (tmp_path / "samples.jsonl").read_text() == ""
    log.log({"train/step": 1, "reward/mean": 0.5})
    log.log_samples([{"step": 1, "response": "a"}, {"step": 1, "response": "b\n"}])
    log.log({"train/step": 2, "reward/mean": 0.25})
    assert open_logs() == []
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"train/step": 1, "reward/mean": 0.5}, {"train/step": 2, "reward/mean": 0.25}]
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert [s["response"] for s in samples] == ["a", "b\n"]


@pytest.mark.skipif(os.name == "nt", reason="runs are locked through fcntl (not on Windows)")
def test_a_run_in_use_by_another_process_is_refused_untouched(tmp_path, capsys):
    """A second train.py on a run that another process is training (a requeued job) would delete
    the checkpoint the first is writing: it stops, naming the holder, before it touches anything.
    The lock ends with its process, so a lock file left behind blocks nobody."""
    import subprocess
    import sys
    run = tmp_path / "runs" / "busy"
    (run / "checkpoint.tmp").mkdir(parents=True)  # what a start would remove: a save under way
    (run / "metrics.jsonl").write_text('{"train/step": 1}\n')
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
         "f.write(f'train.py pid {os.getpid()} on here'); f.flush()\n"
         "print('held', flush=True); time.sleep(120)", str(run / "train.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            train.main(tiny_args(tmp_path, "name=busy"))
        assert f"train.py pid {holder.pid} on here is training it" in str(e.value.code)
        assert (run / "checkpoint.tmp").is_dir()
        assert (run / "metrics.jsonl").read_text() == '{"train/step": 1}\n'
    finally:
        holder.kill()
        holder.wait()
    lock = train.lock_run(str(run))  # the holder is gone: free, and it names this process now
    assert (run / "train.lock").read_text() == f"train.py pid {os.getpid()} on {socket.gethostname()}\n"
    lock.close()
