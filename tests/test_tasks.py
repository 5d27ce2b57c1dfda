"""tasks.py: the Countdown checker, dataset generators, the tiny task's format, math answers."""
import json
import os
import random
import re
import sys
import time
from fractions import Fraction

import pytest

from reward import HELP_MARKER
from tasks import (MAX_LITERAL_DIGITS, CountdownTask, Example, MathTask,
                   TinyCountdownTask, check_countdown, gsm8k_answers_equal, gsm8k_final_number,
                   last_boxed, make_task, math_answers_equal, normalize_math_answer,
                   tiny_check_text)

# ----------------------------------------------------------------------------------------------
# check_countdown: adversarial table. Default numbers [3, 7, 12] and target 33 (3*7+12).

N, T = [3, 7, 12], 33
COUNTDOWN_CASES = [
    # (expression, numbers, target, verdict)
    ("3*7+12", N, T, True),
    ("3 * 7 + 12", N, T, True),
    ("(3*7)+12", N, T, True),
    ("12+7*3", N, T, True),
    ("12 + (7 * 3)", N, T, True),
    ("\t3*7\n+ 12 ", N, T, True),
    ("((((((((((3*7))))))))))+12", N, T, True),
    ("(" * 60 + "3*7" + ")" * 60 + "+12", N, T, True),  # deep but under the length bound
    ("3*7+12 = 33", N, T, True),  # [ours] a trailing "= target" is allowed
    ("3*7+12=33", N, T, True),
    ("3*7+12 = 34", N, T, False),
    ("3*7+12 = 33 = 33", N, T, False),
    ("3*7+12 =", N, T, False),
    ("3*7+12 = 33.0", N, T, False),
    ("3*7+12", N, 34, False),
    ("3*7*12", N, T, False),  # wrong value
    ("3*7", N, T, False),  # 12 unused
    ("3*7+12+3", N, T, False),  # 3 reused
    ("3*7+12", [3, 7, 12, 1], T, False),  # 1 unused
    ("37+12", N, 49, False),  # 3 and 7 glued
    ("12+21", [1, 2, 21], 33, False),  # "12" glued from 1 and 2
    ("3 7 12", N, T, False),
    ("3*7 12", N, T, False),
    ("3*7--12", N, 9 + 24, False),  # unary minus (3*7 - -12 = 33)
    ("3*7-(-12)", N, T, False),
    ("+3*7+12", N, T, False),  # unary plus
    ("3*7+(+12)", N, T, False),
    ("-3*7+12", N, -9, False),
    ("3**7+12", N, T, False),
    ("2**99999", [2, 99999], 0, False),
    ("__import__('os').system('echo hi')", N, T, False),
    ("abs(3)*7+12", N, T, False),
    ("1/0", [1, 0], 0, False),
    ("7/(3-3)", [7, 3, 3], 0, False),  # division by zero from given numbers
    ("((((", N, T, False),
    ("(3*7+12", N, T, False),
    ("3*7+12)", N, T, False),
    ("()", [], 0, False),
    ("3*()7+12", N, T, False),
    ("", N, T, False),
    ("   ", N, T, False),
    ("３*7+12", N, T, False),  # fullwidth digit
    ("٣*7+12", N, T, False),  # Arabic-Indic digit
    ("3*7+１２", N, T, False),
    ("3×7+12", N, T, False),
    ("3*7＋12", N, T, False),
    ("3*7+12.0", N, T, False),
    ("0x3*7+12", N, T, False),
    ("3e0*7+12", N, T, False),
    ("3*7+12;", N, T, False),
    ("3*7+12 # comment", N, T, False),
    ("3*7+12\x00", N, T, False),
    ("<answer>3*7+12</answer>", N, T, False),
    ("3*7+1234567", [3, 7, 1234567], 1234588, False),  # literal longer than 6 digits
    ("1+" * 5000 + "1", [1] * 5001, 5001, False),  # 10 kB
    ("(" * 5000 + "3*7+12" + ")" * 5000, N, T, False),  # 10 kB of parentheses
    ("3*7+12" + " " * 10000, N, T, False),  # over the length bound, however harmless
    ("9/(1/3)", [9, 1, 3], 27, True),  # rational intermediate
    ("4/8*6", [4, 8, 6], 3, True),
    ("12/7+3", N, T, False),  # not a whole number
    ("10-4-3", [10, 4, 3], 3, True),  # left associative
    ("10-4-3", [10, 4, 3], 9, False),
    ("24/4/2", [24, 4, 2], 3, True),
    ("24/4/2", [24, 4, 2], 12, False),
    ("2+3*4", [2, 3, 4], 14, True),  # precedence
    ("2+3*4", [2, 3, 4], 20, False),
    ("5+5+2", [5, 5, 2], 12, True),  # duplicates in the list
    ("5+2", [5, 5, 2], 7, False),
    ("5+5+5", [5, 5, 2], 15, False),
    ("3*7+012", N, T, True),  # [ours] a leading zero reads as the same number
]


@pytest.mark.parametrize("expression,numbers,target,expected", COUNTDOWN_CASES)
def test_check_countdown_table(expression, numbers, target, expected):
    start = time.perf_counter()
    verdict = check_countdown(expression, numbers, target)
    elapsed = time.perf_counter() - start
    assert verdict is expected
    assert elapsed < 0.010, f"{elapsed * 1000:.1f} ms"


def test_check_countdown_never_raises_on_odd_inputs():
    assert check_countdown(None, N, T) is False
    assert check_countdown("3*7+12", ["x"], T) is False
    assert check_countdown(b"3*7+12", N, T) is False


def _random_tree(values, rng):
    """An independent random expression: (text, exact value or None on division by zero)."""
    if len(values) == 1:
        return str(values[0]), Fraction(values[0])
    cut = rng.randrange(1, len(values))
    (lt, lv), (rt, rv) = _random_tree(values[:cut], rng), _random_tree(values[cut:], rng)
    op = rng.choice("+-*/")
    if lv is None or rv is None or (op == "/" and rv == 0):
        value = None
    else:
        value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else None}[op]
    pad = lambda: " " * rng.randrange(2)  # noqa: E731
    return f"({pad()}{lt}{pad()}{op}{pad()}{rt}{pad()})", value


def test_check_countdown_agrees_with_exact_evaluation():
    rng = random.Random(1234)
    checked = 0
    for _ in range(1500):
        numbers = [rng.randint(0, 99) for _ in range(rng.choice([2, 3, 4]))]
        order = numbers[:]
        rng.shuffle(order)
        text, value = _random_tree(order, rng)
        if value is None:
            assert check_countdown(text, numbers, 0) is False
            continue
        checked += 1
        assert check_countdown(text, numbers, value) is True, (text, numbers, value)
        assert check_countdown(text, numbers, value + 1) is False
        assert check_countdown(text, numbers + [1], value) is False  # a number left unused
        if len(numbers) > 2:
            assert check_countdown(text, numbers[:-1] + [numbers[-1] + 100], value) is False
    assert checked > 1000


# ----------------------------------------------------------------------------------------------
# Countdown datasets

def _canonical(example):
    return tuple(sorted(example.data["numbers"])), example.data["target"]


def test_countdown_splits_disjoint_deterministic_and_solved():
    a = CountdownTask(n_train=400, n_test=100, seed=3)
    b = CountdownTask(n_train=400, n_test=100, seed=3)
    c = CountdownTask(n_train=400, n_test=100, seed=4)
    train, test = a.examples("train"), a.examples("test")
    assert len(train) == 400 and len(test) == 100
    assert [e.key for e in train] == [e.key for e in b.examples("train")]
    assert [e.key for e in test] == [e.key for e in b.examples("test")]
    assert [e.key for e in train] != [e.key for e in c.examples("train")]
    assert not {_canonical(e) for e in train} & {_canonical(e) for e in test}
    assert len({e.key for e in train + test}) == 500
    for e in train + test:
        numbers, target = e.data["numbers"], e.data["target"]
        assert len(numbers) in (3, 4) and all(1 <= x <= 99 for x in numbers) and 1 <= target <= 100
        assert check_countdown(e.data["solution"], numbers, target)
        assert a.local_correct(e, f"<think>ok</think> <answer>{e.data['solution']}</answer>")
        system, user = e.prompt
        assert system["role"] == "system" and HELP_MARKER in system["content"]
        assert "<think>" in system["content"] and "<answer>" in system["content"]
        assert user["role"] == "user" and str(target) in user["content"] and str(numbers) in user["content"]
        assert "step by step" in user["content"]
    counts = [len(e.data["numbers"]) for e in train]
    assert 0.35 < counts.count(3) / len(counts) < 0.65
    # the test split does not depend on n_train
    d = CountdownTask(n_train=50, n_test=100, seed=3)
    assert [e.key for e in d.examples("test")] == [e.key for e in test]


