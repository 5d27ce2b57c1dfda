"""train.py: a tiny end-to-end run, config errors, exact resume, the non-finite guard."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import algo
import train
from devices import DEVICES

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
                "perf/update_s", "perf/tokens_per_s", "train/loss"):
        assert key in rows[0], key
    assert "eval/acc_capped" in rows[1] and "eval/acc_capped" in rows[3]
    assert ("perf/peak_mem_gb" in rows[0]) == (device == "cuda")
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
    # a second run reuses the cached warm start
    train.main(tiny_args(tmp_path, "name=again", "rl.steps=1", f"device={device}"))
    assert "warm start: reusing" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("rl.nonsense=1", "unknown config key 'rl.nonsense'"),
    ("bogus=1", "allowed here: name, seed"),
    ("rl.steps=ten", "rl.steps='ten': expected an integer"),
    ("rl.algo=ppo", "allowed: ['gapg', 'grpo', 'dr_grpo', 'da_grpo']"),
    ("rl.filter=some", "rl.filter='some'"),
    ("model.gradient_checkpointing=maybe", "expected a boolean"),
    ("rl.group_size=1", "rl.group_size=1"),
    ("reward.alpha_c=2", "alpha_c"),
    ("rl.steps.x=1", "no sub-keys"),
    ("rl=3", "is a section"),
    ("device=tpu", "device='tpu'"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        train.load_config([override])


def test_config_casts_and_fractions():
    cfg = train.load_config(["rl.rho=3/7", "rl.lr=1e-5", "rl.betas=[0.8, 0.9]",
                             "task.n_train=123", "model.gradient_checkpointing=true"])
    assert cfg.rl.rho == 3 / 7 and cfg.rl.lr == 1e-5 and cfg.rl.betas == [0.8, 0.9]
    assert cfg.task["n_train"] == 123 and cfg.model.gradient_checkpointing is True


def test_unknown_task_argument_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no argument"):
        train.main(tiny_args(tmp_path, "name=bad", "task.colour=red"))


def test_resume_is_exact(tmp_path, monkeypatch):
    common = tiny_args(tmp_path, "rl.steps=4", "save_every=2", "eval.every=0")
    train.main(common + ["name=straight"])
    real_step = train.Trainer.rl_step

    def crash_after_checkpoint(self):
        if self.step == 3:  # step 3 is lost: the last checkpoint holds step 2
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(train.Trainer, "rl_step", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train.main(common + ["name=crashed"])
    monkeypatch.setattr(train.Trainer, "rl_step", real_step)
    train.main([f"resume={tmp_path / 'runs' / 'crashed'}"])
    a = load_file(tmp_path / "runs" / "straight" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "crashed" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["train/step"] for r in read_rows(tmp_path / "runs" / "crashed")]
    assert steps == [1, 2, 3, 4, 4]  # the lost step 3 was logged once, by the resumed run


def test_non_finite_step_is_skipped(tmp_path, monkeypatch):
    # filter none: every prompt is selected, so the update always runs
    trainer = train.Trainer(train.load_config(tiny_args(tmp_path, "name=nan", "rl.steps=1",
                                                        "rl.filter=none")))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def poisoned(model, *args, **kwargs):
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        return float("nan")

    monkeypatch.setattr(algo, "update_policy", poisoned)
    row = trainer.rl_step()
    assert row["filter/selected"] == 4 and row["train/skipped"] == "non_finite"
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not trainer.opt.state  # the optimizer never stepped on the poisoned gradient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", ["countdown-qwen2.5-3b.yaml", "math-qwen2.5-1.5b.yaml"])
def test_gpu_recipes_run_on_a_tiny_model_of_the_same_family(config, device, tmp_path):
    """The GPU recipes exactly as written, except: a tiny random Qwen2 model with a
    character-level ChatML tokenizer, a few prompts, and the oracle cloud; on the CPU, and on
    CUDA where there is one."""
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
                             "rl.micro_batch_size=1", f"out_dir={tmp_path / 'runs'}"])
    assert cfg.precision == "bf16-mixed" and cfg.model.gradient_checkpointing
    cfg.cloud = {"backend": "oracle"}  # no network in tests
    if cfg.task["name"] == "math":
        cfg.task.update(path_train=str(tmp_path / "train.jsonl"),
                        path_test=str(tmp_path / "test.jsonl"))
    else:
        cfg.task.update(n_train=20, n_test=4)
    trainer = train.Trainer(cfg)
    final = trainer.train()
    assert trainer.step == 2 and final["n"] == 2
    assert trainer.sampler_model is not trainer.model  # bf16 sampler copy, fp32 master weights
    assert next(trainer.sampler_model.parameters()).dtype == torch.bfloat16
    assert next(trainer.model.parameters()).dtype == torch.float32
    rows = read_rows(tmp_path / "runs" / cfg.name)
    assert [r["train/step"] for r in rows] == [1, 2, 2]
