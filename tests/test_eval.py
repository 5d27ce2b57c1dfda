"""Tests for eval.py against hand-computed numbers: SPEC 7 metric arithmetic, routing curves,
APGR / CPT, naive and oracle routing, the policy's decision score and curve, the router, and an
end-to-end run of the command line on tiny random checkpoints."""
import csv
import itertools
import json
import os
import random
import re
import shlex
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import yaml

import cloud as cloud_module
import eval as ev
import model
from algo import capped_metrics, cloud_cap, cloud_share
from devices import DEVICES
from model import ModelConfig, Transformer, build_char_tokenizer, save_pretrained
from tasks import HELP_MARKER, make_task


@pytest.fixture
def one_thread():
    """The router test trains a small network; on 2 shared cores one thread is several times
    faster than two fighting other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ----------------------------------------------------------------------------- SPEC 7 arithmetic


def test_capped_metrics_cap_in_dataset_order():
    # N = 10, budget 0.2 -> cap 2: the help calls at 0 and 2 are served, those at 3 and 6 are not
    help = [1, 0, 1, 1, 0, 0, 1, 0, 0, 0]
    local = [0, 1, 1, 0, 1, 0, 0, 1, 1, 0]   # index 2 is a help call: never a local answer
    cloud = [1, 0, 0, 1, 0, 0, 1, 0, 0, 0]
    lens = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    m = capped_metrics(torch.tensor(help).bool(), torch.tensor(local).bool(),
                       torch.tensor(cloud).bool(), 0.2, torch.tensor(lens))
    assert m["cap"] == 2 and m["calls_served"] == 2
    assert m["call_ratio"] == pytest.approx(0.4)
    assert m["local_acc"] == pytest.approx(4 / 10)          # indices 1, 4, 7, 8
    assert m["cond_local_acc"] == pytest.approx(4 / 6)      # 6 prompts kept local
    assert m["acc_capped"] == pytest.approx((4 + 1) / 10)   # served: 0 right, 2 wrong
    assert m["acc_uncapped"] == pytest.approx((4 + 3) / 10)  # 0, 3, 6 right in the cloud
    assert m["len_help"] == pytest.approx((10 + 30 + 40 + 70) / 4)
    assert m["len_local"] == pytest.approx((20 + 50 + 60 + 80 + 90 + 100) / 6)


@pytest.mark.parametrize("n, budget, cap", [
    (100, 0.29, 29), (100, 0.57, 57), (200, 0.58, 116), (500, 0.3, 150), (10, 0.25, 2), (7, 0, 0),
    (7, 1, 7), (6000, cloud_share(1 / 2), 2000), (7500, cloud_share(1 / 2), 2500),
    (7500, cloud_share(7 / 5), 4375), (7499, cloud_share(1 / 2), 2499), (5000, cloud_share(3 / 7), 1500)])
def test_cloud_cap_is_floor_n_budget_despite_float_rounding(n, budget, cap):
    # 100 * 0.29 is 28.999999999999996 in floats; cloud_share(1/2) is 1/3 rounded to 12 decimals
    assert cloud_cap(n, budget) == cap


def test_capped_metrics_over_no_prompts_are_none_not_zero():
    # every prompt asks for help: no local answers to be right or wrong among (0/0), no lengths
    m = capped_metrics(torch.ones(4).bool(), torch.zeros(4).bool(),
                       torch.tensor([1, 1, 0, 1]).bool(), 0.5, torch.tensor([5, 6, 7, 8]))
    assert m["cond_local_acc"] is None and m["len_local"] is None
    assert m["local_acc"] == 0.0 and m["len_help"] == 6.5 and m["acc_capped"] == 0.5
    # no prompt asks: no help-call length
    m = capped_metrics(torch.zeros(4).bool(), torch.tensor([1, 0, 0, 1]).bool(),
                       torch.ones(4).bool(), 0.5, torch.tensor([5, 6, 7, 8]))
    assert m["len_help"] is None and m["cond_local_acc"] == 0.5 and m["len_local"] == 6.5
    # an evaluation of no prompts has no metrics at all; flags of different lengths are a bug
    with pytest.raises(ValueError, match=r"N >= 1; got shapes \(0,\), \(0,\), \(0,\)"):
        capped_metrics(torch.zeros(0).bool(), torch.zeros(0).bool(), torch.zeros(0).bool(), 0.3)
    with pytest.raises(ValueError, match=r"got shapes \(3,\), \(2,\), \(3,\)"):
        capped_metrics(torch.zeros(3).bool(), torch.zeros(2).bool(), torch.zeros(3).bool(), 0.3)
    # [2, 2] flags are not 4 prompts, even beside flags of length 4
    with pytest.raises(ValueError, match=r"got shapes \(2, 2\), \(4,\), \(4,\)"):
        capped_metrics(torch.eye(2).bool(), torch.zeros(4).bool(), torch.zeros(4).bool(), 0.3)
    for budget in (float("nan"), -0.5, 2, "0.3", None):
        with pytest.raises(ValueError, match=f"budget must be a share of prompts in \\[0, 1\\], "
                                             f"got {budget!r}"):
            capped_metrics(torch.zeros(3).bool(), torch.zeros(3).bool(), torch.zeros(3).bool(), budget)
    with pytest.raises(ValueError, match=r"len_tokens must be \[N\] = \[2\], got shape \(1,\)"):
        capped_metrics(torch.zeros(2).bool(), torch.zeros(2).bool(), torch.zeros(2).bool(), 0.5, [3])

def test_routing_curve_by_hand():
    local, cloud, order = [1, 0, 1, 0], [1, 1, 0, 1], [3, 0, 2, 1]
    c, a = ev.routing_curve(order, local, cloud)
    # k=0: 2/4; send 3 (0->1): 3/4; send 0 (1->1): 3/4; send 2 (1->0): 2/4; send 1 (0->1): 3/4
    assert c.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert a.tolist() == pytest.approx([0.5, 0.75, 0.75, 0.5, 0.75])
    with pytest.raises(ValueError, match="permutation"):
        ev.routing_curve([0, 0, 1, 2], local, cloud)


def test_apgr_and_cpt_by_hand():
    c = [0, 0.25, 0.5, 0.75, 1.0]
    a = [0.5, 0.7, 0.8, 0.85, 0.9]
    s = ev.gap_recovered(c, a)
    # PGR = [0, .5, .75, .875, 1]; trapezoids of width .25: (.25 + .625 + .8125 + .9375) * .25
    assert s["apgr"] == pytest.approx(0.65625)
    assert s["cpt50"] == 0.25 and s["cpt80"] == 0.75
    assert s["curve_local_acc"] == 0.5 and s["curve_cloud_acc"] == 0.9
    # explicit reference accuracies: PGR = (a - .4) / .6 = [1/6, 1/2, 2/3, 3/4, 5/6]
    s = ev.gap_recovered(c, a, acc_local=0.4, acc_cloud=1.0)
    assert s["apgr"] == pytest.approx(0.25 * (1 / 3 + 7 / 12 + 17 / 24 + 19 / 24))
    assert s["cpt50"] == 0.25 and s["cpt80"] == 1.0
    # a straight line (random routing in expectation) recovers half of the gap
    assert ev.gap_recovered([0, 0.5, 1], [0.2, 0.5, 0.8])["apgr"] == pytest.approx(0.5)
    none = ev.gap_recovered([0, 1], [0.6, 0.6])
    assert none["apgr"] is None and none["cpt50"] is None


def test_auroc_by_hand():
    assert ev.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts 1/2: (0.5 + 1) / 2
    assert ev.auroc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)
    assert ev.auroc([0.3, 0.2], [1, 1]) is None

# ----------------------------------------------------------------------------- SPEC 8 routing


LOCAL = [1, 0, 1, 0, 0, 1, 1, 0]
CLOUD = [1, 1, 0, 1, 1, 1, 0, 0]


def test_oracle_routing_by_hand():
    # wrong prompts: 1, 3, 4, 7, of which the cloud gets 1, 3, 4 right. Budget 0.25 -> cap 2:
    # send 1 and 3
    order = ev.oracle_order(LOCAL, CLOUD)
    assert order.tolist() == [1, 3, 4, 7, 0, 5, 2, 6]   # 0, 5: both right; 2, 6: only local
    m = ev.routed_metrics(order, min(cloud_cap(8, 0.25), 3), LOCAL, CLOUD, 0.25)
    assert m["help_calls"] == 2 and m["call_ratio"] == pytest.approx(0.25)
    assert m["local_acc"] == pytest.approx(4 / 8)
    assert m["cond_local_acc"] == pytest.approx(4 / 6)
    assert m["acc_capped"] == pytest.approx(6 / 8) and m["acc_uncapped"] == pytest.approx(6 / 8)
    # budget 0.75 -> cap 6, but only the 3 calls that gain go: 1, 3, 4 (7 is wrong in the cloud)
    m = ev.routed_metrics(order, min(cloud_cap(8, 0.75), 3), LOCAL, CLOUD, 0.75)
    assert m["call_ratio"] == pytest.approx(3 / 8) and m["acc_capped"] == pytest.approx(7 / 8)
    # a prompt the cloud also gets wrong comes after one it gets right, whatever their order
    local, cloud = [1, 0, 1, 0, 0], [1, 0, 1, 1, 1]
    order = ev.oracle_order(local, cloud)
    assert order.tolist() == [3, 4, 1, 0, 2]
    assert ev.routed_metrics(order, 1, local, cloud, 0.2)["acc_capped"] == pytest.approx(3 / 5)


def test_oracle_curve_is_an_upper_bound_at_every_call_ratio():
    # prompt 0: only the device is right (sending it loses), 1: both right (no change), 2: only
    # the cloud is right (gains). Best at k calls: 2/3, then 3/3 (send 2), 3/3 (send 2 and 1),
    # 2/3 (all); sending 0 before 1 would drop k=2 to 2/3
    local, cloud = [1, 1, 0], [0, 1, 1]
    assert ev.oracle_order(local, cloud).tolist() == [2, 1, 0]
    _, acc = ev.routing_curve(ev.oracle_order(local, cloud), local, cloud)
    assert acc.tolist() == pytest.approx([2 / 3, 1, 1, 2 / 3])
    # no ordering of 8 prompts does better at any k
    _, best = ev.routing_curve(ev.oracle_order(LOCAL, CLOUD), LOCAL, CLOUD)
    for perm in itertools.permutations(range(8)):
        assert (ev.routing_curve(perm, LOCAL, CLOUD)[1] <= best + 1e-12).all()


def test_naive_routing_sends_a_seeded_random_share():
    order = ev.naive_order(8, seed=3)
    assert sorted(order.tolist()) == list(range(8))
    assert ev.naive_order(8, seed=3).tolist() == order.tolist()
    assert any(ev.naive_order(8, seed=s).tolist() != order.tolist() for s in range(4, 8))
    sent = set(order[:2].tolist())
    expected = sum(CLOUD[i] if i in sent else LOCAL[i] for i in range(8)) / 8
    m = ev.routed_metrics(order, cloud_cap(8, 0.25), LOCAL, CLOUD, 0.25)
    assert m["help_calls"] == 2 and m["acc_capped"] == pytest.approx(expected)


def test_router_order_sends_lowest_scores_first():
    assert ev.router_order([0.9, 0.1, 0.5, 0.1]).tolist() == [1, 3, 2, 0]  # ties: dataset order


def test_policy_curve_endpoints_are_local_only_and_cloud_only():
    help = [1, 0, 1, 0]
    local = [0, 1, 1, 0]          # index 2 asked for help: its local verdict is not this one
    answered = [1, 0, 0, 0]       # made to answer: prompt 0 right, prompt 2 wrong
    cloud = [1, 0, 1, 1]
    preference = [2.0, -1.0, 0.5, -3.0]   # order 0, 2, 1, 3
    c, a, kept = ev.policy_curve(help, local, answered, cloud, preference)
    assert kept.tolist() == [True, True, False, False]
    # k=0: 2/4; send 0 (1->1) 2/4; send 2 (0->1) 3/4; send 1 (1->0) 2/4; send 3 (0->1) 3/4
    assert a.tolist() == pytest.approx([0.5, 0.5, 0.75, 0.5, 0.75])
    assert a[0] == pytest.approx(np.mean(kept)) and a[-1] == pytest.approx(np.mean(cloud))
    # the policy's own choice (help on 0 and 2, uncapped: 1 local + 2 cloud) is the k=2 point
    m = capped_metrics(torch.tensor(help).bool(), torch.tensor(local).bool(),
                       torch.tensor(cloud).bool(), 1.0)
    assert m["acc_uncapped"] == pytest.approx(a[2])

def test_capped_curve_by_hand():
    help = [1, 0, 1, 1, 0]
    local = [1, 1, 0, 0, 0]       # prompt 0 asked for help: its local verdict never counts
    cloud = [0, 0, 1, 1, 1]
    c, a = ev.capped_curve(help, local, cloud)
    # 1 right local answer (prompt 1); help calls 0, 2, 3 served in dataset order: +0, +1, +1
    assert c.tolist() == pytest.approx([0, 0.2, 0.4, 0.6])
    assert a.tolist() == pytest.approx([0.2, 0.2, 0.4, 0.6])
    for cap in range(4):   # each point is capped_metrics' acc_capped at that cap (budget cap / N)
        m = capped_metrics(torch.tensor(help).bool(), torch.tensor(local).bool(),
                           torch.tensor(cloud).bool(), cap / 5)
        assert m["acc_capped"] == pytest.approx(a[cap])
    assert ev.capped_curve([0, 0], [1, 0], [1, 1])[1].tolist() == [0.5]   # no help calls
    with pytest.raises(ValueError, match="one length"):
        ev.capped_curve([0, 1], [1], [1, 1])


# ----------------------------------------------------------------------------- decision point


def test_decision_split():
    tiny = make_task("tiny_countdown", n_train=4, n_test=4)
    assert tiny.decision_split("[007+003=010]10#23#03#H") == ("[007+003=010]10#23#03#", "H", "A")
    assert tiny.decision_split("[007+0") == ("[007+0", "H", "A")
    cd = make_task("countdown", n_train=4, n_test=4)
    assert cd.decision_split("<think>a</think> <answer>1+2</answer>") == \
        ("<think>a</think>", " " + HELP_MARKER, " <answer>")
    assert cd.decision_split("<think>stuck</think>\n" + HELP_MARKER) == \
        ("<think>stuck</think>", "\n" + HELP_MARKER, "\n<answer>")


def tiny_model(vocab_size, seed=0, layers=1):
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=64, eos_token_id=1)
    return Transformer(cfg).init_weights(seed, std=0.5).eval()


def test_continuation_logprobs_match_unpadded_forwards():
    model = tiny_model(12, seed=1)
    prefixes = [[2, 3, 4], [5], [6, 7, 8, 9, 10, 2]]
    conts = [[5, 6], [7, 8, 9], [11]]
    got = ev.continuation_logprobs(model, prefixes, conts, pad_id=0)
    for p, c, g in zip(prefixes, conts, got):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, torch.arange(ids.shape[1])[None]).double(), -1)[0]
        want = sum(logp[len(p) + j - 1, t] for j, t in enumerate(c))
        assert float(g) == pytest.approx(float(want), abs=1e-4)


@pytest.mark.parametrize("max_elements", [1, 3000, 2 ** 27])
def test_continuation_logprobs_are_the_same_however_they_are_batched(max_elements):
    model = tiny_model(12, seed=2)
    rng = random.Random(0)
    prefixes = [[rng.randrange(2, 12) for _ in range(rng.randint(1, 30))] for _ in range(12)]
    conts = [[rng.randrange(2, 12) for _ in range(rng.randint(1, 4))] for _ in range(12)]
    got = ev.continuation_logprobs(model, prefixes, conts, pad_id=0, max_elements=max_elements)
    for p, c, g in zip(prefixes, conts, got):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, torch.arange(ids.shape[1])[None]).double(), -1)[0]
        assert float(g) == pytest.approx(float(sum(logp[len(p) + j - 1, t] for j, t in enumerate(c))),
                                         abs=1e-4)


def test_scoring_and_router_training_report_their_progress():
    """The stages that ran with a frozen line (the line and its clock stood still until they
    ended): the decision scores count continuations, the router's fit its steps."""
    model = tiny_model(12, seed=2)
    seen = []
    ev.continuation_logprobs(model, [[2, 3]] * 5, [[4]] * 5, pad_id=0, max_elements=30,
                             progress=lambda d, t: seen.append((d, t)))
    # a row costs max(2 projected positions * 12, 3 positions * 64) = 192: one row a batch
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    seen.clear()
    x, y = torch.randn(40, 3), np.arange(40) % 2 == 0
    linear = torch.nn.Linear(3, 1)
    ev.fit_bce(lambda idx: linear(x[idx])[:, 0], list(linear.parameters()), y, steps=7,
               batch_size=8, lr=0.01, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(k, 7) for k in range(1, 8)]