def test_countdown_verdicts_and_cloud():
    task = CountdownTask(n_train=0, n_test=5, seed=0)
    ex = Example("countdown:3,7,12->33", [], {"numbers": [3, 7, 12], "target": 33, "solution": "3 * 7 + 12"})
    assert task.local_correct(ex, "<think>x</think> <answer>3*7+12</answer>")
    assert task.local_correct(ex, "<answer>1+1</answer> no wait <answer>12 + 3*7</answer>")  # the last one
    assert not task.local_correct(ex, "<answer>3*7+12</answer> <answer>1+1</answer>")
    assert not task.local_correct(ex, "<answer>3*7+12</answer> " + HELP_MARKER)  # a help call
    assert not task.local_correct(ex, "3*7+12")  # no answer block
    cloud = task.cloud_messages(ex)
    assert HELP_MARKER not in json.dumps(cloud) and "[3, 7, 12]" in cloud[-1]["content"]
    rng = random.Random(0)
    assert task.cloud_correct(ex, task.oracle_answer(ex, True, rng))
    assert not any(task.cloud_correct(ex, task.oracle_answer(ex, False, rng)) for _ in range(20))


def test_bad_split_and_bad_arguments():
    task = CountdownTask(n_train=5, n_test=5)
    with pytest.raises(ValueError, match="'validation'"):
        task.examples("validation")
    with pytest.raises(ValueError, match="number_range"):
        TinyCountdownTask(number_range=(1, 200))
    with pytest.raises(ValueError, match="ops"):
        CountdownTask(ops="+^")
    with pytest.raises(ValueError, match="allowed|use one of"):
        make_task("chess")
    with pytest.raises(ValueError, match="n_nubmers"):
        make_task("tiny_countdown", n_nubmers=3)
    assert make_task("tiny_countdown", n_train=3, n_test=2).name == "tiny_countdown"
    with pytest.raises(ValueError, match="distinct examples"):  # 1..2 cannot make 105 distinct prompts
        TinyCountdownTask(number_range=(1, 2), n_train=100, n_test=5).examples("train")


# ----------------------------------------------------------------------------------------------
# The tiny task

def _verify_chain(chain, numbers, target=None):
    """Independent check of a bare chain: returns its final value if every step is honest and
    uses the numbers as specified, else None."""
    m = re.fullmatch(r"\[(.*)\]", chain)
    if not m:
        return None
    unused, prev = list(numbers), None
    for step in m.group(1).split(","):
        s = re.fullmatch(r"([0-9]{3})([-+*])([0-9]{3})=([0-9]{3})", step)
        if not s:
            return None
        a, op, b, r = int(s[1]), s[2], int(s[3]), int(s[4])
        if prev is None:
            for x in (a, b):
                if x not in unused:
                    return None
                unused.remove(x)
        elif a == prev and b in unused:
            unused.remove(b)
        elif b == prev and a in unused:
            unused.remove(a)
        else:
            return None
        if {"+": a + b, "-": a - b, "*": a * b}[op] != r:
            return None
        prev = r
    if unused or (target is not None and prev != target):
        return None
    return prev


@pytest.fixture(scope="module")
def tiny():
    return TinyCountdownTask()


def test_tiny_default_dataset(tiny):
    train, test = tiny.examples("train"), tiny.examples("test")
    assert len(train) == 20000 and len(test) == 500
    assert not {_canonical(e) for e in train} & {_canonical(e) for e in test}
    assert [e.key for e in test] == [e.key for e in TinyCountdownTask(n_train=10).examples("test")]
    for e in train[:3000] + test:
        numbers, target = e.data["numbers"], e.data["target"]
        assert len(numbers) == 3 and all(1 <= x <= 20 for x in numbers) and 1 <= target <= 999
        assert e.prompt == ",".join(f"{x:02d}" for x in numbers) + f"|{target:03d}="
        assert set(e.prompt) <= set(tiny.alphabet)
        assert _verify_chain(e.data["solution"], numbers, target) == target
        assert set(e.data["solution"]) <= set(tiny.alphabet)
    assert tiny.stop_texts == ("A", "H")
    assert set(tiny.alphabet) == set("0123456789,|=[]+-*#AH")
    assert "/" in TinyCountdownTask(ops="+-*/", n_train=1, n_test=1).alphabet


EX_33 = Example("k33", "07,03,12|033=", {"numbers": [7, 3, 12], "target": 33, "solution": "[007*003=021,021+012=033]"})
EX_13 = Example("k13", "05,03,02|013=", {"numbers": [5, 3, 2], "target": 13, "solution": "[005*002=010,010+003=013]"})

TINY_CASES = [
    # (example, response, local_correct, help_called, formatted)
    (EX_33, "[007*003=021,021+012=033]00=33=33=A", True, False, True),
    (EX_33, "[003*007=021,012+021=033]00=33=33=A", True, False, True),  # operands either way round
    (EX_33, "[007*003=021,021+012=033]00=33=33=H", False, True, True),  # help, though right
    (EX_33, "[007+003=010,010+012=033]00=33=33=A", False, False, True),  # fake arithmetic on target
    (EX_33, "[007+003=010,010*012=120]10#23#03#A", False, False, True),  # honest miss
    (EX_33, "[007+003=010,010*012=120]10#23#03#H", False, True, True),
    (EX_33, "[007*003=021,021+012=033]99#99#99#A", True, False, False),  # check is not graded
    (EX_33, "[007*003=021,021+012=033]A", True, False, False),
    (EX_33, "[007*003=021,021+012=033]00=33=33=AA", False, False, False),  # text after the decision
    (EX_33, "[007*003=021,021+012=033]00=33=3", False, False, False),  # truncated
    (EX_33, "[007*003=021,021+0", False, False, False),
    (EX_33, "[007*H", False, True, False),  # a help call mid-chain is still a help call
    (EX_33, "A", False, False, False),
    (EX_33, "", False, False, False),
    (EX_33, "[007*003=021]02#13#13#A", False, False, False),  # too few steps
    (EX_33, "[007*003=021,021+012=033,033*001=033]00=33=33=A", False, False, False),  # too many
    (EX_33, "[007*003=021,021+012=033]00=33=33=B", False, False, False),
    (EX_13, "[005*002=010,010+003=013]00=11=33=A", True, False, True),
    (EX_13, "[005+005=010,010+003=013]00=11=33=A", False, False, True),  # 5 reused, 2 unused
    (EX_13, "[004*002=008,008+005=013]00=11=33=A", False, False, True),  # 4 is not given
    (EX_13, "[005*002=010,003+010=013]00=11=33=A", True, False, True),
    (EX_13, "[005*002=010,010+003=013]00=11=33=H", False, True, True),
    (EX_13, "[005+003=008,008*002=016]00=11=63#A", False, False, True),
    (EX_13, "[005-003=002,002*002=004]00=01#43#A", False, False, True),
    (EX_13, "[003-005=998,998+...]", False, False, False),  # no negative results
    (EX_13, "[005*002=010,010+003=013]00=11=33#A", True, False, False),  # inconsistent check char
    (EX_13, "[005*002=010,010+003=013]10#11#33#A", True, False, False),  # check copies a wrong digit
    (EX_13, "[００５*002=010,010+003=013]00=11=33=A", False, False, False),
]


@pytest.mark.parametrize("example,response,correct,help,formatted", TINY_CASES)
def test_tiny_verdicts(tiny, example, response, correct, help, formatted):
    assert tiny.local_correct(example, response) is correct
    assert tiny.help_called(response) is help
    assert tiny.formatted(response) is formatted


def test_tiny_step_out_of_range_is_wrong(tiny):
    ex = Example("k", "20,20,20|999=", {"numbers": [20, 20, 20], "target": 999, "solution": ""})
    assert not tiny.local_correct(ex, "[020*020=400,400*020=999]99=99=99=A")  # true result 8000


def test_tiny_cloud_correct(tiny):
    assert tiny.cloud_correct(EX_33, "[007*003=021,021+012=033]")
    assert tiny.cloud_correct(EX_33, " [007*003=021,021+012=033]\n")
    assert tiny.cloud_correct(EX_33, "[007*003=021,021+012=033]00=33=33=A")
    assert not tiny.cloud_correct(EX_33, "[007*003=021,021+012=033]00=33=33=H")
    assert not tiny.cloud_correct(EX_33, "[007+003=010,010*012=120]")
    assert not tiny.cloud_correct(EX_33, "I don't know")
    assert tiny.cloud_messages(EX_33) == [{"role": "user", "content": "07,03,12|033="}]
    rng = random.Random(5)
    assert tiny.oracle_answer(EX_33, True, rng) == EX_33.data["solution"]
    for _ in range(20):
        wrong = tiny.oracle_answer(EX_33, False, rng)
        value = _verify_chain(wrong, [7, 3, 12])
        assert value is not None and value != 33  # honest arithmetic, misses the target
        assert not tiny.cloud_correct(EX_33, wrong)


