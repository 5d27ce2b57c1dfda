"""algo.rollout / update_inputs on the tiny task with scripted responses (no sampling model):
help flags, local verdicts, one cloud call per prompt that asked, the SPEC 3 rewards, and the
device-token mask that excludes the self-check."""
import pytest
import torch

import algo
import sample
from model import build_char_tokenizer
from reward import RewardConfig
from tasks import Example, TinyCountdownTask

TASK = TinyCountdownTask(n_train=10, n_test=10)
TOK = build_char_tokenizer(TASK.alphabet)
# 3 + 7 = 10, 10 * 12 = 120: target 120 is solved; target 33 is not
SOLVED = Example("a", "03,07,12|120=", {"numbers": [3, 7, 12], "target": 120, "solution": ""})
UNSOLVED = Example("b", "03,07,12|033=", {"numbers": [3, 7, 12], "target": 33, "solution": ""})
CHAIN = "[003+007=010,010*012=120]"
RESPONSES = [  # prompt-major, G = 2
    CHAIN + "11=22=00=A",      # SOLVED: correct answer            -> alpha_a
    CHAIN + "11=22=00=H",      # SOLVED: help call                 -> alpha_c if cloud right
    CHAIN + "10#23#03#A",      # UNSOLVED: wrong answer            -> 0
    "[003+007=010,010*012=12",  # UNSOLVED: truncated, no decision  -> 0
]


class CountingCloud:
    """correct: key -> verdict, or None for a call that fails."""
    def __init__(self, correct):
        self.correct, self.asked = correct, []

    def ask(self, task, examples):
        from cloud import CloudAnswer
        self.asked += [ex.key for ex in examples]
        return [CloudAnswer("", False, False, error="CloudError: HTTP 503")
                if self.correct[ex.key] is None else CloudAnswer("", self.correct[ex.key], False)
                for ex in examples]


