"""Datasets, prompts and answer verifiers (SPEC.md sections 1, 1b, 2 and 5; DESIGN.md tasks.py).

Three tasks share one small interface (`Task`):
  - CountdownTask       TinyZero-style Countdown for instruct models, Template I prompts.
  - TinyCountdownTask   a character-level Countdown for the from-scratch demo (fixed-width fields
                        and a per-digit self-check before the answer/help decision).
  - MathTask            MATH / MATH-lighteval / GSM8K from local JSONL files, Template II prompts.
Nothing here calls a model, and nothing ever eval()s model text: arithmetic goes through
our own small parser with exact rationals (fractions.Fraction).
"""
from __future__ import annotations

import codecs
import hashlib
import inspect
import itertools
import json
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from reward import HELP_MARKER, help_start, last_answer_block, last_match, template1_formatted
from reward import help_called as marker_help_called

SPLITS = ("train", "test")
ANSWER_OPENINGS = ("<answer>", "\\boxed{", "\\fbox{", "####")  # how final answers open


@dataclass(frozen=True)
class Example:
    """One prompt. key: stable unique id (cache key); prompt: raw text (char-level tasks) or chat
    messages [{"role", "content"}]; data: task-specific fields (numbers, target, solution, gold)."""
    key: str
    prompt: str | list
    data: dict

    def __hash__(self):  # the dict/list fields are unhashable; the key identifies the example
        return hash(self.key)


class Task:
    """The interface every task implements; defaults suit marker-based (pretrained) tasks.

    A new task: subclass this, give it a unique `name` (the cloud cache files answers under it),
    an __init__ that takes `allow_help` (eval.py rebuilds a run's task with allow_help=False for
    the task-tuning baseline), implement examples, local_correct, cloud_messages and
    cloud_correct (REQUIRED_METHODS; make_task refuses a task without them), oracle_answer for
    the oracle cloud backend, self_check_correct when has_self_check, and register the class in
    TASKS (the config's task.name). The other methods' defaults read Template I markers
    (<answer>, <unknown>). A task trained from scratch (model.path empty) is character-level: it
    also sets `alphabet` and implements warm_start_completion, and one with a decision character
    of its own overrides help_called, answered, formatted and decision_split, as
    TinyCountdownTask does."""
    name: str = "task"
    stop_texts: tuple = ()      # texts that, as a single token, end generation besides EOS
    banned_texts: tuple = ()    # texts that, as a single token, are never sampled
    alphabet: str | None = None  # char-level tasks only: every character prompts/completions use
    has_self_check: bool = False  # self_check_mask can mark tokens (else: all False, skip it)
    allow_help: bool = True     # False: the help option is removed (task-tuning-only baseline)
    answer_opening: str = "<answer>"  # the text that opens a final answer (decision_split)

    def examples(self, split: str) -> list[Example]:
        raise NotImplementedError

    def answer_start(self, text: str) -> int:
        """Where the final answer that local_correct reads starts, or -1 if there is none.
        Default: the last complete Template I <answer>...</answer> block."""
        block = last_answer_block(text)
        return block.start() if block else -1

    def help_called(self, text: str) -> bool:
        """SPEC section 2 (lenient marker; of the marker and the answer that local_correct reads,
        the one starting last wins)."""
        return marker_help_called(text, self.answer_start(text))

    def local_correct(self, example: Example, text: str) -> bool:
        """The task's verdict on a DEVICE response: False for help calls and unparseable answers."""
        raise NotImplementedError

    def formatted(self, text: str) -> bool:
        """Format check used by the v1 reward (SPEC section 3)."""
        return template1_formatted(text)

    def cloud_messages(self, example: Example) -> list[dict]:
        """What the cloud sees: the prompt x alone, never the device's reasoning (SPEC section 1)."""
        raise NotImplementedError

    def cloud_correct(self, example: Example, cloud_text: str) -> bool:
        raise NotImplementedError

    def oracle_answer(self, example: Example, correct: bool, rng: random.Random) -> str:
        """Text a simulated strong model returns: a correct solution or a plausible wrong one."""
        raise NotImplementedError

    def self_check_mask(self, pieces: list[str]) -> list[bool]:
        """True for generated tokens that are a declared self-check and carry no policy gradient
        (SPEC section 5, last bullet). Pretrained-model tasks declare none."""
        return [False] * len(pieces)

    def self_check_correct(self, example: Example, text: str) -> bool:
        """has_self_check tasks: the response's self-check is the one its own answer implies
        (a warm-start statistic; not part of the reward)."""
        raise NotImplementedError

    def warm_start_completion(self, example: Example, rng: random.Random,
                              p_correct: float = 0.7, p_help: float = 0.2) -> str:
        """Tasks trained from scratch: one supervised trace for train.py's warm start, correct
        with probability p_correct (else a plausible wrong attempt), ending in a help call with
        probability p_help. Every character must be in `alphabet`."""
        raise NotImplementedError

    @classmethod
    def trains_from_scratch(cls) -> bool:
        """The task supplies warm-start traces: train.py can train a model for it from scratch."""
        return cls.warm_start_completion is not Task.warm_start_completion

    def answered(self, text: str) -> bool:
        """The response gives a final answer (right or wrong) rather than a help call or nothing:
        the format adherence reported by evaluation."""
        return self.answer_start(text) >= 0 and not self.help_called(text)

    def decision_split(self, text: str) -> tuple[str, str, str]:
        """(prefix, help continuation, answer continuation) of a device response at its
        answer-or-help decision, for eval.py's routing score [ours]. Marker tasks: the decision
        point is the start of the LAST help call (as help_called reads it: a tag or the phrase)
        or final answer (an answer opening, even unfinished, or the answer local_correct reads),
        as SPEC 2: the last one wins; or the end of the text if there is neither. The whitespace
        before it moves into both continuations, so they tokenize as the model would write them."""
        answer_at = max(text.rfind(self.answer_opening), self.answer_start(text))
        cut = max(answer_at, help_start(text, after=answer_at))
        cut = len(text) if cut < 0 else cut
        prefix = text[:cut].rstrip()
        space = text[len(prefix):cut]
        # the answer opened as the response opens it at the cut (GSM8K's "####"), else as usual
        opening = next((o for o in ANSWER_OPENINGS if text.startswith(o, cut)), self.answer_opening)
        return prefix, space + HELP_MARKER, space + opening


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; use one of {SPLITS}")
    return split


def _disjoint_splits(draw, canonical, rng: random.Random, n_train: int, n_test: int):
    """Draw examples until both splits are full. No canonical form (e.g. sorted numbers and
    target) appears twice, so train and test are disjoint. The test split is drawn first, so it
    does not change when n_train changes."""
    seen, test, train = set(), [], []
    draws_left = 100 * (n_train + n_test) + 10_000
    while len(test) < n_test or len(train) < n_train:
        if draws_left == 0:
            raise ValueError(f"could only generate {len(test) + len(train)} distinct examples of the "
                             f"{n_train + n_test} requested; widen the number/target ranges or ask for fewer")
        draws_left -= 1
        example = draw(rng)
        if example is None or canonical(example) in seen:
            continue
        seen.add(canonical(example))
        (test if len(test) < n_test else train).append(example)
    return {"train": train, "test": test}