def test_tiny_self_check_mask(tiny):
    response = "[005*002=010,010+003=013]00=11=33=A"
    mask = tiny.self_check_mask(list(response))
    assert mask == [False] * 25 + [True] * 9 + [False]
    assert tiny.self_check_mask(list("[005*002=010,010+003=013]00=11=33=H"))[25:34] == [True] * 9
    assert tiny.self_check_mask(["[005*002=010,", "010+003=013]", "00=", "11=33=", "A"]) == [False, False, True, True, False]
    assert tiny.self_check_mask(["[005*002=010,010+003=013", "]00=", "11=33=", "A"]) == [False, False, True, False]
    assert tiny.self_check_mask(list("[005*002=010,010+0")) == [False] * 18  # no check reached
    assert tiny.self_check_mask(list("[005*002=010,010+003=013]00=1")) == [False] * 25 + [True] * 4
    assert tiny.self_check_mask([]) == []
    # no decision after the 9 check characters: what stands in its place keeps its gradient
    undecided = "[005*002=010,010+003=013]00=11=33=1=A"
    assert tiny.self_check_mask(list(undecided)) == [False] * 25 + [True] * 9 + [False] * 3
    assert CountdownTask(n_train=1, n_test=1).self_check_mask(["<think>", "a"]) == [False, False]


def _expected_check(final, target):
    out, differed = "", False
    for i in range(3):
        f, t = f"{final:03d}"[i], f"{target:03d}"[i]
        differed |= f != t
        out += f + t + ("#" if differed else "=")
    return out


def test_tiny_check_text_examples():
    assert tiny_check_text(120, 33) == "10#23#03#"  # the worked examples of issue 5
    assert tiny_check_text(33, 33) == "00=33=33="
    assert tiny_check_text(34, 33) == "00=33=43#"


def test_warm_start_statistics(tiny):
    rng = random.Random(0)
    examples = tiny.examples("test")
    n, correct, helps, help_when_right, help_when_wrong, n_right = 4000, 0, 0, 0, 0, 0
    for i in range(n):
        ex = examples[i % len(examples)]
        completion = tiny.warm_start_completion(ex, rng)
        chain, check, decision = completion[:-10], completion[-10:-1], completion[-1]
        target = ex.data["target"]
        final = _verify_chain(chain, ex.data["numbers"])
        assert final is not None  # always honest arithmetic over all numbers
        assert check == _expected_check(final, target)
        assert decision in "AH"
        assert tiny.formatted(completion)
        right = final == target
        correct += right
        helps += decision == "H"
        n_right += right
        help_when_right += right and decision == "H"
        help_when_wrong += (not right) and decision == "H"
        assert tiny.local_correct(ex, completion) is (right and decision == "A")
    assert abs(correct / n - 0.7) < 0.03
    assert abs(helps / n - 0.2) < 0.03
    assert abs(help_when_right / n_right - 0.2) < 0.04  # routing is not taught
    assert abs(help_when_wrong / (n - n_right) - 0.2) < 0.05


def test_warm_start_wrong_attempts_are_near_misses(tiny):
    rng = random.Random(1)
    examples = tiny.examples("test")[:200]
    distances = []
    for ex in examples:
        completion = tiny.warm_start_completion(ex, rng, p_correct=0.0, p_help=0.0)
        assert completion.endswith("A")
        final = _verify_chain(completion[:-10], ex.data["numbers"])
        assert final != ex.data["target"]
        distances.append(abs(final - ex.data["target"]))
    distances.sort()
    assert distances[len(distances) // 2] <= 20  # closest of 8 tries: typically close


# ----------------------------------------------------------------------------------------------
# Math answers

MATH_CASES = [
    # (a, b, equal)
    ("\\frac{1}{2}", "\\frac12", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\tfrac{3}{4}", "3/4", True),
    ("0.5", "\\frac{1}{2}", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\frac{-1}{2}", "-\\frac12", True),
    ("2.50", "2.5", True),
    ("2.0", "2", True),
    (".5", "0.5", True),
    ("x = 5", "5", True),
    ("y=-3", "-3", True),
    ("5 \\text{ cm}", "5", True),
    ("10\\text{ inches}", "10", True),
    ("12 \\text{cm}^2", "12", True),
    ("\\text{Tuesday}", "Tuesday", True),
    ("\\text{(C)}", "C", True),
    ("$5$", "5", True),
    ("\\$18.00", "18", True),
    ("50\\%", "50", True),
    ("50%", "50", True),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "90", True),
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("(1, 2)", "(1,2)", True),
    ("\\left\\{1, 2\\right\\}", "\\{1,2\\}", True),
    ("x \\rightarrow 2", "x\\rightarrow2", True),
    ("\\sqrt2", "\\sqrt{2}", True),
    ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}", True),
    ("3\\!\\cdot\\!4", "3\\cdot4", True),
    ("a\\,b", "ab", True),
    ("1.0000001", "1", False),  # both exact: compared exactly
    ("5.", "5", True),
    ("\\displaystyle\\frac{2}{3}", "\\frac{2}{3}", True),
    ("0.3333", "\\frac{1}{3}", False),  # beyond the tolerance
    ("0.3333333", "\\frac{1}{3}", True),  # a rounded decimal, within it
    ("1000000", "1000001", False),  # whole numbers compare exactly
    ("0.000000000001", "0", False),
    ("2", "3", False),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("x+1", "x-1", False),
    ("(1,2)", "(2,1)", False),
    ("10", "100", False),
    ("\\sqrt{2}", "2", False),
    ("", "0", False),
    (None, "0", False),
    ("-0", "0", True),
    # a matrix's row break \\ is not the space command "\ ", however it is spaced
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}12\\end{pmatrix}", False),
    ("\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("x^{2}+1", "x^2+1", True),
    ("x^{10}", "x^10", False),  # only a single-character exponent loses its braces
    ("\\sqrt[3]2", "\\sqrt[3]{2}", True),
    ("+5", "5", True),
    ("3\\textnormal{ cm}", "3", True),
    ("10\\,000", "10000", True),  # a thin space groups thousands
    ("1 000 000", "1000000", True),
    ("3 1/2", "\\frac{31}{2}", False),  # spaces never join digits: a mixed number is not 31/2
    ("\\frac 1 2", "1/2", True),  # TeX skips spaces before an argument
    ("\\dfrac 3 4", "0.75", True),
    ("1 2", "12", False),
    ("3\\text{ or 4}", "3", False),  # a text with a digit is no unit: the hedge stays
    ("3\\text{ or 4}", "3or4", True),
    ("10, 100", "10100", False),  # a comma and a space list two numbers; they group no thousands
    ("10,100", "10100", True),
    ("1, 000", "1000", False),
    ("1,\\,000", "1000", True),  # a spacing command after the comma still groups thousands
]


@pytest.mark.parametrize("a,b,expected", MATH_CASES)
def test_math_answers_equal(a, b, expected):
    assert math_answers_equal(a, b) is expected
    if a is not None:
        assert math_answers_equal(b, a) is expected


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{5}.", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{1}, finally \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{x^{2}+{1}}", "x^{2}+{1}"),
    ("$\\boxed 7$", "7"),
    ("\\fbox{3}", "3"),
    ("\\boxed{1} then \\boxed{2", None),  # the last one is unbalanced
    ("no box", None),
    ("\\boxed", None),
    # mentions of the format after the answer are no answer
    ("\\boxed{5}. (I put it in \\boxed as asked.)", "5"),
    ("\\boxed{5}. Note: \\boxed{} is required.", "5"),
    ("\\boxed{5} \\fboxrule=1pt", "5"),
    ("\\boxed{}", None),
    # other ways to write a box
    ("\\boxed5", "5"),
    ("\\boxed -2", "-2"),
    ("\\boxed \\pi", "\\pi"),
    ("\\boxed A", "A"),
    ("\\boxed\n{5}", "5"),
    ("\\boxed{a \\} b}", "a \\} b"),  # an escaped brace does not close the box
    ("\\boxed{\\{1\\}", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("She pays 3 * 6 = 18 dollars.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("#### -7.5", "-7.5"),
    ("The answer is \\boxed{\\$1,200}.", "1200"),
    ("So she has 5 apples and 12 pears, total 17.", "17"),
    ("nothing here", None),
    ("#### \u22125", "-5"),  # the Unicode minus sign
    ("#### - 5", "-5"),
    ("#### 5,6", "5"),  # a comma groups three digits or it is no part of the number
    ("#### 1,2345", "1"),
    ("so 10 - 5", "5"),  # a spaced sign only right after ####
    ("#### 1,234,567.5", "1234567.5"),
    ("#### -\n5", "-5"),
])
def test_gsm8k_final_number(text, expected):
    assert gsm8k_final_number(text) == expected


def test_gsm8k_answers_compare_whole_numbers_exactly():
    assert gsm8k_answers_equal("18.0", "18") and gsm8k_answers_equal("1,234", "1234")
    assert not gsm8k_answers_equal("12345679", "12345678")


