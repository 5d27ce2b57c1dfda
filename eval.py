"""Evaluate trained runs under the cloud-call budget, against the paper's baselines (SPEC.md
sections 7-8; DESIGN.md eval.py).

    python eval.py runs/NAME [runs/NAME2 ...] [--split test] [--budget 0.3] [--n N]
                   [--task-tuned runs/T] [--out DIR]

Each run is decoded greedily on the first N prompts of the split, its help calls go to the cloud
through the run's own answer cache, and SPEC 7 metrics are computed with the hard cap. Baselines
on the same prompts: cloud only; task-tuning only (the help-disabled run itself); naive
offloading, a prompt-only router and the oracle router, all three over the task-tuned model.
Accuracy-vs-call-ratio curves come from ordering the prompts by who should go to the cloud first;
a policy also gets SPEC 7's curve of its own decisions as the cap varies.
Writes runs/NAME/eval.json for every run, and report.md + curve.csv (+ curve.png with
matplotlib) for each run, and the combined report in --out (default: the first run's directory).

Read top to bottom:
  1. routing arithmetic   AUROC, routing curves, APGR / CPT, operating points (pure functions)
  2. the policy's score   teacher-forced log-probs of help vs answer at its own decision point
  3. routers              BCE-trained prompt classifiers: a tiny transformer, or a logistic probe
  4. runs                 loading a run directory and evaluating runs and baselines
  5. outputs              eval.json, report.md, curve.csv / curve.png, the command line
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import algo
from cloud import CloudError, NoCloud, check_appendable, make_cloud
from model import (ConfigLoader, ModelConfig, Transformer, atomic_write, atomic_write_text,
                   check_writable, load_pretrained, load_tokenizer, resolve_device,
                   status_line)
from sample import generate, left_pad
from tasks import SPLITS, make_task, task_settings

SCHEMA_VERSION = 1

# ----------------------------------------------------------------------------- 1. routing arithmetic


def auroc(scores, labels):
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties
    counting 1/2 (Mann-Whitney U / (n_pos * n_neg), from average ranks). None if a class is empty."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0   # 1-based, ties share their mean rank
    ranks = average_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def routing_curve(order, local_ok, cloud_ok):
    """Accuracy when the first k prompts of `order` (a permutation of 0..N-1) go to the cloud and
    the rest stay local, for every k = 0..N:
        acc(k) = ( sum_{i in order[:k]} cloud_ok_i + sum_{i not in order[:k]} local_ok_i ) / N.
    Every point sends exactly k prompts, so no cap applies. Returns (call_ratio = k/N, acc)."""
    local = np.asarray(local_ok, dtype=np.float64).reshape(-1)
    cloud = np.asarray(cloud_ok, dtype=np.float64).reshape(-1)
    order = np.asarray(order, dtype=np.int64).reshape(-1)
    N = len(local)
    if len(cloud) != N or sorted(order.tolist()) != list(range(N)):
        raise ValueError(f"need local_ok and cloud_ok of one length N={N} and an order that is a "
                         f"permutation of 0..N-1")
    gain = np.concatenate([[0.0], np.cumsum(cloud[order] - local[order])])
    return np.arange(N + 1) / max(N, 1), (local.sum() + gain) / max(N, 1)


def gap_recovered(call_ratio, acc, acc_local=None, acc_cloud=None):
    """RouteLLM's summaries of a curve acc(c), c the call ratio in [0, 1]:

        PGR(c)  = (acc(c) - acc_local) / (acc_cloud - acc_local)   performance gap recovered
        APGR    = integral_0^1 PGR(c) dc                          (trapezoid rule over the points)
        CPT(x)  = min { c on the curve : PGR(c) >= x }            call-performance threshold

    acc_local / acc_cloud default to the curve's own endpoints acc(0) (everything local) and
    acc(1) (everything to the cloud), so PGR runs from 0 to 1 and routing at random scores
    APGR = 0.5 in expectation. Returns {apgr, cpt50, cpt80, curve_local_acc, curve_cloud_acc}
    (the last two: the acc_local / acc_cloud used); the three summaries are None when
    acc_cloud <= acc_local (no gap to recover)."""
    c, a = np.asarray(call_ratio, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    acc_local = float(a[0]) if acc_local is None else float(acc_local)
    acc_cloud = float(a[-1]) if acc_cloud is None else float(acc_cloud)
    out = {"apgr": None, "cpt50": None, "cpt80": None, "curve_local_acc": acc_local,
           "curve_cloud_acc": acc_cloud}
    gap = acc_cloud - acc_local
    if not gap > 1e-12:
        return out
    pgr = (a - acc_local) / gap
    out["apgr"] = float(np.sum((pgr[1:] + pgr[:-1]) / 2 * np.diff(c)))
    for key, share in (("cpt50", 0.5), ("cpt80", 0.8)):
        reached = np.nonzero(pgr >= share - 1e-12)[0]
        out[key] = float(c[reached[0]]) if len(reached) else None
    return out


def naive_order(n, seed):
    """Naive offloading (SPEC 8.3): a seeded uniformly random order of the prompts."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


def router_order(score):
    """Router (SPEC 8.4): the prompts least likely to be answered right (lowest score: the
    router's logit, or any increasing function of P(correct)) go first (stable on ties)."""
    return np.argsort(np.asarray(score, dtype=np.float64), kind="stable")


def oracle_order(local_ok, cloud_ok):
    """Oracle router, an upper bound for any router at every call ratio: first the prompts the
    device model gets wrong and the cloud right (the only calls that gain), then those both get
    wrong and those both get right (no change), last those only the device gets right (the only
    calls that lose), each group in dataset order."""
    local, cloud = np.asarray(local_ok, dtype=bool), np.asarray(cloud_ok, dtype=bool)
    return np.concatenate([np.nonzero(~local & cloud)[0], np.nonzero(~local & ~cloud)[0],
                           np.nonzero(local & cloud)[0], np.nonzero(local & ~cloud)[0]])


def policy_order(help_preference):
    """The trained policy: prompts where it prefers the help continuation most go first."""
    return np.argsort(-np.asarray(help_preference, dtype=np.float64), kind="stable")


def policy_curve(help, local_ok, answered_ok, cloud_ok, preference):
    """The trained policy's curve [ours]: prompts go to the cloud in order of its help
    preference (policy_order); a prompt kept local scores its own local answer, which for a
    prompt where the policy asked for help is `answered_ok` (its answer when made to answer at
    its decision point; only those entries are read). Returns (call_ratio, acc, local verdicts)."""
    help = np.asarray(help, dtype=bool)
    kept = np.asarray(local_ok, dtype=bool) & ~help
    kept[help] = np.asarray(answered_ok, dtype=bool)[help]
    return (*routing_curve(policy_order(preference), kept, cloud_ok), kept)


def capped_curve(help, local_ok, cloud_ok):
    """The trained policy's curve as SPEC 7 defines it: overall accuracy as the cap varies. With
    a cap of k calls its first k help calls (dataset order) go to the cloud and later ones are
    scored wrong, for k = 0..H (H = its help calls; a larger cap changes nothing):
        acc(k) = ( sum_i local_ok_i * (1 - help_i) + sum_{the first k help calls} cloud_ok_i ) / N.
    Returns (call_ratio = k/N, acc); the last point is the policy's uncapped accuracy."""
    help, local, cloud = (np.asarray(x, dtype=bool).reshape(-1) for x in (help, local_ok, cloud_ok))
    N = len(help)
    if len(local) != N or len(cloud) != N:
        raise ValueError(f"need help, local_ok and cloud_ok of one length (got {N}, {len(local)}, "
                         f"{len(cloud)})")
    local = local & ~help   # a help call is never a local answer (SPEC 2)
    served = np.concatenate([[0], np.cumsum(cloud[help])])
    return np.arange(len(served)) / max(N, 1), (local.sum() + served) / max(N, 1)


