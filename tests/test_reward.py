"""reward.py: help detection (SPEC section 2), Template I format, the reward tables (section 3)."""
import math

import pytest

from reward import (HELP_MARKER, RewardConfig, help_called, help_start, reward,
                    template1_formatted)

HELP_CASES = [
    # (text, is a help call)
    (HELP_MARKER, True),
    ("<think>I tried 3+7 and 12*3, nothing works.</think> " + HELP_MARKER, True),
    ("<think>stuck</think> <unknown> I need external assitance </unknown>", True),  # misspelt, via the tag
    ("<unknown>", True),
    ("<UNKNOWN> help </UNKNOWN>", True),
    ("I need External  Assistance", True),  # case and a double space
    ("please, external\n\tassist me", True),
    ("EXTERNAL ASSISTANT", True),  # /external\s+assist/i matches the prefix
    ("externalassistance", False),  # no whitespace between the words
    ("external help", False),
    ("unknown", False),
    ("", False),
    ("<think>easy</think> <answer>3*7+12</answer>", False),
    ("<answer>42</answer> " + HELP_MARKER, True),  # marker last wins
    (HELP_MARKER + " actually I got it: <answer>42</answer>", False),  # answer last wins
    ("The answer is \\boxed{5}. " + HELP_MARKER, True),
    ("<answer>I need external assistance</answer>", True),  # a marker inside the answer block
    (HELP_MARKER + " <answer>12", True),  # an unclosed answer is not a final answer
    ("<answer>1</answer> <unknown> x </unknown> <answer>2</answer>", False),
    ("<answer>1</answer> <answer>2</answer> I need external assistance", True),
    # an unclosed <answer> before the marker does not reach over it to a later complete answer
    ("<answer> 3+4 " + HELP_MARKER + " then <answer>7</answer>", False),
    ("<answer> 3+4 I need external assistance <answer>7", True),
    ("<answer><answer>7</answer>", False),
    # a blank answer block closing a help call is no answer: the call stands
    ("<think>stuck</think> " + HELP_MARKER + "\n<answer> </answer>", True),
    (HELP_MARKER + " <ANSWER>\n</ANSWER>", True),
    (HELP_MARKER + " <answer></answer> x </answer>", True),  # nor does it reach a later closing
]


@pytest.mark.parametrize("text,expected", HELP_CASES)
def test_help_called(text, expected):
    assert help_called(text) is expected


FORMAT_CASES = [
    ("<think>3*7=21, 21+12=33</think> <answer>3*7+12</answer>", True),
    ("<think>a</think><answer>1</answer>", True),
    ("  <think>a\nb</think>\n<answer> (74 + 78) - (36 + 7) </answer>\n", True),
    ("<think>I am stuck</think> " + HELP_MARKER, True),
    ("<think>I am stuck</think>\n<unknown>I need external  assistance</unknown>", True),
    ("<think>x</think> <unknown> I need external assitance </unknown>", False),  # not the marker
    ("<answer>1</answer>", False),  # no think block
    ("<think>a</think>", False),  # no final answer
    ("<think>a</think> <answer>1</answer> <answer>2</answer>", False),  # two answers
    ("<think>a</think> <answer>1</answer> done.", False),  # text after the answer
    ("<think>a</think> <answer>  </answer>", False),  # empty answer
    ("<think>a <think>b</think></think> <answer>1</answer>", False),  # nested think
    ("<think>a</think> <think>b</think> <answer>1</answer>", False),  # two think blocks
    ("<think>a <answer>1</answer></think> <answer>1</answer>", False),  # answer inside think
    ("hello <think>a</think> <answer>1</answer>", False),  # text before think
    ("<think>a</think> <answer>1</answer> " + HELP_MARKER, False),
]


@pytest.mark.parametrize("text,expected", FORMAT_CASES)
def test_template1_formatted(text, expected):
    assert template1_formatted(text) is expected


