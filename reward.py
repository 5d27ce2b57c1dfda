"""The paper's reward: help-call detection, the Template I format check and the hierarchical
reward (SPEC.md sections 2 and 3). Pure functions of text and verdicts; no I/O, no model.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

HELP_MARKER = "<unknown> I need external assistance </unknown>"

# SPEC section 2: lenient help marker. "<unknown>" alone counts (the paper counted a misspelt
# "assitance" inside the tags), and so does the phrase "external assist..." in any case/spacing.
_HELP_RE = re.compile(r"<unknown>|external\s+assist", re.IGNORECASE)
# The same, plus the closing tag that ends a call (help_start).
_HELP_OR_CLOSE_RE = re.compile(r"</?unknown>|external\s+assist", re.IGNORECASE)
# Template I's final answer: a complete <answer>...</answer> block with no other <answer> opening
# inside, so an unclosed "<answer>" cannot reach over a later help marker, and not blank (a model
# that asks for help may still close with "<answer> </answer>": no answer). The Countdown verifier
# (tasks.py) reads the content of the last such block.
ANSWER_BLOCK_RE = re.compile(r"<answer>(?!\s*</answer>)((?:(?!<answer>).)*?)</answer>",
                             re.IGNORECASE | re.DOTALL)


def last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    """The last match of `pattern` in `text`, or None."""
    last = None
    for last in pattern.finditer(text):
        pass
    return last


def _last_start(pattern: re.Pattern, text: str) -> int:
    """Start index of the last match of `pattern` in `text`, or -1 if none."""
    last = last_match(pattern, text)
    return last.start() if last else -1


def last_answer_block(text: str) -> re.Match | None:
    """The LAST complete <answer>...</answer> block of `text` (group 1: its content), or None."""
    return last_match(ANSWER_BLOCK_RE, text)


def help_called(text: str, answer_at: int | None = None) -> bool:
    """SPEC section 2: does the response ask the cloud for help?

    A help call is `<unknown>` or /external\\s+assist/i. When the text also holds a final answer,
    whichever STARTS last wins; a marker written inside an answer block therefore counts as a
    help call ("<answer>I need external assistance</answer>" is not an answer to anything).
    `answer_at`: where the final answer that the task's verifier reads starts (-1: none); by
    default, the last Template I <answer>...</answer> block.
    """
    if answer_at is None:
        answer_at = _last_start(ANSWER_BLOCK_RE, text)
    return _last_start(_HELP_RE, text) > answer_at


def help_start(text: str, after: int = -1) -> int:
    """Where the last help call after index `after` starts, or -1 if none (eval's decision point):
    the last help match, or, for a phrase inside an <unknown> tag not yet closed, that tag."""
    start = opened = -1
    for m in _HELP_OR_CLOSE_RE.finditer(text, after + 1):
        if m.group(0).startswith("</"):
            opened = -1
        elif m.group(0).startswith("<"):
            start = opened = m.start()
        else:
            start = m.start() if opened < 0 else opened
    return start


# Template I format (SPEC section 1b). Exact rules [ours]:
#   - optional surrounding whitespace;
#   - exactly one <think>...</think> block, first; its content has no other tag of the template;
#   - then optional whitespace and EITHER exactly one <answer>...</answer> whose content is not
#     blank and holds no tag, OR the help marker (exactly, up to runs of whitespace);
#   - nothing after it. Tags are lower case, as the prompt shows them.
_TAG_RE = re.compile(r"</?(think|answer|unknown)>")
# (the blocks' contents stop at their first closing tag: a lazy .*? tried every later closing
# tag, time quadratic in the text for one made of many "</think><answer>x</answer>" pieces;
# a closing tag inside a block is refused by the tag checks below either way)
_TEMPLATE1_RE = re.compile(
    r"\s*<think>(?P<think>(?:(?!</think>).)*)</think>\s*"
    r"(?:<answer>(?P<answer>(?:(?!</answer>).)*)</answer>"
    r"|(?P<help><unknown>\s*I\s+need\s+external\s+assistance\s*</unknown>))"
    r"\s*",
    re.DOTALL,
)


def template1_formatted(text: str) -> bool:
    """True when `text` follows the Template I layout: <think>...</think> then one final
    <answer>...</answer> or the help marker, and nothing else (rules above)."""
    m = _TEMPLATE1_RE.fullmatch(text)
    if m is None or _TAG_RE.search(m.group("think")):
        return False
    if m.group("help") is not None:
        return True
    answer = m.group("answer")
    return bool(answer.strip()) and not _TAG_RE.search(answer)


@dataclass
class RewardConfig:
    """Weights of the hierarchical reward (SPEC section 3). v3 (default) uses alpha_a and
    alpha_c; v1 adds the format bonus alpha_f. Constraint: alpha_a > alpha_c (> alpha_f in v1);
    alpha_a = alpha_c is accepted as SPEC section 10's ablation (help pays as much as solving)."""
    version: str = "v3"
    alpha_a: float = 1.0
    alpha_c: float = 0.25
    alpha_f: float = 0.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.version not in ("v1", "v3"):
            raise ValueError(f"reward version={self.version!r} is not allowed; use 'v1' or 'v3'")
        for name in ("alpha_a", "alpha_c", "alpha_f"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"reward {name}={value!r} must be a number")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"reward {name}={value!r} must be a finite number >= 0")
        if not self.alpha_a > 0:
            raise ValueError(f"reward alpha_a={self.alpha_a} must be > 0: solving it yourself must "
                             f"pay (SPEC section 3)")
        if not self.alpha_a >= self.alpha_c:
            raise ValueError(f"reward needs alpha_a > alpha_c (SPEC section 3; alpha_a = alpha_c "
                             f"is allowed as SPEC 10's ablation), got alpha_a={self.alpha_a} and "
                             f"alpha_c={self.alpha_c}")
        if self.version == "v1" and not self.alpha_c > self.alpha_f:
            raise ValueError(f"reward v1 needs alpha_c > alpha_f (SPEC section 3), "
                             f"got alpha_c={self.alpha_c} and alpha_f={self.alpha_f}")
        if self.version == "v3" and self.alpha_f != 0:
            raise ValueError(f"reward alpha_f={self.alpha_f} is only used by version 'v1'; "
                             f"set alpha_f=0 for 'v3' or choose version='v1'")


@dataclass(frozen=True)
class Reward:
    """A reward and its named parts (answer / cloud / format); total == sum of the parts."""
    total: float
    components: dict = field(default_factory=dict)


def reward(help: bool, local_ok: bool, cloud_ok: bool, formatted: bool, cfg: RewardConfig) -> Reward:
    """SPEC section 3: the hierarchical reward; exactly one case of the table applies.

    help: the device response is a help call; local_ok: the task's verdict on the device answer
    (ignored for help calls: a help call is never a correct local answer); cloud_ok: the cloud's
    verdict (only used for help calls); formatted: the format check (v1 only). [ours] A help call
    earns no format bonus in v1: it is paid through the cloud case only.
    """
    answer = cloud = fmt = 0.0
    if help:
        if cloud_ok:
            cloud = cfg.alpha_c
    else:
        if local_ok:
            answer = cfg.alpha_a
        if cfg.version == "v1" and formatted:
            fmt = cfg.alpha_f
    return Reward(total=answer + cloud + fmt, components={"answer": answer, "cloud": cloud, "format": fmt})