# the keys of every row of the table, i.e. of eval.json's `metrics` and each of its `baselines`;
# None where a row has no such value: response statistics (len_*, clipped_ratio, answer_rate,
# format_rate) for rows that write no responses of their own (cloud only, naive, router, oracle),
# curve summaries (apgr ... curve_cloud_acc) for rows that are one point, not a curve
ROW_KEYS = ("n", "budget", "cap", "call_ratio", "help_calls", "calls_served", "local_acc",
            "cond_local_acc", "acc_capped", "acc_uncapped", "len_help", "len_local",
            "clipped_ratio", "answer_rate", "format_rate", "apgr", "cpt50", "cpt80",
            "curve_local_acc", "curve_cloud_acc")


def table_row(metrics):
    """metrics with every key of ROW_KEYS (None where missing) first, then its own extra keys."""
    return {**dict.fromkeys(ROW_KEYS), **metrics}


def routed_metrics(order, k, local_ok, cloud_ok, budget):
    """SPEC 7 metrics when exactly the first k prompts of `order` go to the cloud (k <= cap, so
    the capped and uncapped figures agree)."""
    help = np.zeros(len(order), dtype=bool)
    help[np.asarray(order)[:k]] = True
    m = algo.capped_metrics(torch.from_numpy(help), torch.as_tensor(np.asarray(local_ok, bool)),
                            torch.as_tensor(np.asarray(cloud_ok, bool)), budget)
    m["help_calls"] = int(k)
    return m

# ----------------------------------------------------------------------------- 2. the policy's score


@torch.no_grad()
def continuation_logprobs(model, prefixes, continuations, pad_id, max_elements=2 ** 27,
                          progress=None):
    """sum_t log p(c_t | prefix, c_<t) for each (prefix, continuation) pair of token-id lists:
    right-padded rows [prefix | continuation], one teacher-forced forward per batch. Pairs are
    batched in order of prefix length; a batch holds at most max_elements in the larger of its
    projected logits (rows * positions from its shortest prefix on * vocabulary; none before)
    and its MLP activations (rows * length * intermediate size), so long reasoning followed by
    a short continuation does not cost a whole vocabulary per reasoning token.
    progress(done, total): called with the pairs done after each batch."""
    device = next(model.parameters()).device
    rows = [p + c for p, c in zip(prefixes, continuations)]
    if any(len(p) == 0 or len(c) == 0 for p, c in zip(prefixes, continuations)):
        raise ValueError("every prefix and every continuation needs at least one token")
    out = torch.zeros(len(rows), dtype=torch.float64)
    V, width = model.config.vocab_size, model.config.intermediate_size
    order = sorted(range(len(rows)), key=lambda i: len(prefixes[i]))
    b = 0
    while b < len(order):
        start = len(prefixes[order[b]]) - 1    # the batch's shortest prefix: no logits before
        e, L = b + 1, len(rows[order[b]])
        while e < len(order):                  # grow the batch while it fits max_elements
            longer = max(L, len(rows[order[e]]))
            if (e + 1 - b) * max((longer - start) * V, longer * width) > max_elements:
                break
            e, L = e + 1, longer
        batch = order[b:e]
        ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
        real = torch.zeros(len(batch), L, dtype=torch.bool)
        target = torch.zeros(len(batch), L, dtype=torch.bool)   # continuation tokens
        for i, r in enumerate(batch):
            ids[i, :len(rows[r])] = torch.tensor(rows[r])
            real[i, :len(rows[r])] = True
            target[i, len(prefixes[r]):len(rows[r])] = True
        ids, real, target = ids.to(device), real.to(device), target.to(device)
        positions = torch.arange(L, device=device).expand(len(batch), L)
        # logits of positions start..L-2; position t-1 predicts token t
        logits = model(ids, positions, attn_mask=real, logits_from=start)[:, :-1]
        picked = target[:, start + 1:]
        logp = torch.log_softmax(logits[picked].float(), dim=-1)
        token_logp = logp.gather(-1, ids[:, start + 1:][picked][:, None])[:, 0]
        row_of = torch.nonzero(picked)[:, 0]
        sums = torch.zeros(len(batch), device=device, dtype=torch.float64)
        out[batch] = sums.index_add_(0, row_of, token_logp.double()).cpu()
        b = e
        if progress:
            progress(b, len(order))
    return out


def help_preference(model, tokenizer, task, examples, texts, progress=None):
    """The policy's routing score of each prompt [ours]: at the decision point of its own greedy
    response (task.decision_split: tiny task, before the A/H character; Template I, before the
    final <answer> / <unknown> block), log p(help continuation) - log p(answer continuation),
    both teacher-forced after the prompt and its reasoning. Larger: it wants the cloud more.
    Returns (scores [N] float64, the (prefix, help, answer) texts of each response).
    progress(done, total): over the 2N continuations scored."""
    splits = [task.decision_split(t) for t in texts]
    prefixes = [tokenizer.prompt_ids(ex.prompt) + tokenizer.encode(p)
                for ex, (p, _, _) in zip(examples, splits)]
    n = len(examples)
    help_lp = continuation_logprobs(model, prefixes, [tokenizer.encode(h) for _, h, _ in splits],
                                    tokenizer.pad_id,
                                    progress=progress and (lambda d, t: progress(d, 2 * n)))
    answer_lp = continuation_logprobs(model, prefixes, [tokenizer.encode(a) for _, _, a in splits],
                                      tokenizer.pad_id,
                                      progress=progress and (lambda d, t: progress(n + d, 2 * n)))
    return (help_lp - answer_lp).numpy(), splits


@torch.no_grad()
def answered_locally(model, tokenizer, task, examples, splits, max_new_tokens, batch_size=256,
                     progress=None):
    """The local verdict of each response had it answered at its decision point [ours]: the
    policy's own prefix + the answer continuation, then greedy decoding to the end unless that
    continuation already ends the response (tiny task: 'A' is a stop character, so the verdict
    is simply on "<its chain and check>A"). The response keeps the policy's budget: prefix,
    continuation and decoded tokens together at most max_new_tokens. Used for prompts where the
    policy asked for help, whose local answer a curve needs when it keeps them local. Decoded
    batch_size rows at a time (eval.batch_size), as the greedy evaluation is. progress(done,
    total): called with the rows decoded after each batch."""
    if not examples:
        return []
    stop_ids = tokenizer.eos_ids + tokenizer.single_token_ids(task.stop_texts)
    banned_ids = tokenizer.single_token_ids(task.banned_texts)
    texts, rows = [], []  # rows: (index, prompt + prefix + continuation ids, tokens left)
    for i, (prefix, _, answer) in enumerate(splits):
        texts.append(prefix + answer)
        said = tokenizer.encode(prefix) + tokenizer.encode(answer)
        if said[-1] not in stop_ids and len(said) < max_new_tokens:
            rows.append((i, tokenizer.prompt_ids(examples[i].prompt) + said,
                         max_new_tokens - len(said)))
    if rows:
        # batches of batch_size rows when the longest row and largest budget fit the context
        # together; else row by row (each fits alone: its prompt + max_new_tokens, as train.py
        # checked)
        together = max(len(ids) for _, ids, _ in rows) + max(left for *_, left in rows)
        fits = together <= model.config.max_position_embeddings
        size = batch_size if fits else 1
        for start in range(0, len(rows), size):
            batch = rows[start:start + size]
            out = generate(model, [ids for _, ids, _ in batch], n=1,
                           max_new_tokens=max(left for *_, left in batch), temperature=0.0,
                           stop_ids=stop_ids, banned_ids=banned_ids, pad_id=tokenizer.pad_id)
            for row, (i, _, left) in enumerate(batch):  # greedy: a longer run starts the same
                ids = out.tokens[row, :min(int(out.lengths[row]), left)].tolist()
                texts[i] += tokenizer.decode([t for t in ids if t not in tokenizer.eos_ids])
            if progress:
                progress(start + len(batch), len(rows))
    return [bool(task.local_correct(ex, t)) for ex, t in zip(examples, texts)]