# SPEC section 3, v3 with the paper's Countdown weights alpha_a = 1, alpha_c = 0.25.
V3_ROWS = [
    # help, local_ok, cloud_ok, formatted -> total, answer, cloud
    (False, True, False, False, 1.0, 1.0, 0.0),
    (False, True, True, True, 1.0, 1.0, 0.0),
    (False, False, True, True, 0.0, 0.0, 0.0),  # no help call: the cloud verdict is irrelevant
    (False, False, False, True, 0.0, 0.0, 0.0),  # formatting earns nothing in v3
    (True, False, True, False, 0.25, 0.0, 0.25),
    (True, False, False, True, 0.0, 0.0, 0.0),
    (True, True, True, True, 0.25, 0.0, 0.25),  # a help call is never a correct local answer
    (True, True, False, False, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("help,local_ok,cloud_ok,formatted,total,answer,cloud", V3_ROWS)
def test_reward_v3_table(help, local_ok, cloud_ok, formatted, total, answer, cloud):
    r = reward(help, local_ok, cloud_ok, formatted, RewardConfig())
    assert r.total == pytest.approx(total)
    assert r.components == pytest.approx({"answer": answer, "cloud": cloud, "format": 0.0})
    assert r.total == pytest.approx(sum(r.components.values()))


# SPEC section 3, v1 with the paper's v1 Countdown weights 2 / 0.5 / 0.2.
V1_ROWS = [
    # help, local_ok, cloud_ok, formatted -> total, answer, cloud, format
    (False, True, False, True, 2.2, 2.0, 0.0, 0.2),  # correct + formatted
    (False, True, False, False, 2.0, 2.0, 0.0, 0.0),  # correct, unformatted
    (False, False, False, True, 0.2, 0.0, 0.0, 0.2),  # wrong, formatted
    (False, False, True, True, 0.2, 0.0, 0.0, 0.2),
    (False, False, False, False, 0.0, 0.0, 0.0, 0.0),  # wrong, unformatted
    (True, False, True, True, 0.5, 0.0, 0.5, 0.0),  # help, cloud correct
    (True, False, True, False, 0.5, 0.0, 0.5, 0.0),
    (True, False, False, True, 0.0, 0.0, 0.0, 0.0),  # help, cloud wrong: else 0
    (True, True, True, True, 0.5, 0.0, 0.5, 0.0),
]


@pytest.mark.parametrize("help,local_ok,cloud_ok,formatted,total,answer,cloud,fmt", V1_ROWS)
def test_reward_v1_table(help, local_ok, cloud_ok, formatted, total, answer, cloud, fmt):
    cfg = RewardConfig(version="v1", alpha_a=2.0, alpha_c=0.5, alpha_f=0.2)
    r = reward(help, local_ok, cloud_ok, formatted, cfg)
    assert r.total == pytest.approx(total)
    assert r.components == pytest.approx({"answer": answer, "cloud": cloud, "format": fmt})


@pytest.mark.parametrize("alpha_c", [0.2, 0.3, 0.6])  # the paper's MATH settings
def test_paper_math_weights(alpha_c):
    cfg = RewardConfig(alpha_a=1.0, alpha_c=alpha_c)
    assert reward(True, False, True, False, cfg).total == pytest.approx(alpha_c)
    assert reward(False, True, False, False, cfg).total == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs,needle", [
    ({"alpha_a": 0.2, "alpha_c": 0.4}, "alpha_a > alpha_c"),
    ({"alpha_a": 0.0, "alpha_c": 0.0}, "alpha_a=0.0 must be > 0"),  # every reward 0: no signal
    ({"alpha_c": -0.1}, "alpha_c=-0.1"),
    ({"alpha_a": -1.0}, "alpha_a=-1.0"),
    ({"alpha_a": float("nan")}, "alpha_a=nan"),
    ({"alpha_a": "1"}, "alpha_a='1'"),
    ({"version": "v2"}, "'v1' or 'v3'"),
    ({"version": "v1", "alpha_c": 0.2, "alpha_f": 0.2}, "alpha_c > alpha_f"),
    ({"version": "v1", "alpha_c": 0.1, "alpha_f": 0.5}, "alpha_c > alpha_f"),
    ({"version": "v1", "alpha_f": -0.1}, "alpha_f=-0.1"),
    ({"alpha_f": 0.2}, "only used by version 'v1'"),
])
def test_invalid_weights_raise(kwargs, needle):
    with pytest.raises(ValueError) as err:
        RewardConfig(**kwargs)
    assert needle in str(err.value)