def script(monkeypatch, responses):
    """sample.generate returns these responses (prompt-major rows), whatever it is asked."""
    ids = [TOK.encode(r) for r in responses]
    T = max(map(len, ids))
    tokens = torch.zeros(len(ids), T, dtype=torch.long)
    mask = torch.zeros(len(ids), T, dtype=torch.bool)
    for i, r in enumerate(ids):
        tokens[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    finished = torch.tensor([r[-1] in "AH" for r in responses])
    out = sample.Generation(tokens, torch.zeros(len(ids), T), mask, mask.sum(1), finished)
    monkeypatch.setattr(sample, "generate", lambda *a, **k: out)


@pytest.fixture
def scripted(monkeypatch):
    script(monkeypatch, RESPONSES)


@pytest.mark.parametrize("cloud_right", [True, False])
def test_rollout_scores_as_spec(scripted, cloud_right):
    cloud = CountingCloud({"a": cloud_right, "b": True})
    cfg = RewardConfig(alpha_a=1.0, alpha_c=0.4)
    ro = algo.rollout(None, TOK, [SOLVED, UNSOLVED], 2, algo.Sampling(40), TASK, cloud, cfg)
    assert ro.texts == RESPONSES
    assert ro.help.tolist() == [[False, True], [False, False]]
    assert ro.local_ok.tolist() == [[True, False], [False, False]]
    assert cloud.asked == ["a"]  # only the prompt where a response asked for help
    assert ro.cloud_asked.tolist() == [True, False] and ro.cloud_ok.tolist() == [cloud_right, False]
    assert ro.rewards.tolist() == [[1.0, pytest.approx(0.4 if cloud_right else 0.0)], [0.0, 0.0]]
    # the 9 check characters after "]" carry no gradient; chain and decision do
    n = len(CHAIN)
    assert ro.device_mask[0, :n].all() and not ro.device_mask[0, n:n + 9].any()
    assert ro.device_mask[0, n + 9] and not ro.device_mask[0, n + 10:].any()
    assert ro.device_mask[3, :len(RESPONSES[3])].all()  # truncated: nothing to exclude


def test_failed_cloud_call_is_marked(scripted):
    ro = algo.rollout(None, TOK, [SOLVED, UNSOLVED], 2, algo.Sampling(40), TASK,
                      CountingCloud({"a": None, "b": True}), RewardConfig(alpha_c=0.4))
    assert ro.cloud_failed.tolist() == [True, False] and ro.cloud_ok.tolist() == [False, False]
    ok = algo.rollout(None, TOK, [SOLVED, UNSOLVED], 2, algo.Sampling(40), TASK,
                      CountingCloud({"a": False, "b": True}), RewardConfig(alpha_c=0.4))
    assert ok.cloud_failed.tolist() == [False, False]  # a wrong answer is not a failure


def test_help_disabled_asks_no_cloud(scripted):
    task = TinyCountdownTask(n_train=10, n_test=10, allow_help=False)
    cloud = CountingCloud({"a": True, "b": True})
    ro = algo.rollout(None, TOK, [SOLVED, UNSOLVED], 2, algo.Sampling(40), task, cloud,
                      RewardConfig(alpha_c=0.4))
    assert cloud.asked == [] and ro.rewards[0, 1] == 0.0
    assert not ro.help.any() and not ro.formatted[0, 1]  # an "H" is no call, and off-format


def test_help_disabled_evaluation_counts_markers_as_wrong_local_answers(monkeypatch):
    """The task-tuning baseline is 'everything local' (SPEC 8.2): a help decision its policy
    writes anyway is a wrong local answer, not a cloud call served (by NoCloud)."""
    from cloud import NoCloud
    script(monkeypatch, [RESPONSES[0], RESPONSES[1]])   # a correct answer, a help decision
    task = TinyCountdownTask(n_train=10, n_test=10, allow_help=False)
    m, out = algo.evaluate_policy(None, TOK, task, [SOLVED, SOLVED], NoCloud(), 0.5, 40)
    assert out["help"].tolist() == [False, False]
    assert (m["call_ratio"], m["calls_served"], m["local_acc"]) == (0.0, 0, 0.5)
    assert m["cond_local_acc"] == 0.5 and m["acc_capped"] == 0.5  # over both prompts


def test_evaluation_shares_are_exact_fractions(monkeypatch):
    """3 of 10 rows clipped, answered and formatted: each share is 0.3 exactly (a float32 mean
    gave 0.30000001 in eval.json), as the capped metrics' shares are."""
    from cloud import NoCloud
    script(monkeypatch, [RESPONSES[0]] * 3 + [RESPONSES[3]] * 7)   # 3 answers, 7 truncated
    m, _ = algo.evaluate_policy(None, TOK, TASK, [SOLVED] * 10, NoCloud(), 0.5, 40)
    assert (m["answer_rate"], m["format_rate"], m["clipped_ratio"]) == (0.3, 0.3, 0.7)
    assert m["local_acc"] == 0.3


def test_update_inputs_align_prompt_and_response(scripted):
    ro = algo.rollout(None, TOK, [SOLVED, UNSOLVED], 2, algo.Sampling(40), TASK,
                      CountingCloud({"a": True, "b": True}), RewardConfig())
    ids, pos, real, start, mask = algo.update_inputs(ro, torch.tensor([1, 3]), TOK.pad_id)
    assert start == 13  # both prompts are 13 characters
    assert TOK.decode(ids[0, :start].tolist()) == SOLVED.prompt
    assert TOK.decode(ids[0, start:start + len(RESPONSES[1])].tolist()) == RESPONSES[1]
    assert real[1].sum() == 13 + len(RESPONSES[3]) and pos[0, :5].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(mask, ro.device_mask[[1, 3], :mask.shape[1]])


def test_evaluation_counts_help_calls_whose_cloud_call_failed(monkeypatch):
    # one greedy response per prompt, both help calls; the cloud fails on "a", answers "b" right
    script(monkeypatch, [RESPONSES[1], CHAIN + "11=22=00=H"])
    m, out = algo.evaluate_policy(None, TOK, TASK, [SOLVED, UNSOLVED],
                                  CountingCloud({"a": None, "b": True}), 1.0, 40)
    assert out["cloud_failed"].tolist() == [True, False] and m["cloud_failed"] == 1
    assert m["calls_served"] == 2 and m["acc_capped"] == 0.5  # the failed call is scored wrong
    with pytest.raises(ValueError, match="at least one example"):
        algo.evaluate_policy(None, TOK, TASK, [], CountingCloud({}), 1.0, 40)