def test_decision_scores_report_both_continuations_of_every_prompt():
    task = make_task("tiny_countdown", n_train=4, n_test=8)
    tok = build_char_tokenizer(task.alphabet)
    ex = task.examples("test")[:3]
    model = tiny_model(tok.vocab_size, seed=0)
    seen = []
    texts = [ex[0].data["solution"] + "xxxA", "xxH", ex[2].data["solution"] + "xxH"]
    ev.help_preference(model, tok, task, ex, texts, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (6, 6) and all(t == 6 for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[0][0] <= 3


@pytest.mark.parametrize("max_elements, forwards", [(43008, 1), (43007, 2)])
def test_continuation_batches_count_logits_only_where_they_are_projected(max_elements, forwards):
    """16 rows of a 40-token prefix and a 2-token continuation, vocabulary 200, MLP width 64: a
    row costs max(3 projected positions * 200, 42 positions * 64) = 2,688 elements, so 16 rows
    fit 43,008 (counting all 42 positions' logits, 8,400 a row, would allow 5 a batch)."""
    model = tiny_model(200)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    ev.continuation_logprobs(model, [[5] * 40] * 16, [[6, 7]] * 16, pad_id=0,
                             max_elements=max_elements)
    assert len(calls) == forwards


def test_answered_locally_tiny_task_needs_no_decoding():
    task = make_task("tiny_countdown", n_train=4, n_test=8)
    tok = build_char_tokenizer(task.alphabet)
    ex = task.examples("test")[:2]
    right = ex[0].data["solution"] + "xxx"              # the check is not graded
    wrong = task.wrong_chain(ex[1], __import__("random").Random(0)) + "xxx"
    splits = [task.decision_split(right + "H"), task.decision_split(wrong + "H")]
    assert ev.answered_locally(None, tok, task, ex, splits, 8) == [True, False]

# ----------------------------------------------------------------------------- routers


def test_router_ranks_prompts_whose_probability_rounds_to_1():
    """Logits 20, 30 and 25 are all P = 1.0 in fp32: ranked by the probability, the three tied
    and went in dataset order; by the router's logit, the least sure goes first."""
    router = ev.ProbeRouter(None, pad_id=0)
    prompts = [[1], [2], [3]]
    router._train = (prompts, torch.tensor([[20.0], [30.0], [25.0]]))
    router.linear = torch.nn.Linear(1, 1)
    with torch.no_grad():
        router.linear.weight.fill_(1.0)
        router.linear.bias.zero_()
    assert ev.router_order(router.predict(prompts)).tolist() == [0, 2, 1]
    assert ev.auroc(router.predict(prompts), np.array([False, True, True])) == 1.0


def test_router_beats_chance_when_difficulty_is_in_the_prompt(one_thread):
    rng = np.random.default_rng(0)

    def make(n):  # "hard" prompts start with a large number; the label is "answered right"
        prompts = [[int(x) for x in rng.integers(2, 12, size=8)] for _ in range(n)]
        return prompts, np.array([p[0] < 7 for p in prompts])

    train, test = make(500), make(200)
    router = ev.TinyRouter(vocab_size=12, pad_id=0, max_len=8, seed=0)
    router.fit(*train, steps=60, lr=3e-3)
    assert ev.auroc(router.predict(test[0]), test[1]) > 0.75


def test_logistic_probe_fit_and_hidden_states():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=gen)
    y = (x[:, 0] - 0.5 * x[:, 1] > 0).numpy()
    linear = torch.nn.Linear(5, 1)
    ev.fit_bce(lambda idx: linear(x[idx])[:, 0], list(linear.parameters()), y[:300], steps=100,
               batch_size=64, lr=0.05)
    with torch.no_grad():
        assert ev.auroc(linear(x[300:])[:, 0], y[300:]) > 0.9
    # features: the final-norm hidden state at each prompt's last token, padding or not
    model = tiny_model(12, seed=2)
    seen = []
    handle = model.norm.register_forward_hook(lambda m, i, o: seen.append(o[0, -1].clone()))
    prompts = [[2, 3, 4, 5], [6, 7]]
    with torch.no_grad():
        for p in prompts:
            model(torch.tensor([p]), torch.arange(len(p))[None])
    handle.remove()
    h = ev.last_hidden_states(model, prompts, pad_id=0)
    assert torch.allclose(h, torch.stack(seen), atol=1e-5)
    assert isinstance(model.lm_head, torch.nn.Linear)    # restored

# ----------------------------------------------------------------------------- command line


def chat_char_tokenizer():
    """A character-level tokenizer with ChatML markup, standing in for a pretrained model's."""
    import string
    tok = build_char_tokenizer(string.printable)
    tok.tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.chat_format = "chatml"
    return tok


def write_run(root, name, allow_help, seed, task="tiny_countdown", max_new_tokens=40):
    """A run directory as train.py leaves it, holding a tiny random checkpoint. task="countdown"
    stands in for a pretrained model (Template I chat prompts, model.path set: probe router)."""
    if task == "tiny_countdown":
        task_cfg = {"name": task, "n_numbers": 3, "number_range": [1, 20], "ops": "+-*"}
        tok, model_path, max_len = build_char_tokenizer(make_task(task).alphabet), "", 64
    else:
        task_cfg = {"name": task, "n_numbers": 3, "number_range": [1, 20], "ops": "+-*"}
        tok, model_path, max_len = chat_char_tokenizer(), "(a pretrained model)", 1024
    task_cfg.update(n_train=60, n_test=30, seed=0, allow_help=allow_help)
    path = os.path.join(root, name)
    model = tiny_model(tok.vocab_size, seed)
    model.config.max_position_embeddings = max_len
    save_pretrained(model, os.path.join(path, "checkpoint"), tok)
    cfg = {"name": name, "seed": 0, "device": "cpu", "model": {"path": model_path},
           "task": task_cfg, "cloud": {"backend": "oracle", "p_correct": 0.9, "seed": 0},
           "rl": {"algo": "gapg", "filter": "any_correct"},
           "sampling": {"max_new_tokens": max_new_tokens, "temperature": 1.0, "top_k": 0,
                        "top_p": 1.0},
           "eval": {"every": 0, "n": 20, "budget": 0.3, "batch_size": 64}}
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with open(os.path.join(path, "final_eval.json"), "w") as f:  # train.py finished it
        f.write("{}")
    return path


def test_an_unfinished_run_is_evaluated_with_a_note(tmp_path, capsys, monkeypatch):
    policy = write_run(tmp_path, "policy", True, seed=1)
    os.remove(os.path.join(policy, "final_eval.json"))      # stopped at step 7 of 240
    with open(os.path.join(policy, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps({"train/step": s}) + "\n" for s in range(1, 8)))
    with open(os.path.join(policy, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["rl"]["steps"] = 240
    with open(os.path.join(policy, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    res = ev.main([policy, "--n", "4", "--router-n", "0"])
    note = f"{policy} has not finished training (logged up to step 7 of 240)"
    assert f"{note}; its last checkpoint is evaluated" in res.notes   # no trainer state to read
    assert f"note: {note}" in capsys.readouterr().out
    # killed at step 7, its last checkpoint saved at step 5: the note names the step evaluated
    torch.save({"step": 5, "dual": 0.0, "optimizer": {}},
               os.path.join(policy, "checkpoint", "trainer_state.pt"))
    res = ev.main([policy, "--n", "4", "--router-n", "0"])
    assert f"{note}; its last checkpoint, from step 5, is evaluated" in res.notes
    # still training: train.py saves its step-6 checkpoint after the note, before the loading
    real_load = ev.load_pretrained

    def saved_meanwhile(path, **kw):
        torch.save({"step": 6, "dual": 0.0, "optimizer": {}}, os.path.join(path, "trainer_state.pt"))
        return real_load(path, **kw)
    monkeypatch.setattr(ev, "load_pretrained", saved_meanwhile)
    res = ev.main([policy, "--n", "4", "--router-n", "0"])
    monkeypatch.undo()
    assert f"{note}; its last checkpoint, from step 5, is evaluated" in res.notes
    assert (f"{policy}: train.py saved a newer checkpoint during this evaluation: the one "
            f"evaluated is from step 6, not step 5") in res.notes
    res = ev.main([policy, "--n", "4", "--router-n", "0"])  # no save meanwhile: no such note
    assert not any("newer checkpoint" in n for n in res.notes)
    # finished, but early: rl.time_limit_min stopped it at step 7 (train.py then evaluates it)
    with open(os.path.join(policy, "final_eval.json"), "w") as f:
        json.dump({"acc_capped": 0.5}, f)
    res = ev.main([policy, "--n", "4", "--router-n", "0"])
    assert f"{policy} stopped training at step 7 of 240 (rl.time_limit_min)" in res.notes[0]
    cfg["rl"]["steps"] = 7   # trained to its rl.steps: no note
    with open(os.path.join(policy, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    assert not [n for n in ev.main([policy, "--n", "4", "--router-n", "0"]).notes if "training" in n]


def test_runs_share_a_task_whether_its_defaults_are_written_out_or_not(tmp_path):
    """train.py gives default.yaml's written-out task and task={name: tiny_countdown} one warm
    start; eval.py likewise puts both in one table, and refuses runs of another task."""
    written = write_run(tmp_path, "written", True, seed=1)
    short = write_run(tmp_path, "short", True, seed=2)
    other = write_run(tmp_path, "other", True, seed=3)
    for path, task in ((short, {"name": "tiny_countdown", "n_train": 60, "n_test": 30}),
                       (other, {"name": "tiny_countdown", "n_train": 60, "n_test": 30, "seed": 1})):
        with open(os.path.join(path, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        cfg["task"] = task
        with open(os.path.join(path, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
    res = ev.main([written, short, "--n", "4", "--router-n", "0"])
    assert [key for key, _, _ in res.rows if key.startswith("policy:")] == [f"policy:{written}",
                                                                             f"policy:{short}"]
    with pytest.raises(SystemExit, match=f"{re.escape(other)} and {re.escape(written)} use "
                                         f"different tasks"):
        ev.main([written, other, "--n", "4", "--router-n", "0"])


def test_runs_that_set_another_budget_or_n_are_noted(tmp_path):
    """Without --budget / --n, the first run's eval settings apply to the whole table; a run
    whose config.yaml sets others is named, not silently evaluated under the first's."""
    first = write_run(tmp_path, "first", True, seed=1)
    other = write_run(tmp_path, "other", True, seed=2)
    with open(os.path.join(other, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["eval"].update(budget=None, n=12)   # null: rho / (1 + rho) = 0.3 at the default rho 3/7
    with open(os.path.join(other, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    res = ev.main([first, other, "--router-n", "0"])
    assert res.settings["budget"] == 0.3 and res.settings["n"] == 20
    assert not [n for n in res.notes if "budget" in n]     # null resolves to the same 0.3
    assert f"the 20 prompts are {first}'s eval.n; {other} set(s) another (--n sets one for all)" \
        in res.notes
    cfg["eval"]["budget"] = 0.2
    with open(os.path.join(other, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    res = ev.main([first, other, "--router-n", "0", "--n", "4"])
    assert f"the budget 0.3 comes from {first}'s config.yaml; {other} set(s) another (--budget " \
        "sets one for all)" in res.notes
    assert not [n for n in res.notes if "prompts are" in n]   # --n chose for all
    assert not [n for n in ev.main([first, other, "--router-n", "0", "--n", "4", "--budget", "0.2"]).notes
                if "budget" in n]


def test_a_budget_prints_as_given_not_rounded_to_a_whole_percent(tmp_path, capsys):
    policy = write_run(tmp_path, "policy", True, seed=1)
    res = ev.main([policy, "--n", "16", "--budget", "0.125", "--router-n", "0"])
    out = capsys.readouterr().out
    assert "budget 12.5% (cap 2 calls)" in out and "naive offloading (random 12.5%)" in out
    assert res.settings["cap"] == 2   # floor(16 * 0.125)


def test_cli_end_to_end(tmp_path, capsys):
    policy = write_run(tmp_path, "policy", True, seed=1)
    tuned = write_run(tmp_path, "tuned", False, seed=2)
    ev.main([policy, tuned, "--budget", "0.25", "--router-n", "40", "--router-steps", "5"])
    printed = capsys.readouterr().out
    assert "oracle router" in printed
    wrote = printed.splitlines()[-1]
    for f in ("eval.json", "report.md", "curve.csv"):  # the policy's (the combined report's)
        assert os.path.join(policy, f) in wrote and os.path.join(tuned, f) in wrote
    report = open(os.path.join(policy, "report.md")).read()
    for text in ("| method | call ratio | local acc | cond. local acc | acc capped | acc uncapped | APGR",
                 "cloud only", "task-tuning only (tuned)", "naive offloading", "router", "oracle",
                 "policy (gapg)", "budget: 25%", "N = 20", "curve.csv"):
        assert text in report
    lines = open(os.path.join(policy, "curve.csv")).read().splitlines()
    capped = [tuple(map(float, line.rsplit(",", 2)[1:])) for line in lines
              if line.startswith('"policy (gapg), capped"')]
    try:
        import matplotlib  # noqa: F401
        assert os.path.exists(os.path.join(policy, "curve.png")) and "(curve.png)" in report
    except ImportError:
        assert "matplotlib is not installed" in report
    d = json.load(open(os.path.join(policy, "eval.json")))
    assert d["role"] == "policy" and d["settings"]["n"] == 20 and d["settings"]["cap"] == 5
    assert set(d["baselines"]) == {"cloud_only", "task_tuning_only", "naive", "router", "oracle"}
    m = d["metrics"]
    documented = ("call_ratio", "help_calls", "calls_served", "local_acc", "cond_local_acc",
                  "acc_capped", "acc_uncapped", "len_help", "len_local", "clipped_ratio",
                  "answer_rate", "apgr", "cpt50", "cpt80", "curve_local_acc", "curve_cloud_acc")
    for key in documented:
        assert key in m
    # every baseline row has the keys of a policy's metrics, null where it has no such value
    policy_only = {"cloud_requests", "cloud_failed", "decision_agreement"}
    extras = {"capped", "auroc_train", "auroc_test"}     # cloud_only's and router's own keys
    for key, b in d["baselines"].items():
        assert set(b) - extras == set(m) - policy_only, key
    for key in ("cloud_only", "naive", "router", "oracle"):     # no responses of their own
        b = d["baselines"][key]
        assert [b[k] for k in ("len_help", "len_local", "clipped_ratio", "answer_rate")] == \
            [None] * 4
    tt, cloud_only = d["baselines"]["task_tuning_only"], d["baselines"]["cloud_only"]
    assert tt["len_local"] > 0 and tt["apgr"] is None and cloud_only["apgr"] is None
    assert m["calls_served"] == min(m["help_calls"], 5)
    # the capped curve runs from no calls to the policy's own (uncapped) point, through acc capped
    assert len(capped) == m["help_calls"] + 1 and capped[0][0] == 0
    assert capped[-1] == pytest.approx((m["call_ratio"], m["acc_uncapped"]), abs=1e-6)
    assert capped[m["calls_served"]][1] == pytest.approx(m["acc_capped"], abs=1e-6)
    # the policy's curve ends at cloud only (same cloud); it starts at its local-only accuracy
    assert m["curve_cloud_acc"] == pytest.approx(d["baselines"]["cloud_only"]["acc_uncapped"])
    assert m["curve_local_acc"] >= m["local_acc"] - 1e-9
    for key in ("naive", "router", "oracle"):
        b = d["baselines"][key]
        assert b["curve_local_acc"] == pytest.approx(d["baselines"]["task_tuning_only"]["acc_uncapped"])
        assert b["curve_cloud_acc"] == pytest.approx(d["baselines"]["cloud_only"]["acc_uncapped"])
    t = json.load(open(os.path.join(tuned, "eval.json")))
    assert t["role"] == "task_tuned" and t["metrics"]["call_ratio"] == 0.0
    assert os.path.exists(os.path.join(tuned, "report.md"))


def test_a_cloud_call_that_fails_once_keeps_its_verdict_in_the_report(tmp_path, monkeypatch):
    # each prompt's first call to a backend fails, a second would succeed: within one report a
    # prompt keeps its first verdict, so the baselines, the policy's capped point and its curves
    # all count the same (failed) answers, and a note says so
    real = cloud_module.OracleBackend.complete

    def first_call_fails(self, task, examples):
        seen = self.__dict__.setdefault("seen", set())
        texts = [t if e.key in seen else ConnectionError("first call fails")
                 for e, t in zip(examples, real(self, task, examples))]
        seen.update(e.key for e in examples)
        return texts

    monkeypatch.setattr(cloud_module.OracleBackend, "complete", first_call_fails)
    policy = write_run(tmp_path, "policy", True, seed=1)
    res = ev.main([policy, "--n", "20", "--router-n", "0"])
    m = json.load(open(os.path.join(policy, "eval.json")))["metrics"]
    assert m["calls_served"] >= 1      # the served help calls all failed: local answers only
    assert m["acc_capped"] == pytest.approx(m["local_acc"])
    label = next(iter(res.capped))
    calls, acc = res.capped[label]
    assert acc[m["calls_served"]] == pytest.approx(m["acc_capped"])
    assert m["curve_cloud_acc"] == 0.0   # every prompt's one call failed
    note = f"{policy}: the cloud call failed for 20 prompt(s) (first error: ConnectionError"
    assert any(n.startswith(note) for n in res.notes)


def test_cli_errors_name_the_problem(tmp_path, no_evaluation):
    with pytest.raises(SystemExit, match="no such run directory"):
        ev.main([str(tmp_path / "missing")])
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(SystemExit, match=r"config\.yaml: a file, not a run directory"):
        ev.main([str(tmp_path / "config.yaml")])
    (tmp_path / "notrun").mkdir()
    with pytest.raises(SystemExit, match="no config.yaml, so this is not a train.py run"):
        ev.main([str(tmp_path / "notrun")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text("task: {name: tiny_countdown}\n")
    with pytest.raises(SystemExit, match="no checkpoint/model.safetensors"):
        ev.main([str(tmp_path / "empty")])
    run = write_run(tmp_path, "p", True, seed=0)
    with pytest.raises(SystemExit, match=r"--budget=1.5 is not allowed.*\[0, 1\]"):
        ev.main([run, "--budget", "1.5"])
    with pytest.raises(SystemExit, match="--n=99 is not allowed: the test split has 30"):
        ev.main([run, "--n", "99"])
    with pytest.raises(SystemExit, match="trained with help allowed"):
        ev.main([run, "--task-tuned", run])
    with pytest.raises(SystemExit,
                       match=r"--split='dev' is not allowed; use one of \['train', 'test'\]"):
        ev.main([run, "--split", "dev"])
    with pytest.raises(SystemExit, match="given more than once"):
        ev.main([run, run + os.sep])


def run_with_config(tmp_path, name, edit):
    """A tiny run whose config.yaml is edit(the config text)."""
    run = write_run(tmp_path, name, True, seed=0)
    config = os.path.join(run, "config.yaml")
    with open(config) as f:
        text = edit(f.read())
    with open(config, "w") as f:
        f.write(text)
    return run


@pytest.fixture
def no_evaluation(monkeypatch):
    """The errors below must come before any decoding: fail if the evaluation starts."""
    monkeypatch.setattr(ev, "evaluate_baselines",
                        lambda *a, **k: pytest.fail("evaluation started despite bad input"))


def test_a_cloud_section_edited_after_training_is_an_error_before_any_decoding(tmp_path,
                                                                                no_evaluation):
    """The run's cache holds the answers of the cloud it trained with; its config.yaml now names
    another (p_correct 0.9 -> 0.5): refused at start, as train.py refuses it on resume, not at
    the first cloud call after the whole greedy decoding."""
    run = write_run(tmp_path, "edited", True, seed=0)
    task = make_task("tiny_countdown", n_numbers=3, number_range=[1, 20], ops="+-*", n_train=60,
                     n_test=30, seed=0)
    trained_with = cloud_module.make_cloud({"backend": "oracle", "p_correct": 0.9, "seed": 0},
                                           cache_path=os.path.join(run, "cloud_cache.jsonl"))
    trained_with.ask(task, task.examples("test")[:2])
    config = os.path.join(run, "config.yaml")
    with open(config) as f:
        text = f.read()
    with open(config, "w") as f:
        f.write(text.replace("p_correct: 0.9", "p_correct: 0.5"))
    message = exit_message([run])
    assert "holds answers of backend 'oracle', model 'oracle(p_correct=0.9,seed=0)'" in message
    assert message.endswith(f"set the cloud section of {config} back to what this run used")


def exit_message(args):
    """The SystemExit message of ev.main(args): one line, and an exit status other than 0."""
    with pytest.raises(SystemExit) as e:
        ev.main(args)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code   # sys.exit(text): status 1
    return e.value.code


def test_cli_bad_run_files_are_one_line_errors(tmp_path, no_evaluation):
    bad_yaml = run_with_config(tmp_path, "bad_yaml", lambda t: "task: [unclosed\n")
    assert re.search(r"bad_yaml/config.yaml is not valid YAML: .* at line 2",
                     exit_message([bad_yaml]))
    a_list = run_with_config(tmp_path, "a_list", lambda t: "- 1\n")
    assert "a_list/config.yaml is not a train.py config" in exit_message([a_list])
    zero_batch = run_with_config(tmp_path, "zero_batch",
                                 lambda t: t.replace("batch_size: 64", "batch_size: 0"))
    assert "eval.batch_size=0 is not allowed: an integer >= 1" in exit_message([zero_batch])
    big_budget = run_with_config(tmp_path, "big_budget",
                                 lambda t: t.replace("budget: 0.3", "budget: 2"))
    assert re.search(r"big_budget/config.yaml: eval.budget=2 is not allowed.*\[0, 1\]",
                     exit_message([big_budget]))
    assert "bad_n/config.yaml: eval.n=-1 is not allowed" in exit_message(
        [run_with_config(tmp_path, "bad_n", lambda t: t.replace("n: 20", "n: -1"))])
    assert "abc_n/config.yaml: eval.n='abc' is not allowed" in exit_message(
        [run_with_config(tmp_path, "abc_n", lambda t: t.replace("n: 20", "n: abc"))])


def test_a_damaged_rl_section_config_encoding_or_metrics_line_is_a_one_line_error_or_ignored(
        tmp_path):
    """An `rl:` that is not a mapping and a config.yaml that is not UTF-8 were a traceback and
    an error naming no file; a metrics.jsonl line that is JSON but not an object (read only for
    the unfinished-run note) was a traceback."""
    rl_list = run_with_config(tmp_path, "rl_list", lambda t: t.replace("rl:", "rl: [1]\nold_rl:"))
    assert ("rl_list/config.yaml: section 'rl' must be a mapping of its settings, got [1]"
            in exit_message([rl_list, "--n", "2", "--router-n", "0"]))
    latin = run_with_config(tmp_path, "latin", lambda t: t + "# caf\xe9\n")
    with open(os.path.join(latin, "config.yaml"), "r+b") as f:
        text = f.read().replace("\xe9".encode(), b"\xe9")   # Latin-1, not UTF-8
        f.seek(0), f.truncate(), f.write(text)
    assert re.search(r"latin/config.yaml is not UTF-8 text \(invalid continuation byte at byte "
                     r"\d+\); save it as UTF-8", exit_message([latin, "--n", "2"]))
    run = write_run(tmp_path, "listed", True, seed=1)
    os.remove(os.path.join(run, "final_eval.json"))
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write('{"train/step": 1}\n{"train/step": 3}\n[3]\n')
    res = ev.main([run, "--n", "2", "--router-n", "0"])
    assert any(n.startswith(f"{run} has not finished training (logged up to step 3 of ?)")
               for n in res.notes)


def test_the_recorded_command_runs_the_same_evaluation_when_pasted_into_a_shell(tmp_path):
    """A run directory whose name holds a space was recorded unquoted in eval.json and
    report.md, so the command read back named two directories."""
    run = write_run(tmp_path, "my run", True, seed=1)
    args = [run, "--n", "2", "--router-n", "0"]
    ev.main(args)
    command = json.load(open(os.path.join(run, "eval.json")))["settings"]["command"]
    assert shlex.split(command) == ["python", "eval.py"] + args
    assert f"- command: `{command}`" in open(os.path.join(run, "report.md")).read()


def test_an_empty_split_is_an_error_naming_it(tmp_path, no_evaluation):
    """A hand-edited task with no test prompts (train.py refuses one) failed inside the greedy
    decode, naming neither the split nor the run."""
    run = run_with_config(tmp_path, "empty", lambda t: t.replace("n_test: 30", "n_test: 0"))
    for n in ([], ["--n", "0"]):   # eval.n = 20 of none, or all of none
        assert exit_message([run, "--router-n", "0"] + n) == (
            f"eval error: the test split of {run}'s task has no examples (its config.yaml's "
            "task section); evaluate a split that has some")


def test_a_null_budget_is_rho_over_one_plus_rho(tmp_path):
    run = write_run(tmp_path, "p", True, seed=0)
    with open(os.path.join(run, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["eval"]["budget"], cfg["rl"]["rho"] = None, 0.25
    with open(os.path.join(run, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    res = ev.evaluate_runs([run], n=10, router_n=0)
    assert res.settings["budget"] == pytest.approx(0.2) and res.settings["cap"] == 2


@pytest.mark.parametrize("name, content, message", [
    ("model.safetensors", b"not safetensors", "model.safetensors: the weights cannot be read"),
    ("tokenizer.json", b'{"broken', "tokenizer.json: cannot be read as a tokenizer"),
    ("config.json", b"{", "config.json: not valid JSON"),
    ("tokenizer_config.json", b"[1,", "tokenizer_config.json: not valid JSON"),
])
def test_cli_corrupt_checkpoint_is_a_one_line_error(tmp_path, name, content, message):
    run = write_run(tmp_path, "corrupt", True, seed=0)
    with open(os.path.join(run, "checkpoint", name), "wb") as f:
        f.write(content)
    assert f"corrupt/checkpoint/{message}" in exit_message([run, "--n", "2"])


def test_cli_device_must_exist_here(tmp_path, no_evaluation):
    run = write_run(tmp_path, "p", True, seed=0)
    bad = ["tpu", "cuda:x", "cuda:99", "mps"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        text = exit_message([run, "--device", device])
        assert text.startswith(f"eval error: --device={device!r} is not allowed; use cpu"), text
    if not torch.cuda.is_available():
        assert text.endswith("use cpu (no CUDA device is available here)")
    assert ev.resolve_device("cpu") == torch.device("cpu")


def test_cli_rejects_nonsensical_numbers(tmp_path, no_evaluation):
    run = write_run(tmp_path, "p", True, seed=0)
    for args, message in [
            (["--router-steps", "0"],
             "--router-steps=0 is not allowed: a number of training steps >= 1"),
            (["--router-steps", "-3"], "--router-steps=-3 is not allowed"),
            (["--n", "-1"], "--n=-1 is not allowed: a count of prompts >= 0"),
            (["--router-n", "-1"], "--router-n=-1 is not allowed: a count of train prompts >= 0"),
            (["--seed", "-1"], "--seed=-1 is not allowed: an integer in [0, 2**64 - 1]"),
            (["--seed", str(2 ** 64)], f"--seed={2 ** 64} is not allowed"),
            (["--budget", "nan"], "--budget=nan is not allowed")]:
        assert message in exit_message([run] + args)


def test_cli_checks_outputs_are_writable_before_evaluating(tmp_path, no_evaluation, monkeypatch):
    run = write_run(tmp_path, "p", True, seed=0)
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        assert exit_message([run, "--out", str(out)]).endswith(
            f"--out {str(out)!r} cannot be written: {tmp_path / 'a_file'} is not a directory")
    # a run directory that takes no new file (tests may run as root, so refuse it by hand)
    def refuse(dir=None, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(model.tempfile, "NamedTemporaryFile", refuse)
    assert exit_message([run]).endswith(f"run directory {run!r} cannot be written: no new file "
                                        f"can be made in {run} (Permission denied)")


def test_report_without_matplotlib_writes_csv_and_says_how_to_plot(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib raises ImportError
    settings = {"split": "test", "n": 2, "budget": 0.5, "cap": 1, "date": "d", "machine": "m",
                "task": {"name": "tiny_countdown"}, "cloud": {"backend": "oracle"},
                "base_model": "b", "models": {}, "task_tuned_run": None, "runs": ["r"]}
    res = ev.Results(settings, [("naive", "naive offloading", {"call_ratio": 0.5, "apgr": None})],
                     curves={"naive": (np.array([0, 0.5, 1]), np.array([0.0, 0.5, 1.0]))})
    (tmp_path / "curve.png").write_bytes(b"an earlier evaluation's figure")
    assert ev.write_curves(res, tmp_path, ["naive"]) is None
    assert not (tmp_path / "curve.png").exists()   # not left to contradict the report
    assert (tmp_path / "curve.csv").read_text().splitlines() == [
        "method,call_ratio,accuracy", '"naive",0.000000,0.000000', '"naive",0.500000,0.500000',
        '"naive",1.000000,1.000000']
    report = ev.report_markdown(res, [], None, "python eval.py r")
    assert "matplotlib is not installed" in report and "curve.csv" in report
    assert "| naive offloading | 0.500 |" in report


def test_cli_without_task_tuned_run_says_what_the_baselines_route(tmp_path):
    policy = write_run(tmp_path, "policy", True, seed=1)
    res = ev.main([policy, "--n", "8", "--router-n", "100", "--router-steps", "2"])
    keys = [key for key, _, _ in res.rows]
    assert keys[:2] == ["cloud_only", "local_only"] and "task_tuning_only" not in keys
    d = json.load(open(os.path.join(policy, "eval.json")))
    assert "local_only" in d["baselines"] and "NOT the task-tuning-only baseline" in d["notes"][0]
    # the train split holds 60 prompts: all of them label the router, and the notes say so
    assert d["settings"]["router_train_prompts"] == 60
    assert d["notes"][1] == ("the router was trained on the whole train split, 60 prompts "
                             "(--router-n asked for 100)")
    assert "help disabled at decode time" in open(os.path.join(policy, "report.md")).read()
    # evaluated on the train split itself, the router has seen the test prompts
    res = ev.main([policy, "--n", "4", "--split", "train", "--router-n", "10",
                   "--router-steps", "2"])
    assert [n for n in res.notes if "optimistic" in n] == [
        "evaluated on the train split, whose first prompts also trained the router: the "
        "router's row and test AUROC are optimistic"]


def test_cli_template1_task_with_probe_router(tmp_path):
    """The marker-task path: chat prompts, decision point before <answer> / <unknown>, the local
    answer of a help call decoded after "<answer>", and the logistic probe router."""
    policy = write_run(tmp_path, "policy", True, seed=1, task="countdown", max_new_tokens=12)
    tuned = write_run(tmp_path, "tuned", False, seed=2, task="countdown", max_new_tokens=12)
    res = ev.main([policy, "--task-tuned", tuned, "--n", "6", "--router-n", "24",
                   "--router-steps", "5"])
    assert res.router["kind"].startswith("logistic probe")
    d = json.load(open(os.path.join(policy, "eval.json")))
    assert d["metrics"]["n"] == 6 and d["baselines"]["router"]["help_calls"] == 1
    assert d["metrics"]["curve_cloud_acc"] == pytest.approx(
        d["baselines"]["cloud_only"]["acc_uncapped"])


def test_answered_locally_decodes_after_the_answer_opening(monkeypatch):
    """The continuation keeps the policy's budget: prefix + answer opening + decoded tokens at
    most max_new_tokens (here 17 + 9 characters before decoding)."""
    import types
    task = make_task("countdown", n_numbers=3, number_range=[1, 20], ops="+-*", n_train=4, n_test=4)
    tok = chat_char_tokenizer()
    ex = task.examples("test")[:2]
    splits = [task.decision_split("<think>hm</think> " + HELP_MARKER)] * 2
    calls, first = [], tok.prompt_ids(ex[0].prompt)
    lengths = [len(tok.prompt_ids(e.prompt)) for e in ex]

    def fake_generate(model, prompts, max_new_tokens, **kw):   # ex[0]: the solution, ex[1]: wrong
        calls.append((prompts, max_new_tokens))
        texts = [ex[0].data["solution"] if p[:len(first)] == first else "1 + 1" for p in prompts]
        ids = [tok.encode(t + "</answer>") + [1] for t in texts]
        L = max(map(len, ids))
        tokens = torch.tensor([i + [0] * (L - len(i)) for i in ids])
        return types.SimpleNamespace(tokens=tokens, lengths=torch.tensor([len(i) for i in ids]))

    monkeypatch.setattr(ev, "generate", fake_generate)
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=4096))
    assert ev.answered_locally(model, tok, task, ex, splits, 64) == [True, False]
    want = tok.prompt_ids(ex[0].prompt) + tok.encode("<think>hm</think>") + tok.encode(" <answer>")
    assert calls[0][0][0] == want and calls[0][1] == 64 - 26
    # a budget the solution does not fit in: cut where the policy's own response would end
    assert ev.answered_locally(model, tok, task, ex, splits, 26 + 3) == [False, False]
    # rows that fit the context alone (prompt + 64) but not together, a longer prefix leaving
    # row 1 fewer tokens: decoded one by one, each with its own budget
    calls.clear()
    splits[1] = task.decision_split("<think>hmmmmmmmmm</think> " + HELP_MARKER)  # 8 more
    model.config.max_position_embeddings = max(lengths) + 64
    assert max(lengths[0] + 26, lengths[1] + 34) + 38 > max(lengths) + 64   # not together
    assert ev.answered_locally(model, tok, task, ex, splits, 64) == [True, False]
    assert [(len(prompts), budget) for prompts, budget in calls] == [(1, 38), (1, 30)]
    # rows that fit together go batch_size at a time (one batch of every help call took memory
    # in proportion to the evaluation's size)
    calls.clear()
    model.config.max_position_embeddings = 4096
    ex5 = task.examples("test")[:4] + task.examples("train")[:1]
    seen = []  # and report the rows decoded after each batch
    assert len(ev.answered_locally(model, tok, task, ex5, [splits[0]] * 5, 64, batch_size=2,
                                   progress=lambda d, t: seen.append((d, t)))) == 5
    assert [len(prompts) for prompts, _ in calls] == [2, 2, 1]
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_auroc_is_none_without_positives():
    """No positive example: undefined, None (not a ZeroDivisionError)."""
    assert ev.auroc([0.3, 0.2], [0, 0]) is None


def test_curves_refuse_arrays_of_different_lengths():
    """A cloud verdict per prompt, or a ValueError."""
    with pytest.raises(ValueError, match="one length"):
        ev.routing_curve([0, 1], [1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="one length"):
        ev.capped_curve([0, 1], [1, 1], [1])
    with pytest.raises(ValueError, match="one length"):
        ev.capped_curve([0, 1], [1, 1], [1, 1, 0])


def test_gap_recovered_uses_the_curve_endpoint_and_the_real_spacing():
    """Acc_cloud defaults to acc(1), the last point, not the curve's best point;
    the trapezoids use the points' own call ratios (uneven spacing)."""
    s = ev.gap_recovered([0, 0.5, 1], [0.5, 0.9, 0.7])
    assert s["curve_cloud_acc"] == 0.7
    # PGR = [0, 2, 1]: (0 + 2) / 2 * .5 + (2 + 1) / 2 * .5
    assert s["apgr"] == pytest.approx(1.25) and s["cpt50"] == 0.5
    # PGR = [0, 1, 1] at c = [0, .1, 1]: .5 * .1 + 1 * .9
    assert ev.gap_recovered([0, 0.1, 1], [0.2, 0.6, 0.6])["apgr"] == pytest.approx(0.95)


def test_router_and_policy_orders_keep_dataset_order_on_ties():
    """Stable on ties also past numpy's small-array insertion sort."""
    scores = np.zeros(40)
    scores[::3] = 0.5
    low, high = [i for i in range(40) if i % 3], list(range(0, 40, 3))
    assert ev.router_order(scores).tolist() == low + high
    assert ev.policy_order(scores).tolist() == high + low
    assert ev.policy_order([1.0, 3.0, 3.0, 0.0]).tolist() == [1, 2, 0, 3]


def test_policy_curve_leaves_its_inputs_alone():
    """The kept-local verdicts are a new array, not the caller's local_ok overwritten."""
    local = np.array([False, True, True, False])
    help = np.array([True, False, True, False])
    ev.policy_curve(help, local, [True, False, False, False], [1, 0, 1, 1], [2.0, -1, 0.5, -3])
    assert local.tolist() == [False, True, True, False]


def test_a_report_shows_only_its_own_policies(tmp_path):
    """A run's report.md has the baselines and that run's policy row, not the others'."""
    settings = {"split": "test", "n": 2, "budget": 0.5, "cap": 1, "date": "d", "machine": "m",
                "task": {"name": "tiny_countdown"}, "cloud": {"backend": "oracle"},
                "base_model": "b", "models": {"runs/a": "A", "runs/b": "B"},
                "task_tuned_run": None, "runs": ["runs/a", "runs/b"]}
    policy = {"call_ratio": 0.5, "help_calls": 1, "calls_served": 1, "len_help": 3.0,
              "len_local": 4.0, "clipped_ratio": 0.0, "curve_local_acc": 0.5,
              "decision_agreement": 1.0}
    res = ev.Results(settings, [("naive", "naive offloading", {"call_ratio": 0.5}),
                                ("policy:runs/a", "policy A", policy),
                                ("policy:runs/b", "policy B", policy)])
    report = ev.report_markdown(res, ["runs/a"], None, "python eval.py runs/a runs/b")
    assert "| naive offloading |" in report and "| policy A |" in report
    assert "policy B" not in report


def test_boundary_budgets_and_the_whole_split_are_allowed(tmp_path, monkeypatch):
    """--budget 0 (no cloud) and 1 are allowed, and --n equal to the split size."""
    run = write_run(tmp_path, "p", True, seed=0)
    monkeypatch.setattr(ev, "evaluate_baselines", lambda *a, **k: None)
    monkeypatch.setattr(ev, "evaluate_policy_run", lambda *a, **k: None)
    for budget, cap in ((0.0, 0), (1.0, 30)):
        res = ev.evaluate_runs([run], budget=budget, n=30, router_n=0)
        assert res.settings["n"] == 30 and res.settings["cap"] == cap


def test_a_negative_zero_budget_is_a_budget_of_0_percent(tmp_path, capsys):
    """-0 passes 0 <= budget (it equals 0); the report says 0%, not -0%."""
    run = write_run(tmp_path, "p", True, seed=0)
    res = ev.main([run, "--n", "4", "--budget", "-0", "--router-n", "0"])
    # (paths taken out: pytest's first temporary directory of a machine is .../pytest-0/...)
    out = capsys.readouterr().out.replace(str(tmp_path), "TMP")
    assert "budget 0% (cap 0 calls)" in out and "-0" not in out
    assert str(res.settings["budget"]) == "0.0"
    assert "budget: 0% of prompts" in open(os.path.join(run, "report.md")).read()


def test_a_run_named_with_a_bar_keeps_the_report_tables_columns(tmp_path):
    """A "|" in a run's name is escaped in the markdown tables, so every row keeps its columns."""
    run = write_run(tmp_path, "a|b", True, seed=0)
    ev.main([run, "--n", "4", "--router-n", "0"])
    report = open(os.path.join(run, "report.md")).read()
    assert "| a\\|b (gapg) |" in report
    for table in report.split("\n\n"):
        rows = [line for line in table.splitlines() if line.startswith("|")]
        cells = {len(re.split(r"(?<!\\)\|", line)) for line in rows}
        assert len(cells) <= 1, table   # the same number of unescaped bars on every row


def test_runs_decoding_different_numbers_of_tokens_are_noted(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "evaluate_baselines", lambda *a, **k: None)
    monkeypatch.setattr(ev, "evaluate_policy_run", lambda *a, **k: None)
    short = write_run(tmp_path, "short", True, seed=1, max_new_tokens=20)
    long = write_run(tmp_path, "long", True, seed=2, max_new_tokens=40)
    notes = ev.evaluate_runs([short, long], n=4, router_n=0).notes
    assert [n for n in notes if "new tokens" in n] == [
        f"the runs decode different numbers of new tokens, each its own sampling.max_new_tokens "
        f"({short}: 20, {long}: 40; the baselines use the base model's run's), so a longer "
        f"budget may explain part of a gap"]
    same = write_run(tmp_path, "same", True, seed=3, max_new_tokens=20)
    assert not [n for n in ev.evaluate_runs([short, same], n=4, router_n=0).notes
                if "new tokens" in n]


def test_curve_csv_columns_are_call_ratio_then_accuracy(tmp_path, monkeypatch):
    """An asymmetric curve, so swapped columns show."""
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    settings = {"split": "test", "n": 2, "budget": 0.5}
    res = ev.Results(settings, [], curves={"oracle": (np.array([0, 0.5, 1]),
                                                      np.array([0.25, 0.75, 0.5]))})
    ev.write_curves(res, tmp_path, ["oracle"])
    assert (tmp_path / "curve.csv").read_text().splitlines()[1:] == [
        '"oracle",0.000000,0.250000', '"oracle",0.500000,0.750000', '"oracle",1.000000,0.500000']
    # a label holding a quote or a comma (a run directory's name) reads back whole
    label = 'gapg (runs/say "hi", twice)'
    res.curves[label] = res.curves["oracle"]
    ev.write_curves(res, tmp_path, [label])
    with open(tmp_path / "curve.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[1:] == [[label, "0.000000", "0.250000"], [label, "0.500000", "0.750000"],
                        [label, "1.000000", "0.500000"]]


def test_config_yaml_is_read_as_train_py_reads_it(tmp_path, no_evaluation):
    """A hand-edited config.yaml: 9e-1 is a number (PyYAML alone keeps it as text, which the
    cloud refused here while train.py took it), and a key given twice is an error naming it."""
    exponent = run_with_config(tmp_path, "exponent",
                               lambda t: t.replace("p_correct: 0.9", "p_correct: 9e-1"))
    run = ev.load_run(exponent, "cpu")
    assert run.cfg["cloud"]["p_correct"] == 0.9
    twice = run_with_config(tmp_path, "twice", lambda t: t + "seed: 1\n")
    assert re.search(r"twice/config.yaml is not valid YAML: the key 'seed' is given twice at "
                     r"line \d+", exit_message([twice]))


def test_cli_config_sections_and_counts_must_have_the_right_type(tmp_path, no_evaluation):
    """A section that is not a mapping; a boolean is not a count."""
    not_a_map = run_with_config(tmp_path, "not_a_map",
                                lambda t: yaml.safe_dump({**yaml.safe_load(t), "sampling": 5}))
    assert "not_a_map/config.yaml: section 'sampling' is missing" in exit_message([not_a_map])
    no_model = run_with_config(tmp_path, "no_model",
                               lambda t: yaml.safe_dump({k: v for k, v in yaml.safe_load(t).items()
                                                         if k != "model"}))
    assert "no_model/config.yaml: section 'model' is missing" in exit_message([no_model])
    def drop_task_name(t):
        cfg = yaml.safe_load(t)
        del cfg["task"]["name"]
        return yaml.safe_dump(cfg)
    no_name = run_with_config(tmp_path, "no_name", drop_task_name)
    assert "no_name/config.yaml: task.name is missing" in exit_message([no_name])
    bool_batch = run_with_config(tmp_path, "bool_batch",
                                 lambda t: t.replace("batch_size: 64", "batch_size: true"))
    assert "eval.batch_size=True is not allowed: an integer >= 1" in exit_message([bool_batch])


def test_an_unset_budget_is_rho_over_one_plus_rho_as_in_training(tmp_path, monkeypatch):
    """eval.budget absent or null: rho / (1 + rho) (train.py's rule), never a fixed 0.3;
    a bad rho is blamed on rl.rho."""
    seen = []
    def stop(res, base, label, role, examples, budget, *rest):
        seen.append(budget)
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "evaluate_baselines", stop)

    def with_budget(budget, rho):
        def edit(t):
            cfg = yaml.safe_load(t)
            cfg["eval"].pop("budget")
            if budget != "absent":
                cfg["eval"]["budget"] = budget
            cfg.setdefault("rl", {})["rho"] = rho
            return yaml.safe_dump(cfg)
        return edit
    for name, budget in (("absent", "absent"), ("null", None)):
        run = run_with_config(tmp_path, name, with_budget(budget, 1.0))
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate_runs([run], n=2, router_n=0)
        assert seen.pop() == 0.5                    # rho = 1: P(cloud) <= P(local), half
    bad_rho = run_with_config(tmp_path, "bad_rho", with_budget(None, -1))
    assert "bad_rho/config.yaml: rl.rho=-1 is not allowed: a finite number >= 0" in \
        exit_message([bad_rho])


def test_eval_json_keeps_booleans():
    """JSON true / false, not 1 / 0 (bool is an int subclass)."""
    assert json.dumps(ev._plain({"a": True, "b": np.bool_(False), "c": [np.int64(3)],
                                 "d": np.float32(0.3)})) == \
        '{"a": true, "b": false, "c": [3], "d": 0.3}'


def test_no_router_reads_no_train_split(tmp_path):
    """--router-n 0 trains no router, so a MATH run is evaluated from its test file alone: a
    train file that is missing, or that disagrees with the test file, is no error then."""
    run = write_run(tmp_path, "math", True, seed=0, task="countdown", max_new_tokens=8)
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"problem": f"What is {k} + {k}?",
                                             "solution": f"\\boxed{{{2 * k}}}"}) + "\n"
                                 for k in range(1, 4)))
    with open(os.path.join(run, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["task"] = {"name": "math", "path_train": str(tmp_path / "missing.jsonl"),
                   "path_test": str(test_file), "allow_help": True}
    with open(os.path.join(run, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    for router_n in (0, 1):
        res = ev.evaluate_runs([run], n=3, router_n=router_n)
        assert res.settings["router_train_prompts"] == 0 and res.router == {}
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):  # a router needs the file
        ev.evaluate_runs([run], n=3, router_n=2)


def test_oracle_sends_only_the_wrong_prompts_when_the_cap_allows_more(tmp_path, monkeypatch):
    """Budget 0.3 of 10 prompts is a cap of 3, but the base model gets only prompt 0
    wrong: the oracle sends that one prompt, not 3."""
    run = write_run(tmp_path, "tuned", False, seed=2)

    def fake_evaluate_policy(model, tok, task, examples, cloud, budget, *a, **k):
        local = torch.ones(len(examples), dtype=torch.bool)
        local[0] = False
        help = torch.zeros(len(examples), dtype=torch.bool)
        metrics = {**capped_metrics(help, local, help, budget), "cloud_failed": 0}
        return metrics, {"help": help, "local_ok": local}

    monkeypatch.setattr(ev.algo, "evaluate_policy", fake_evaluate_policy)
    res = ev.evaluate_runs([run], n=10, budget=0.3, router_n=0)
    oracle = {key: m for key, _, m in res.rows}["oracle"]
    assert oracle["help_calls"] == 1 and oracle["call_ratio"] == pytest.approx(0.1)


def test_a_run_left_with_only_checkpoint_old_is_evaluated_from_it(tmp_path):
    """A crash between train.py save()'s two renames leaves checkpoint.old alone; train.py's
    resume restores it, and eval.py evaluates it."""
    run = write_run(tmp_path, "policy", True, seed=1)
    os.replace(os.path.join(run, "checkpoint"), os.path.join(run, "checkpoint.old"))
    res = ev.main([run, "--n", "4", "--router-n", "0"])
    assert res.settings["models"][run].endswith("checkpoint.old")


def test_a_refused_api_key_is_a_one_line_error(tmp_path, monkeypatch):
    def refused(self, task, examples):
        raise cloud_module.CloudAuthError("HTTP 401 from the cloud: check the environment "
                                          "variable OPENAI_API_KEY (it is NOT set)")
    monkeypatch.setattr(cloud_module.OracleBackend, "complete", refused)
    run = write_run(tmp_path, "policy", True, seed=1)
    assert exit_message([run, "--n", "4", "--router-n", "0"]) == (
        "eval error: HTTP 401 from the cloud: check the environment variable OPENAI_API_KEY "
        "(it is NOT set)")


def test_ctrl_c_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def interrupted(self, task, examples):
        raise KeyboardInterrupt
    monkeypatch.setattr(cloud_module.OracleBackend, "complete", interrupted)
    run = write_run(tmp_path, "policy", True, seed=1)
    before = sorted(os.listdir(run))
    with pytest.raises(SystemExit) as e:
        ev.main([run, "--n", "4", "--router-n", "0"])
    assert e.value.code == 130 and "interrupted, nothing written" in capsys.readouterr().err
    assert sorted(os.listdir(run)) == before


def test_the_router_learns_which_prompts_the_device_gets_right(tmp_path, monkeypatch, one_thread):
    """SPEC 8.4: the router's label is "the base model answers this prompt right by itself".
    A stand-in base model gets exactly the prompts whose first number is below 10 right; the
    router trained on those labels must rank test prompts the same way (AUROC against the
    device's test answers well above 0.5; inverted labels would put it well below)."""
    run = write_run(tmp_path, "tuned", False, seed=2)

    def fake_evaluate_policy(model, tok, task, examples, cloud, budget, *a, **k):
        local = torch.tensor([ex.data["numbers"][0] < 10 for ex in examples])
        help = torch.zeros(len(examples), dtype=torch.bool)
        metrics = {**capped_metrics(help, local, help, budget), "cloud_failed": 0}
        return metrics, {"help": help, "local_ok": local}

    monkeypatch.setattr(ev.algo, "evaluate_policy", fake_evaluate_policy)
    res = ev.evaluate_runs([run], n=30, budget=0.3, router_n=60, router_steps=150)
    train_examples = make_task("tiny_countdown", n_numbers=3, number_range=[1, 20], ops="+-*",
                               n_train=60, n_test=30, seed=0).examples("train")
    share_right = sum(ex.data["numbers"][0] < 10 for ex in train_examples) / 60
    assert res.router["train_positive_rate"] == pytest.approx(share_right)
    assert res.router["auroc_test"] > 0.8


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_is_evaluated_in_the_dtype_it_was_trained_and_sampled_in(tmp_path, device):
    """fp32 runs in fp32 (on CUDA too, where the loader alone would pick bf16); bf16-mixed runs
    in bf16, as train.py's bf16 sampler copy evaluated them."""
    for precision, dtype in (("fp32", torch.float32), ("bf16-mixed", torch.bfloat16),
                             ("bf16", torch.bfloat16)):
        run = run_with_config(tmp_path, precision, lambda t: f"precision: {precision}\n" + t)
        model = ev.load_run(run, device).model()
        assert next(model.parameters()).dtype == dtype, precision
    bad = run_with_config(tmp_path, "fp16", lambda t: "precision: fp16\n" + t)
    with pytest.raises(ValueError, match=r"precision='fp16' is not allowed: fp32, bf16-mixed"):
        ev.load_run(bad, "cpu")


@pytest.mark.parametrize("rl, label", [
    ({"algo": "gapg", "filter": "any_correct"}, "r1 (gapg)"),
    ({"algo": "gapg"}, "r1 (gapg)"),                         # the default rule
    ({"algo": "dr_grpo", "filter": "none"}, "r1 (dr_grpo, no filter)"),
    ({"algo": "gapg", "filter": "mixed"}, "r1 (gapg, filter mixed)"),
])
def test_run_labels_name_the_rules(rl, label):
    """Two runs differing only in their filter rule get different labels in the report."""
    run = ev.Run("runs/r1", {"rl": rl}, task=None, cloud=None, device=torch.device("cpu"))
    assert run.label == label


def test_each_run_reports_its_own_cloud_and_task_and_the_requests_made_for_it(tmp_path):
    """A run's eval.json and report.md named the first run's cloud and task; and a policy whose
    cloud the baselines shared (no task-tuned run) reported 0 cloud_requests although the
    evaluation sent its prompts through that cloud."""
    a = write_run(tmp_path, "a", True, seed=1)
    c = run_with_config(tmp_path, "c", lambda t: t.replace("p_correct: 0.9", "p_correct: 0.5"))
    tuned = write_run(tmp_path, "tuned", False, seed=2)
    ev.main([a, c, tuned, "--n", "10", "--router-n", "0"])
    own = {r: json.load(open(os.path.join(r, "eval.json")))["settings"] for r in (a, c, tuned)}
    assert [own[r]["cloud"]["p_correct"] for r in (a, c, tuned)] == [0.9, 0.5, 0.9]
    assert [own[r]["task"]["allow_help"] for r in (a, c, tuned)] == [True, True, False]
    assert "- cloud: backend=oracle, p_correct=0.5, seed=0" in open(os.path.join(c, "report.md")).read()
    # without the task-tuned run the baselines route a's help-disabled decode through a's cloud:
    # the cloud-only row asks all 10 prompts there, on an empty cache
    fresh = write_run(tmp_path / "fresh", "a", True, seed=1)
    ev.main([fresh, "--n", "10", "--router-n", "0"])
    metrics = json.load(open(os.path.join(fresh, "eval.json")))["metrics"]
    assert metrics["cloud_requests"] == 10
    ev.main([fresh, "--n", "10", "--router-n", "0"])  # all cached now
    assert json.load(open(os.path.join(fresh, "eval.json")))["metrics"]["cloud_requests"] == 0


def test_one_run_under_two_spellings_is_one_run(tmp_path, monkeypatch, no_evaluation):
    run = write_run(tmp_path, "a", True, seed=0)
    os.symlink(run, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    for other in (os.path.abspath(run), str(tmp_path / "link")):
        assert exit_message(["a", other]) == \
            f"eval error: {other}: given more than once (as a); give each run once"


def test_a_cloud_cache_that_cannot_be_appended_to_is_an_error_before_evaluating(tmp_path,
                                                                             no_evaluation):
    """It was a traceback from the first answer cached, after the whole greedy decode."""
    run = write_run(tmp_path, "a", True, seed=0)
    os.mkdir(os.path.join(run, "cloud_cache.jsonl"))  # unwritable as a file, even for root
    assert exit_message([run]) == (
        f"eval error: cloud cache {os.path.join(run, 'cloud_cache.jsonl')} cannot be appended to "
        f"(Is a directory): make it writable, then run the same command again")


def test_outputs_that_cannot_be_written_are_a_one_line_error(tmp_path, monkeypatch):
    """A full disk writing eval.json was a traceback: now one line naming the file, and no
    temporary file left behind."""
    run = write_run(tmp_path, "a", True, seed=0)

    def fsync(fd):
        raise OSError(28, "No space left on device")

    full = types.ModuleType("os")
    full.__dict__.update(os.__dict__, fsync=fsync)
    monkeypatch.setattr(model, "os", full)  # model.atomic_write's os only
    assert exit_message([run, "--n", "4", "--router-n", "0"]) == (
        f"eval error: [Errno 28] No space left on device: '{os.path.join(run, 'eval.json')}'; some "
        f"outputs were not written (the cloud answers are cached): once fixed, run the same "
        f"command again")
    assert not [f for f in os.listdir(run) if ".tmp" in f]


def test_out_spelled_otherwise_than_the_run_gets_one_report(tmp_path, monkeypatch, capsys):
    """--out naming the run's own directory by a relative path (the run given absolute) wrote
    its report twice and listed every file twice."""
    run = write_run(tmp_path, "a", True, seed=0)
    monkeypatch.chdir(tmp_path)
    ev.main([run, "--n", "4", "--router-n", "0", "--out", "a"])
    wrote = capsys.readouterr().out.splitlines()[-1].removeprefix("wrote ").split(", ")
    assert len(wrote) == len(set(map(os.path.realpath, wrote))), wrote


SIGNAL_SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import eval as ev
real_write = ev.write_outputs
def evaluate(*args, **kwargs):  # stands in for a long evaluation that the signal interrupts
    if {during!r} == "evaluation":
        os.kill(os.getpid(), signal.{sig})
        time.sleep(5)
    return real_evaluate(*args, **kwargs)
def write(res, out_dir, command):  # the signal arrives after the first file is written
    first = os.path.join(out_dir, "first.txt")
    open(first, "w").write("1")
    if {during!r} == "writing":
        os.kill(os.getpid(), signal.{sig})
        time.sleep(0.5)
    return [first] + real_write(res, out_dir, command)
real_evaluate, ev.evaluate_runs, ev.write_outputs = ev.evaluate_runs, evaluate, write
ev.main([{run!r}, "--n", "4", "--router-n", "0"])
"""


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
@pytest.mark.parametrize("during", ["evaluation", "writing"])
def test_ctrl_c_and_sigterm_stop_cleanly_and_never_half_write(tmp_path, sig, code, during):
    """SIGTERM killed eval.py at once (cloud answers under way were lost, not cached); a signal
    while the outputs were written left some from this evaluation and some from an earlier one,
    with a traceback. Now both stop as Ctrl-C does, and the outputs are finished first."""
    run = write_run(tmp_path, "a", True, seed=0)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = SIGNAL_SCRIPT.format(repo=repo, during=during, sig=sig, run=run)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == code, child.stderr[-2000:]
    assert "Traceback" not in child.stderr
    written = [os.path.exists(os.path.join(run, f)) for f in ("eval.json", "report.md")]
    if during == "evaluation":
        assert "interrupted, nothing written" in child.stderr and written == [False, False]
    else:
        assert "interrupted while writing its outputs, which were finished first" in child.stderr
        assert written == [True, True]


def test_the_progress_line_fits_the_terminal_and_is_whole_in_a_log(monkeypatch):
    """On a terminal (80 columns) the updating line is cut to 79 characters, since \\r cannot
    overwrite a wrapped line; written to a file it is whole."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("COLUMNS", "80")
    stage = "local answers of its help calls " * 4
    for stream in (Terminal(), io.StringIO()):
        ev.Progress(stream)(stage, 3, 10)
        line = stream.getvalue()
        assert line.startswith("\reval | ") and "s | local answers" in line
        if stream.isatty():
            assert len(line) == 80 and "3/10" not in line   # cut inside the stage's text
        else:
            assert line.endswith(stage + " 3/10")
