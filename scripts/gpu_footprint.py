"""Measure a GPU recipe's memory and time per step with a random-weight model of the real shape.

    python scripts/gpu_footprint.py configs/countdown-qwen2.5-3b.yaml --arch qwen2.5-3b \
        --tokenizer .cache/smollm2 --steps 2 [key=value ...]

Builds a randomly initialised model with the named architecture (no download: the shapes are
those of the public config.json files), saves it beside a tokenizer you have (any chat
tokenizer whose vocabulary fits, e.g. SmolLM2's from scripts/get_smollm2.py), and runs
train.py's RL step on the recipe a few times with the simulated (oracle) cloud. Random weights
almost never emit an end-of-sequence token, so every response runs to max_new_tokens; the
filter keeps every prompt and every response gets a non-zero coefficient, so all of them go
through the backward pass and the optimizer steps: the time and memory per step are upper
bounds for the recipe. Prints the per-step sampling / update seconds and the peak GPU memory.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import algo  # noqa: E402
import train  # noqa: E402
from bench import ARCHS, random_model  # noqa: E402
from model import load_tokenizer, save_pretrained  # noqa: E402


def random_checkpoint(arch: str, tokenizer_dir: str, out: str, device: str):
    tok = load_tokenizer(tokenizer_dir)
    if tok.vocab_size > ARCHS[arch]["vocab_size"]:
        raise ValueError(f"tokenizer vocabulary {tok.vocab_size} > {arch} vocabulary "
                         f"{ARCHS[arch]['vocab_size']}")
    model = random_model(arch, device, torch.bfloat16, eos_token_id=tok.eos_ids[0])
    save_pretrained(model, out, tok)
    for name in ("tokenizer_config.json", "generation_config.json"):  # keep the chat template
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out, name))
    print(f"random {arch}: {model.num_params() / 1e9:.2f}B parameters -> {out}", flush=True)


def every_response_updates(rewards, *args, **kwargs):
    """Stands in for algo.group_advantages here: +-1/(G-1), alternating within each group (a
    centred coefficient, as GAPG's is). Random weights never answer correctly, so every reward
    of a group is equal and GAPG's coefficients are all 0: no response would reach the backward
    pass and AdamW would never allocate its states."""
    coef = torch.ones(rewards.shape)
    coef[:, 1::2] = -1.0
    return coef / max(rewards.shape[1] - 1, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--arch", required=True, choices=sorted(ARCHS))
    ap.add_argument("--tokenizer", required=True, help="a local tokenizer directory")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("overrides", nargs="*", help="more train.py key=value overrides")
    args = ap.parse_intermixed_args()
    if args.steps < 1:
        ap.error(f"--steps {args.steps} is not allowed: an integer >= 1 (RL steps to measure)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here (this script measures GPU memory)")
    if not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        ap.error(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
    work = tempfile.mkdtemp(prefix="footprint-")
    try:
        try:  # the overrides and the task are checked before the (large) checkpoint is built
            cfg = train.load_config([args.recipe, f"model.path={os.path.join(work, 'model')}",
                                     "cloud={backend: oracle}", "rl.filter=none", "eval.n=0",
                                     f"out_dir={work}", "name=footprint",
                                     f"device={args.device}", *args.overrides])
            train.load_task(cfg)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"config error: {e}")
        random_checkpoint(args.arch, args.tokenizer, os.path.join(work, "model"), args.device)
        algo.group_advantages = every_response_updates
        t = time.time()
        try:
            trainer = train.Trainer(cfg)
        except train.ConfigError as e:  # e.g. prompts longer than the architecture's context
            sys.exit(f"config error: {e}")
        print(f"loaded in {time.time() - t:.0f} s ({cfg.precision}); {cfg.rl.prompts_per_step} "
              f"prompts x G={cfg.rl.group_size}, {cfg.sampling.max_new_tokens} new tokens, "
              f"micro-batch {cfg.rl.micro_batch_size}", flush=True)
        for _ in range(args.steps):
            r = trainer.rl_step()
            trainer.step += 1
            print(f"step {trainer.step}: sampling {r['perf/sample_s']:.1f} s "
                  f"({r['perf/tokens_per_s']:,.0f} generated tok/s, mean response "
                  f"{float(trainer.last_rollout.lengths.float().mean()):.0f} tokens), update "
                  f"{r['perf/update_s']:.1f} s ({r['filter/selected']} prompts, loss "
                  f"{r['train/loss']:.3g}, skipped {r['train/skipped'] or 'no'})"
                  + (f", peak GPU memory {r['perf/peak_mem_gb']:.1f} GiB"
                     if "perf/peak_mem_gb" in r else ""), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