@pytest.mark.parametrize("answer", [
    "3" * 309,  # beyond float range
    "1" * 5000,  # beyond Python's int-from-string digit limit
    "\\frac{" * 1000 + "1" + "}{2}" * 1000,  # nesting deeper than the recursion limit
    "\\frac{" + "9" * 400 + "}{7}",
], ids=["beyond-float", "beyond-int-digits", "deep-nesting", "huge-fraction"])
def test_hostile_answers_are_wrong_not_a_crash(answer):
    """A model's (or cloud's) final answer is untrusted text: the verdict is False, never an
    exception that would end the training step."""
    assert math_answers_equal(answer, "5") is False and math_answers_equal("5", answer) is False
    assert gsm8k_answers_equal(gsm8k_final_number(answer), "5") is False
    assert gsm8k_answers_equal("1" * 400, "2") is False


@pytest.mark.parametrize("number", ["1e999999999", "1E-999999999", "-1e999999999"])
def test_gsm8k_comparison_reads_no_exponent(number):
    """A comparison takes plain decimals (and a/b, the form a box's fraction is read in), as the
    scorer reads numbers out of a text: "1e5" there is 1, then 5. Read as an exponent, 1e999999999
    was a billion-digit integer (the call did not return)."""
    assert gsm8k_answers_equal(number, "1") is False and gsm8k_answers_equal("1", number) is False
    assert gsm8k_answers_equal("1e5", "100000") is False
    assert gsm8k_answers_equal("-1/2", "-0.5") and gsm8k_answers_equal("3/0", "3") is False
    assert gsm8k_answers_equal("+5", "5")  # a plain sign, as Fraction reads it


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_math_task_loads_and_checks(tmp_path):
    good = _write(tmp_path / "math.jsonl", [
        json.dumps({"problem": "What is 1/2 + 0?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"}),
        "",
        json.dumps({"problem": "Compute 2+3.", "solution": "Step: \\boxed{1} no, \\boxed{5}"}),
    ])
    task = MathTask(path_train=good, path_test=good, kind="math", max_steps=4)
    train = task.examples("train")
    assert [e.data["gold"] for e in train] == ["\\frac{1}{2}", "5"]
    assert train[0].key == MathTask(path_train=good).examples("train")[0].key  # stable
    system, user = train[0].prompt
    assert "Step 1" in system["content"] and "\\boxed{}" in system["content"] and "4 steps" in system["content"]
    assert HELP_MARKER in system["content"] and user["content"].startswith("What is 1/2 + 0?")
    assert HELP_MARKER not in json.dumps(task.cloud_messages(train[0]))
    assert task.local_correct(train[0], "Step 1: add.\nThe answer is \\boxed{0.5}.")
    assert task.local_correct(train[0], "Step 1: \\boxed{\\dfrac12}")
    assert not task.local_correct(train[0], "Step 1: \\boxed{0.5}. " + HELP_MARKER)
    assert not task.local_correct(train[0], "Step 1: I think it is 0.5")
    assert task.formatted("Step 1: add. Step 2: \\boxed{5}")
    assert task.formatted("Step 1: hmm. " + HELP_MARKER)
    assert not task.formatted("\\boxed{5}")
    rng = random.Random(0)
    for ex in train:
        assert task.cloud_correct(ex, task.oracle_answer(ex, True, rng))
        assert not task.cloud_correct(ex, task.oracle_answer(ex, False, rng))


def test_math_task_without_help_keeps_the_step_layout(tmp_path):
    """allow_help=False (the task-tuning baseline) removes the help option only, as Countdown's
    does: the "Step 1: ..." layout that formatted() checks stays in the prompt (it was the cloud's
    message, which has none)."""
    path = _write(tmp_path / "m.jsonl", [json.dumps({"problem": "p", "solution": "\\boxed{1}"})])
    helped = MathTask(path_train=path).examples("train")[0].prompt[0]["content"]
    alone = MathTask(path_train=path, allow_help=False).examples("train")[0].prompt[0]["content"]
    assert "Step 1" in alone and "\\boxed{}" in alone
    assert "<unknown>" not in alone and "steps, stop" not in alone
    assert helped.startswith(alone[:-1])  # Template II up to its help sentence