# ----------------------------------------------------------------------------- 3. routers


def fit_bce(logits_of, params, labels, steps, batch_size, lr, weight_decay=0.0, seed=0,
            val_share=0.1, progress=None):
    """Minibatch AdamW on binary cross-entropy. The last val_share of the examples is held out;
    the parameters with the best held-out AUROC (checked 10 times) are kept. logits_of(idx)
    returns the logits of the examples idx; progress(done, total) is called with the steps done.
    Returns (fit indices, held-out indices)."""
    y = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    n = len(y)
    n_val = int(n * val_share) if n >= 20 else 0
    fit_idx, val_idx = torch.arange(n - n_val), torch.arange(n - n_val, n)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, best_state = -1.0, None
    every = max(1, steps // 10)
    for step in range(steps):
        idx = fit_idx[torch.randint(len(fit_idx), (min(batch_size, len(fit_idx)),), generator=gen)]
        logits = logits_of(idx)
        loss = F.binary_cross_entropy_with_logits(logits, y[idx].to(logits.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if n_val and ((step + 1) % every == 0 or step == steps - 1):
            with torch.no_grad():
                score = auroc(logits_of(val_idx).cpu(), y[val_idx].numpy())
            if score is not None and score > best:
                best, best_state = score, [p.detach().clone() for p in params]
        if progress:
            progress(step + 1, steps)
    if best_state is not None:
        with torch.no_grad():
            for p, q in zip(params, best_state):
                p.copy_(q)
    return fit_idx, val_idx


class TinyRouter:
    """A prompt-only router for from-scratch (character-level) device models: a small model.py
    Transformer (2 layers, width 64) whose final-norm hidden state at the last prompt token feeds
    a linear head (the lm_head replaced by one logit), trained with BCE to predict "the device
    model's greedy answer is right"."""
    kind = "tiny transformer (2 layers, width 64) on the prompt"

    def __init__(self, vocab_size, pad_id, max_len, seed=0, device="cpu"):
        cfg = ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=max(max_len, 8), tie_word_embeddings=False)
        self.model = Transformer(cfg).init_weights(seed)
        self.model.lm_head = nn.Linear(cfg.hidden_size, 1)
        nn.init.zeros_(self.model.lm_head.weight)
        nn.init.zeros_(self.model.lm_head.bias)
        self.model.to(device)
        self.pad_id, self.device = pad_id, device

    def logits(self, prompts):
        ids, real, positions = left_pad(prompts, self.pad_id, self.device)
        return self.model(ids, positions, attn_mask=real, logits_from=-1)[:, 0, 0].float()

    def fit(self, prompts, labels, steps=400, batch_size=64, lr=1e-3, seed=0, progress=None):
        self.model.train()
        fit_idx, val_idx = fit_bce(lambda idx: self.logits([prompts[i] for i in idx.tolist()]),
                                   list(self.model.parameters()), labels, steps, batch_size, lr,
                                   weight_decay=0.01, seed=seed, progress=progress)
        self.model.eval()
        return fit_idx, val_idx

    @torch.no_grad()
    def predict(self, prompts, batch_size=256):
        """The logit of P(the device model answers right) for each prompt: a score that ranks
        (the probability rounds to 1.0 in fp32 past a logit of about 17, tying such prompts)."""
        return torch.cat([self.logits(prompts[i:i + batch_size]).cpu()
                          for i in range(0, len(prompts), batch_size)]).numpy()


@torch.no_grad()
def last_hidden_states(model, prompts, pad_id, batch_size=16):
    """The device model's final-norm hidden state at the last prompt token [N, hidden] (fp32):
    lm_head is swapped for an identity during the forward, so no model.py change is needed."""
    device, head = next(model.parameters()).device, model.lm_head
    model.lm_head = nn.Identity()
    try:
        out = []
        for i in range(0, len(prompts), batch_size):
            ids, real, positions = left_pad(prompts[i:i + batch_size], pad_id, device)
            out.append(model(ids, positions, attn_mask=real, logits_from=-1)[:, 0].float().cpu())
    finally:
        model.lm_head = head
    return torch.cat(out)


class ProbeRouter:
    """A prompt-only router for pretrained device models: logistic regression (BCE) on the device
    model's own last hidden state at the end of the prompt, features standardised on the
    training set."""
    kind = "logistic probe on the device model's last hidden state"

    def __init__(self, model, pad_id):
        self.device_model, self.pad_id = model, pad_id

    def features(self, prompts):
        return last_hidden_states(self.device_model, prompts, self.pad_id)

    def fit(self, prompts, labels, steps=300, batch_size=256, lr=1e-2, seed=0, progress=None):
        x = self.features(prompts)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        x = (x - self.mean) / self.std
        self.linear = nn.Linear(x.shape[1], 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self._train = (prompts, x)   # predict() on the same list reuses these features
        return fit_bce(lambda idx: self.linear(x[idx])[:, 0], list(self.linear.parameters()),
                       labels, steps, batch_size, lr, weight_decay=0.01, seed=seed,
                       progress=progress)

    @torch.no_grad()
    def predict(self, prompts):
        """The logit of P(the device model answers right) for each prompt (as TinyRouter's)."""
        if prompts is self._train[0]:
            x = self._train[1]
        else:
            x = (self.features(prompts) - self.mean) / self.std
        return self.linear(x)[:, 0].numpy()

# ----------------------------------------------------------------------------- 4. runs


@dataclass
class Run:
    path: str
    cfg: dict
    task: object
    cloud: object
    device: torch.device
    _model: object = None
    _tokenizer: object = None
    note_step: object = None    # the checkpoint step _training_note named (an unfinished run)
    loaded_step: object = None  # the step of the checkpoint model() loaded (when note_step is set)

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path))

    @property
    def checkpoint(self):
        return checkpoint_dir(self.path)

    @property
    def help_allowed(self):
        return bool(self.task.allow_help)

    @property
    def from_scratch(self):
        return not (self.cfg.get("model") or {}).get("path")

    @property
    def label(self):
        rl = self.cfg.get("rl") or {}
        rule = rl.get("filter", "any_correct")
        extra = {"any_correct": "", "none": ", no filter"}.get(rule, f", filter {rule}")
        return f"{self.name} ({rl.get('algo', '?')}{extra})"

    def model(self):
        """In the dtype train.py sampled and evaluated it in: fp32 for an fp32 run (also on CUDA,
        where the loader's default is bf16), bf16 for bf16-mixed (its bf16 sampler copy) and bf16."""
        if self._model is None:
            dtype = torch.float32 if self.cfg.get("precision", "fp32") == "fp32" else torch.bfloat16
            self._model = load_pretrained(self.checkpoint, dtype=dtype, device=self.device).eval()
            if self.note_step is not None:  # a run still training may have saved again
                self.loaded_step = _checkpoint_step(self)
        return self._model

    def newer_checkpoint_note(self) -> str | None:
        """A note when train.py, still training this run, saved a newer checkpoint between the
        training note and the model's loading: the report evaluated that one."""
        if self.loaded_step in (None, self.note_step):
            return None
        return (f"{self.path}: train.py saved a newer checkpoint during this evaluation: the one "
                f"evaluated is from step {self.loaded_step}, not step {self.note_step}")

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.checkpoint)
        return self._tokenizer

    def release(self):
        self._model = None