def _drawn_split(task, split: str) -> list[Example]:
    """A split of a generated Countdown task: both are drawn on first use, by task._draw from a
    generator seeded with task.seed, with no (numbers, target) pair in both."""
    _check_split(split)
    if task._splits is None:
        task._splits = _disjoint_splits(
            task._draw, lambda ex: (tuple(sorted(ex.data["numbers"])), ex.data["target"]),
            random.Random(task.seed), task.n_train, task.n_test)
    return list(task._splits[split])


def _check_count(name: str, value, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_range(name: str, value, lo: int, hi: int) -> tuple[int, int]:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    if not ok or not lo <= value[0] <= value[1] <= hi:
        raise ValueError(f"{name}={value!r} must be a pair (low, high) with {lo} <= low <= high <= {hi}")
    return int(value[0]), int(value[1])


def _check_ops(ops: str, allowed: str = "+-*/") -> str:
    if not isinstance(ops, str) or not ops or any(c not in allowed for c in ops) or len(set(ops)) != len(ops):
        raise ValueError(f"ops={ops!r} must be a non-empty string of distinct characters from {allowed!r}")
    return ops


# ----------------------------------------------------------------------------------------------
# Countdown expressions: our own recursive-descent parser over exact rationals.

MAX_EXPRESSION_CHARS = 200   # longer answers are rejected outright (cheap, never slow, and
                             # parentheses nested at most 100 deep bound the parser's recursion)
MAX_LITERAL_DIGITS = 6       # "123456789" is not a Countdown number
_ASCII_DIGITS = "0123456789"  # str.isdigit() would also accept "３" and "٣"
_SPACES = " \t\r\n"


class _Invalid(Exception):
    """Raised inside the parser; check_countdown turns it into False."""


def _tokenize(text: str) -> list:
    """Integer literals (as int) and the single characters + - * / ( )."""
    tokens, i = [], 0
    while i < len(text):
        c = text[i]
        if c in _SPACES:
            i += 1
        elif c in _ASCII_DIGITS:
            j = i
            while j < len(text) and text[j] in _ASCII_DIGITS:
                j += 1
            if j - i > MAX_LITERAL_DIGITS:
                raise _Invalid("literal too long")
            tokens.append(int(text[i:j]))
            i = j
        elif c in "+-*/()":
            tokens.append(c)
            i += 1
        else:
            raise _Invalid(f"character {c!r}")
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ;
    factor := INTEGER | '(' expr ')'. No unary signs, no powers, no names."""

    def __init__(self, tokens: list):
        self.tokens, self.pos = tokens, 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        token = self.peek()
        self.pos += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor()
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise _Invalid("division by zero")
            else:
                value = value / rhs
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if isinstance(token, int):
            return Fraction(token)
        if token == "(":
            value = self.expr()
            if self.take() != ")":
                raise _Invalid("unbalanced parentheses")
            return value
        raise _Invalid(f"unexpected {token!r}")


def check_countdown(expression: str, numbers: list[int], target: int, ops: str = "+-*/") -> bool:
    """True iff `expression` uses every given number exactly once (as a multiset), only the
    operators in `ops` (of + - * /) and parentheses over ASCII integer literals, and equals
    `target` exactly (Fraction arithmetic).

    [ours] Whitespace is allowed anywhere between tokens, and so is one trailing "= N" when N is
    the target itself. Anything else (unary signs, "**", names, unicode digits, glued numbers,
    division by zero, unbalanced parentheses, > 200 characters, > 6-digit literals) is False,
    never an exception.
    """
    try:
        if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
            return False
        if "=" in expression:
            expression, stated = expression.split("=", 1)
            stated = stated.strip(_SPACES)
            if not stated or any(c not in _ASCII_DIGITS for c in stated) or int(stated) != target:
                return False
        tokens = _tokenize(expression)
        if any(isinstance(t, str) and t in "+-*/" and t not in ops for t in tokens):
            return False  # an operator the task (and its prompt) does not allow
        literals = sorted(t for t in tokens if isinstance(t, int))
        if literals != sorted(int(n) for n in numbers):
            return False  # checked before evaluating: only the given numbers are ever multiplied
        parser = _Parser(tokens)
        value = parser.expr()
        if parser.pos != len(tokens):
            return False  # leftovers such as ")" or "2 3"
        return value == target
    except (_Invalid, ValueError, TypeError, ZeroDivisionError, RecursionError):
        return False


def _random_expression(numbers: list[int], ops: str, rng: random.Random):
    """A random expression tree over all `numbers` (each once): returns (text, value) or None if
    a division was not exact or an intermediate went negative."""
    items = [(str(n), n, True) for n in numbers]  # (text, integer value, is a leaf)
    rng.shuffle(items)
    while len(items) > 1:
        i = rng.randrange(len(items) - 1)
        (left, a, left_leaf), (right, b, right_leaf) = items[i], items[i + 1]
        op = rng.choice(ops)
        if op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        elif op == "*":
            value = a * b
        else:
            if b == 0 or a % b:
                return None
            value = a // b
        if value < 0:
            return None
        left = left if left_leaf else f"({left})"
        right = right if right_leaf else f"({right})"
        items[i:i + 2] = [(f"{left} {op} {right}", value, False)]
    return items[0][0], items[0][1]


def _ops_in_words(ops: str) -> str:
    """"+-*/" -> "+, -, * and /"."""
    return ops if len(ops) == 1 else ", ".join(ops[:-1]) + " and " + ops[-1]


# the cloud's prompt, and the device's with help disabled; the device's adds the help option
CLOUD_TEMPLATE1_SYSTEM = (
    "You are a helpful assistant. You first reason about the problem step by step inside "
    "<think> </think> tags, and then give your final answer inside <answer> </answer> tags at the "
    "very end of your response."
)
TEMPLATE1_SYSTEM = CLOUD_TEMPLATE1_SYSTEM + (
    " If after thorough reasoning you cannot find a solution, end your response with the help "
    f"request {HELP_MARKER} instead of an answer."
)


class CountdownTask(Task):
    """TinyZero-style Countdown with Template I prompts (SPEC sections 1b and 9).

    Each example: `n_numbers` numbers (3 or 4 by default) from `number_range`, a target in
    `target_range` reached by a random expression using every number exactly once (exact division
    only, no negative intermediates), and that expression as `data["solution"]`. [ours] The prompt
    asks to use each number exactly once, which is what the verifier (and TinyZero's) checks.
    """
    name = "countdown"

    def __init__(self, n_numbers=(3, 4), number_range=(1, 99), ops="+-*/", target_range=(1, 100),
                 n_train=5000, n_test=1000, seed=0, allow_help=True):
        self.allow_help = flag(allow_help, "allow_help")
        self.n_numbers = (n_numbers,) if isinstance(n_numbers, int) else tuple(n_numbers)
        if not self.n_numbers or any(isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 6
                                     for n in self.n_numbers):
            raise ValueError(f"n_numbers={n_numbers!r} must be an integer or a list of integers in 2..6")
        self.number_range = _check_range("number_range", number_range, 0, 999)
        self.target_range = _check_range("target_range", target_range, 0, 10**6)
        self.ops = _check_ops(ops)
        _check_count("n_train", n_train)
        _check_count("n_test", n_test)
        _check_count("seed", seed)  # '0' or [1] would seed a different or no generator
        self.n_train, self.n_test, self.seed = n_train, n_test, seed
        self._splits = None

    def _draw(self, rng: random.Random) -> Example | None:
        count = rng.choice(self.n_numbers)  # kept across retries, so each count is equally common
        for _ in range(100):
            numbers = [rng.randint(*self.number_range) for _ in range(count)]
            made = _random_expression(numbers, self.ops, rng)
            if made is not None and self.target_range[0] <= made[1] <= self.target_range[1]:
                break
        else:
            return None
        solution, target = made
        return Example(key=f"countdown:{','.join(map(str, numbers))}->{target}",
                       prompt=self.messages(numbers, target, TEMPLATE1_SYSTEM if self.allow_help
                                            else CLOUD_TEMPLATE1_SYSTEM),
                       data={"numbers": numbers, "target": target, "solution": solution})

    def examples(self, split: str) -> list[Example]:
        return _drawn_split(self, split)

    def messages(self, numbers: list[int], target: int, system: str) -> list[dict]:
        # the example uses only the allowed ops: "+-*/" gives (1 + 2) / 3
        first, last = self.ops[0], self.ops[-1]
        question = (f"Using the numbers {list(numbers)}, create an equation that equals {target}. "
                    f"You can use {_ops_in_words(self.ops)}, and each number must be used exactly once. "
                    "Show your reasoning in <think> </think> tags and return the final equation in "
                    f"<answer> </answer> tags, for example <answer> (1 {first} 2) {last} 3 </answer>.")
        return [{"role": "system", "content": system},
                {"role": "user", "content": question + " Let me solve this step by step."}]

    def local_correct(self, example: Example, text: str) -> bool:
        if self.help_called(text):
            return False
        block = last_answer_block(text)
        return block is not None and check_countdown(block.group(1), example.data["numbers"],
                                                     example.data["target"], self.ops)

    def cloud_messages(self, example: Example) -> list[dict]:
        """[ours] The same question, with a system message that offers no help escape."""
        return self.messages(example.data["numbers"], example.data["target"], CLOUD_TEMPLATE1_SYSTEM)

    def cloud_correct(self, example: Example, cloud_text: str) -> bool:
        return self.local_correct(example, cloud_text)

    def oracle_answer(self, example: Example, correct: bool, rng: random.Random) -> str:
        numbers, target = example.data["numbers"], example.data["target"]
        if correct:
            return f"<answer>{example.data['solution']}</answer>"
        for _ in range(50):
            made = _random_expression(numbers, self.ops, rng)
            if made is not None and made[1] != target:
                return f"<answer>{made[0]}</answer>"
        return f"<answer>({example.data['solution']}) + 1</answer>"  # an extra literal: never correct


# ----------------------------------------------------------------------------------------------
# The tiny character-level Countdown (issue 5): prompt "07,03,12|033=", response
# "[007+003=010,010*012=120]10#23#03#H".

def _apply_op(a: int, op: str, b: int) -> int | None:
    """One chain step with true arithmetic; None if not a whole number in 0..999."""
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    elif op == "/":
        if b == 0 or a % b:
            return None
        value = a // b
    else:
        return None
    return value if 0 <= value <= 999 else None


def _run_chain(order: list[int], ops: list[str]) -> list[tuple] | None:
    """Left-to-right chain ((order[0] op order[1]) op order[2]) ...: its steps (a, op, b, result),
    or None if an intermediate leaves 0..999 or a division is not exact."""
    steps, value = [], order[0]
    for op, b in zip(ops, order[1:]):
        result = _apply_op(value, op, b)
        if result is None:
            return None
        steps.append((value, op, b, result))
        value = result
    return steps


def _chain_text(steps: list[tuple]) -> str:
    return "[" + ",".join(f"{a:03d}{op}{b:03d}={r:03d}" for a, op, b, r in steps) + "]"


def tiny_check_text(final: int, target: int) -> str:
    """Per-digit interleaved self-check: (final digit, target digit, '=' while every digit so far
    agrees else '#') for each of the 3 positions. 120 vs 033 -> "10#23#03#"."""
    out, differed = [], False
    for f, t in zip(f"{final:03d}", f"{target:03d}"):
        differed = differed or f != t
        out.append(f + t + ("#" if differed else "="))
    return "".join(out)


_TINY_STEP_RE = re.compile(r"([0-9]{3})([+\-*/])([0-9]{3})=([0-9]{3})")


class TinyCountdownTask(Task):
    """Character-level Countdown for the from-scratch demo (issue 5, SPEC section 5 last bullet).

    prompt   "07,03,12|033="      numbers 2-digit, target 3-digit, zero-padded
    response "[007+003=010,010*012=120]" + "10#23#03#" + "A" or "H"
             a left-to-right chain (first step: two given numbers; each later step: the previous
             result and one unused given number, in either order), then the self-check of the
             final value against the target (tiny_check_text), then the decision: A answer, H help.
    The decision is the first 'A' or 'H' of the response (both are stop texts). The self-check
    tokens carry no policy gradient (self_check_mask) and do not affect correctness.
    """
    name = "tiny_countdown"
    stop_texts = ("A", "H")

    has_self_check = True

    def __init__(self, n_numbers=3, number_range=(1, 20), ops="+-*", n_train=20000, n_test=500, seed=0,
                 allow_help=True):
        self.allow_help = flag(allow_help, "allow_help")
        self.banned_texts = () if self.allow_help else ("H",)  # help disabled: H is never sampled
        _check_count("n_numbers", n_numbers, minimum=2)
        self.n_numbers = n_numbers
        self.number_range = _check_range("number_range", number_range, 0, 99)
        self.ops = _check_ops(ops)
        _check_count("n_train", n_train)
        _check_count("n_test", n_test)
        _check_count("seed", seed)  # '0' or [1] would seed a different or no generator
        self.n_train, self.n_test, self.seed = n_train, n_test, seed
        self.alphabet = "0123456789,|=[]+-*#AH" + ("/" if "/" in self.ops else "")
        self._splits = None
        n = n_numbers - 1
        step = r"[0-9]{3}[" + re.escape(self.ops) + r"][0-9]{3}=[0-9]{3}"
        self._format_re = re.compile(r"\[" + step + ("(?:," + step + "){%d}" % (n - 1)) + r"\]"
                                     r"((?:[0-9][0-9][=#]){3})([AH])")

    # --- data -----------------------------------------------------------------------------------
    def _random_chain(self, numbers: list[int], rng: random.Random) -> list[tuple] | None:
        order = list(numbers)
        rng.shuffle(order)
        return _run_chain(order, [rng.choice(self.ops) for _ in range(len(numbers) - 1)])

    def _draw(self, rng: random.Random) -> Example | None:
        numbers = [rng.randint(*self.number_range) for _ in range(self.n_numbers)]
        steps = self._random_chain(numbers, rng)
        if steps is None or not 1 <= steps[-1][3] <= 999:
            return None
        target = steps[-1][3]
        prompt = ",".join(f"{x:02d}" for x in numbers) + f"|{target:03d}="
        return Example(key=f"tiny_countdown:{prompt}", prompt=prompt,
                       data={"numbers": numbers, "target": target, "solution": _chain_text(steps)})

    def examples(self, split: str) -> list[Example]:
        return _drawn_split(self, split)

    # --- parsing and verdicts -------------------------------------------------------------------
    def chain_correct(self, chain: str, numbers: list[int], target: int) -> bool:
        """Verdict on a bare chain "[...]": n-1 well-formed steps, each written result equal to the
        true result of its step (0..999), every given number used exactly once, final == target."""
        if not (chain.startswith("[") and chain.endswith("]")):
            return False
        steps = chain[1:-1].split(",")
        if len(steps) != len(numbers) - 1:
            return False
        unused, previous = list(numbers), None
        for step in steps:
            m = _TINY_STEP_RE.fullmatch(step)
            if m is None or m.group(2) not in self.ops:
                return False
            a, op, b, written = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            if previous is None:  # first step: two given numbers
                for x in (a, b):
                    if x not in unused:
                        return False
                    unused.remove(x)
            elif a == previous and b in unused:
                unused.remove(b)
            elif b == previous and a in unused:
                unused.remove(a)
            else:
                return False
            if _apply_op(a, op, b) != written:
                return False
            previous = written
        return not unused and previous == target

    @staticmethod
    def decision(text: str) -> str | None:
        """The decision character: the first 'A' or 'H' in the response (None if neither)."""
        for c in text:
            if c in "AH":
                return c
        return None

    def help_called(self, text: str) -> bool:
        return self.decision(text) == "H"

    def answered(self, text: str) -> bool:
        return self.decision(text) == "A"

    def decision_split(self, text: str) -> tuple[str, str, str]:
        """The text before the decision character (all of it if there is none), then "H" / "A"."""
        cut = next((i for i, c in enumerate(text) if c in "AH"), len(text))
        return text[:cut], "H", "A"

    def local_correct(self, example: Example, text: str) -> bool:
        """Decision 'A' as the last character and a correct chain; the check is not graded."""
        if self.decision(text) != "A" or text.index("A") != len(text) - 1:
            return False
        close = text.find("]")
        return close >= 0 and self.chain_correct(text[:close + 1], example.data["numbers"], example.data["target"])

    def formatted(self, text: str) -> bool:
        """The exact grammar with n-1 steps, a self-check whose first digits copy the final written
        result and whose '='/'#' follow the digit comparisons it writes, then A or H. (The target
        digits cannot be verified here: formatted() sees no example.)"""
        m = self._format_re.fullmatch(text)
        if m is None:
            return False
        final = text[:text.index("]")][-3:]
        check = m.group(1)
        claimed_target = int(check[1] + check[4] + check[7])
        return final == check[0] + check[3] + check[6] and check == tiny_check_text(int(final), claimed_target)

    def self_check_mask(self, pieces: list[str]) -> list[bool]:
        """True for tokens lying wholly inside the check: the (at most) 9 characters after the
        first ']' and before the decision character. Whatever stands where the decision should
        be is never masked, so a response that fails to decide still gets a gradient."""
        text = "".join(pieces)
        close = text.find("]")
        if close < 0:
            return [False] * len(pieces)
        end = min(len(text), close + 1 + len(tiny_check_text(0, 0)))
        for i in range(close + 1, end):
            if text[i] in "AH":
                end = i
                break
        mask, start = [], 0
        for piece in pieces:
            stop = start + len(piece)
            mask.append(bool(piece) and start > close and stop <= end)
            start = stop
        return mask

    # --- cloud ----------------------------------------------------------------------------------
    def cloud_messages(self, example: Example) -> list[dict]:
        return [{"role": "user", "content": example.prompt}]

    def cloud_correct(self, example: Example, cloud_text: str) -> bool:
        """A correct chain "[...]" at the start; a trailing check/decision is tolerated unless
        the decision is a help call."""
        text = cloud_text.strip()
        close = text.find("]")
        if close < 0 or self.decision(text[close + 1:]) == "H":
            return False
        return self.chain_correct(text[:close + 1], example.data["numbers"], example.data["target"])

    def wrong_chain(self, example: Example, rng: random.Random, tries: int = 8) -> str:
        """A near miss: of `tries` random valid chains (true arithmetic, all numbers), the one whose
        final value is closest to the target without equalling it; if none, any wrong chain; if
        every chain lands on the target, the solution with its last result miswritten by one."""
        numbers, target = example.data["numbers"], example.data["target"]
        best = None
        for _ in range(tries):
            steps = self._random_chain(numbers, rng)
            if steps is not None and steps[-1][3] != target:
                if best is None or abs(steps[-1][3] - target) < abs(best[-1][3] - target):
                    best = steps
        if best is None:
            wrong = []
            for order in sorted(set(itertools.permutations(numbers))):
                for ops in itertools.product(self.ops, repeat=len(numbers) - 1):
                    steps = _run_chain(list(order), list(ops))
                    if steps is not None and steps[-1][3] != target:
                        wrong.append(steps)
            if not wrong:  # every chain lands on the target: a slip in the solution's last step
                solution = example.data["solution"]
                final = int(solution[-4:-1])
                return f"{solution[:-4]}{final + 1 if final < 999 else final - 1:03d}]"
            best = rng.choice(wrong)
        return _chain_text(best)

    def oracle_answer(self, example: Example, correct: bool, rng: random.Random) -> str:
        return example.data["solution"] if correct else self.wrong_chain(example, rng)

    def self_check_correct(self, example: Example, text: str) -> bool:
        close = text.find("]")
        written = text[close - 3:close] if close >= 3 else ""  # no "]": no answer, so no check
        if len(written) != 3 or any(c not in _ASCII_DIGITS for c in written):
            return False
        return text[close + 1:close + 10] == tiny_check_text(int(written), example.data["target"])

    def warm_start_completion(self, example: Example, rng: random.Random,
                              p_correct: float = 0.7, p_help: float = 0.2) -> str:
        """A supervised trace for the warm start (issue 5): the solution with probability
        p_correct, else a near-miss wrong chain; the correct self-check; then 'H' with probability
        p_help REGARDLESS of correctness (routing is left to RL), else 'A'."""
        chain = example.data["solution"] if rng.random() < p_correct else self.wrong_chain(example, rng)
        final = int(chain[-4:-1])
        decision = "H" if rng.random() < p_help else "A"
        return chain + tiny_check_text(final, example.data["target"]) + decision


# ----------------------------------------------------------------------------------------------
# Math answers: the last \boxed{...}, normalisation, comparison; GSM8K final numbers.

def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with nested braces matched; also the
    "\\boxed 5" / "\\boxed5" form. A mention is no answer and is passed over: an empty
    \\boxed{}, or \\boxed followed by a word ("in \\boxed as asked"). None if there is no
    answer or the last box is unbalanced (a response cut off inside its answer)."""
    found = _last_boxed_at(text)
    return found[1] if found else None


# \boxed or \fbox as a command (not \fboxrule); the unbraced form's argument starts with a
# digit, a sign, a command or a lone letter (\boxed 5, \boxed -2, \boxed \pi, \boxed A) and
# runs to a space or dollar sign
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_UNBRACED_ARGUMENT_RE = re.compile(r"[ \t]*((?:[-+]?[0-9.]|\\[a-zA-Z]|[a-zA-Z](?![a-zA-Z]))"
                                   r"[^\s$]*)")


def _last_boxed_at(text: str) -> tuple[int, str] | None:
    """(start, content) of the answer last_boxed reads, or None."""
    for box in reversed(list(_BOX_RE.finditer(text))):
        j = box.end()
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "{":
            depth, k = 0, j
            while k < len(text):
                if text[k] == "\\":  # \{ and \} are characters, not grouping
                    k += 1
                elif text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            else:
                return None  # the last box never closes
            if text[j + 1:k].strip():
                return box.start(), text[j + 1:k]
            continue  # \boxed{}: a mention of the format
        m = _UNBRACED_ARGUMENT_RE.match(text, box.end())
        if m:
            return box.start(), m.group(1)
    return None


def _braced_argument(s: str, i: int):
    """The LaTeX argument starting at s[i] (spaces before it skipped, as TeX does): {group},
    a \\command, or one character. Returns (content, index after it) or None."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        depth = 0
        for k in range(i, len(s)):
            depth += {"{": 1, "}": -1}.get(s[k], 0)
            if depth == 0:
                return s[i + 1:k], k + 1
        return None
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m:
            return m.group(0), i + len(m.group(0))
    return s[i], i + 1


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2} (also inside arguments)."""
    out, i = [], 0
    while True:
        j = s.find("\\frac", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        numerator = _braced_argument(s, j + 5)
        denominator = numerator and _braced_argument(s, numerator[1])
        if not denominator:
            out.append(s[j:])
            return "".join(out)
        out.append("\\frac{" + _fix_fracs(numerator[0]) + "}{" + _fix_fracs(denominator[0]) + "}")
        i = denominator[1]


_TEXT_COMMAND = r"\\(?:text|textbf|textrm|textnormal|mbox|mathrm|mathbf)"
# A unit after a value: the text command that ends the answer, holding no digit ("3\text{ or 4}"
# is no unit) and no brace (so at most one start can match: a left-to-right search is linear,
# no backtracking over the value).
_TRAILING_UNIT_RE = re.compile(_TEXT_COMMAND + r"\{[^{}0-9]*\}(?:\^\{?[0-9]\}?)?\s*\Z")
_TEXT_RE = re.compile(_TEXT_COMMAND + r"\{([^{}]*)\}")
# spacing commands, read left to right so that a row break \\ stays whole (its second
# backslash does not start a "\ " or "\," command)
_SPACING_RE = re.compile(r"\\\\|\\[,;:! ]|\\q?quad(?![a-zA-Z])|~")


def _spacing(m: re.Match) -> str:
    """A row break stays; \\! and a space command between digits (thousands: 10\\,000) go;
    any other space command is a space."""
    command, s = m.group(0), m.string
    if command == "\\\\":
        return command
    between_digits = 0 < m.start() and m.end() < len(s) and s[m.start() - 1].isdigit() \
        and s[m.end()].isdigit()
    return "" if command == "\\!" or between_digits else " "


def normalize_math_answer(s: str) -> str:
    """Canonical text of a math answer (MATH-style normalisation, our own rules):
    drops $ signs, spacing commands, \\left/\\right, degree signs, percent signs, \\text{} units
    after a value, a leading "x =", a leading "+", spaces (but digits separated by spaces stay
    apart: "3 1/2" is not 31/2) and a final period; \\dfrac/\\tfrac -> \\frac; bmatrix ->
    pmatrix; \\frac12 -> \\frac{1}{2}; \\sqrt2 -> \\sqrt{2}; \\sqrt[3]2 -> \\sqrt[3]{2};
    x^{2} -> x^2; an answer that is a/b of two integers -> \\frac{a}{b} (\\pi/2 stays as it is);
    1,000, 1{,}000, 1\\,000 and 1 000 -> 1000 (but "10, 100", a list, stays apart); .5 -> 0.5;
    2.50 -> 2.5; (C) -> C; the Unicode minus sign -> "-"."""
    s = str(s).strip()
    s = s.replace("\n", " ").replace("\\displaystyle", "")
    # "10, 100" lists two numbers: a comma the text follows with a blank groups no thousands
    # (blanks go below, and "10,100" would then read as 10100); "10,\\!000" and "1{,}000" still do
    listed = re.search(r",\s", s) is not None
    s = s.replace("\u2212", "-")  # the Unicode minus sign (as GSM8K's verifier reads it)
    s = _SPACING_RE.sub(_spacing, s)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)  # but not \\leftarrow, \\rightarrow
    s = s.replace("{,}", ",")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\$", "").replace("$", "")
    for degree in ("^{\\circ}", "^\\circ", "°", "\\degree"):
        s = s.replace(degree, "")
    s = s.replace("\\%", "").replace("%", "")
    m = _TRAILING_UNIT_RE.search(s)
    if m and re.search(r"[0-9}]", s[:m.start()]):  # a unit only after a value
        s = s[:m.start()].rstrip()
    while _TEXT_RE.search(s):
        s = _TEXT_RE.sub(r"\1", s)
    m = re.match(r"\s*[a-zA-Z]\s*=", s)
    if m and "=" not in s[m.end():]:
        s = s[m.end():]
    s = s.strip()
    if re.fullmatch(r"-?[0-9]{1,3}( [0-9]{3})+(\.[0-9]+)?", s):  # thousands grouped by spaces
        s = s.replace(" ", "")
    s = re.sub(r"(?<![0-9]) +| +(?![0-9])", "", s).rstrip(".")  # one space between digits stays
    s = re.sub(r"^\+(?=.)", "", s)  # +5, +\frac{1}{2}, +\infty (a "+" alone stays)
    s = re.sub(r"\\(begin|end)\{bmatrix\}", r"\\\1{pmatrix}", s)
    s = re.sub(r"\\sqrt(\[[^\[\]]*\])?([0-9a-zA-Z])", r"\\sqrt\1{\2}", s)
    s = re.sub(r"([_^])\{([^{}\\])\}", r"\1\2", s)
    s = _fix_fracs(s)
    m = re.fullmatch(r"(-?)([0-9]+)/([0-9]+)", s)
    if m:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    if not listed and re.fullmatch(r"-?[0-9]{1,3}(,[0-9]{3})+(\.[0-9]+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"^(-?)\.([0-9])", r"\g<1>0.\2", s)
    if re.fullmatch(r"-?[0-9]+\.[0-9]+", s):
        s = s.rstrip("0").rstrip(".")
    if s == "-0":
        s = "0"
    m = re.fullmatch(r"\(([A-Z])\)", s)
    if m:
        s = m.group(1)
    return s


MAX_ANSWER_CHARS = 1000  # [ours] a longer final answer is wrong unread: bounds the verifier's work


def _as_number(s: str) -> Fraction | None:
    """The value of a normalised answer that is a plain number or a simple fraction, else None."""
    num = r"-?[0-9]+(?:\.[0-9]+)?"
    if re.fullmatch(num, s):
        return Fraction(s)
    m = re.fullmatch(r"(-?)\\frac\{(" + num + r")\}\{(" + num + r")\}", s)
    if m and Fraction(m.group(3)) != 0:
        value = Fraction(m.group(2)) / Fraction(m.group(3))
        return -value if m.group(1) else value
    return None


def _terminates(q: Fraction) -> bool:
    """q has a finite decimal expansion: its reduced denominator has no prime factor but 2 and 5."""
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _rounded_decimal_of(text: str, q: Fraction) -> bool:
    """[ours] `text`, a decimal with a fractional part, stands for q, a value no decimal writes
    exactly (1/3 as 0.3333333): q rounded to the digits written and within a relative 1e-6.
    Every other pair of numbers is compared exactly (Fraction: 1000000 != 1000000.5)."""
    m = re.fullmatch(r"-?[0-9]+\.([0-9]+)", text)
    if m is None or _terminates(q):
        return False
    error = abs(Fraction(text) - q)
    return error <= Fraction(1, 2 * 10 ** len(m.group(1))) and error <= abs(q) / 10 ** 6


def math_answers_equal(a: str | None, b: str | None) -> bool:
    """Equal after normalisation, or equal as numbers: exactly, or a rounded decimal of a value
    that has no exact decimal (_rounded_decimal_of)."""
    if a is None or b is None or max(len(a), len(b)) > MAX_ANSWER_CHARS:
        return False
    na, nb = normalize_math_answer(a), normalize_math_answer(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    x, y = _as_number(na), _as_number(nb)
    if x is None or y is None:
        return False
    return x == y or _rounded_decimal_of(na, y) or _rounded_decimal_of(nb, x)


# a number: commas only as thousands separators (so "5,6" is 5 then 6, not 56)
_UNSIGNED = r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+"
_NUMBER_RE = re.compile(r"-?(?:" + _UNSIGNED + ")")
# GSM8K's declared answer: "####", then the number ("#### - 5" is -5; bold or a dollar sign may
# come between, and a dollar sign after the minus: "#### -$5" is -5). A markdown heading such as
# "#### Step 2" is no declared answer.
# A numbered heading ("#### 2. Money", "#### 3) Total") is none either (nor, by the same rule, an
# answer followed by a sentence, "#### 72. She sold ...": the verifier still reads 72 as the
# text's last number). The number is matched whole before that check ((?=(...))\2: an atomic
# group, which Python's re has only from 3.11), so "1,234. Total" is not read as "1".
# No two quantifiers may take the same blanks: "####" and a long run of spaces with no number
# after it took time quadratic in the run (minutes for a model that degenerates into spaces).
_DECLARED_RE = re.compile(r"####\s*(?:(?:\*\*|\\?\$)[ \t]*)?((?:-\s*(?:\\?\$[ \t]*)?)?(?=("
                          + _UNSIGNED + r"))\2)(?![.)][ \t]+[A-Za-z])")

# A gold answer whose number goes on after the declared one ("#### 1e5", "#### 3/4", "#### 1 000",
# "#### 5,00"): the scorer reads a model's answer written so as 1, 3, 1 and 5, so the intended
# answer would score wrong. After the number: blanks, then at most one character that joins
# numbers (an exponent "e", a times "x", any symbol but "("), blanks, and a digit. (Blanks are
# any white space but a line break: "#### 10\u00a0000", with a no-break space, is refused too.)
_NUMBER_GOES_ON_RE = re.compile(r"[^\S\n]*(?:(?:[eExX][+-]?|[^\s\w(])[^\S\n]*)?[0-9]")


# what a comparison reads, once commas, blanks, dollar signs and backslashes are gone: a plain
# decimal, or a/b (how _gsm8k_declared writes a boxed fraction). Not an exponent, which the
# scorer never reads out of a text ("1e5" is 1, then 5), and which Fraction would expand: 1e999999999
# is a billion-digit integer
_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+|[0-9]+/[0-9]+)")


def _clean_number(token: str) -> str | None:
    token = re.sub(r"[,\s$\\]", "", token)  # "-$5" (a declared answer) is -5
    if not _PLAIN_NUMBER_RE.fullmatch(token):
        return None
    try:
        Fraction(token)
    except (ValueError, ZeroDivisionError):  # beyond Python's int-from-string digit limit; 3/0
        return None
    return token


def _gsm8k_declared(text: str) -> tuple[int, str | None] | None:
    """The declared GSM8K answer: (start, its number with commas stripped) of whichever starts
    last of the last "#### <number>" and the last boxed answer (last_boxed; the number it holds,
    normalised as a MATH answer, else its first number, None if it holds none; a fraction as
    "a/b"); None if there is neither."""
    text = text.replace("\u2212", "-")  # the Unicode minus sign (one character for one)
    hashes = last_match(_DECLARED_RE, text)
    boxed = _last_boxed_at(text)
    if hashes is not None and (boxed is None or hashes.start() > boxed[0]):
        return hashes.start(), _clean_number(hashes.group(1))
    if boxed is None:
        return None
    # a box that holds one number as the MATH verifier reads it (10\,000, 1{,}000, \frac{1}{2},
    # \$18): that number, not the first digits in it (10, 1, 1)
    value = (_as_number(normalize_math_answer(boxed[1]))
             if len(boxed[1]) <= MAX_ANSWER_CHARS else None)
    if value is not None:
        return boxed[0], str(value)
    found = _NUMBER_RE.search(boxed[1])
    return boxed[0], (_clean_number(found.group(0)) if found else None)


def gsm8k_final_number(text: str) -> str | None:
    """GSM8K verdict input: the declared answer (the later of the last "#### <number>" and the last
    \\boxed{}), else the last number of the text; commas stripped."""
    text = text.replace("\u2212", "-")  # the Unicode minus sign, for both readings
    declared = _gsm8k_declared(text)
    if declared is not None:
        return declared[1]
    found = _NUMBER_RE.findall(text)
    return _clean_number(found[-1]) if found else None


def gsm8k_answers_equal(prediction: str | None, gold: str) -> bool:
    if prediction is None or max(len(prediction), len(gold)) > MAX_ANSWER_CHARS:
        return False
    x, y = _clean_number(prediction), _clean_number(gold)
    return x is not None and y is not None and Fraction(x) == Fraction(y)  # both exact decimals


def refuse(path, problems: list[str], shown: int = 20) -> None:
    """One ValueError naming every record of data file `path` that is refused (the first
    `shown` of them, and how many more), so that a file is mended in one pass."""
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        raise ValueError(f"{path}: {len(problems)} records refused (mend or remove them):\n  "
                         + "\n  ".join(problems[:shown]) + more)


def load_jsonl(path, fields: tuple[str, ...], problems: list[str]) -> list[tuple[int, dict]]:
    """(line number, record) for each good non-blank line of a UTF-8 JSONL file (a byte-order
    mark may open it). A missing file, or a file or line not UTF-8, is an error at once; a line
    of invalid JSON or a record without one of `fields` (as a string) is appended to `problems`,
    naming file, line and field, for the caller's one error (refuse) with its own refusals."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    data = path.read_bytes()
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if data.startswith(bom):
            raise ValueError(f"{path}: the file is {name} (it starts with the byte-order mark "
                             f"{bom.hex(' ').upper()}); save it as UTF-8")
    records, refused = [], []
    # bytes.splitlines() breaks at \n, \r\n and \r only, as reading in text mode did (not at
    # U+2028, which a JSON string may hold); each line is decoded alone, so that an error names it
    for line_number, raw in enumerate(data.splitlines(), start=1):
        if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]  # a UTF-8 byte-order mark: allowed, and no text
        if b"\x00" in raw:  # valid UTF-8, but never in JSON text: UTF-16 / UTF-32 without a BOM
            raise ValueError(f"{path}:{line_number}: holds NUL bytes (the file looks UTF-16 or "
                             f"UTF-32 without a byte-order mark); save the file as UTF-8")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            column = len(raw[:e.start].decode("utf-8")) + 1  # the bytes before it are valid
            raise ValueError(f"{path}:{line_number}: not UTF-8 (byte 0x{raw[e.start]:02x} at "
                             f"column {column}); save the file as UTF-8") from None
        if not line.strip():
            continue
        record, why = _parse_record(line, fields)
        if why:
            refused.append(f"{path}:{line_number}: {why}")
        else:
            records.append((line_number, record))
    problems.extend(refused)
    if not records and not refused:
        raise ValueError(f"{path}: no records")
    return records


def _parse_record(line: str, fields: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """(the record of a JSONL line, None), or (None, why it is no record with every one of
    `fields` a string)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    for name in fields:
        if not isinstance(record.get(name), str):
            return None, f"field {name!r} is {'missing' if name not in record else 'not a string'}"
        try:  # "\ud83d" alone: JSON allows it, no tokenizer or UTF-8 file takes it
            record[name].encode("utf-8")
        except UnicodeEncodeError as e:
            return None, (f"field {name!r} holds half a UTF-16 surrogate pair "
                          f"({record[name][e.start]!r}) at character {e.start}, which is no text")
    return record, None


# the device's prompt with help disabled (the task-tuning baseline); with help, TEMPLATE2_HELP
# follows it
NO_HELP_TEMPLATE2_SYSTEM = (
    "Solve the problem step by step, writing your reasoning as \"Step 1: ...\", \"Step 2: ...\" "
    "and so on, and put the final answer in \\boxed{}."
)
TEMPLATE2_HELP = (  # str.format(max_steps=..., marker=HELP_MARKER)
    " If you have not solved the problem after {max_steps} steps, stop and reply with {marker} "
    "instead of an answer."
)
CLOUD_TEMPLATE2_SYSTEM = "Solve the problem step by step and put the final answer in \\boxed{}."


class MathTask(Task):
    """MATH / MATH-lighteval ({"problem", "solution"}; gold = the last \\boxed{} of the solution)
    or GSM8K ({"question", "answer"}; gold = the number after "####") from local JSONL files,
    with Template II prompts (SPEC section 1b; help after `max_steps` steps, paper: 6)."""

    KINDS = {"math": ("problem", "solution"), "gsm8k": ("question", "answer")}
    answer_opening = "\\boxed{"  # decision_split: the final answer opens with \boxed{

    def __init__(self, path_train=None, path_test=None, kind="math", max_steps=6, allow_help=True):
        self.allow_help = flag(allow_help, "allow_help")
        if kind not in self.KINDS:
            raise ValueError(f"kind={kind!r} is not allowed; use one of {sorted(self.KINDS)}")
        _check_count("max_steps", max_steps, minimum=1)
        self.kind, self.max_steps, self.name = kind, max_steps, kind
        self.paths = {"train": path_train, "test": path_test}
        self._loaded = {}

    def examples(self, split: str) -> list[Example]:
        _check_split(split)
        if split not in self._loaded:
            path = self.paths[split]
            if path is None:
                raise ValueError(f"MathTask has no {split} file; pass path_{split}=...")
            examples = self._load(path)
            other = self._loaded.get("test" if split == "train" else "train", [])
            refuse(path, self._other_answers(examples, earlier=other))  # across train and test
            self._loaded[split] = examples
        return list(self._loaded[split])

    def _load(self, path) -> list[Example]:
        """The file's examples; every record refused is named in one error (not one per run)."""
        examples, problems = [], []
        for line_number, record in load_jsonl(path, self.KINDS[self.kind], problems):
            try:
                examples.append(self._example(path, line_number, record))
            except ValueError as e:
                problems.append(str(e))
        refuse(path, problems + self._other_answers(examples))
        return examples

    def _example(self, path, line_number: int, record: dict) -> Example:
        question_field, answer_field = self.KINDS[self.kind]
        question, solution = record[question_field], record[answer_field]
        if not question.strip():
            raise ValueError(f"{path}:{line_number}: field {question_field!r} is blank")
        if self.kind == "math":
            gold = last_boxed(solution)
            if gold is None:
                raise ValueError(f"{path}:{line_number}: field {answer_field!r} has no "
                                 f"\\boxed{{...}} answer")
        else:
            declared = last_match(_DECLARED_RE, solution.replace("\u2212", "-"))
            gold = _clean_number(declared.group(1)) if declared else None
            if gold is None:
                raise ValueError(f"{path}:{line_number}: field {answer_field!r} does not end "
                                 f"with '#### <number>'")
            if _NUMBER_GOES_ON_RE.match(declared.string, declared.end()):
                written = declared.string[declared.start():].split("\n", 1)[0]
                raise ValueError(f"{path}:{line_number}: field {answer_field!r}: "
                                 "'#### <number>' must be a plain decimal number (digits, an "
                                 "optional sign and decimal point, commas between groups of "
                                 f"three digits); {written[:60]!r} is read as {gold}")
        digest = hashlib.sha256(question.encode("utf-8")).hexdigest()[:16]
        example = Example(key=f"{self.kind}:{digest}",
                          prompt=self.messages(question, cloud=False),
                          data={"problem": question, "solution": solution, "gold": gold,
                                "source": f"{path}:{line_number}"})
        why = self._scored_wrong_because(example)
        if why:
            raise ValueError(f"{path}:{line_number}: field {answer_field!r} is scored wrong "
                             f"by the task's own scorer: {why}")
        return example

    def _other_answers(self, examples: list[Example], earlier: list | tuple = ()) -> list[str]:
        """A question asked again (in the same file, or in `earlier`: the other split's) with an
        answer the scorer reads as another one, named with both lines: one of the two golds is
        wrong, and both share a key in the cloud cache. The same answer again is fine."""
        first, problems = {}, []
        for example in itertools.chain(earlier, examples):
            seen = first.setdefault(example.data["problem"], example)
            if seen is not example and not self.cloud_correct(seen, example.data["solution"]):
                problems.append(f"{example.data['source']}: the question of "
                                f"{seen.data['source']} again, with another answer "
                                f"({example.data['gold'][:60]!r} here, "
                                f"{seen.data['gold'][:60]!r} there)")
        return problems

    def _scored_wrong_because(self, example: Example) -> str | None:
        """None if the task's scorer finds the example's reference solution right, else why not.
        (A record whose own solution is scored wrong is refused: no answer, or not that one, could
        ever score as correct.)"""
        solution, gold = example.data["solution"], example.data["gold"]
        if self.cloud_correct(example, solution):
            return None
        if len(gold) > MAX_ANSWER_CHARS:
            return (f"its answer is {len(gold)} characters long; the scorer reads at most "
                    f"{MAX_ANSWER_CHARS}")
        if self.kind == "math" and not normalize_math_answer(gold):
            return f"its answer {gold[:60]!r} is empty after normalisation"
        if self.help_called(solution):
            return "it reads as a help call (\"<unknown>\" or \"external assist\" after its answer)"
        # only GSM8K gets here: a \boxed{} after "#### <number>" is what it reads (_gsm8k_declared)
        read = gsm8k_final_number(solution)
        read = "no number" if read is None else repr(read[:60])
        return f"the scorer reads {read} in it (from a later \\boxed{{}}), not {gold[:60]!r}"

    def messages(self, problem: str, cloud: bool) -> list[dict]:
        if cloud:
            system = CLOUD_TEMPLATE2_SYSTEM
        elif not self.allow_help:
            system = NO_HELP_TEMPLATE2_SYSTEM
        else:
            system = NO_HELP_TEMPLATE2_SYSTEM + TEMPLATE2_HELP.format(max_steps=self.max_steps,
                                                                      marker=HELP_MARKER)
        return [{"role": "system", "content": system},
                {"role": "user", "content": problem + "\nLet's think step by step."}]

    def answer_start(self, text: str) -> int:
        """Where the answer the verifier reads starts (-1: none): the last boxed answer
        (last_boxed); GSM8K: the later of the last "#### <number>" and the last box, if that one
        holds a number. GSM8K's fallback, the last number of the text, is no declared answer."""
        if self.kind == "gsm8k":
            declared = _gsm8k_declared(text)
            return declared[0] if declared and declared[1] is not None else -1
        boxed = _last_boxed_at(text)
        return boxed[0] if boxed else -1

    def local_correct(self, example: Example, text: str) -> bool:
        if self.help_called(text):
            return False
        if self.kind == "gsm8k":
            return gsm8k_answers_equal(gsm8k_final_number(text), example.data["gold"])
        return math_answers_equal(last_boxed(text), example.data["gold"])

    def formatted(self, text: str) -> bool:
        """[ours] Template II: a "Step 1:" and either a final \\boxed{} answer or a help call."""
        return bool(re.search(r"Step\s*1\s*:", text)) and (self.help_called(text) or last_boxed(text) is not None)

    def cloud_messages(self, example: Example) -> list[dict]:
        """[ours] The problem with a system message that offers no help escape."""
        return self.messages(example.data["problem"], cloud=True)

    def cloud_correct(self, example: Example, cloud_text: str) -> bool:
        return self.local_correct(example, cloud_text)

    def oracle_answer(self, example: Example, correct: bool, rng: random.Random) -> str:
        """Correct: the reference solution. Wrong: a boxed (or ####) answer that differs."""
        if correct:
            return example.data["solution"]
        gold = example.data["gold"]
        value = _as_number(normalize_math_answer(gold))
        if value is not None:
            wrong = value + rng.choice([-2, -1, 1, 2, 10])
            wrong_text = str(wrong.numerator) if wrong.denominator == 1 else f"{wrong.numerator}/{wrong.denominator}"
        else:
            wrong_text = f"{gold}+1"
        if self.kind == "gsm8k":
            return f"Step 1: I estimate the result.\n#### {wrong_text}"
        return f"Step 1: I estimate the result.\nThe answer is $\\boxed{{{wrong_text}}}$."


# ----------------------------------------------------------------------------------------------

TASKS = {"tiny_countdown": TinyCountdownTask, "countdown": CountdownTask, "math": MathTask}
REQUIRED_METHODS = ("examples", "local_correct", "cloud_messages", "cloud_correct")


def missing_methods(cls) -> list[str]:
    """The Task methods a task class leaves at Task's NotImplementedError although every run
    calls them (self_check_correct too when has_self_check), and an __init__ without allow_help."""
    needed = REQUIRED_METHODS + (("self_check_correct",) if cls.has_self_check else ())
    missing = [name for name in needed if getattr(cls, name, None) is getattr(Task, name)]
    init = cls.__init__
    params = {} if init is object.__init__ else inspect.signature(init).parameters
    if "allow_help" not in params and not any(p.kind == inspect.Parameter.VAR_KEYWORD
                                              for p in params.values()):
        missing.append("__init__(..., allow_help)")
    return missing


def make_task(name: str, **kwargs) -> Task:
    """Build a task by name; unknown names or arguments are errors listing what is allowed, and
    so is a registered class that lacks part of the Task interface."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not allowed; use one of {sorted(TASKS)}")
    missing = missing_methods(TASKS[name])
    if missing:
        raise ValueError(f"task {name!r} ({TASKS[name].__name__}) does not implement "
                         f"{', '.join(missing)}; a task implements "
                         f"{', '.join(REQUIRED_METHODS)} and takes allow_help (see tasks.Task)")
    return construct(f"task {name!r}", TASKS[name], kwargs)


def task_settings(name: str, **kwargs) -> dict:
    """A task's full settings: its constructor's defaults with kwargs on top, so that a setting
    written out at its default value and the same setting left out name one task (train.py's
    warm-start cache key)."""
    defaults = {p: v.default for p, v in inspect.signature(TASKS[name].__init__).parameters.items()
                if p != "self" and v.default is not inspect.Parameter.empty}
    return {"name": name, **defaults, **kwargs}


def flag(value, name: str) -> bool:
    """A true/false setting; anything else (e.g. the string "no", which bool() reads as True)
    is an error."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false")
    return value


def construct(what: str, cls, kwargs: dict):
    """cls(**kwargs), every failure a ValueError naming `what`: unknown or missing arguments as
    one error listing what is allowed, a bad value (e.g. a string where a number goes) with the
    settings given."""
    # (a class without its own __init__ takes no settings: object's *args, **kwargs are not any)
    init = cls.__init__
    signature = {} if init is object.__init__ else inspect.signature(init).parameters
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    params = {p: v for p, v in signature.items() if p != "self" and v.kind not in variadic}
    any_name = any(v.kind == inspect.Parameter.VAR_KEYWORD for v in signature.values())
    unknown = [] if any_name else sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"{what} has no argument(s) {unknown}; allowed: {list(params)}")
    missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty
               and p not in kwargs]
    if missing:
        raise ValueError(f"{what} needs the argument(s) {missing}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} with {kwargs}: {e}") from e