def test_validate_catches_later_edits():
    cfg = RewardConfig()
    cfg.alpha_c = 2.0
    with pytest.raises(ValueError, match="alpha_a > alpha_c"):
        cfg.validate()
    assert math.isclose(RewardConfig(alpha_c=0.0).alpha_c, 0.0)  # help never paid: allowed


def test_equal_weights_ablation_allowed():
    """SPEC 10's ablation alpha_c = alpha_a: a correct help call pays exactly what a local solve
    does (v3 and v1), and anything above alpha_a is still refused."""
    cfg = RewardConfig(alpha_a=0.5, alpha_c=0.5)
    assert reward(True, False, True, False, cfg).total == reward(False, True, False, False, cfg).total == 0.5
    v1 = RewardConfig(version="v1", alpha_a=2.0, alpha_c=2.0, alpha_f=0.2)
    assert reward(True, False, True, True, v1).total == 2.0
    assert reward(False, True, False, True, v1).total == pytest.approx(2.2)
    with pytest.raises(ValueError, match="alpha_a > alpha_c"):
        RewardConfig(alpha_a=0.5, alpha_c=0.5000001)


@pytest.mark.parametrize("text,expected", [
    (HELP_MARKER + " actually: <ANSWER>42</ANSWER>", False),  # the answer is last, in any case
    (HELP_MARKER + " actually: <answer>3*7\n+ 12</answer>", False),  # an answer spanning lines
    ("<ANSWER>42</ANSWER> " + HELP_MARKER, True),
])
def test_help_called_answer_after_marker_in_any_case_or_lines(text, expected):
    assert help_called(text) is expected


@pytest.mark.parametrize("kwargs,needle", [
    ({"alpha_a": float("inf")}, "finite"),
    ({"alpha_a": float("nan")}, "finite"),
    ({"alpha_a": True, "alpha_c": 0.25}, "must be a number"),
    ({"alpha_c": False}, "must be a number"),
])
def test_reward_weights_must_be_finite_numbers_not_booleans(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        RewardConfig(**kwargs)


def test_help_called_takes_the_answer_start_from_the_task():
    """The default reads Template I <answer> blocks only; a task passes where the answer its
    verifier reads starts (tasks.py). HELP_MARKER is 47 characters, its phrase starts at 17."""
    text = HELP_MARKER + " Step 3: so \\boxed{5}"   # the box starts at 47 + 12 = 59
    assert help_called(text) is True                   # no <answer> block: the marker stands
    assert help_called(text, answer_at=59) is False    # the boxed answer is last
    assert help_called(text, answer_at=10) is True     # an answer at 10 is before the phrase (17)
    assert help_called("no marker", answer_at=-1) is False


@pytest.mark.parametrize("text,after,expected", [
    (HELP_MARKER, -1, 0),                                   # the phrase is inside the open tag
    ("<UNKNOWN> I need External Assistance", -1, 0),        # any case, tag never closed
    ("abc I need external assistance", -1, 11),             # a bare phrase starts the call
    ("<unknown>x</unknown> external assist", -1, 21),       # the tag closed before the phrase
    ("<unknown> <answer>5</answer> external assistance", 10, 29),  # the tag is before `after`
    ("<answer>5</answer>", -1, -1),
    ("<think>hm</think> " + HELP_MARKER + " " + HELP_MARKER, -1, 66),  # the last call: 18+47+1
])
def test_help_start(text, after, expected):
    assert help_start(text, after) == expected