def checkpoint_dir(path) -> str:
    """A run's checkpoint/, or checkpoint.old/ when a crash in the middle of train.py's save left
    only that one (train.py's resume makes the same choice)."""
    ckpt = os.path.join(path, "checkpoint")
    return ckpt + ".old" if not os.path.isdir(ckpt) and os.path.isdir(ckpt + ".old") else ckpt


def load_run(path, device) -> Run:
    """A train.py run directory; each missing piece is an error that names it."""
    if not os.path.isdir(path):
        what = "a file, not a run directory" if os.path.exists(path) else "no such run directory"
        raise FileNotFoundError(f"{path}: {what} (expected runs/NAME written by train.py)")
    config = os.path.join(path, "config.yaml")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{path}: no config.yaml, so this is not a train.py run directory")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(checkpoint_dir(path), name)):
            raise FileNotFoundError(f"{path}: no checkpoint/{name} (train.py writes the checkpoint "
                                    "every save_every steps and at the end; is the run finished?)")
    try:
        with open(config, encoding="utf-8") as f:
            cfg = yaml.load(f, Loader=ConfigLoader) or {}  # as train.py reads it
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e
        raise ValueError(f"{config} is not valid YAML: {problem}{where}") from e
    except UnicodeDecodeError as e:  # as train.py reports it
        raise ValueError(f"{config} is not UTF-8 text ({e.reason} at byte {e.start}); save it "
                         "as UTF-8") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{config} is not a train.py config (a mapping of sections)")
    for key in ("model", "task", "cloud", "sampling", "eval"):
        if not isinstance(cfg.get(key), dict):
            raise ValueError(f"{config}: section {key!r} is missing")
    if not isinstance(cfg.get("rl") or {}, dict):  # optional (its labels, steps and rho read it)
        raise ValueError(f"{config}: section 'rl' must be a mapping of its settings, got "
                         f"{cfg['rl']!r}")
    if not isinstance(cfg["task"].get("name"), str):
        raise ValueError(f"{config}: task.name is missing (the task's name, e.g. countdown)")
    if cfg.get("precision", "fp32") not in ("fp32", "bf16-mixed", "bf16"):
        raise ValueError(f"{config}: precision={cfg['precision']!r} is not allowed: fp32, "
                         "bf16-mixed or bf16")
    for section, key, default in (("sampling", "max_new_tokens", None),
                                  ("eval", "batch_size", 256)):
        v = cfg[section].get(key, default)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"{config}: {section}.{key}={v!r} is not allowed: an integer >= 1")
    task = make_task(**cfg["task"])
    cloud = make_cloud(dict(cfg["cloud"]), cache_path=os.path.join(path, "cloud_cache.jsonl"))
    try:  # another cloud's answers in the run's cache: said now, not after the greedy decoding
        cloud.check_cache()
    except ValueError as e:
        raise ValueError(f"{e}: set the cloud section of {config} back to what this run "
                         f"used") from None
    cloud.failed = {}  # a prompt whose call failed keeps that verdict for the whole report
    return Run(path, cfg, task, cloud, torch.device(device))