def test_gsm8k_task(tmp_path):
    path = _write(tmp_path / "gsm.jsonl", [json.dumps({"question": "How many?", "answer": "5+7=12\n#### 1,212"})])
    task = MathTask(path_test=path, kind="gsm8k")
    (ex,) = task.examples("test")
    assert ex.data["gold"] == "1212" and task.name == "gsm8k"
    assert task.local_correct(ex, "Step 1: ... so 1212 in all.")
    assert task.local_correct(ex, "Step 1: ...\n#### 1,212.00")
    assert not task.local_correct(ex, "Step 1: ... so 1213 in all.")
    assert not task.cloud_correct(ex, task.oracle_answer(ex, False, random.Random(0)))
    with pytest.raises(ValueError, match="path_train"):
        task.examples("train")


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        MathTask(path_train=missing).examples("train")
    bad_json = _write(tmp_path / "bad.jsonl", [json.dumps({"problem": "p", "solution": "\\boxed{1}"}), "{oops"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        MathTask(path_train=bad_json).examples("train")
    no_field = _write(tmp_path / "nofield.jsonl", [json.dumps({"problem": "p", "solution": "\\boxed{1}"}),
                                                   json.dumps({"problem": "p"}), json.dumps({"x": 1})])
    with pytest.raises(ValueError, match=r"nofield\.jsonl:2: field 'solution' is missing"):
        MathTask(path_train=no_field).examples("train")
    no_box = _write(tmp_path / "nobox.jsonl", [json.dumps({"problem": "p", "solution": "it is 3"})])
    with pytest.raises(ValueError, match=r"nobox\.jsonl:1: field 'solution' has no \\boxed"):
        MathTask(path_train=no_box).examples("train")
    empty_box = _write(tmp_path / "empty.jsonl",
                       [json.dumps({"problem": "p", "solution": "\\boxed{}"})])
    with pytest.raises(ValueError, match=r"empty\.jsonl:1: field 'solution' has no \\boxed"):
        MathTask(path_train=empty_box).examples("train")  # a gold no answer could ever equal
    not_gsm = _write(tmp_path / "gsm.jsonl", [json.dumps({"question": "q", "answer": "12"})])
    with pytest.raises(ValueError, match=r"gsm\.jsonl:1: field 'answer'"):
        MathTask(path_train=not_gsm, kind="gsm8k").examples("train")
    worded = _write(tmp_path / "worded.jsonl", [json.dumps({"question": "q", "answer": "5+7=12\n#### twelve"})])
    with pytest.raises(ValueError, match=r"worded\.jsonl:1: field 'answer' does not end with '#### <number>'"):
        MathTask(path_train=worded, kind="gsm8k").examples("train")  # not the 12 before it
    not_object = _write(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"list\.jsonl:1"):
        MathTask(path_train=not_object).examples("train")
    # JSON escapes half a UTF-16 pair alone, which no tokenizer or UTF-8 cache file can take
    half = _write(tmp_path / "half.jsonl", ['{"problem": "p \\ud83d", "solution": "\\boxed{1}"}'])
    with pytest.raises(ValueError, match=r"half\.jsonl:1: field 'problem' holds half a UTF-16 "
                                         r"surrogate pair \('\\ud83d'\) at character 2"):
        MathTask(path_train=half).examples("train")
    with pytest.raises(ValueError, match="kind"):
        MathTask(kind="aime")


def test_every_refused_record_of_a_file_is_named_in_one_error(tmp_path):
    """A file is mended in one pass: each refused record was one run's error, the next one's
    only showing when that was fixed."""
    rows = [{"question": "q1", "answer": "#### 1e5"}, {"question": "q2", "answer": "#### 2"},
            {"question": " ", "answer": "#### 3"}, {"question": "q2", "answer": "#### 4"}]
    path = _write(tmp_path / "gsm.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(ValueError) as refused:
        MathTask(path_train=path, kind="gsm8k").examples("train")
    assert str(refused.value).splitlines() == [
        f"{path}: 3 records refused (mend or remove them):",
        f"  {path}:1: field 'answer': '#### <number>' must be a plain decimal number (digits, an "
        f"optional sign and decimal point, commas between groups of three digits); '#### 1e5' is "
        f"read as 1",
        f"  {path}:3: field 'question' is blank",
        f"  {path}:4: the question of {path}:2 again, with another answer ('4' here, '2' there)"]
    many = _write(tmp_path / "many.jsonl", [json.dumps({"question": f"q{i}", "answer": "#### 1/2"})
                                            for i in range(23)])
    with pytest.raises(ValueError, match=r"many\.jsonl: 23 records refused .*\n(  .*:\d+: .*\n){20}"
                                         r"  \.\.\. and 3 more$"):
        MathTask(path_train=many, kind="gsm8k").examples("train")


def test_every_refused_line_of_a_file_is_named_in_one_error(tmp_path):
    """Lines that are no record (invalid JSON, a field missing or not a string) are refused
    records too: named in the same one error as the others (README), not one per run."""
    rows = [json.dumps({"problem": "a"}), json.dumps({"problem": "b", "solution": "no box"}),
            json.dumps({"problem": 5, "solution": "\\boxed{1}"}), "{oops",
            json.dumps({"problem": "c", "solution": "\\boxed{2}"})]
    path = _write(tmp_path / "m.jsonl", rows)
    with pytest.raises(ValueError) as refused:
        MathTask(path_train=path).examples("train")
    assert sorted(str(refused.value).splitlines()) == sorted([
        f"{path}: 4 records refused (mend or remove them):",
        f"  {path}:1: field 'solution' is missing",
        f"  {path}:2: field 'solution' has no \\boxed{{...}} answer",
        f"  {path}:3: field 'problem' is not a string",
        f"  {path}:4: invalid JSON (Expecting property name enclosed in double quotes at "
        f"column 2)"])


@pytest.mark.parametrize("answer, read_as", [
    ("#### 1e5", "1"), ("#### 3/4", "3"), ("#### 1 000", "1"), ("#### 5,00", "5"),
    ("#### 3 1/2", "3"), ("#### 1.2.3", "1.2"), ("#### \u22125 1", "-5"),
    ("#### 10\u00a0000", "10"), ("#### 10\u202f000", "10"),  # no-break spaces
])
def test_gsm8k_gold_must_be_one_plain_number(tmp_path, answer, read_as):
    """The scorer reads "#### 1e5" in a model's answer as 1 (and 1000 as 1000): a gold written
    so would score the intended 100000 wrong, so the loader refuses it."""
    path = _write(tmp_path / "gsm.jsonl", [json.dumps({"question": "q", "answer": "x\n" + answer})])
    with pytest.raises(ValueError, match=r"gsm\.jsonl:1: field 'answer': '#### <number>' must be a "
                                         r"plain decimal number .*; '.*' is read as " + read_as):
        MathTask(path_train=path, kind="gsm8k").examples("train")


@pytest.mark.parametrize("answer, gold", [
    ("#### 1,000", "1000"), ("#### 18 (3 * 6)", "18"), ("#### 18 dollars", "18"),
    ("#### 2.5%", "2.5"), ("#### **18**", "18"), ("#### 18\n19 is wrong", "18"),
])
def test_gsm8k_gold_followed_by_no_number_is_accepted(tmp_path, answer, gold):
    path = _write(tmp_path / "gsm.jsonl", [json.dumps({"question": "q", "answer": answer})])
    assert MathTask(path_train=path, kind="gsm8k").examples("train")[0].data["gold"] == gold


@pytest.mark.parametrize("kind, solution, why", [
    # each of these normalises to "" (dollar signs, the period, percent and degree signs, empty
    # \text{} and a leading "x =" all go), which no answer equals
    ("math", "So \\boxed{$}", r"its answer '\$' is empty after normalisation"),
    ("math", "So \\boxed{.}", r"its answer '\.' is empty after normalisation"),
    ("math", "So \\boxed{\\%}", r"its answer '\\\\%' is empty after normalisation"),
    ("math", "So \\boxed{\\text{}}", r"its answer '\\\\text\{\}' is empty after normalisation"),
    ("math", "So \\boxed{^\\circ}", r"its answer '\^\\\\circ' is empty after normalisation"),
    ("math", "So \\boxed{x=}", r"its answer 'x=' is empty after normalisation"),
    ("math", "So \\boxed{" + "1" * 1500 + "}",
     r"its answer is 1500 characters long; the scorer reads at most 1000"),
    ("math", "So \\boxed{5}. No, I need external assistance.", r"it reads as a help call"),
    ("gsm8k", "#### " + "1" * 2000,
     r"its answer is 2000 characters long; the scorer reads at most 1000"),
    ("gsm8k", "#### 5\nSo the final answer is \\boxed{6}", r"the scorer reads '6' in it .*not '5'"),
    ("gsm8k", "#### 5\nSo it is \\boxed{five}", r"the scorer reads no number in it .*not '5'"),
])
def test_record_whose_own_solution_scores_wrong_is_refused(tmp_path, kind, solution, why):
    """A record that even its reference solution cannot answer correctly is refused on loading,
    with the reason (else every answer to it, the cloud's included, scores wrong)."""
    question_field, answer_field = MathTask.KINDS[kind]
    fine = "#### 5" if kind == "gsm8k" else "\\boxed{5}"
    path = _write(tmp_path / "data.jsonl", [json.dumps({question_field: q, answer_field: a})
                                            for q, a in (("p", fine), ("q", solution))])
    with pytest.raises(ValueError, match=rf"data\.jsonl:2: field '{answer_field}' is scored wrong "
                                         rf"by the task's own scorer: {why}"):
        MathTask(path_train=path, kind=kind).examples("train")


def test_record_whose_own_solution_scores_right_is_kept(tmp_path):
    path = _write(tmp_path / "gsm.jsonl", [
        json.dumps({"question": "q", "answer": "#### 5\nSo the final answer is \\boxed{5}"}),
        json.dumps({"question": "r", "answer": "#### 1,000"})])
    task = MathTask(path_train=path, kind="gsm8k")
    assert [e.data["gold"] for e in task.examples("train")] == ["5", "1000"]
    longest = "\\boxed{" + "1" * 1000 + "}"  # at the limit: scored
    path = _write(tmp_path / "math.jsonl", [json.dumps({"problem": q, "solution": a})
                                            for q, a in (("p", "\\boxed{x=5}"), ("q", longest))])
    assert [len(e.data["gold"]) for e in MathTask(path_train=path).examples("train")] == [3, 1000]


@pytest.mark.parametrize("question", ["", " \n\t"])
def test_blank_question_is_refused(tmp_path, question):
    path = _write(tmp_path / "gsm.jsonl", [json.dumps({"question": "q", "answer": "#### 1"}),
                                           json.dumps({"question": question, "answer": "#### 2"})])
    with pytest.raises(ValueError, match=r"gsm\.jsonl:2: field 'question' is blank"):
        MathTask(path_train=path, kind="gsm8k").examples("train")


def test_question_repeated_with_another_answer_is_refused(tmp_path):
    """One of the two golds is wrong (and both share a cloud cache key): an error naming both
    lines, within a file and across the train and test files. The same answer again, in any
    form the scorer reads as equal, is allowed."""
    def rows(*pairs):
        return [json.dumps({"problem": p, "solution": f"So \\boxed{{{a}}}."}) for p, a in pairs]
    train = _write(tmp_path / "train.jsonl", rows(("p", "1"), ("q", "2"), ("p", "1.0"), ("p", "1")))
    assert [e.data["gold"] for e in MathTask(path_train=train).examples("train")] == \
        ["1", "2", "1.0", "1"]
    clash = _write(tmp_path / "clash.jsonl", rows(("p", "1"), ("q", "2"), ("p", "1"), ("p", "3")))
    with pytest.raises(ValueError, match=r"clash\.jsonl:4: the question of .*clash\.jsonl:1 "
                                         r"again, with another answer \('3' here, '1' there\)"):
        MathTask(path_train=clash).examples("train")
    test = _write(tmp_path / "test.jsonl", rows(("r", "4"), ("q", "\\frac{5}{2}")))
    task = MathTask(path_train=train, path_test=test)
    task.examples("train")
    with pytest.raises(ValueError, match=r"test\.jsonl:2: the question of .*train\.jsonl:2 again"):
        task.examples("test")
    with pytest.raises(ValueError, match=r"test\.jsonl:2: the question of .*train\.jsonl:2 again"):
        task.examples("test")  # still refused when asked again
    task = MathTask(path_train=train, path_test=test)
    task.examples("test")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: the question of .*test\.jsonl:2 again"):
        task.examples("train")  # loaded the other way round
    same = _write(tmp_path / "same.jsonl", rows(("q", "2.00"), ("r", "4")))
    task = MathTask(path_train=train, path_test=same)
    assert len(task.examples("train")) == 4 and len(task.examples("test")) == 2


def test_jsonl_encoding_errors_name_file_and_line(tmp_path):
    """A file that is not UTF-8 is refused with the file, the line and the byte (not a decoder
    buffer offset); a UTF-16 file is named as such."""
    record = json.dumps({"problem": "p", "solution": "\\boxed{1}"})
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(b"\xff\xfe" + (record + "\n").encode("utf-16-le"))
    with pytest.raises(ValueError, match=r"utf16\.jsonl: the file is UTF-16 \(it starts with the "
                                         r"byte-order mark FF FE\); save it as UTF-8"):
        MathTask(path_train=utf16).examples("train")
    utf16.write_bytes(b"\xfe\xff" + record.encode("utf-16-be"))
    with pytest.raises(ValueError, match=r"utf16\.jsonl: the file is UTF-16 .*FE FF"):
        MathTask(path_train=utf16).examples("train")
    utf16.write_bytes(b"\xff\xfe\x00\x00" + record.encode("utf-32-le"))
    with pytest.raises(ValueError, match=r"utf16\.jsonl: the file is UTF-32 .*FF FE 00 00\)"):
        MathTask(path_train=utf16).examples("train")
    # without a byte-order mark the NUL bytes give it away (it was "invalid JSON" at column 2)
    for encoding in ("utf-16-le", "utf-16-be", "utf-32-le"):
        utf16.write_bytes((record + "\n").encode(encoding))
        with pytest.raises(ValueError, match=r"utf16\.jsonl:1: holds NUL bytes \(the file looks "
                                             r"UTF-16 or UTF-32 without a byte-order mark\); save "
                                             r"the file as UTF-8"):
            MathTask(path_train=utf16).examples("train")
    # Latin-1 "é" (byte 0xe9) on line 3, after the 16 characters {"problem": "caf
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b"\n".join([record.encode(), b"", '{"problem": "caf\xe9", "solution": '
                                  '"\\\\boxed{1}"}'.encode("latin-1")]))
    with pytest.raises(ValueError, match=r"latin\.jsonl:3: not UTF-8 \(byte 0xe9 at column 17\); "
                                         r"save the file as UTF-8"):
        MathTask(path_train=latin).examples("train")


def test_jsonl_file_may_open_with_a_utf8_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    lines = [json.dumps({"problem": "Caf\u00e9?", "solution": "\\boxed{1}"}),
             json.dumps({"problem": "q", "solution": "\\boxed{2}"})]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8"))
    examples = MathTask(path_train=path).examples("train")
    assert [(e.data["problem"], e.data["gold"]) for e in examples] == [("Caf\u00e9?", "1"),
                                                                         ("q", "2")]


@pytest.mark.parametrize("ops, chain, numbers, target, ok", [
    ("+-*", "[027*037=999]", [27, 37], 999, True),       # 999: the largest 3-digit value
    ("+-*", "[100*010=1000]", [100, 10], 1000, False),   # leaves 0..999
    ("+-*", "[003-007=-04]", [3, 7], -4, False),         # below 0
    ("+-*/", "[012/004=003]", [12, 4], 3, True),         # exact division
    ("+-*/", "[007/002=003]", [7, 2], 3, False),         # 7/2 is not a whole number
    ("+-*/", "[007/000=000]", [7, 0], 0, False),
])
def test_tiny_chain_arithmetic_bounds(ops, chain, numbers, target, ok):
    assert TinyCountdownTask(ops=ops).chain_correct(chain, numbers, target) is ok


def test_countdown_expression_length_limit_is_inclusive():
    from tasks import MAX_EXPRESSION_CHARS
    at_limit = "(" * 97 + "1+2" + ")" * 97    # 197 characters, padded to the limit below
    at_limit = " " * (MAX_EXPRESSION_CHARS - len(at_limit)) + at_limit
    assert len(at_limit) == MAX_EXPRESSION_CHARS and check_countdown(at_limit, [1, 2], 3)
    assert not check_countdown(" " + at_limit, [1, 2], 3)   # one character over


def test_check_countdown_literal_digit_limit_is_inclusive():
    six = 10 ** (MAX_LITERAL_DIGITS - 1)  # 100000: six digits, allowed
    assert check_countdown(f"{six}+1", [six, 1], six + 1)
    assert check_countdown("000007+3", [7, 3], 10)  # leading zeros count towards the six
    assert not check_countdown(f"{six * 10}+1", [six * 10, 1], six * 10 + 1)  # seven: rejected


@pytest.mark.parametrize("a,b,expected", [
    ("1000000", "1000000.5", False),  # both exact: no tolerance, however large the numbers
    ("1.0000005", "1", False),
    ("0.5", "\\frac{1}{2}", True),   # equal forms of one exact value
    ("0.5", "1/2", True),
    ("0.125", "\\frac{1}{8}", True),
    ("1,000", "1000", True),
    # 1/3 has no exact decimal: a decimal may stand for it when it is 1/3 rounded to the digits
    # written (error <= half a unit of the last digit) and within a relative 1e-6
    ("0.3333333", "\\frac{1}{3}", True),   # error 1/(3e7) < 5e-8, relative 1e-7
    ("-0.3333333", "-\\frac{1}{3}", True),
    ("0.6666667", "\\frac{2}{3}", True),   # error 1/(3e7)
    ("0.6666666", "\\frac{2}{3}", False),  # truncated: error 2/(3e7) > 5e-8
    ("0.33333", "\\frac{1}{3}", False),    # rounded, but relative 1e-5
    ("333333.5", "\\frac{1000000}{3}", False),  # relative 5e-7, but 333333.33.. rounds to .3
    ("333333.3333", "\\frac{1000000}{3}", True),  # error 1/30000 < 5e-5
    ("333333", "\\frac{1000000}{3}", False),  # no fractional part: not a rounded decimal
])
def test_numbers_compare_exactly_unless_a_decimal_rounds_a_value_without_one(a, b, expected):
    assert math_answers_equal(a, b) is expected and math_answers_equal(b, a) is expected


@pytest.mark.parametrize("a,b,expected", [
    ("1234568", "1234567.5", False),
    ("2000000.9", "2000001", False),
    ("18.0", "18", True),
    ("1,234", "1234", True),
    (".5", "0.50", True),
])
def test_gsm8k_numbers_compare_exactly(a, b, expected):
    assert gsm8k_answers_equal(a, b) is expected and gsm8k_answers_equal(b, a) is expected


@pytest.mark.parametrize("answer,expected", [
    ("5 \\text{cm}", "5"),
    ("10\\text{ m}^2", "10"),
    ("\\frac{1}{2}\\mbox{ inches}", "\\frac{1}{2}"),
    ("5\\text{cm} \\text{m}", "5cm"),   # only the last unit goes; the other is unwrapped
    ("x\\text{ cm}", "xcm"),              # no value before it: not a unit
    ("1" * 1000 + "\t" * 4000 + "\\text{cm}", "1" * 1000),
    ("1" * 1000 + "\t" * 4000 + "\\textx", "1" * 1000 + "\t" * 4000 + "\\textx"),
])
def test_trailing_unit_is_dropped(answer, expected):
    assert normalize_math_answer(answer) == expected


def test_trailing_unit_search_is_linear():
    """The old pattern backtracked cubically: this 5006-character answer took seconds."""
    start = time.perf_counter()
    normalize_math_answer("1" * 1000 + "\t" * 4000 + "\\textx")
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("answer", ["\\frac{1}{0}", "\\frac{0}{0}", "-\\frac{3}{0.0}"])
def test_zero_denominator_is_wrong_not_a_crash(answer):
    assert math_answers_equal(answer, "5") is False and math_answers_equal("5", answer) is False


def test_leading_variable_is_dropped_only_from_a_single_equation():
    assert math_answers_equal("x = 5", "5")
    assert math_answers_equal("x=1, y=2", "x = 1, y = 2")
    assert not math_answers_equal("x=1, y=2", "1, y=2")  # the x is part of a list of equations


def test_gsm8k_markdown_heading_is_no_declared_answer():
    """A model asked to box its answer may write markdown headings ("#### Step 2"): only "####"
    followed by a number declares an answer, and of that and the last box the later one counts."""
    text = "#### Step 1: Eggs left\n16-3-4=9\n#### Step 2: Money\n9*2=18\n\\boxed{18}"
    assert gsm8k_final_number(text) == "18"
    assert MathTask(kind="gsm8k").local_correct(Example("k", "p", {"gold": "18"}), text)
    assert gsm8k_final_number("#### 18\nno, I misread it\n\\boxed{20}") == "20"
    assert gsm8k_final_number("\\boxed{20}, so\n#### 18") == "18"
    assert gsm8k_final_number("#### **18**") == "18" and gsm8k_final_number("#### \\$1,200") == "1200"
    gsm = MathTask(kind="gsm8k")
    assert gsm8k_final_number("#### 2. Money\n9*2=18") == "18"     # a numbered heading neither
    assert gsm.answer_start("#### 2. Money\n9*2=18") == -1 and gsm.answer_start("####\n18") == 0
    # the Unicode minus: the verifier and the answer's start read it alike (an answer after help)
    assert gsm.answer_start("#### \u22125") == 0
    assert not gsm.help_called(HELP_MARKER + " wait, I see it\n#### \u22125")


def test_gsm8k_takes_the_first_number_after_the_marker():
    assert gsm8k_final_number("#### 18 dollars, that is 3 * 6") == "18"
    assert gsm8k_final_number("#### 1,234 (not 1,243)") == "1234"


def test_countdown_answer_tags_in_any_case_are_read():
    task = CountdownTask(n_train=0, n_test=1, seed=0)
    ex = Example("countdown:3,7,12->33", [], {"numbers": [3, 7, 12], "target": 33, "solution": "3 * 7 + 12"})
    # help_called() (reward.py) already treats <ANSWER> as a final answer; the verifier agrees
    assert task.local_correct(ex, "<think>x</think> <ANSWER>3*7+12</ANSWER>")
    assert task.local_correct(ex, "<Answer>1+1</Answer> <answer>12 + 3*7</answer>")
    assert not task.local_correct(ex, "<answer>3*7+12</answer> <ANSWER>1+1</ANSWER>")


def test_countdown_blank_answer_block_is_no_answer():
    task = CountdownTask(n_train=0, n_test=1, seed=0)
    ex = Example("countdown:3,7,12->33", [], {"numbers": [3, 7, 12], "target": 33, "solution": "3 * 7 + 12"})
    help_then_blank = "<think>stuck</think> " + HELP_MARKER + "\n<answer> </answer>"
    assert task.help_called(help_then_blank) and not task.answered(help_then_blank)
    # the verifier reads the last answer that holds something, as MathTask passes an empty box
    assert task.local_correct(ex, "<answer>3*7+12</answer> <answer>\n</answer>")


def test_countdown_target_range_is_inclusive():
    # 2 numbers in 1..5 added: 15 distinct (pair, sum) examples, sums 2..10; all must appear
    task = CountdownTask(n_numbers=2, number_range=(1, 5), ops="+", target_range=(2, 10),
                         n_train=0, n_test=15, seed=0)
    targets = sorted(e.data["target"] for e in task.examples("test"))
    assert targets[0] == 2 and targets[-1] == 10


def test_tiny_chain_rejects_an_operator_outside_the_task_ops():
    ex = Example("k", "12,04,05|015=", {"numbers": [12, 4, 5], "target": 15, "solution": ""})
    response = "[012/004=003,003*005=015]00=11=55=A"
    assert not TinyCountdownTask(ops="+-*", n_train=1, n_test=1).local_correct(ex, response)
    assert not TinyCountdownTask(ops="+-*", n_train=1, n_test=1).chain_correct("[012/004=003]", [12, 4], 3)
    assert TinyCountdownTask(ops="+-*/", n_train=1, n_test=1).local_correct(ex, response)


def test_tiny_decision_is_the_first_a_or_h():
    tiny = TinyCountdownTask(n_train=1, n_test=1)
    text = "[007*003=021,021+012=033]00=33=33=AH"
    assert tiny.decision(text) == "A" and tiny.answered(text) and not tiny.help_called(text)
    assert not tiny.local_correct(EX_33, text)  # text after the decision
    assert tiny.help_called("[007*003=021,021+012=033]00=33=33=HA")
    assert tiny.cloud_correct(EX_33, "[007*003=021,021+012=033]00=33=33=AH")


EX_5 = Example("math:5", [], {"problem": "p", "solution": "\\boxed{5}", "gold": "5"})


@pytest.mark.parametrize("kind,text,help,correct", [
    # the phrase, then an answer form the verifier reads: the answer is last (SPEC 2)
    ("math", "Step 1: need external assistance? No. Step 2: $\\boxed 5$", False, True),
    ("math", HELP_MARKER + " Step 3: so \\boxed{5}", False, True),
    ("math", HELP_MARKER + " Step 3: so \\fbox{5}", False, True),
    ("math", "Step 1: \\boxed{5}. " + HELP_MARKER, True, False),
    ("math", "Step 1: \\boxed{5}. " + HELP_MARKER + " \\boxed{5", True, False),  # unreadable last box
    ("gsm8k", "Step 1: need external assistance? No.\n#### 5", False, True),
    ("gsm8k", "Step 1: need external assistance? No. \\boxed{5}", False, True),
    ("gsm8k", HELP_MARKER + " so 5", True, False),  # the last number is no declared answer
    ("gsm8k", "#### 5 " + HELP_MARKER + " \\boxed{5}", False, True),  # the later answer: the box
    ("gsm8k", "\\boxed{5} " + HELP_MARKER + " #### 5", False, True),
    ("gsm8k", "#### 5 " + HELP_MARKER + " #### Step 3", True, False),  # a heading is no answer
])
def test_math_help_call_sees_the_answer_forms_the_verifier_reads(kind, text, help, correct):
    task = MathTask(kind=kind)
    assert task.help_called(text) is help
    assert task.local_correct(EX_5, text) is correct
    assert task.answered(text) is (not help)


def test_countdown_unclosed_answer_before_the_marker_then_a_full_answer():
    task = CountdownTask(n_train=0, n_test=1, seed=0)
    ex = Example("countdown:3,7,12->33", [], {"numbers": [3, 7, 12], "target": 33, "solution": "3 * 7 + 12"})
    text = "<answer> 3+4 " + HELP_MARKER + " then <answer>3*7+12</answer>"
    assert not task.help_called(text) and task.answered(text)
    assert task.local_correct(ex, text)  # the verifier reads the last complete block
    assert not task.answered("<think>a</think> <answer>3*7+")  # cut off: no answer to read


def test_decision_split_at_the_help_call_help_called_sees():
    cd = CountdownTask(n_train=0, n_test=1, seed=0)
    assert cd.decision_split("<think>no</think> I need external assistance") == \
        ("<think>no</think> I need", " " + HELP_MARKER, " <answer>")       # the bare phrase
    assert cd.decision_split("<think>x</think>\n<UNKNOWN> I need external assistance </UNKNOWN>") == \
        ("<think>x</think>", "\n" + HELP_MARKER, "\n<answer>")          # the tag, any case
    assert cd.decision_split("<think>a</think> " + HELP_MARKER + " <answer>12") == \
        ("<think>a</think> " + HELP_MARKER, " " + HELP_MARKER, " <answer>")  # an answer opened last
    math = MathTask()
    assert math.decision_split("Step 1: x. Step 2: \\fbox{5}") == \
        ("Step 1: x. Step 2:", " " + HELP_MARKER, " \\fbox{")       # the opening it wrote
    assert MathTask(kind="gsm8k").decision_split("Step 1: 2+3=5.\n#### 5") == \
        ("Step 1: 2+3=5.", "\n" + HELP_MARKER, "\n####")
    assert math.decision_split("Step 1: x.") == ("Step 1: x.", HELP_MARKER, "\\boxed{")


@pytest.mark.parametrize("seed", ["0", [1], True, 1.0, -1, None])
@pytest.mark.parametrize("name", ["countdown", "tiny_countdown"])
def test_task_seed_must_be_an_integer(name, seed):
    with pytest.raises(ValueError) as err:
        make_task(name, n_train=1, n_test=1, seed=seed)
    assert f"seed={seed!r} must be an integer >= 0" in str(err.value)


def test_self_check_correct_reads_the_check_after_the_chain(tiny):
    """By hand: final 120 against target 033 writes the check 10#23#03#."""
    from tasks import Example
    example = Example(key="k", prompt="07,03,12|033=", data={"numbers": [7, 3, 12], "target": 33})
    assert tiny.self_check_correct(example, "[007+003=010,010*012=120]10#23#03#A")
    assert not tiny.self_check_correct(example, "[007+003=010,010*012=120]10=23#03#A")
    assert not tiny.self_check_correct(example, "no chain at all")


def test_only_tasks_with_warm_start_traces_train_from_scratch():
    from tasks import CountdownTask, MathTask, Task
    assert TinyCountdownTask.trains_from_scratch()
    assert not CountdownTask.trains_from_scratch() and not MathTask.trains_from_scratch()

    class Traced(Task):
        def warm_start_completion(self, example, rng, p_correct=0.7, p_help=0.2):
            return "A"
    assert Traced.trains_from_scratch()


def test_scorers_take_linear_time_on_long_runs_of_blanks_and_tags():
    """A model that degenerates into spaces after "####", or into many "</think><answer>"
    pieces, must not stall a step: the declared-answer pattern took time quadratic in the run
    (about 30 minutes for these 200,000 spaces) and the Template I pattern in the pieces
    (minutes for these 40,000).
    Run in a child process with a limit about 100 times what the linear scan needs."""
    import subprocess
    import sys
    code = ("import tasks, reward\n"
            "assert tasks.gsm8k_final_number('####' + ' ' * 200000 + 'x') is None\n"
            "assert not reward.template1_formatted('<think>' + '</think><answer>a</answer>x' "
            "* 40000)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("a,b", [("\u22123", "-3"), ("x = \u22123", "-3"),
                                 ("\u2212\\frac{1}{2}", "-0.5"), ("(\u22121, 2)", "(-1,2)")])
def test_math_reads_the_unicode_minus_as_a_minus(a, b):
    """A model may write the minus sign U+2212 (GSM8K's verifier already reads it as "-")."""
    assert math_answers_equal(a, b) and math_answers_equal(b, a)
    assert MathTask().local_correct(Example("k", "p", {"gold": b}), "Step 1: \\boxed{" + a + "}")
    assert not math_answers_equal("\u22123", "3")


@pytest.mark.parametrize("box,gold,correct", [
    ("10\\,000", "10000", True), ("10{,}000", "10000", True), ("10\\,000", "10", False),
    ("1{,}000", "1", False), ("\\frac{1}{2}", "1", False), ("\\dfrac{12}{2}", "6", True),
    ("\\$1{,}200.00", "1200", True), ("18 \\text{ apples}", "18", True),
])
def test_gsm8k_box_is_read_as_the_number_it_holds(box, gold, correct):
    """A boxed GSM8K answer is the number the box holds (LaTeX thousands separators and
    fractions as the MATH verifier reads them), not the first digits in it."""
    task = MathTask(kind="gsm8k")
    assert task.local_correct(Example("k", "p", {"gold": gold}), "Step 1: \\boxed{" + box + "}") \
        is correct


@pytest.mark.parametrize("a,b,expected", [
    ("+\\frac{1}{2}", "0.5", True), ("+\\infty", "\\infty", True), ("+\\sqrt2", "\\sqrt{2}", True),
    ("+5", "5", True), ("+\\infty", "-\\infty", False), ("+", "-", False),
])
def test_a_leading_plus_sign_is_dropped_before_any_answer(a, b, expected):
    """normalize_math_answer drops a leading "+" (its docstring), not only before a digit."""
    assert math_answers_equal(a, b) is expected and math_answers_equal(b, a) is expected


@pytest.mark.parametrize("text,expected", [
    ("#### -$5", "-5"), ("#### -\\$1,200.50", "-1200.50"), ("#### **-$5**", "-5"),
    ("#### $-5", "-5"), ("#### - $ 5", "-5"),
])
def test_gsm8k_declared_negative_amount_with_the_dollar_sign_after_the_minus(text, expected):
    """"#### -$5" declares -5 (it was no declared answer, and the last number read was 5)."""
    assert gsm8k_final_number(text) == expected
    assert MathTask(kind="gsm8k").answer_start("Step 1: x.\n" + text) == len("Step 1: x.\n")


def test_countdown_rejects_an_operator_outside_the_task_ops():
    """The prompt lists only the task's ops ("You can use + and -"): 3 * 4 uses neither."""
    task = CountdownTask(n_numbers=2, number_range=(1, 9), ops="+-", target_range=(1, 20),
                         n_train=0, n_test=1)
    ex = Example("k", [], {"numbers": [3, 4], "target": 12, "solution": ""})
    assert not task.local_correct(ex, "<think>x</think> <answer>3 * 4</answer>")
    assert not task.cloud_correct(ex, "<answer>(3 * 4)</answer>")
    assert task.local_correct(Example("k", [], {"numbers": [3, 4], "target": 7, "solution": ""}),
                              "<think>x</think> <answer>3 + 4</answer>")
    assert CountdownTask(n_train=0, n_test=1).local_correct(ex, "<answer>3 * 4</answer>")
    assert not check_countdown("8 / 4", [8, 4], 2, ops="+-*")
    assert check_countdown("8 / 4", [8, 4], 2)


def test_tiny_wrong_answer_is_wrong_even_when_every_chain_lands_on_the_target():
    """Numbers [1, 1] with ops "*": the only chain is 1 * 1 = 1, the target. The simulated cloud's
    wrong answer (cloud.py: "plausible, but wrong") and a wrong warm-start trace must still be
    wrong: the solution with its last result miswritten, [001*001=002]."""
    task = TinyCountdownTask(n_numbers=2, number_range=(1, 1), ops="*", n_train=0, n_test=1)
    (ex,) = task.examples("test")
    assert ex.data["solution"] == "[001*001=001]"
    rng = random.Random(0)
    assert task.wrong_chain(ex, rng) == "[001*001=002]"
    assert task.cloud_correct(ex, task.oracle_answer(ex, True, rng))
    assert not task.cloud_correct(ex, task.oracle_answer(ex, False, rng))
    trace = task.warm_start_completion(ex, rng, p_correct=0.0, p_help=0.0)
    assert trace == "[001*001=002]00=00=21#A" and task.formatted(trace)
    assert not task.local_correct(ex, trace)


def test_self_check_correct_needs_a_chain_to_check():
    """Without a "]" there is no final result: text[-4:-1] of "11=22=00=1200" is no answer."""
    task = TinyCountdownTask(n_train=1, n_test=1)
    example = Example(key="k", prompt="07,03,12|120=", data={"numbers": [7, 3, 12], "target": 120})
    assert not task.self_check_correct(example, "11=22=00=1200")
    assert not task.self_check_correct(example, "[1_2]01#12#20#A")  # int() reads "1_2" as 12
    assert task.self_check_correct(example, "[007+003=010,010*012=120]11=22=00=A")


@pytest.mark.parametrize("ops", ["+-*/", "+-", "+-*", "*", "-+", "/*"])
def test_countdown_prompt_example_uses_only_the_task_ops(ops):
    """The prompt's example answer must follow the prompt's own rule ("You can use + and -"):
    an example with "/" would show the model an answer the verifier scores as wrong."""
    task = CountdownTask(n_numbers=2, number_range=(1, 9), ops=ops, target_range=(0, 100), n_train=0, n_test=1)
    (example,) = task.examples("test")
    for messages in (example.prompt, task.cloud_messages(example)):
        sample = re.search(r"for example <answer>(.*?)</answer>", messages[-1]["content"]).group(1)
        used = {c for c in sample if c in "+-*/"}
        assert used and used <= set(ops), (ops, sample)
        assert re.fullmatch(r" \(1 . 2\) . 3 ", sample), sample
    if ops == "+-*/":  # the default prompt keeps TinyZero's example
        assert "for example <answer> (1 + 2) / 3 </answer>." in example.prompt[-1]["content"]


def _reference_countdown(text, numbers, target, ops="+-*/"):
    """An independent verdict: our own tokenizer, a shunting-yard evaluator over Fractions and
    check_countdown's documented rules (ASCII digits/spaces only, no unary signs, one optional
    trailing "= target", every number exactly once, at most 200 characters)."""
    if len(text) > 200:
        return False
    if "=" in text:
        text, stated = text.split("=", 1)
        stated = stated.strip(" \t\r\n")
        if not re.fullmatch(r"[0-9]+", stated, re.ASCII) or int(stated) != target:
            return False
    if not re.fullmatch(r"[0-9+\-*/() \t\r\n]*", text):
        return False
    tokens = [int(t) if t[0].isdigit() else t for t in re.findall(r"[0-9]+|[-+*/()]", text)]
    if any(isinstance(t, int) and len(str(t)) > 6 for t in tokens) or re.search(r"[0-9]{7}", text):
        return False
    if any(t in ("+", "-", "*", "/") and t not in ops for t in tokens):
        return False
    if sorted(t for t in tokens if isinstance(t, int)) != sorted(numbers):
        return False
    precedence, out, stack, previous = {"+": 1, "-": 1, "*": 2, "/": 2}, [], [], None
    for t in tokens:
        after_operand = isinstance(previous, int) or previous == ")"
        if isinstance(t, int) or t == "(":
            if after_operand:
                return False
            (out if isinstance(t, int) else stack).append(Fraction(t) if isinstance(t, int) else t)
        elif t == ")":
            if not after_operand or "(" not in stack:
                return False
            while stack[-1] != "(":
                out.append(stack.pop())
            stack.pop()
        else:
            if not after_operand:
                return False
            while stack and stack[-1] != "(" and precedence[stack[-1]] >= precedence[t]:
                out.append(stack.pop())
            stack.append(t)
        previous = t
    if not (isinstance(previous, int) or previous == ")") or "(" in stack:
        return False
    values = []
    for t in out + stack[::-1]:
        if isinstance(t, Fraction):
            values.append(t)
            continue
        b, a = values.pop(), values.pop()
        if t == "/" and b == 0:
            return False
        values.append({"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[t])
    return values == [target]


def test_check_countdown_agrees_with_an_independent_checker_on_mangled_expressions():
    """Random expressions, half of them mangled (characters dropped, replaced or inserted:
    unary signs, unicode digits, operators and spaces, decimals, "="), against the reference."""
    rng = random.Random(7)
    noise = list("0123456789+-*/()= \t.") + ["\u00d7", "\u00f7", "\u2212", "\u00a0", "\uff13", "\u0663"]
    verdicts = []
    for _ in range(4000):
        numbers = [rng.randint(0, 30) for _ in range(rng.choice([2, 3, 4]))]
        order = numbers[:]
        rng.shuffle(order)
        text, value = _random_tree(order, rng)
        if rng.random() < 0.1:
            text = re.sub(r"[0-9]+", lambda m: "0" + m.group(0), text, count=1)  # a leading zero
        if rng.random() < 0.5:
            chars = list(text)
            for _ in range(rng.randint(1, 2)):
                at = rng.randrange(len(chars) + 1)
                if rng.random() < 0.3 and at < len(chars):
                    del chars[at]
                elif rng.random() < 0.5 and at < len(chars):
                    chars[at] = rng.choice(noise)
                else:
                    chars.insert(at, rng.choice(noise))
            text = "".join(chars)
        target = int(value) if value is not None and value.denominator == 1 and rng.random() < 0.8 \
            else rng.randint(0, 60)
        if rng.random() < 0.1:
            text += f" = {target if rng.random() < 0.8 else target + 1}"
        expected = _reference_countdown(text, numbers, target)
        assert check_countdown(text, numbers, target) is expected, (text, numbers, target)
        verdicts.append(expected)
    assert 0.2 < sum(verdicts) / len(verdicts) < 0.8  # both verdicts well represented