class Progress:
    """One updating line on stderr: what is being evaluated, how far, elapsed time."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.start, self.used = stream, time.time(), False

    def __call__(self, stage, done=None, total=None):
        count = f" {done}/{total}" if total else ""
        status_line(f"eval | {time.time() - self.start:6.1f}s | {stage}{count}", self.stream)
        self.used = True

    def close(self):
        if self.used:
            print(file=self.stream, flush=True)


def _task_key(cfg):
    """The task a run trained on, its defaults filled in (as train.py's warm-start key reads it;
    through JSON, so a default (1, 20) equals a file's [1, 20]), whether help was allowed aside."""
    settings = json.loads(json.dumps(task_settings(**cfg["task"])))
    return {k: v for k, v in settings.items() if k != "allow_help"}


@dataclass
class Results:
    settings: dict
    rows: list                                     # (key, label, metrics) in table order
    curves: dict = field(default_factory=dict)     # label -> (call_ratio, acc)
    points: dict = field(default_factory=dict)     # label -> (call_ratio, acc): a policy's own choice
    capped: dict = field(default_factory=dict)     # label -> (call_ratio, acc): a policy's capped_curve
    per_run: dict = field(default_factory=dict)    # run path -> {"role", "metrics", "task", "cloud"}
    router: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def _training_note(run) -> str | None:
    """A note when train.py did not train the run to its rl.steps: not finished (no
    final_eval.json; its last checkpoint is what gets evaluated), or stopped early by
    rl.time_limit_min (finished, at a lower step)."""
    step = None
    try:
        with open(os.path.join(run.path, "metrics.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                step = row.get("train/step", step) if isinstance(row, dict) else step
    except (OSError, ValueError):
        pass
    steps = (run.cfg.get("rl") or {}).get("steps", "?")
    if not os.path.isfile(os.path.join(run.path, "final_eval.json")):
        saved = run.note_step = _checkpoint_step(run)
        return (f"{run.path} has not finished training (logged up to step {step} of {steps}); "
                f"its last checkpoint{'' if saved is None else f', from step {saved},'} is "
                "evaluated")
    if isinstance(step, int) and isinstance(steps, int) and step < steps:
        return (f"{run.path} stopped training at step {step} of {steps} (rl.time_limit_min); its "
                "final checkpoint is evaluated")
    return None


def _checkpoint_step(run) -> int | None:
    """The RL step of the checkpoint that gets evaluated (its trainer_state.pt, memory-mapped:
    the optimizer state is not read), or None when that file is missing or unreadable."""
    try:
        state = torch.load(os.path.join(run.checkpoint, "trainer_state.pt"), map_location="cpu",
                           weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        return None  # the note then goes without the step
    step = state.get("step") if isinstance(state, dict) else None
    return step if isinstance(step, int) else None


def _check_budget(budget, name):
    if not (isinstance(budget, (int, float)) and not isinstance(budget, bool) and 0 <= budget <= 1):
        raise ValueError(f"{name}={budget!r} is not allowed: give the share of prompts that may "
                         "go to the cloud, a number in [0, 1] (0.3 = at most 30%)")


def _configured_budget(run) -> float:
    """The evaluation budget a run's config.yaml sets: eval.budget, or when that is absent or
    null rho / (1 + rho), as train.py resolves it."""
    config = os.path.join(run.path, "config.yaml")
    budget = run.cfg["eval"].get("budget")
    if budget is None:
        rho = (run.cfg.get("rl") or {}).get("rho", algo.DEFAULT_RHO)
        try:
            budget = algo.cloud_share(rho)
        except ValueError:
            raise ValueError(f"{config}: rl.rho={rho!r} is not allowed: a finite number >= 0 "
                             "(eval.budget is unset, so the budget is rho / (1 + rho))") from None
    _check_budget(budget, f"{config}: eval.budget")
    return float(budget)


def evaluate_runs(paths, split="test", budget=None, n=None, task_tuned=None, router_n=2000,
                  router_steps=None, seed=0, device=None, progress=None) -> Results:
    """Evaluate every run and the SPEC 8 baselines on the same prompts and budget."""
    progress = progress or (lambda *a, **k: None)
    if split not in SPLITS:
        raise ValueError(f"--split={split!r} is not allowed; use one of {list(SPLITS)}")
    if budget is not None:
        _check_budget(budget, "--budget")
    if n is not None and n < 0:
        raise ValueError(f"--n={n} is not allowed: a count of prompts >= 0 (0 = the whole split)")
    if router_n < 0:
        raise ValueError(f"--router-n={router_n} is not allowed: a count of train prompts >= 0 "
                         "(0 or 1: no router)")
    if router_steps is not None and router_steps < 1:
        raise ValueError(f"--router-steps={router_steps} is not allowed: a number of training "
                         "steps >= 1")
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"--seed={seed} is not allowed: an integer in [0, 2**64 - 1]")
    device = resolve_device(device)
    if not paths:
        raise ValueError("give at least one run directory")
    # one run under two spellings (runs/a, /abs/runs/a, a link) is the same run
    given = [os.path.realpath(p) for p in paths]
    firsts = [given.index(g) for g in given]  # where each run was first given
    twice = [i for i, first in enumerate(firsts) if first < i]
    if twice:
        raise ValueError(f"{', '.join(paths[i] for i in twice)}: given more than once (as "
                         f"{', '.join(paths[firsts[i]] for i in twice)}); give each run once")
    runs = [load_run(p, device) for p in paths]
    if task_tuned is not None and os.path.realpath(task_tuned) not in given:
        runs.append(load_run(task_tuned, device))
    first = runs[0]
    for r in runs[1:]:
        if _task_key(r.cfg) != _task_key(first.cfg):
            raise ValueError(f"{r.path} and {first.path} use different tasks ({_task_key(r.cfg)} vs "
                             f"{_task_key(first.cfg)}); runs in one table must share the task")
    all_examples = first.task.examples(split)
    if not all_examples:
        raise ValueError(f"the {split} split of {first.path}'s task has no examples (its "
                         "config.yaml's task section); evaluate a split that has some")
    notes = []
    if budget is None:   # the first run's eval.budget; a run that sets another is noted
        budget = _configured_budget(first)
        differ = [r.path for r in runs[1:] if _configured_budget(r) != budget]
        if differ:
            notes.append(f"the budget {budget:g} comes from {first.path}'s config.yaml; "
                         f"{', '.join(differ)} set(s) another (--budget sets one for all)")
    budget = abs(float(budget))   # -0.0 passes 0 <= budget; it is 0 (printed "0%", not "-0%")
    n_name = "--n" if n is not None else f"{os.path.join(first.path, 'config.yaml')}: eval.n"
    if n is None:
        n = first.cfg["eval"].get("n", 0)
        if not (isinstance(n, int) and not isinstance(n, bool)):
            raise ValueError(f"{n_name}={n!r} is not allowed: a count of prompts >= 0")
        count = lambda r: r.cfg["eval"].get("n", 0) or len(all_examples)   # 0: all of them
        differ = [r.path for r in runs[1:] if count(r) != count(first)]
        if differ:
            notes.append(f"the {count(first)} prompts are {first.path}'s eval.n; "
                         f"{', '.join(differ)} set(s) another (--n sets one for all)")
    if n < 0 or n > len(all_examples):
        raise ValueError(f"{n_name}={n} is not allowed: the {split} split has "
                         f"{len(all_examples)} examples (0 = all of them)")
    n = n or len(all_examples)

    # the task-tuned run: given, or the (first) run trained with help disabled
    if task_tuned is not None:
        base = next(r for r in runs if os.path.realpath(r.path) == os.path.realpath(task_tuned))
        if base.help_allowed:
            raise ValueError(f"--task-tuned {task_tuned}: that run was trained with help allowed "
                             "(task.allow_help: true); the task-tuning-only baseline is a run "
                             "trained with task.allow_help=false")
    else:
        base = next((r for r in runs if not r.help_allowed), None)
    others = [r.path for r in runs if not r.help_allowed and r is not base]
    if others:
        raise ValueError(f"one task-tuned (help-disabled) run per table: {base.path} is the "
                         f"baseline, so leave out {', '.join(others)}")
    policies = [r for r in runs if r.help_allowed]
    clouds = {json.dumps(r.cfg["cloud"], sort_keys=True) for r in runs}
    notes += [note for r in runs if (note := _training_note(r))]
    if len(clouds) > 1:
        notes.append("the runs use different cloud settings; each run's curve and metrics use its "
                     "own cloud, the baselines use the base model's run's cloud")
    lengths = {r.path: r.cfg["sampling"]["max_new_tokens"] for r in runs}
    if len(set(lengths.values())) > 1:
        notes.append("the runs decode different numbers of new tokens, each its own "
                     "sampling.max_new_tokens (" + ", ".join(f"{p}: {k}" for p, k in lengths.items())
                     + "; the baselines use the base model's run's), so a longer budget may "
                     "explain part of a gap")

    cap = algo.cloud_cap(n, budget)
    settings = {"split": split, "n": n, "budget": budget, "cap": cap, "seed": seed,
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": _machine(device), "device": str(device),
                "task": first.cfg["task"], "cloud": first.cfg["cloud"],
                "runs": [r.path for r in runs],
                "task_tuned_run": base.path if base else None,
                "router_train_prompts": 0}
    res = Results(settings, [], notes=notes)

    # --- the base device model of naive / router / oracle: the task-tuned run (SPEC 8.2)
    if base is None:
        if not policies:
            raise ValueError("no run to evaluate")
        donor = policies[0]
        base_task = make_task(**{**donor.cfg["task"], "allow_help": False})
        base = Run(donor.path, donor.cfg, base_task, donor.cloud, donor.device,
                   note_step=donor.note_step)
        base_label = f"help disabled at decode time: {donor.name}"
        notes.append(f"no task-tuned run (task.allow_help=false) was given, so naive / router / "
                     f"oracle route the help-disabled decode of {donor.path}, which is NOT the "
                     "task-tuning-only baseline; pass --task-tuned runs/T for that")
        base_role = None
    else:
        base_label = f"task-tuning only ({base.name})"
        base_role = "task_tuned"
    examples = base.task.examples(split)[:n]
    keys = [ex.key for ex in examples]
    settings["base_model"] = base_label

    settings["models"] = {}
    # a run's cloud_requests count its cloud's new requests over the whole evaluation: the
    # baselines, asked first, may share a policy's cloud (and cache) and ask its prompts for it
    calls_at_start = {id(r.cloud): r.cloud.calls_made for r in runs}
    evaluate_baselines(res, base, base_label, base_role, examples, budget, router_n,
                       router_steps, seed, device, progress)
    for run in policies:
        ex = run.task.examples(split)[:n]
        if [e.key for e in ex] != keys:
            raise ValueError(f"{run.path}: its {split} prompts differ from {base.path}'s")
        evaluate_policy_run(res, run, ex, budget, progress, calls_at_start[id(run.cloud)])
    for run in {id(r.cloud): r for r in [base] + runs}.values():
        if run.cloud.failed:
            error = next(iter(run.cloud.failed.values())).error
            res.notes.append(
                f"{run.path}: the cloud call failed for {len(run.cloud.failed)} prompt(s) (first "
                f"error: {error}); they count as wrong cloud answers everywhere in this report. "
                "Run eval.py again to retry them (the answers that arrived are cached)")
    return res


def evaluate_baselines(res, base, base_label, base_role, examples, budget, router_n,
                       router_steps, seed, device, progress):
    """SPEC 8 rows over the base device model: cloud only, task-tuning only, naive offloading,
    the router (labels from the base model's greedy answers on the train split), the oracle."""
    n, cap = len(examples), algo.cloud_cap(len(examples), budget)
    model, tok = base.model(), base.tokenizer()
    if note := base.newer_checkpoint_note():
        res.notes.append(note)
    max_new, batch = base.cfg["sampling"]["max_new_tokens"], base.cfg["eval"].get("batch_size", 256)
    res.settings["models"][base.path] = _describe(base, model)
    m, out = algo.evaluate_policy(model, tok, base.task, examples, NoCloud(), budget, max_new,
                                  batch, lambda d, t: progress(f"{base.name}: greedy", d, t))
    del m["cloud_failed"]  # NoCloud: this row sent no cloud calls to fail
    m = table_row({**m, "help_calls": int(out["help"].sum())})
    local = out["local_ok"].numpy() & ~out["help"].numpy()
    answers = base.cloud.ask(base.task, examples,
                             lambda d, t: progress(f"{base.name}: cloud verdicts", d, t))
    cloud = np.array([a.correct for a in answers], dtype=bool)
    if base_role:
        res.per_run[base.path] = {"role": base_role, "metrics": m, **own_settings(base)}

    cloud_only = algo.capped_metrics(torch.ones(n, dtype=torch.bool),
                                     torch.zeros(n, dtype=torch.bool), torch.as_tensor(cloud), 1.0)
    cloud_only.update(budget=budget, cap=n, help_calls=n, cond_local_acc=None, capped=False)
    res.rows.append(("cloud_only", "cloud only (no cap)", table_row(cloud_only)))
    res.rows.append(("task_tuning_only" if base_role else "local_only", base_label, dict(m)))

    def routed(key, label, order, k, **extra):
        row = table_row(routed_metrics(order, k, local, cloud, budget))
        res.curves[key] = routing_curve(order, local, cloud)
        row.update(gap_recovered(*res.curves[key]), **extra)
        res.rows.append((key, label, row))

    routed("naive", f"naive offloading (random {budget * 100:g}%)", naive_order(n, seed), cap)

    # no router (--router-n 0 or 1): the train split is not read (a MATH run's file may be absent)
    train = base.task.examples("train")[:router_n] if router_n >= 2 else []
    if len(train) >= 2:
        if len(train) < router_n:
            res.notes.append(f"the router was trained on the whole train split, {len(train)} "
                             f"prompts (--router-n asked for {router_n})")
        _, train_out = algo.evaluate_policy(
            model, tok, base.task, train, NoCloud(), budget, max_new, batch,
            lambda d, t: progress("router labels: greedy on train", d, t))
        labels = train_out["local_ok"].numpy() & ~train_out["help"].numpy()
        train_prompts = [tok.prompt_ids(ex.prompt) for ex in train]
        test_prompts = [tok.prompt_ids(ex.prompt) for ex in examples]
        if base.from_scratch:
            router, default_steps = TinyRouter(
                tok.vocab_size, tok.pad_id, max(len(p) for p in train_prompts + test_prompts),
                seed, device), 400
        else:
            router, default_steps = ProbeRouter(model, tok.pad_id), 300
        steps = default_steps if router_steps is None else router_steps
        progress("router: training")  # (a probe first reads the prompts' hidden states)
        fit_idx, val_idx = router.fit(train_prompts, labels, steps=steps, seed=seed,
                                      progress=lambda d, t: progress("router: training", d, t))
        s_train, s_test = router.predict(train_prompts), router.predict(test_prompts)  # logits
        fit_idx, val_idx = fit_idx.numpy(), val_idx.numpy()
        res.router = {"kind": router.kind, "n_train": len(fit_idx), "n_val": len(val_idx),
                      "train_positive_rate": float(labels.mean()),
                      "auroc_train": auroc(s_train[fit_idx], labels[fit_idx]),
                      "auroc_val": auroc(s_train[val_idx], labels[val_idx]),
                      "auroc_test": auroc(s_test, local)}
        res.settings["router_train_prompts"] = len(train)
        if res.settings["split"] == "train":
            res.notes.append("evaluated on the train split, whose first prompts also trained the "
                             "router: the router's row and test AUROC are optimistic")
        routed("router", "router (BCE, prompt only)", router_order(s_test), cap,
               auroc_train=res.router["auroc_train"], auroc_test=res.router["auroc_test"])
    else:
        res.notes.append(f"no router: it needs at least 2 train prompts"
                         + (f" and the train split has {len(train)}" if router_n >= 2 else "")
                         + f" (--router-n={router_n})")

    routed("oracle", "oracle router (upper bound)", oracle_order(local, cloud),
           min(cap, int((~local & cloud).sum())))
    base.release()


def evaluate_policy_run(res, run, examples, budget, progress, calls_before):
    """A trained policy: SPEC 7 metrics, its two curves (policy_curve, capped_curve) and its own
    point. calls_before: its cloud's calls_made when the evaluation began."""
    model, tok = run.model(), run.tokenizer()
    if note := run.newer_checkpoint_note():
        res.notes.append(note)
    res.settings["models"][run.path] = _describe(run, model)
    label = run.label if run.label not in res.curves else f"{run.label} [{run.path}]"
    max_new, batch = run.cfg["sampling"]["max_new_tokens"], run.cfg["eval"].get("batch_size", 256)
    m, out = algo.evaluate_policy(model, tok, run.task, examples, run.cloud, budget, max_new,
                                  batch, lambda d, t: progress(f"{run.name}: greedy", d, t))
    help = out["help"].numpy()
    local = out["local_ok"].numpy() & ~help
    answers = run.cloud.ask(run.task, examples,
                            lambda d, t: progress(f"{run.name}: cloud verdicts", d, t))
    cloud = np.array([a.correct for a in answers], dtype=bool)
    progress(f"{run.name}: decision scores")
    score, splits = help_preference(model, tok, run.task, examples, out["text"],
                                    lambda d, t: progress(f"{run.name}: decision scores", d, t))
    progress(f"{run.name}: local answers of its help calls")
    asked = np.nonzero(help)[0].tolist()
    answered = np.zeros(len(examples), dtype=bool)
    answered[asked] = answered_locally(model, tok, run.task, [examples[i] for i in asked],
                                       [splits[i] for i in asked], max_new, batch,
                                       lambda d, t: progress(f"{run.name}: local answers of its "
                                                             f"help calls", d, t))
    *curve, _ = policy_curve(help, local, answered, cloud, score)
    m.update(help_calls=int(help.sum()), cloud_requests=run.cloud.calls_made - calls_before,
             decision_agreement=float(((score > 0) == help).mean()), **gap_recovered(*curve))
    m = table_row(m)
    res.rows.append((f"policy:{run.path}", label, m))
    res.curves[label] = curve
    res.points[label] = (m["call_ratio"], m["acc_uncapped"])
    res.capped[label] = capped_curve(help, local, cloud)
    res.per_run[run.path] = {"role": "policy", "metrics": m, **own_settings(run)}
    run.release()


def _describe(run, model):
    source = run.cfg["model"].get("path") or "trained from scratch"
    return f"{source}, {model.num_params() / 1e6:.2f}M parameters, {run.checkpoint}"


def _machine(device):
    text = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(device)}"
    return text

# ----------------------------------------------------------------------------- 5. outputs


TABLE_COLUMNS = [("call ratio", "call_ratio"), ("local acc", "local_acc"),
                 ("cond. local acc", "cond_local_acc"), ("acc capped", "acc_capped"),
                 ("acc uncapped", "acc_uncapped"), ("APGR", "apgr"), ("CPT(50%)", "cpt50"),
                 ("CPT(80%)", "cpt80")]


def _fmt(v, digits: int = 3):
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _plain(obj):
    """JSON-ready: numpy scalars as Python numbers, floats rounded to 6 decimals (the metrics are
    means over N prompts; this hides rounding noise such as 0.1 + 0.2 = 0.30000000000000004)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return round(float(obj), 6)
    return obj


def own_settings(run) -> dict:
    """A run's own task and cloud sections, for its eval.json and report.md (the combined
    report's settings are the first run's)."""
    return {"task": run.cfg["task"], "cloud": run.cfg["cloud"]}


def run_settings(res: Results, path) -> dict:
    """res.settings with the task and cloud of the run at `path`."""
    entry = res.per_run.get(path, {})
    return {**res.settings, **{k: entry[k] for k in ("task", "cloud") if k in entry}}


def eval_json(res: Results, path, command) -> dict:
    """The stable eval.json of one run (keys documented in the README)."""
    baselines = {key: metrics for key, _, metrics in res.rows if not key.startswith("policy:")}
    entry = res.per_run.get(path, {"role": "policy", "metrics": None})
    return _plain({"schema_version": SCHEMA_VERSION, "run": path, "role": entry["role"],
                   "settings": {**run_settings(res, path), "command": command},
                   "metrics": entry["metrics"],
                   "baselines": baselines, "router": res.router, "notes": res.notes})


def write_curves(res: Results, out_dir, labels):
    """curve.csv (method, call_ratio, accuracy) always; curve.png when matplotlib is installed.
    A policy's capped_curve is the method "LABEL, capped". Returns the png's file name, or None."""
    lines = ["method,call_ratio,accuracy"]
    for label in labels:
        for name, curve in ((label, res.curves[label]), (f"{label}, capped", res.capped.get(label))):
            for c, a in zip(*curve) if curve is not None else ():
                quoted = name.replace('"', '""')  # CSV: a quote in a run's name is doubled
                lines.append(f"\"{quoted}\",{c:.6f},{a:.6f}")
    atomic_write_text(os.path.join(out_dir, "curve.csv"), "\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:   # no figure: one left by an earlier evaluation would be stale
        if os.path.isfile(os.path.join(out_dir, "curve.png")):
            os.remove(os.path.join(out_dir, "curve.png"))
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label in labels:
        c, a = res.curves[label]
        line, = ax.plot(c, a, label=label, lw=1.5)
        if label in res.capped:
            ax.plot(*res.capped[label], color=line.get_color(), ls="--", lw=1.5,
                    label=f"{label}, capped")
        if label in res.points:
            x, y = res.points[label]
            ax.plot([x], [y], marker="*", ms=13, color=line.get_color(), ls="none", clip_on=False)
    ax.axvline(res.settings["budget"], color="grey", ls="--", lw=1, label=f"budget {res.settings['budget'] * 100:g}%")
    ax.set_xlabel("cloud call ratio")
    ax.set_ylabel("overall accuracy")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"accuracy vs call ratio ({res.settings['split']}, N={res.settings['n']}); "
                 "* = the policy's own choice", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    try:
        atomic_write(os.path.join(out_dir, "curve.png"), lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
    return "curve.png"


def _cell(text) -> str:
    """A markdown table cell: a "|" in a run's name would otherwise start a new column."""
    return str(text).replace("|", "\\|")


def report_markdown(res: Results, policy_paths, png, command, settings=None) -> str:
    s = settings or res.settings
    rows = [r for r in res.rows if not r[0].startswith("policy:") or r[0][7:] in policy_paths]
    task = s["task"].get("name", "?") + " (" + ", ".join(
        f"{k}={v}" for k, v in s["task"].items() if k not in ("name", "allow_help")) + ")"
    cloud = ", ".join(f"{k}={v}" for k, v in s["cloud"].items())
    models = [f"{label}: {s['models'][key[7:]]}" for key, label, _ in rows
              if key.startswith("policy:")]
    lines = [
        "# Evaluation report", "",
        f"- date: {s['date']}; machine: {s['machine']}",
        f"- command: `{command}`",
        f"- task: {task}; split `{s['split']}`, first N = {s['n']} prompts, greedy decoding",
        f"- cloud: {cloud}",
        f"- budget: {s['budget'] * 100:g}% of prompts, cap = {s['cap']} cloud calls served in dataset "
        "order, later help calls scored wrong (SPEC 7)",
        f"- device model of the baselines: {s['base_model']}; "
        f"{s['models'].get(s['task_tuned_run'] or s['runs'][0], '')}",
    ] + [f"- policy {m}" for m in models] + [
        "", "## Results at the budget", "",
        "| method | " + " | ".join(c for c, _ in TABLE_COLUMNS) + " |",
        "|---|" + "---:|" * len(TABLE_COLUMNS)]
    for _, label, m in rows:
        lines.append(f"| {_cell(label)} | " + " | ".join(_fmt(m.get(k)) for _, k in TABLE_COLUMNS)
                     + " |")
    policies = [(label, m) for key, label, m in rows if key.startswith("policy:")]
    if policies:
        lines += ["", "Trained policies in detail (uncapped help calls; cloud calls served within "
                  "the cap; mean response length in tokens):", "",
                  "| policy | help calls | cloud calls served | len help | len local | clipped | "
                  "local-only acc | decision agreement |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, m in policies:
            lines.append(f"| {_cell(label)} | {m['help_calls']} | {m['calls_served']} | "
                         f"{_fmt(m['len_help'], 1)} | {_fmt(m['len_local'], 1)} | "
                         f"{m['clipped_ratio']:.3f} | "
                         f"{m['curve_local_acc']:.3f} | {m['decision_agreement']:.3f} |")
    if res.router:
        r = res.router
        lines += ["", f"Router: {r['kind']}, trained on {r['n_train']} train prompts (held out "
                  f"{r['n_val']} for early stopping; {r['train_positive_rate']:.1%} answered right). "
                  f"AUROC train {_fmt(r['auroc_train'])}, held-out {_fmt(r['auroc_val'])}, "
                  f"test {_fmt(r['auroc_test'])}."]
    lines += ["", "## Accuracy vs call ratio", ""]
    if png:
        lines += [f"![accuracy vs call ratio]({png})", "",
                  "The points behind it are in curve.csv (columns method, call_ratio, accuracy)."]
    else:
        lines.append("matplotlib is not installed, so there is no figure: the curves are in "
                     "curve.csv (columns method, call_ratio, accuracy). Plot accuracy against "
                     "call_ratio with one line per method, or `pip install matplotlib` and rerun.")
    lines += [
        "", "## How to read this", "",
        "- call ratio: share of prompts sent to the cloud (for a policy: its own help calls, "
        "uncapped). local acc: correct local answers / all prompts; cond. local acc: correct local "
        "answers / prompts kept local; acc capped / uncapped: overall accuracy with / without the "
        "cap (SPEC 7).",
        "- naive / router / oracle route the baseline device model's greedy answers: naive sends a "
        "seeded random share = budget, the router the prompts it scores least likely right, the "
        "oracle exactly the prompts that model gets wrong and the cloud right (up to the budget).",
        "- curves: for k = 0..N the first k prompts of an ordering go to the cloud, the rest keep "
        "their local answer. A policy's ordering is its help preference: log p(help) - log p(answer) "
        "teacher-forced at the decision point of its own greedy response; kept local, a prompt on "
        "which it asked for help gets the answer it gives when forced to answer there "
        "(local-only acc = the curve at 0 calls). The star marks the policy's own choice (uncapped).",
        "- \"capped\" (dashed): the policy's own decisions as the cap varies (SPEC 7): with a cap "
        "of k calls its first k help calls in dataset order go to the cloud and later ones score "
        "wrong, for k = 0 up to its help calls; it ends at the star. Its value at the budget's cap "
        "is acc capped.",
        "- APGR = integral over c in [0, 1] of PGR(c) = (acc(c) - acc(0)) / (acc(1) - acc(0)), "
        "each curve against its own endpoints (0.5 = random routing); CPT(x) = the smallest call "
        "ratio recovering x of that gap. Decision agreement: share of prompts where the sign of "
        "the help preference matches the policy's greedy decision.",
    ]
    if res.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res.notes]
    return "\n".join(lines) + "\n"


def write_outputs(res: Results, out_dir, command):
    """eval.json (+ report.md, curve.*) in every run directory; the combined report in out_dir."""
    policy_paths = [k[7:] for k, _, _ in res.rows if k.startswith("policy:")]
    baseline_curves = [k for k in ("naive", "router", "oracle") if k in res.curves]
    label_of = {k[7:]: label for k, label, _ in res.rows if k.startswith("policy:")}
    written = []
    for path in res.per_run:
        atomic_write_text(os.path.join(path, "eval.json"),
                          json.dumps(eval_json(res, path, command), indent=2) + "\n")
        written.append(os.path.join(path, "eval.json"))
        if os.path.realpath(path) == os.path.realpath(out_dir):  # however each is spelled
            continue
        mine = [path] if path in label_of else []
        png = write_curves(res, path, baseline_curves + [label_of[p] for p in mine])
        atomic_write_text(os.path.join(path, "report.md"),
                          report_markdown(res, mine, png, command, run_settings(res, path)))
        written += [os.path.join(path, f) for f in ("report.md", "curve.csv", png) if f]
    os.makedirs(out_dir, exist_ok=True)
    png = write_curves(res, out_dir, baseline_curves + [label_of[p] for p in policy_paths])
    atomic_write_text(os.path.join(out_dir, "report.md"),
                      report_markdown(res, policy_paths, png, command))
    written += [os.path.join(out_dir, f) for f in ("report.md", "curve.csv", png) if f]
    return written


def print_table(res: Results):
    width = max(len(label) for _, label, _ in res.rows) + 2
    cols = TABLE_COLUMNS[:6]
    print("method".ljust(width) + "".join(c.rjust(16) for c, _ in cols))
    for _, label, m in res.rows:
        print(label.ljust(width) + "".join(_fmt(m.get(k)).rjust(16) for _, k in cols))


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `timeout`'s stop): the evaluation stops as on Ctrl-C (the cloud
    requests under way are waited for and cached), and exits with 143."""


def _terminated(signum, frame):
    raise Terminated


@contextmanager
def signals_held():
    """Within the block, Ctrl-C and SIGTERM are only noted in the list it yields: the outputs
    are all written, never some from this evaluation and some from an earlier one."""
    held = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv=None):
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv):
    p = argparse.ArgumentParser(description="Evaluate runs under the cloud-call budget (SPEC 7-8).")
    p.add_argument("runs", nargs="+", help="run directories written by train.py (runs/NAME)")
    p.add_argument("--split", default="test", help=f"one of {list(SPLITS)} (default test)")
    p.add_argument("--budget", type=float, default=None,
                   help="share of prompts that may go to the cloud, in [0, 1] (default: the run's eval.budget)")
    p.add_argument("--n", type=int, default=None,
                   help="evaluate the first N prompts of the split (default: the run's eval.n; 0 = all)")
    p.add_argument("--task-tuned", default=None,
                   help="the task-tuning-only run (trained with task.allow_help=false); default: "
                        "a given run whose config has allow_help false")
    p.add_argument("--out", default=None, help="directory of the combined report (default: the first run's)")
    p.add_argument("--router-n", type=int, default=2000,
                   help="the first N train prompts label the router (at most the split; 0 or 1: "
                        "no router; default 2000)")
    p.add_argument("--router-steps", type=int, default=None,
                   help="router training steps, >= 1 (default: 400 for a from-scratch device "
                        "model's tiny transformer, 300 for a pretrained model's probe)")
    p.add_argument("--seed", type=int, default=0,
                   help="naive offloading's draw and the router's init, in [0, 2**64 - 1] "
                        "(default 0)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    args = p.parse_args(argv)
    command = "python eval.py " + shlex.join(sys.argv[1:] if argv is None else argv)  # as typed
    progress = Progress()
    try:
        # every directory written at the end must be writable now, not after the evaluation
        if args.out is not None:
            check_writable(args.out, "--out")
        for path in args.runs + ([args.task_tuned] if args.task_tuned else []):
            if os.path.isdir(path):   # a missing run is load_run's error
                check_writable(path, "run directory")
                check_appendable(os.path.join(path, "cloud_cache.jsonl"))
        res = evaluate_runs(args.runs, args.split, args.budget, args.n, args.task_tuned,
                            args.router_n, args.router_steps, args.seed, args.device, progress)
    except (ValueError, OSError, CloudError) as e:  # CloudError: e.g. a refused API key;
        progress.close()                               # OSError: a missing file, a full disk
        sys.exit(f"eval error: {e}")
    except KeyboardInterrupt as e:  # nothing written yet; the cloud answers that arrived are cached
        progress.close()
        print("\neval.py: interrupted, nothing written; the cloud answers that arrived are cached, "
              "so running the same command again does not pay for them twice", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    progress.close()
    with signals_held() as held:
        try:
            written = write_outputs(res, args.out or args.runs[0], command)
        except OSError as e:  # e.g. a full disk
            sys.exit(f"eval error: {e}; some outputs were not written (the cloud answers are "
                     f"cached): once fixed, run the same command again")
    if held:
        print(f"eval.py: interrupted while writing its outputs, which were finished first: "
              f"{', '.join(written)}", file=sys.stderr)
        sys.exit(143 if held[0] == signal.SIGTERM else 130)
    s = res.settings
    print(f"{s['split']} split, N={s['n']}, budget {s['budget'] * 100:g}% (cap {s['cap']} calls); "
          f"baselines over: {s['base_model']}")
    print_table(res)
    for note in res.notes:
        print(f"note: {note}")
    if res.router:
        print(f"router AUROC: train {_fmt(res.router['auroc_train'])}, test {_fmt(res.router['auroc_test'])}")
    print("wrote " + ", ".join(written))
    return res


if __name__ == "__main__":
    main()
