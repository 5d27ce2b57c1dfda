"""Train the on-device model: config, supervised warm start (from-scratch models), the GAPG loop.

    python train.py                                  # configs/default.yaml: the tiny CPU demo
    python train.py configs/x.yaml rl.steps=50       # a config file (over the code defaults,
                                                     # not default.yaml) plus dotted overrides
    python train.py resume=runs/NAME                 # continue a run exactly where it stopped

Config keys and their defaults: the dataclasses in train.py (Config and its sections); task and
cloud take the arguments of tasks.make_task / cloud.make_cloud. A bad setting: a one-line error.
Ctrl-C (or SIGTERM) during RL finishes the current step, saves a checkpoint and stops
(resume= continues); outside RL (the warm start, the final evaluation) it stops at once.

The algorithm itself lives in algo.py; this file only wires it together (DESIGN.md).
Run directory runs/<name>/: config.yaml, metrics.jsonl, samples.jsonl, cloud_cache.jsonl,
final_eval.json, checkpoint/ (model.safetensors + config.json + tokenizer files +
trainer_state.pt), train.lock (held while a train.py trains the run: one at a time).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import glob
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, fields

import torch
import yaml

try:
    import fcntl
except ImportError:  # Windows: runs are not locked (lock_run)
    fcntl = None

import algo
from algo import DEFAULT_RHO  # by name: RLSection's field `algo` hides the module there
from cloud import CloudCache, CloudError, NoCloud, check_appendable, make_cloud
from model import (ConfigDumper, ConfigLoader, ModelConfig, Transformer, atomic_write_text,
                   build_char_tokenizer, check_writable, fsync_dir, load_pretrained,
                   load_tokenizer, remove_dead_temps, reraise_naming, save_pretrained,
                   status_line, temp_path)
from reward import RewardConfig
from tasks import TASKS, make_task, task_settings

# ----------------------------------------------------------------------------- config


class ConfigError(ValueError):
    """A bad setting or argument, found before training starts; main() prints it as one line
    (any other exception is a bug and keeps its traceback)."""


class SaveError(Exception):
    """A checkpoint that could not be saved (e.g. a full disk): the last one saved is intact, and
    main() says in one line which one and how to go on."""


class RunFileError(ConfigError):
    """A run directory or one of its files (not a setting) stops the run before training: one
    line, "error: ..." rather than "config error: ...", without the hint to edit a resumed run's
    config.yaml, which could not help."""


@dataclass
class ModelSection:
    path: str = ""                  # a local HF Llama/Qwen2 directory; "" = tiny model from scratch
    hidden_size: int = 128          # from-scratch architecture (Llama layout, tied embeddings)
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 128
    gradient_checkpointing: bool = False


@dataclass
class WarmStartSection:
    """Supervised warm start of a from-scratch model on solver traces (issue 5)."""
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    p_correct: float = 0.7          # share of correct solver traces (rest: near-miss attempts)
    p_help: float = 0.2             # help decision, independent of correctness
    seed: int = -1                  # -1: the run's seed (set it to share one warm start)
    cache_dir: str = "runs/_warm_start"


@dataclass
class RLSection:
    algo: str = "gapg"              # gapg | grpo | dr_grpo | da_grpo (algo.ADVANTAGE_KINDS)
    filter: str = "any_correct"     # any_correct | mixed | none (algo.FILTER_RULES)
    rho: float = DEFAULT_RHO        # budget: P(cloud) <= rho * P(local) (SPEC 4)
    steps: int = 300
    prompts_per_step: int = 32
    group_size: int = 8
    optimizer: str = "adamw"        # adamw | sgd (SPEC 5's plain step theta += lr * mean g(x))
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    grad_clip: float = 0.0          # max gradient norm; 0 = off
    micro_batch_size: int = 0       # responses per forward/backward; 0 = all at once
    time_limit_min: float = 0.0     # stop (checkpoint, evaluate) after this many minutes; 0 = off
    dual_init: float = 0.0          # da_grpo: lambda_0, target help rate tau, dual step eta
    dual_tau: float = 0.3
    dual_eta: float = 0.5


@dataclass
class EvalSection:
    every: int = 100                # held-out evaluation every N steps (0 = only at the end)
    n: int = 500                    # held-out prompts (0 = the whole test split)
    budget: float | None = None     # cloud-call cap as a share of prompts; None (null):
                                    # rl.rho / (1 + rho), the share training aims at (SPEC 7)
    batch_size: int = 256


@dataclass
class Config:
    name: str = "default"
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    precision: str = "fp32"         # fp32 | bf16-mixed (fp32 master weights, bf16 compute) | bf16
    out_dir: str = "runs"
    resume: str = ""                # a run directory to continue
    save_every: int = 100
    samples_per_step: int = 4       # decoded rollouts written to samples.jsonl per step
    model: ModelSection = field(default_factory=ModelSection)
    task: dict = field(default_factory=lambda: {"name": "tiny_countdown"})
    cloud: dict = field(default_factory=lambda: {"backend": "oracle", "p_correct": 0.95})
    reward: RewardConfig = field(default_factory=RewardConfig)
    warm_start: WarmStartSection = field(default_factory=WarmStartSection)
    rl: RLSection = field(default_factory=RLSection)
    sampling: algo.Sampling = field(default_factory=algo.Sampling)
    eval: EvalSection = field(default_factory=EvalSection)


def _cast(value: str, current, key: str):
    """A command-line string as the type of the field it overrides."""
    if isinstance(current, bool):
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        if value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r}: expected a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected an integer") from None
    if isinstance(current, float):
        try:
            num, _, den = value.partition("/")  # fractions like rho=3/7 are allowed
            return float(num) / float(den) if den else float(value)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{key}={value!r}: expected a number (or a fraction like 3/7)") \
                from None
    if isinstance(current, str):
        return value
    return _parse_yaml(value, key)  # lists and free-form dict entries


def _parse_yaml(value: str, key: str):
    try:
        return yaml.load(value, Loader=ConfigLoader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None)
        raise ConfigError(f"{key}={value!r}: not a valid YAML value ("
                          + (f"{problem}; " if problem else "") + "e.g. [0.9, 0.999] or {name: x})") \
            from None


_NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(/(\d+\.?\d*|\.\d+))?")


def _free_value(value: str, current, key: str):
    """A command-line value for a task / cloud entry, whose type the task or the backend judges
    (cloud.timeout=90.5 where the file wrote 600): for an entry the file gave as text, the text
    (or null); else YAML, with 1e-3 and 3/7 read as numbers."""
    if value.strip() in ("null", "~"):
        return None
    if isinstance(current, str):
        return value
    parsed = _parse_yaml(value, key)
    if isinstance(parsed, str) and _NUMBER_TEXT.fullmatch(parsed):   # 3/7 (and a quoted 1e-3) is text
        return _cast(parsed, 0.0, key)
    return parsed


def _set(obj, path: list, value, key: str, from_cli: bool):
    name = path[0]
    if not isinstance(name, str):  # a file's `yes:` or `1:` key
        _no_name(key)
    if isinstance(obj, dict):
        if len(path) > 1:
            raise ConfigError(f"{key}: {name!r} is a plain value, it has no sub-keys")
        obj[name] = _free_value(value, obj.get(name), key) if from_cli else value
        return
    names = [f.name for f in fields(obj)]
    if name not in names:
        raise ConfigError(f"unknown config key {key!r}; allowed here: {', '.join(names)}"
                          + _did_you_mean(key, path, names))
    current = getattr(obj, name)
    if len(path) == 1 and key == "eval.budget":  # a float that may be null (its default: rho / (1 + rho))
        if value is None or (from_cli and value.lower() in ("null", "~")):
            setattr(obj, name, None)
            return
        current = 0.0  # else a number, read as every float key reads one (3/10)
        try:
            if isinstance(value, str):
                value = _cast(value, current, key)
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key}={value!r}: expected a number (or a fraction like 3/7)")
        except ConfigError as e:
            raise ConfigError(f"{e}, or null for rho / (1 + rho)") from None
        setattr(obj, name, float(value))
        return
    if len(path) == 1 and value is None and not from_cli and (
            dataclasses.is_dataclass(current) or isinstance(current, dict)):
        return  # a file's empty section (`rl:` with its keys commented out) sets nothing
    if isinstance(current, dict) and len(path) == 1:  # task / cloud: replaced as a whole
        value = _parse_yaml(value, key) if from_cli else value
        if not isinstance(value, dict):  # the key that picks the task / the backend
            pick = "backend" if name == "cloud" else "name"
            raise ConfigError(f"{key} is a section; give a mapping like {key}={{{pick}: ...}} or "
                              f"set one entry with {key}.<key>=...")
        for k in value:
            if not isinstance(k, str):
                _no_name(f"{key}.{k}")
        setattr(obj, name, dict(value))
        return
    if dataclasses.is_dataclass(current) or isinstance(current, dict):
        if len(path) == 1:
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; set its keys, e.g. {key}.<key>=...")
            for k, v in value.items():
                _set(current, [k], v, f"{key}.{k}", from_cli)
            return
        _set(current, path[1:], value, key, from_cli)
        return
    if len(path) > 1:
        raise ConfigError(f"{key}: {name!r} is a plain value, it has no sub-keys")
    if from_cli or (isinstance(current, float) and isinstance(value, str)):
        value = _cast(value, current, key)  # a YAML file's 3/7 or "1e-4" reaches us as a string
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, int) and not isinstance(current, bool) and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected an integer")
    elif current is not None and not isinstance(value, type(current)):
        kinds = {int: "an integer", float: "a number (or a fraction like 3/7)", str: "a string",
                 bool: "a boolean (true/false)", list: "a list"}
        raise ConfigError(f"{key}={value!r}: expected {kinds.get(type(current), type(current).__name__)}")
    if isinstance(value, list) and current and all(_number(c) for c in current):
        value = [_cast(v, 0.0, key) if isinstance(v, str) else v for v in value]  # [0.9, 1e-3]
    setattr(obj, name, value)


def _no_name(key):
    raise ConfigError(f"config key {key!r} is not a name: YAML reads yes/no/on/off/true/false as a "
                      f"boolean, ~ as null and digits as a number; quote a key that reads so")


def _did_you_mean(key: str, path: list, names: list) -> str:
    """A hint for an unknown key: the key without leading dashes, the section that has it
    (`steps` -> rl.steps), or a close spelling (`rl.stepz` -> rl.steps)."""
    rest = ".".join(path)
    prefix = key[:len(key) - len(rest)].rstrip(".")
    where = lambda k: f"{prefix}.{k}" if prefix else k
    bare = rest.lstrip("-")
    if bare != rest and bare.split(".")[0] in names:
        return f"; did you mean {where(bare)!r}? (no leading dashes)"
    if len(path) == 1 and "." in bare and bare.split(".")[0] in names:  # a file's `rl.steps: 3`
        head, _, tail = bare.partition(".")
        return f"; in a config file write it nested: {head}: {{{tail}: ...}}"
    name = bare.split(".")[0]
    defaults = Config()
    sections = {f.name: [g.name for g in fields(getattr(defaults, f.name))] for f in fields(Config)
                if dataclasses.is_dataclass(getattr(defaults, f.name))}
    elsewhere = [f"{s}.{name}" for s, keys in sections.items() if name in keys and s != prefix]
    if elsewhere:
        return f"; did you mean {' or '.join(map(repr, elsewhere))}?"
    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {where(close[0] + bare[len(name):])!r}?" if close else ""


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(cfg: Config):
    """Every choice checked up front, each error naming the key, the bad value and what is
    allowed. (Checks that need the task's data, e.g. eval.n against the test split, are in
    Trainer, still before the warm start.)"""
    choice = lambda key, v, allowed: v in allowed or _fail(f"{key}={v!r}; allowed: {list(allowed)}")
    choice("rl.algo", cfg.rl.algo, algo.ADVANTAGE_KINDS)
    choice("rl.filter", cfg.rl.filter, algo.FILTER_RULES)
    choice("device", cfg.device, ("auto", "cpu", "cuda"))
    choice("precision", cfg.precision, ("fp32", "bf16-mixed", "bf16"))
    choice("rl.optimizer", cfg.rl.optimizer, ("adamw", "sgd"))
    positive = lambda v: _number(v) and v > 0
    non_negative = lambda v: _number(v) and v >= 0
    share = lambda v: _number(v) and 0 <= v <= 1
    betas = lambda v: isinstance(v, list) and len(v) == 2 and all(share(b) and b < 1 for b in v)
    seed = lambda v: isinstance(v, int) and 0 <= v < 2**63  # what every generator accepts
    rules = [  # key, test, what is allowed
        ("seed", seed, "an integer in [0, 2**63)"),
        ("save_every", positive, "an integer > 0"),
        ("samples_per_step", non_negative, "an integer >= 0"),
        ("model.hidden_size", positive, "an integer > 0"),
        ("model.num_hidden_layers", positive, "an integer > 0"),
        ("model.num_attention_heads", positive, "an integer > 0"),
        ("model.num_key_value_heads", positive, "an integer > 0"),
        ("model.intermediate_size", positive, "an integer > 0"),
        ("model.max_position_embeddings", positive, "an integer > 0"),
        ("warm_start.steps", non_negative, "an integer >= 0"),
        ("warm_start.batch_size", positive, "an integer > 0"),
        ("warm_start.lr", positive, "a finite number > 0"),
        ("warm_start.warmup", positive, "an integer >= 1 (1 = no warmup)"),
        ("warm_start.p_correct", share, "a number in [0, 1]"),
        ("warm_start.p_help", share, "a number in [0, 1]"),
        ("warm_start.seed", lambda v: v == -1 or seed(v),
         "an integer in [0, 2**63), or -1 for the run's seed"),
        ("rl.rho", non_negative, "a finite number >= 0 (3/7: at most 30% to the cloud)"),
        ("rl.steps", positive, "an integer > 0"),
        ("rl.prompts_per_step", positive, "an integer > 0"),
        ("rl.group_size", lambda v: v >= 2, "an integer >= 2 (the group baseline needs 2)"),
        ("rl.lr", positive, "a finite number > 0"),
        ("rl.weight_decay", non_negative, "a finite number >= 0"),
        ("rl.betas", betas, "a list of two numbers in [0, 1), e.g. [0.9, 0.999]"),
        ("rl.grad_clip", non_negative, "a finite number >= 0 (0 = off)"),
        ("rl.micro_batch_size", non_negative, "an integer >= 0 (0 = all responses at once)"),
        ("rl.time_limit_min", non_negative, "a finite number >= 0 (0 = no limit)"),
        ("rl.dual_init", non_negative, "a finite number >= 0 (lambda is kept at 0 or above)"),
        ("rl.dual_tau", share, "a number in [0, 1]"),
        ("rl.dual_eta", non_negative, "a finite number >= 0"),
        ("sampling.max_new_tokens", positive, "an integer > 0"),
        ("sampling.max_prompt_tokens", non_negative, "an integer >= 0 (0 = no limit)"),
        ("sampling.temperature", lambda v: positive(v) and v >= 1e-6,
         "a finite number >= 1e-6 (training samples need T > 0; a smaller T overflows logits / T)"),
        # the update's log-probs are those of the whole tempered softmax: sampling from a
        # top-k / top-p restriction of it would make the step not the policy's gradient
        ("sampling.top_k", lambda v: v == 0, "0 in training (top-k sampling is not supported)"),
        ("sampling.top_p", lambda v: v == 1, "1 in training (top-p sampling is not supported)"),
        ("eval.every", non_negative, "an integer >= 0 (0 = only at the end)"),
        ("eval.n", non_negative, "an integer >= 0 (0 = the whole test split)"),
        ("eval.budget", lambda v: v is None or share(v),
         "a number in [0, 1] (0.3 = at most 30% of prompts), or null for rho / (1 + rho)"),
        ("eval.batch_size", positive, "an integer > 0"),
    ]
    for key, ok, allowed in rules:
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if not ok(value):
            _fail(f"{key}={value!r}: must be {allowed}")
    if cfg.name in ("", ".", "..") or "/" in cfg.name or "\\" in cfg.name:
        _fail(f"name={cfg.name!r}: must be a directory name for {cfg.out_dir}/<name> "
              f"(not empty, no '/'), e.g. name=my-run")
    m = cfg.model
    if not m.path and (m.hidden_size % m.num_attention_heads
                       or m.hidden_size // m.num_attention_heads % 2):
        _fail(f"model.hidden_size={m.hidden_size} with model.num_attention_heads="
              f"{m.num_attention_heads}: hidden_size must be num_attention_heads times an even "
              f"number (the head size, even for RoPE)")
    if not m.path and m.num_attention_heads % m.num_key_value_heads:
        _fail(f"model.num_attention_heads={m.num_attention_heads} must be a multiple of "
              f"model.num_key_value_heads={m.num_key_value_heads}")
    if cfg.task.get("name") not in TASKS:
        _fail(f"task.name={cfg.task.get('name')!r}: allowed: {', '.join(TASKS)}")
    if not m.path and not TASKS[cfg.task["name"]].trains_from_scratch():
        scratch = [name for name, task in TASKS.items() if task.trains_from_scratch()]
        _fail(f"model.path is empty (train from scratch), which task {cfg.task['name']!r} does "
              f"not support (it has no warm-start traces; from scratch: {', '.join(scratch)}); "
              f"set model.path to a local HF checkpoint directory")
    try:
        cfg.reward.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _fail(message):
    raise ConfigError(message)


def load_config(argv: list[str]) -> Config:
    """[config.yaml] [key.sub=value ...]; a bare run uses configs/default.yaml."""
    options = [a for a in argv if a.startswith("-") and "=" not in a]
    if options:
        raise ConfigError(f"unknown option {options[0]!r}; usage: python train.py [config.yaml] "
                          f"[key.sub=value ...] or resume=runs/NAME (--help: more)")
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    if len(files) > 1:
        raise ConfigError(f"at most one config file, got {files}")
    resume = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    if resume:  # continue a run: its own saved config, nothing else may change
        if files or len(overrides) > 1:
            raise ConfigError(f"resume={resume[0]} takes no config file or other overrides; to "
                              f"change a setting (e.g. rl.steps, to train longer), edit "
                              f"{os.path.join(resume[0], 'config.yaml')}, then resume")
        files = [os.path.join(resume[0], "config.yaml")]
        if not os.path.isfile(files[0]):
            raise ConfigError(f"resume={resume[0]}: no config.yaml there, so not a run directory")
    path = files[0] if files else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "configs", "default.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist or is not a file")
    cfg = Config()
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.load(f, Loader=ConfigLoader)
        except yaml.YAMLError as e:  # its message spans lines: made one
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") \
                from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte "
                              f"{e.start}); save it as UTF-8") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping (name: ..., rl: {{...}}, ...), "
                          f"not a {type(data).__name__}")
    if data.get("resume") and not resume:
        raise ConfigError(f"config file {path}: resume is not a file setting; continue a run "
                          f"with python train.py resume=runs/NAME")
    for key, value in data.items():
        _set(cfg, [key], value, key, from_cli=False)
    for item in overrides:
        key, value = item.split("=", 1)
        _set(cfg, key.split("."), value, key, from_cli=True)
    if resume:
        cfg.resume = resume[0]
    validate(cfg)
    if cfg.eval.budget is None:  # resolved here, so the run's config.yaml holds the number
        cfg.eval.budget = algo.cloud_share(cfg.rl.rho)
    return cfg


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)

# ----------------------------------------------------------------------------- run directory


RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "final_eval.json")  # train.py's own


def lock_run(run_dir: str):
    """Hold RUN_DIR/train.lock while this process lives, or raise RunFileError naming the process
    that holds it. A second train.py on one run (a job requeued while the first still runs)
    would delete the checkpoint the first is writing and interleave their logs. A POSIX lock
    (fcntl.lockf): the system drops it when its process ends, however it ends, so it is never
    stale; it belongs to the process, so a process may take it again. Returns the open lock
    file (closing it releases the lock); None where fcntl is missing (Windows): no lock."""
    if fcntl is None:
        return None
    path = os.path.join(run_dir, "train.lock")
    f = open(path, "a+")  # never truncated before it is held: it names the holder
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip() or "a process"
        f.close()
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # e.g. ENOLCK: a filesystem without locks
            print(f"note: {path} cannot be locked ({e.strerror}): nothing stops a second "
                  f"train.py on this run", file=sys.stderr)
            return None
        raise RunFileError(f"{run_dir} is in use: {holder} is training it ({path} is locked); "
                           f"wait for it to end or stop it, then run this command again") from None
    f.truncate(0)
    f.write(f"train.py pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


class RunLog:
    """metrics.jsonl / samples.jsonl (each write appended by a file opened and closed for it, so
    no handle outlives the call) and the one-line progress display."""

    def __init__(self, run_dir: str, total_steps: int):
        self.metrics = os.path.join(run_dir, "metrics.jsonl")
        self.samples = os.path.join(run_dir, "samples.jsonl")
        for path in (self.metrics, self.samples):  # both exist from the start, to follow
            self.append(path, [])
        self.total, self.start = total_steps, time.time()

    @staticmethod
    def append(path: str, rows: list):
        try:
            with open(path, "a") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))
        except OSError as e:  # e.g. a full disk: reported in one line naming the file (run())
            reraise_naming(e, path)

    def log(self, row: dict):
        self.append(self.metrics, [row])

    def log_samples(self, rows: list):
        self.append(self.samples, rows)

    def progress(self, step: int, first_step: int, text: str):
        elapsed = time.time() - self.start
        done = step - first_step
        eta = elapsed / done * (self.total - step) if done else 0
        status_line(f"step {step}/{self.total} | {_clock(elapsed)} elapsed | ETA {_clock(eta)} | {text}")


def is_final_row(row: dict) -> bool:
    """The final evaluation's row in metrics.jsonl: eval/* keys, no train/loss (a step's has one)."""
    return "train/loss" not in row and any(k.startswith("eval/") for k in row)


def truncate_log(path: str, step: int, drop_final: bool = False, eval_every: int = 0):
    """Keep the rows of steps <= step (a crash can log steps after the last checkpoint); with
    drop_final, not the final evaluation's row either (training goes on past it, or the run is
    evaluated again): given eval_every, its eval/* keys join its step's row when a longer run
    evaluates at that step (a multiple of eval_every), as a run trained that long in one go
    logs them. A torn last line (a crash mid-append) is cut off; an earlier line that is not a
    JSON object is a ValueError naming it."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, "rb") as f:
        lines = f.readlines()
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode()
            row = json.loads(line)
            problem = None if isinstance(row, dict) else "not a JSON object"
        except ValueError as e:  # not UTF-8, or not JSON
            problem = f"not valid JSON ({e})"
        if problem:
            if not b"".join(lines[n:]).strip():
                break  # the last line, torn by the crash
            raise ValueError(f"{path}:{n}: corrupt log line ({problem}); only a torn last line is "
                             f"repaired automatically: fix or delete that line, then resume")
        at = row.get("train/step", row.get("step", 0))
        if at > step:
            continue
        if drop_final and is_final_row(row):
            last = json.loads(keep[-1]) if keep else {}
            if eval_every and at % eval_every == 0 and last.get("train/step") == at:
                keep[-1] = json.dumps({**last, **row}) + "\n"
            continue
        keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(keep))


@contextlib.contextmanager
def ctrl_c_flag():
    """Within the block a first Ctrl-C (or SIGTERM) only sets the flag it yields: the RL loop
    then finishes its step, saves and stops (a step cut in half could leave the weights updated
    but not the step count). A second one interrupts at once. Outside the main thread: never
    set."""
    stop = []
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_ctrl_c(signum, frame):
        stop.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous[signal.SIGTERM] or signal.SIG_DFL)  # main()'s
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\n{name}: stopping after this step with a checkpoint (Ctrl-C or SIGTERM again "
              "stops at once, losing the steps since the last checkpoint)", file=sys.stderr)

    # SIGTERM (a scheduler's or `timeout`'s stop) is handled as a first Ctrl-C
    previous = {s: signal.signal(s, on_ctrl_c) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available; use device=cpu or "
                          "device=auto")
    return torch.device(cfg.device)


def step_seed(seed: int, step: int, what: str) -> int:
    """Every random draw of a step is seeded from (seed, step, purpose), so a resumed run makes
    exactly the draws the uninterrupted run would have made (no RNG state to save)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{what}".encode()).digest()[:8], "little") >> 1


def prompt_lengths(examples: list, tokenizer) -> dict:
    """Each prompt's length in tokens, by example key (tokenized once for the two checks below)."""
    return {ex.key: len(tokenizer.prompt_ids(ex.prompt)) for ex in examples}


def drop_long_prompts(examples: list, lengths: dict, max_tokens: int, per_step: int = 1) -> list:
    """The training prompts of at most max_tokens tokens (SPEC 9's max prompt length; 0 = all);
    at least per_step of them (rl.prompts_per_step: a step never takes a prompt twice)."""
    if not max_tokens:
        return examples
    kept = [ex for ex in examples if lengths[ex.key] <= max_tokens]
    if len(kept) < len(examples):
        print(f"sampling.max_prompt_tokens={max_tokens}: left out {len(examples) - len(kept)} of "
              f"{len(examples)} training prompts as longer")
    if not kept:
        raise ConfigError(f"sampling.max_prompt_tokens={max_tokens}: every training prompt is "
                          f"longer; raise it, or 0 for no limit")
    if len(kept) < per_step:
        raise ConfigError(f"sampling.max_prompt_tokens={max_tokens} leaves {len(kept)} training "
                          f"prompts, fewer than rl.prompts_per_step={per_step}; raise it (0 = no "
                          f"limit), or use rl.prompts_per_step <= {len(kept)}")
    return kept


def check_context(examples: list, lengths: dict, max_new_tokens: int, limit: int, what: str):
    """Every prompt plus sampling.max_new_tokens must fit the model's context (`what`=`limit`):
    an error now, not when a long prompt is first sampled."""
    longest = max(lengths[ex.key] for ex in examples)
    need = longest + max_new_tokens
    if limit < need:
        raise ConfigError(f"{what}={limit}: prompts take up to {longest} tokens plus "
                          f"sampling.max_new_tokens={max_new_tokens}; must be at least {need}")


def check_answer_room(task, traces: list[str], max_new_tokens: int):
    """Training from scratch: the task's answers (as in `traces`, sample_traces' warm-start
    traces, one token a character) must fit sampling.max_new_tokens, or no response ever ends
    and no step updates."""
    longest = max(len(trace) - len(ex.prompt) for ex, trace in zip(task.examples("train"), traces))
    if longest > max_new_tokens:
        raise ConfigError(f"sampling.max_new_tokens={max_new_tokens}: the task's answers take up "
                          f"to {longest} tokens (its sampled warm-start traces); must be at least "
                          f"{longest}")


def fit_prompts(cfg: Config, train: list, test: list, tokenizer, limit: int, what: str) -> list:
    """The training prompts that sampling.max_prompt_tokens keeps, after checking that they and
    the test prompts fit the context `what`=`limit` with sampling.max_new_tokens; each prompt is
    tokenized once."""
    lengths = prompt_lengths(train + test, tokenizer)
    train = drop_long_prompts(train, lengths, cfg.sampling.max_prompt_tokens,
                              cfg.rl.prompts_per_step)
    check_context(train + test, lengths, cfg.sampling.max_new_tokens, limit, what)
    return train


def step_prompts(examples: list, seed: int, step: int, k: int) -> list:
    """The step's prompts: epochs of seeded shuffles of the training split, k per step."""
    n = len(examples)
    per_epoch = max(n // k, 1)
    epoch, offset = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(step_seed(seed, epoch, "epoch")).shuffle(order)
    return [examples[order[(offset * k + i) % n]] for i in range(k)]

# ----------------------------------------------------------------------------- warm start


def sample_traces(task, k: int = 8) -> list[str]:
    """The first k training prompts with a warm-start completion each (a fixed draw)."""
    rng = random.Random(0)
    return [ex.prompt + task.warm_start_completion(ex, rng) for ex in task.examples("train")[:k]]


def warm_start_key(cfg: Config, task) -> str:
    """The warm start's cache name: the settings that shape it (the task's with its defaults
    filled in, so that writing a default out changes nothing), and the task's alphabet and a few
    of its traces, so that a task whose format changed gets a new warm start, not a stale one."""
    task_key = {k: v for k, v in task_settings(**cfg.task).items() if k != "allow_help"}
    spec = {"task": task_key, "model": config_dict(cfg.model), "warm": config_dict(cfg.warm_start),
            "seed": warm_start_seed(cfg), "alphabet": task.alphabet, "traces": sample_traces(task)}
    spec["warm"].pop("cache_dir")
    spec["warm"].pop("seed")
    spec["model"].pop("gradient_checkpointing")
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def warm_start_seed(cfg: Config) -> int:
    return cfg.seed if cfg.warm_start.seed < 0 else cfg.warm_start.seed


def warm_start(cfg: Config, task, device) -> str:
    """Train a tiny model from scratch on solver traces (cross-entropy on the completion,
    self-check characters included) and save it; reuse a cached one whose config matches."""
    out = os.path.join(cfg.warm_start.cache_dir, warm_start_key(cfg, task))
    if os.path.exists(os.path.join(out, "warm_start.json")):
        print(f"warm start: reusing {out}")
        return out
    # runs of one seed started side by side share this warm start: one trains it, the others
    # wait for it (else each trained it, and the last to finish deleted and replaced the cache
    # while an earlier one could be loading it)
    os.makedirs(cfg.warm_start.cache_dir, exist_ok=True)
    with open(out + ".lock", "a") as lock:
        if fcntl is not None:
            try:
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):  # else a filesystem without locks
                    print(f"warm start: another process is training {out}; waiting for it",
                          flush=True)
                    fcntl.lockf(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(os.path.join(out, "warm_start.json")):  # saved meanwhile
                print(f"warm start: reusing {out}")
                return out
            return _train_warm_start(cfg, task, device, out)
        finally:  # a process waiting for the lock holds this file open: it goes on all the same
            with contextlib.suppress(FileNotFoundError):
                os.remove(out + ".lock")


def _train_warm_start(cfg: Config, task, device, out: str) -> str:
    """warm_start's training and atomic save into `out`, under its lock."""
    others = glob.glob(os.path.join(glob.escape(cfg.warm_start.cache_dir), "*", "warm_start.json"))
    if others:  # say why minutes of training start although warm starts are cached
        print(f"warm start: none of the {len(others)} cached in {cfg.warm_start.cache_dir} has "
              f"these settings (model, warm_start and task sections, seed, the task's traces)")
    # killed processes' unfinished saves, of these settings or others: OUT.tmp.PID@HOST
    remove_dead_temps(os.path.join(glob.escape(cfg.warm_start.cache_dir), "*"))
    ws, m = cfg.warm_start, cfg.model
    tokenizer = build_char_tokenizer(task.alphabet)
    model_cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size,
                            intermediate_size=m.intermediate_size,
                            num_hidden_layers=m.num_hidden_layers,
                            num_attention_heads=m.num_attention_heads,
                            num_key_value_heads=m.num_key_value_heads,
                            max_position_embeddings=m.max_position_embeddings,
                            tie_word_embeddings=True, eos_token_id=tokenizer.eos_ids[0])
    seed = warm_start_seed(cfg)
    model = Transformer(model_cfg).init_weights(seed).to(device).train()
    print(f"warm start: {model.num_params() / 1e6:.2f}M-parameter model from scratch, "
          f"{ws.steps} steps x {ws.batch_size} traces -> {out}")
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.01, betas=(0.9, 0.95))
    train = task.examples("train")
    rng = random.Random(seed)
    start = time.time()
    for step in range(ws.steps):
        lr = ws.lr * min(1.0, (step + 1) / ws.warmup) * 0.5 * (1 + math.cos(math.pi * step / ws.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [rng.choice(train) for _ in range(ws.batch_size)]
        pairs = [(tokenizer.prompt_ids(ex.prompt),
                  tokenizer.encode(task.warm_start_completion(ex, rng, ws.p_correct, ws.p_help)))
                 for ex in batch]
        loss = supervised_loss(model, pairs, tokenizer.pad_id, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == ws.steps - 1:
            el = time.time() - start
            status_line(f"warm start {step + 1}/{ws.steps} | {_clock(el)} elapsed | ETA "
                        f"{_clock(el / (step + 1) * (ws.steps - step - 1))} | loss {loss.item():.4f}")
    print()
    model.eval()
    n_stats = min(500, len(task.examples("test")))
    stats = warm_start_stats(model, tokenizer, task, cfg.sampling.max_new_tokens, n_stats)
    print(f"warm start: greedy on {n_stats} test prompts: " +
          ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    tmp = temp_path(out)
    try:
        save_pretrained(model, tmp, tokenizer)
        atomic_write_text(os.path.join(tmp, "warm_start.json"), json.dumps(
            {"config": config_dict(cfg.warm_start), "seconds": time.time() - start, **stats},
            indent=2))
    except BaseException:  # e.g. a full disk: the part written goes, its space back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    fsync_dir(os.path.dirname(os.path.abspath(out)))
    return out


def supervised_loss(model, pairs, pad_id, device):
    """Mean cross-entropy of the completion tokens given their prompts (right-padded batch)."""
    L = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), L), pad_id, dtype=torch.long)
    target = torch.full((len(pairs), L), -100, dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        seq = p + c
        ids[i, :len(seq)] = torch.tensor(seq)
        target[i, len(p) - 1:len(seq) - 1] = torch.tensor(c)  # position t predicts token t+1
    ids, target = ids.to(device), target.to(device)
    logits = model(ids, torch.arange(L, device=device).expand(len(pairs), L))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


@torch.no_grad()
def warm_start_stats(model, tokenizer, task, max_new_tokens, n=500):
    """Greedy local accuracy, help rate, and self-check accuracy (the check characters the model
    wrote versus the ones its own final value implies) on held-out prompts."""
    examples = task.examples("test")[:n]
    metrics, out = algo.evaluate_policy(model, tokenizer, task, examples, NoCloud(), 0.0,
                                        max_new_tokens)
    stats = {"local_acc": metrics["local_acc"], "help_rate": metrics["call_ratio"]}
    if task.has_self_check:
        stats["check_acc"] = sum(task.self_check_correct(ex, text)
                                 for ex, text in zip(examples, out["text"])) / len(examples)
    return stats


# ----------------------------------------------------------------------------- the RL loop


def _whole_section_hint(error, section: str, key: str) -> str:
    """`task.name=x` / `cloud.backend=x` keep the other keys of the section they change, which
    the new task or backend may not take: say how to replace the section instead."""
    if "has no argument(s)" not in str(error):
        return ""
    return (f" (if this comes from switching with {section}.{key}=..., which keeps the section's "
            f"other settings: replace the section whole, '{section}={{{key}: ..., ...}}')")


def load_task(cfg: Config) -> tuple:
    """-> (task, train examples, test examples), each problem with the task's settings a
    ConfigError (a bad argument, a missing data file, splits too small for rl.prompts_per_step
    or eval.n)."""
    try:
        task = make_task(**cfg.task)  # its errors name the task and the bad argument
    except ValueError as e:
        raise ConfigError(str(e) + _whole_section_hint(e, "task", "name")) from None
    try:
        train, test = task.examples("train"), task.examples("test")
    except (ValueError, OSError) as e:  # too few distinct problems, a missing data file
        raise ConfigError(f"task {cfg.task}: {e}") from None
    if not train or not test:
        raise ConfigError(f"task {cfg.task['name']!r}: needs a non-empty train and test split, "
                          f"got {len(train)} and {len(test)} examples")
    if cfg.rl.prompts_per_step > len(train):
        raise ConfigError(f"rl.prompts_per_step={cfg.rl.prompts_per_step}: the training split "
                          f"has only {len(train)} prompts and a step takes each at most once; "
                          f"use rl.prompts_per_step <= {len(train)}")
    if cfg.eval.n > len(test):
        raise ConfigError(f"eval.n={cfg.eval.n}: the test split has only {len(test)} prompts; "
                          f"use eval.n <= {len(test)}, or eval.n=0 for all of them")
    return task, train, test


class TimedCloud:
    """The cloud as the rollout sees it, adding up the seconds its answers took (perf/cloud_s)."""

    def __init__(self, cloud):
        self.cloud, self.seconds = cloud, 0.0

    def ask(self, task, examples):
        start = time.time()
        try:
            return self.cloud.ask(task, examples)
        finally:
            self.seconds += time.time() - start


class Trainer:
    def __init__(self, cfg: Config):
        # First every check that can fail on a bad setting (ConfigError), then the slow part.
        self.cfg = cfg
        self.device = resolve_device(cfg)
        if self.device.type == "cuda":
            # torch 2.13's cuDNN attention backward gives NaN query gradients on H100 / H200 for a
            # masked sequence of length 64 mod 128 (pytorch#196678, fixed after 2.13.0): a bf16
            # update would be skipped as non-finite. The other SDPA kernels are not affected; drop
            # this when the torch pin moves past the fix.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.run_dir = cfg.resume or os.path.join(cfg.out_dir, cfg.name)
        ckpt = os.path.join(self.run_dir, "checkpoint")
        has_checkpoint = os.path.exists(ckpt) or os.path.exists(ckpt + ".old")
        if not cfg.resume and has_checkpoint:
            raise ConfigError(f"{self.run_dir} already holds a run; resume it with "
                              f"resume={self.run_dir}, or choose another name=")
        warm_cache = os.path.realpath(cfg.warm_start.cache_dir)
        if not cfg.model.path and not cfg.resume and \
                os.path.commonpath([os.path.realpath(self.run_dir), warm_cache]) == warm_cache:
            raise ConfigError(f"{self.run_dir} lies in warm_start.cache_dir "
                              f"{cfg.warm_start.cache_dir}, where cached warm starts live; choose "
                              f"another name= or out_dir=")
        if cfg.resume and not has_checkpoint:
            raise ConfigError(f"resume={self.run_dir}: no checkpoint yet (the run stopped before "
                              f"its first save); start it afresh with: python train.py "
                              f"{os.path.join(self.run_dir, 'config.yaml')}")
        self.task, self.train_examples, test = load_task(cfg)
        try:  # the run's cache file (a file's fault), then the backend (a setting's)
            cache = CloudCache(os.path.join(self.run_dir, "cloud_cache.jsonl"))
        except ValueError as e:  # a corrupt record
            raise RunFileError(str(e)) from None
        try:
            self.cloud = make_cloud(dict(cfg.cloud), cache=cache)
        except ValueError as e:
            raise ConfigError(str(e) + _whole_section_hint(e, "cloud", "backend")) from None
        try:
            self.cloud.check_cache()
        except ValueError as e:
            raise ConfigError(f"{e}: set the cloud section back to what this run used, or start "
                              f"a new run (name=...)") from None
        local = cfg.cloud.get("path") if cfg.cloud.get("backend") == "local" else None
        if local and not cfg.resume and not os.path.isfile(os.path.join(local, "config.json")):
            # the backend loads its model when first asked: after the warm start, too late
            raise ConfigError(f"cloud.path={local!r} has no config.json; the local cloud backend "
                              f"needs an HF checkpoint directory")
        self.eval_examples = test[:cfg.eval.n] if cfg.eval.n else test
        if not cfg.model.path:  # from scratch: a too-short context fails here, not after warm start
            # the character tokenizer reads any character outside the alphabet as <pad>
            traces = sample_traces(self.task)
            texts = [ex.prompt for ex in self.train_examples + test] + list(
                self.task.stop_texts + self.task.banned_texts) + traces
            unknown = sorted(set("".join(texts)) - set(self.task.alphabet or ""))
            if unknown:
                raise ConfigError(f"task {self.task.name!r}: its prompts, stop/banned texts or "
                                  f"warm-start traces use {''.join(unknown)!r}, which are not in "
                                  f"its alphabet {self.task.alphabet!r}")
            check_answer_room(self.task, traces, cfg.sampling.max_new_tokens)
            self.train_examples = fit_prompts(cfg, self.train_examples, test,
                                              build_char_tokenizer(self.task.alphabet),
                                              cfg.model.max_position_embeddings,
                                              "model.max_position_embeddings")
            self.check_cloud_fits(test)
        elif not cfg.resume and not os.path.isdir(cfg.model.path):
            hint = (" (python scripts/get_smollm2.py makes it)"
                    if os.path.normpath(cfg.model.path) == os.path.join(".cache", "smollm2") else "")
            raise ConfigError(f"model.path={cfg.model.path!r} is not a directory{hint}; give a "
                              f"local HF checkpoint directory, or '' to train from scratch")
        # the directories written to: an error now, not after the warm start (which a resume,
        # loading its checkpoint, never reads)
        dirs = [("run directory" if cfg.resume else "out_dir", self.run_dir)] + (
            [("warm_start.cache_dir", cfg.warm_start.cache_dir)]
            if not cfg.model.path and not cfg.resume else [])
        try:
            for key, d in dirs:
                check_writable(d, key)
        except ValueError as e:
            raise (RunFileError if cfg.resume else ConfigError)(str(e)) from None
        try:  # the first cloud call appends to the cache: said now
            check_appendable(self.cloud.cache.path)
        except ValueError as e:
            raise RunFileError(str(e)) from None
        os.makedirs(self.run_dir, exist_ok=True)
        self.lock = lock_run(self.run_dir)  # before anything in the run directory is touched
        # a save cut short leaves a whole checkpoint.tmp: its space back before anything is written
        shutil.rmtree(ckpt + ".tmp", ignore_errors=True)
        for name in RUN_FILES:  # their atomic writes cut short: NAME.tmp.PID@HOST, writer dead
            remove_dead_temps(os.path.join(glob.escape(self.run_dir), name))
        if not cfg.resume:  # a fresh start: the old run files go (config.yaml is rewritten)
            for stale in (name for name in RUN_FILES if name != "config.yaml"):
                if os.path.exists(os.path.join(self.run_dir, stale)):
                    os.remove(os.path.join(self.run_dir, stale))
            atomic_write_text(os.path.join(self.run_dir, "config.yaml"),
                              yaml.dump(config_dict(cfg), Dumper=ConfigDumper, sort_keys=False))
        if cfg.resume:
            # A crash mid-save can leave only checkpoint.old: it becomes the checkpoint again, so
            # that the next save() keeps it as .old until the new one is in place.
            if not os.path.exists(ckpt):
                os.replace(ckpt + ".old", ckpt)
            source = ckpt
        else:
            source = cfg.model.path or warm_start(cfg, self.task, self.device)
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        try:
            self.model = load_pretrained(source, dtype=dtype, device=self.device)
            self.tokenizer = load_tokenizer(source)
        except (ValueError, OSError) as e:  # a missing, truncated or foreign file: one line
            raise (RunFileError if cfg.resume else ConfigError)(
                f"cannot load the model from {source}: {e}") from e
        if cfg.resume:  # the checkpoint loaded: a .old that save() was killed deleting can go
            shutil.rmtree(ckpt + ".old", ignore_errors=True)
        self.model.gradient_checkpointing = cfg.model.gradient_checkpointing
        # never sampled, so left out of the update's log-probs too (help disabled: "H")
        self.banned_ids = self.tokenizer.single_token_ids(self.task.banned_texts)
        if cfg.model.path:  # (from scratch: done above, before the warm start)
            try:  # a chat task needs a chat format: a raw-text tokenizer fails here, not in step 1
                self.train_examples = fit_prompts(cfg, self.train_examples, test, self.tokenizer,
                                                  self.model.config.max_position_embeddings,
                                                  f"max_position_embeddings of {source}")
            except ConfigError:  # already names the setting at fault
                raise
            except ValueError as e:  # the tokenizer's, e.g. no chat format for chat prompts
                raise ConfigError(f"model.path={cfg.model.path!r}: {e}") from None
            self.check_cloud_fits(test)
        self.sampler_model = self.model
        if cfg.precision == "bf16-mixed":  # a bf16 copy samples; fp32 master weights train
            self.sampler_model = load_pretrained(source, dtype=torch.bfloat16, device=self.device)
        if cfg.rl.optimizer == "sgd":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.rl.lr,
                                       weight_decay=cfg.rl.weight_decay)
        else:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.rl.lr,
                                         weight_decay=cfg.rl.weight_decay, betas=tuple(cfg.rl.betas))
        self.step, self.dual = 0, cfg.rl.dual_init
        self.saved_step = None  # the step of the checkpoint on disk (None: none yet)
        self.time_limited = False  # stopped by rl.time_limit_min: finished (README)
        self.non_finite = 0  # steps of this session skipped for a NaN/inf loss or gradient
        self.stopped_by = signal.SIGINT  # the signal that stops train(): SIGINT or SIGTERM
        if cfg.resume:
            path = os.path.join(source, "trainer_state.pt")
            try:  # weights_only: tensors, numbers and containers; a pickled object is refused
                state = torch.load(path, weights_only=True, map_location="cpu")  # AdamW's
                # load_state_dict moves its state to the parameters' device
            except pickle.UnpicklingError as e:
                found = re.search(r"Unsupported global: GLOBAL \S+", str(e))
                raise ConfigError(f"cannot resume from {path}: it holds objects other than tensors, "
                                  f"numbers and containers ({found.group(0) if found else 'refused'});"
                                  f" resume only run directories you trust") from None
            except (EOFError, RuntimeError, OSError) as e:  # empty, truncated or unreadable
                raise ConfigError(f"cannot resume from {path}: not a readable trainer state "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
            self.resume_optimizer(state["optimizer"])
            self.step, self.dual = state["step"], state["dual"]
            self.saved_step = self.step
            # finished by the time limit only under the settings it stopped with: raising rl.steps
            # or changing rl.time_limit_min in the run's config.yaml trains on
            self.time_limited = state.get("time_limit_stop") == self.time_limit_settings()
            print(f"resumed {self.run_dir} at step {self.step}")
            # Training goes on (e.g. rl.steps raised): the old final evaluation and its row are
            # stale. The file goes first: eval.py takes a final_eval.json for a finished run.
            final_path = os.path.join(self.run_dir, "final_eval.json")
            if not self.finished() and os.path.exists(final_path):
                os.remove(final_path)
            # A finished run without final_eval.json (deleted) is evaluated again: its old final
            # row goes too, its eval/* keys joining no step's row (no training goes on).
            evaluated = self.finished() and os.path.exists(final_path)
            for name in ("metrics.jsonl", "samples.jsonl"):  # drop rows logged after the checkpoint
                try:
                    truncate_log(os.path.join(self.run_dir, name), self.step,
                                 drop_final=not evaluated,
                                 eval_every=0 if self.finished() else cfg.eval.every)
                except ValueError as e:  # a corrupt line before the last
                    raise RunFileError(str(e)) from None

    def resume_optimizer(self, saved: dict):
        """Load the checkpoint's optimizer state, then apply config.yaml's rl.lr, rl.weight_decay
        and rl.betas, which load_state_dict would silently replace with the checkpoint's; a
        changed value is reported. A different rl.optimizer cannot take over the state: error."""
        rl = self.cfg.rl
        kind = "adamw" if "betas" in saved["param_groups"][0] else "sgd"
        if kind != rl.optimizer:
            raise ConfigError(f"rl.optimizer={rl.optimizer!r}: the checkpoint in {self.run_dir} "
                              f"was trained with {kind!r}, whose state cannot carry over; set it "
                              f"back, or start a new run (name=...)")
        self.opt.load_state_dict(saved)
        wanted = {"lr": rl.lr, "weight_decay": rl.weight_decay}
        if kind == "adamw":
            wanted["betas"] = tuple(rl.betas)
        for key, value in wanted.items():
            if self.opt.param_groups[0][key] != value:
                print(f"resume: rl.{key}={value} from config.yaml (the checkpoint was saved with "
                      f"{self.opt.param_groups[0][key]})")
            for group in self.opt.param_groups:
                group[key] = value

    def time_limit_settings(self) -> tuple:
        """What a stop by rl.time_limit_min is saved with, and compared against on resume."""
        return (self.cfg.rl.steps, self.cfg.rl.time_limit_min)

    def finished(self) -> bool:
        """Trained to rl.steps, or stopped by rl.time_limit_min (README: that counts as finished)."""
        return self.step >= self.cfg.rl.steps or self.time_limited

    # one step of SPEC 5-6
    def rl_step(self) -> dict:
        cfg, rl = self.cfg, self.cfg.rl
        examples = step_prompts(self.train_examples, cfg.seed, self.step, rl.prompts_per_step)
        calls, cached = self.cloud.calls_made, self.cloud.served_from_cache
        if self.device.type == "cuda":  # perf/peak_mem_gb: this step's peak
            torch.cuda.reset_peak_memory_stats(self.device)
        cloud = TimedCloud(self.cloud)
        t0 = time.time()
        self.model.eval()
        with torch.no_grad(), self.autocast():
            ro = algo.rollout(self.sampler_model, self.tokenizer, examples, rl.group_size,
                              cfg.sampling, self.task, cloud, cfg.reward,
                              seed=step_seed(cfg.seed, self.step, "sample"))
        t1 = time.time()
        sample_s = t1 - t0 - cloud.seconds  # the rollout without waiting for the cloud
        coef = algo.group_advantages(ro.rewards, rl.algo, help=ro.help, dual=self.dual)
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, self.step, "filter"))
        # [ours] a prompt whose cloud call failed (not cached: retried when next sampled) stays
        # out of the filter and S, since its help responses could not be scored
        filt = algo.filter_prompts(ro.local_ok, ro.cloud_ok, ro.help, rl.rho, rl.filter, gen,
                                   rewards=ro.rewards, exclude=ro.cloud_failed)
        row = self.rollout_metrics(ro)
        row.update({"filter/d1": filt.n_d1, "filter/d2": filt.n_d2,
                    "filter/d2_candidates": filt.n_d2_candidates,
                    "filter/d2_dropped": filt.n_d2_dropped,
                    "filter/zero_variance": filt.n_zero_variance,
                    "filter/cloud_failed": int(ro.cloud_failed.sum()),
                    "filter/selected": len(filt.selected)})
        loss, grad_norm, skipped = 0.0, 0.0, "empty_selection" if len(filt.selected) == 0 else ""
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        if not skipped:
            with self.autocast():
                loss = algo.update_policy(self.model, ro, coef, filt.selected,
                                          cfg.sampling.temperature, rl.micro_batch_size,
                                          self.tokenizer.pad_id, self.banned_ids)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0
            if not grads:   # every selected response has coefficient 0: nothing to update
                skipped = "zero_coefficients"
            elif not (math.isfinite(loss) and math.isfinite(grad_norm)):
                skipped = "non_finite"  # never let a NaN/inf reach the weights
                self.non_finite += 1
            else:
                if rl.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), rl.grad_clip)
                self.opt.step()
                self.sync_sampler()
        self.opt.zero_grad(set_to_none=True)
        if rl.algo == "da_grpo":
            self.dual = algo.update_dual(self.dual, row["route/help_ratio"], rl.dual_tau,
                                         rl.dual_eta)
        t2 = time.time()
        generated = int(ro.lengths.sum())
        finite = lambda v: v if math.isfinite(v) else None  # null: metrics.jsonl is strict JSON
        row.update({"train/step": self.step + 1, "train/loss": finite(loss),
                    "train/grad_norm": finite(grad_norm),
                    "train/skipped": skipped, "train/dual": self.dual,
                    "perf/sample_s": sample_s, "perf/cloud_s": cloud.seconds,
                    "perf/update_s": t2 - t1, "perf/tokens_per_s": generated / max(sample_s, 1e-9),
                    "perf/cloud_calls": self.cloud.calls_made - calls,  # this step's
                    "perf/cloud_cached": self.cloud.served_from_cache - cached})
        if self.device.type == "cuda":
            row["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.last_rollout = ro
        return row

    def rollout_metrics(self, ro) -> dict:
        help, lengths = ro.help.reshape(-1), ro.lengths.float()
        answered = ro.cloud_asked & ~ro.cloud_failed
        row = {f"reward/{k}": float(v.mean()) for k, v in ro.components.items()}
        row["reward/mean"] = float(ro.rewards.mean())
        # shares as exact count / total (a float32 mean logs 6 of 20 as 0.30000001, and then
        # da_grpo's dual rises although the help rate equals its target)
        def share(mask):
            return int(mask.sum()) / mask.numel()
        row.update({
            "route/help_ratio": share(help),
            "route/local_acc": share(ro.local_ok),
            # over the prompts the cloud answered: a failed call (filter/cloud_failed) is no
            # wrong answer of the cloud's; None: nothing to average (nothing asked or answered)
            "route/cloud_acc": float(ro.cloud_ok[answered].float().mean())
            if answered.any() else None,
            "route/len_help": float(lengths[help].mean()) if help.any() else None,
            "route/len_answer": float(lengths[~help].mean()) if (~help).any() else None,
            "route/clipped_ratio": share(~ro.finished),
        })
        return row

    def autocast(self):
        if self.cfg.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def check_cloud_fits(self, test):
        """A backend with check_fits (the local one: its context) must take every prompt the run
        may send it: an error at the start, not at the first help call. Checked when the run
        starts, not on resume."""
        check = getattr(self.cloud.backend, "check_fits", None)
        if check is not None and not self.cfg.resume:
            try:
                check(self.task, self.train_examples + test)
            except (ValueError, OSError) as e:
                raise ConfigError(f"cloud: {e}") from None

    def sync_sampler(self):
        if self.sampler_model is not self.model:
            with torch.no_grad():
                for p, q in zip(self.sampler_model.parameters(), self.model.parameters()):
                    p.copy_(q)

    def evaluate(self) -> dict:
        self.model.eval()
        with self.autocast():
            metrics, _ = algo.evaluate_policy(self.sampler_model, self.tokenizer, self.task,
                                              self.eval_examples, self.cloud, self.cfg.eval.budget,
                                              self.cfg.sampling.max_new_tokens,
                                              self.cfg.eval.batch_size,
                                              lambda done, total: status_line(
                                                  f"evaluation {done}/{total}"))
        return metrics

    def save(self):
        """Checkpoint atomically: write checkpoint.tmp, then swap it in. At every moment a
        complete `checkpoint` or `checkpoint.old` exists (resume falls back to .old): .old is
        only deleted once a newer complete checkpoint has taken its place. A write that fails
        (e.g. a full disk) is a SaveError."""
        ckpt = os.path.join(self.run_dir, "checkpoint")
        tmp = ckpt + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        state = {"optimizer": self.opt.state_dict(), "step": self.step, "dual": self.dual,
                 "time_limit_stop": self.time_limit_settings() if self.time_limited else None}
        try:
            save_pretrained(self.model, tmp, self.tokenizer)
            try:
                torch.save(state, os.path.join(tmp, "trainer_state.pt"))
            except RuntimeError as e:  # how torch's zip writer reports a failed write
                raise OSError(str(e)) from e
            with open(os.path.join(tmp, "trainer_state.pt"), "rb+") as f:
                os.fsync(f.fileno())
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)  # the part written: its space back
            raise SaveError(f"cannot save the checkpoint of step {self.step} to {tmp} "
                            f"({' '.join(str(e).split())})") from e
        if os.path.exists(ckpt):
            self.remove_old(ckpt + ".old")
            os.replace(ckpt, ckpt + ".old")
        os.replace(tmp, ckpt)
        fsync_dir(self.run_dir)  # the swap survives a crash of the machine, too
        self.saved_step = self.step
        self.remove_old(ckpt + ".old")

    def remove_old(self, old: str):
        """Delete checkpoint.old; one that stays (e.g. a subdirectory that cannot be written)
        would block the next save's swap: a SaveError now, naming it."""
        shutil.rmtree(old, ignore_errors=True)
        if os.path.lexists(old):
            raise SaveError(f"{old} could not be deleted, and a save needs its place: "
                            f"delete it")

    def kept(self) -> str:
        """Which checkpoint a run stopped by a failed write goes on from."""
        return (f"the checkpoint of step {self.saved_step} is intact"
                if self.saved_step is not None else "no checkpoint was saved yet")

    def train(self) -> dict:
        cfg = self.cfg
        final_path = os.path.join(self.run_dir, "final_eval.json")
        if self.finished() and os.path.exists(final_path):  # resumed a finished run
            print(f"{self.run_dir} is already complete ({self.step} steps"
                  f"{', stopped by rl.time_limit_min' if self.time_limited else ''}); its final "
                  f"evaluation is in {final_path}")
            with open(final_path) as f:
                final = json.load(f)
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a+") as f:
                f.seek(0)
                last = f.read().splitlines()[-1:]
                if not last or not is_final_row(json.loads(last[0])):  # a crash came
                    f.write(json.dumps(self.final_row(final)) + "\n")      # before its row
            return final
        log = RunLog(self.run_dir, cfg.rl.steps)
        first = self.step
        print(f"{cfg.rl.algo} on {self.task.name}: {cfg.rl.steps} steps x "
              f"{cfg.rl.prompts_per_step} prompts x G={cfg.rl.group_size}, filter={cfg.rl.filter}, "
              f"rho={cfg.rl.rho:.3f}, reward {cfg.reward.version} alpha_a={cfg.reward.alpha_a} "
              f"alpha_c={cfg.reward.alpha_c}"
              + (f" alpha_f={cfg.reward.alpha_f}" if cfg.reward.version == "v1" else "")
              + f", help {'allowed' if self.task.allow_help else 'disabled'}"
              f", run dir {self.run_dir}")
        if cfg.reward.alpha_c == cfg.reward.alpha_a:
            print(f"note: reward.alpha_c = reward.alpha_a = {cfg.reward.alpha_a} is SPEC 10's "
                  f"ablation: a help call the cloud gets right pays as much as solving (the paper "
                  f"reports a collapse to always asking for help); SPEC 3 needs alpha_a > alpha_c")
        matched = algo.cloud_share(cfg.rl.rho)
        if abs(cfg.eval.budget - matched) > 1e-6:
            print(f"note: eval.budget={cfg.eval.budget} caps evaluation at another share than "
                  f"rl.rho={cfg.rl.rho:.4g} trains for (SPEC 4: rho/(1+rho) = {matched:.4g}; "
                  f"eval.budget=null uses that)")

        def stop_if_asked(stop):  # a Ctrl-C / SIGTERM came during the step or the save
            if stop:
                print(f"\nstopped by {'Ctrl-C' if stop[0] == signal.SIGINT else 'SIGTERM'}: "
                      f"checkpoint saved at step {self.step}")
                self.stopped_by = stop[0]
                raise KeyboardInterrupt

        with ctrl_c_flag() as stop:
            while not self.finished():
                if cfg.rl.time_limit_min and time.time() - log.start > 60 * cfg.rl.time_limit_min:
                    print(f"\nrl.time_limit_min={cfg.rl.time_limit_min} reached at step "
                          f"{self.step}")
                    self.time_limited = True
                    self.save()
                    stop_if_asked(stop)  # stop there: no final evaluation until resumed
                    break
                row = self.rl_step()
                self.step += 1
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.rl.steps:
                    row.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                log.log(row)
                samples = self.sample_rows(cfg.samples_per_step)
                log.log_samples([{"step": self.step, "prompt": ex_prompt, "response": text,
                                  "reward": float(r), "help": bool(h), "local_ok": bool(ok)}
                                 for ex_prompt, text, r, h, ok in samples])
                log.progress(self.step, first, f"reward {row['reward/mean']:.3f} | help "
                             f"{row['route/help_ratio']:.2f} | local {row['route/local_acc']:.2f}"
                             + (f" | eval acc {row['eval/acc_capped']:.3f}"
                                if "eval/acc_capped" in row else "")
                             + (f" | cloud failed {self.cloud.failures}"
                                if self.cloud.failures else "")
                             + (f" | non-finite, skipped {self.non_finite}"
                                if self.non_finite else ""))
                if self.step % cfg.save_every == 0 or self.step == cfg.rl.steps or stop:
                    self.save()
                stop_if_asked(stop)
        print()
        final = self.evaluate()
        # final_eval.json first: it marks the run complete, so a resume never logs the row twice
        atomic_write_text(final_path, json.dumps(final, indent=2))
        log.log(self.final_row(final))
        return final

    def final_row(self, final: dict) -> dict:
        return {"train/step": self.step, **{f"eval/{k}": v for k, v in final.items()}}

    def sample_rows(self, k):
        ro, G = self.last_rollout, self.last_rollout.G
        rows = list(range(0, len(ro.texts), max(len(ro.texts) // max(k, 1), 1)))[:k]
        return [(self.tokenizer.decode(ro.prompt_ids[r // G]), ro.texts[r], ro.rewards.view(-1)[r],
                 ro.help.view(-1)[r], ro.local_ok.view(-1)[r]) for r in rows]


def print_table(rows: list[tuple[str, dict]]):
    cols = [("call ratio", "call_ratio"), ("local acc", "local_acc"),
            ("cond. local", "cond_local_acc"), ("acc @cap", "acc_capped"),
            ("acc uncapped", "acc_uncapped"), ("answered", "answer_rate")]
    width = max(len(name) for name, _ in rows) + 2
    print("method".ljust(width) + "".join(c.rjust(14) for c, _ in cols))
    for name, m in rows:
        print(name.ljust(width) + "".join("–".rjust(14) if m[k] is None else f"{m[k]:14.3f}"
                                          for _, k in cols))


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the RL loop (the warm start, the final evaluation): it stops the run as a
    Ctrl-C does, with its message, and exits with 143."""


def raise_terminated(signum, frame):
    raise Terminated


def exit_code(e: KeyboardInterrupt, signum: int) -> int:
    """128 + the signal: 143 for SIGTERM, 130 for Ctrl-C (signum: the one the RL loop saw)."""
    return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signum)


def continue_command(run_dir: str) -> str:
    """How to go on with a run that stopped early: resume it from its checkpoint, or start it
    afresh from its config.yaml if it stopped before its first checkpoint."""
    if any(os.path.isdir(os.path.join(run_dir, c)) for c in ("checkpoint", "checkpoint.old")):
        return f"python train.py resume={run_dir}"
    return f"python train.py {os.path.join(run_dir, 'config.yaml')}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        sys.exit(0)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        return run(argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run(argv: list[str]):
    try:
        cfg = load_config(argv)
        torch.manual_seed(cfg.seed)
        trainer = Trainer(cfg)
    except ConfigError as e:
        resumed = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
        setting = not isinstance(e, RunFileError) and "resume" not in str(e)
        hint = (f" (a resumed run takes its settings from {os.path.join(resumed[0], 'config.yaml')}"
                f": change them there)" if resumed and setting else "")
        sys.exit(f"{'error' if isinstance(e, RunFileError) else 'config error'}: {e}{hint}")
    except (KeyboardInterrupt, OSError) as e:  # in setup (the warm start, or loading the
        # checkpoint to resume); OSError: e.g. a full disk writing the warm start or run files
        kept = ("the run's checkpoint is unchanged" if any(a.startswith("resume=") for a in argv)
                else "nothing to resume (a warm start is cached only once complete)")
        if isinstance(e, OSError):
            sys.exit(f"error: {e}; {kept}: once fixed, run the same command again")
        print(f"\ninterrupted before RL started; {kept}: run the same command again",
              file=sys.stderr)
        sys.exit(exit_code(e, signal.SIGINT))
    start = time.time()
    try:
        final = trainer.train()
        answers = trainer.cloud.ask(trainer.task, trainer.eval_examples, progress=lambda done,
                                    total: status_line(f"cloud only: {done}/{total} prompts asked"))
    except KeyboardInterrupt as e:
        print(f"\ninterrupted; continue with: {continue_command(trainer.run_dir)}",
              file=sys.stderr)
        sys.exit(exit_code(e, trainer.stopped_by))
    except CloudError as e:  # e.g. a refused API key: the run goes on from its last checkpoint
        sys.exit(f"\ncloud error: {e}; once fixed, continue with: "
                 f"{continue_command(trainer.run_dir)}")
    except (SaveError, OSError) as e:  # a checkpoint, a run file or the cloud cache not written
        # (e.g. a full disk): the run goes on from its last checkpoint
        sys.exit(f"\n{e}; {trainer.kept()}; once fixed, continue with: "
                 f"{continue_command(trainer.run_dir)}")
    n, budget = final["n"], cfg.eval.budget
    cloud_only = {"call_ratio": 1.0, "local_acc": 0.0, "cond_local_acc": None, "answer_rate": None}
    acc = sum(a.correct for a in answers) / n
    cloud_only.update(acc_uncapped=acc, acc_capped=acc)
    print(f"\nheld-out evaluation: {n} test prompts, greedy, cloud cap {budget * 100:g}% "
          f"({final['cap']} calls), {time.time() - start:.0f} s of RL + evaluation")
    print_table([(f"{cfg.rl.algo} ({trainer.run_dir})", final), ("cloud only (no cap)", cloud_only)])
    if trainer.cloud.failures:
        print(f"note: {trainer.cloud.failures} cloud calls failed in this run (training leaves "
              f"their prompts out of the update, evaluation scores them wrong; "
              f"{sum(a.error is not None for a in answers)} of the {n} cloud-only answers); check "
              f"the cloud settings, then python eval.py {trainer.run_dir} asks them again; the "
              f"first failure: {trainer.cloud.first_error}")
    if trainer.non_finite:
        print(f"note: {trainer.non_finite} RL steps were skipped, their loss or gradient NaN or "
              f"inf (train/skipped = non_finite in metrics.jsonl): the weights may have diverged; "
              f"a smaller rl.lr (now {cfg.rl.lr:g}) or rl.grad_clip may help")
    print("baselines (task-tuning only, naive offloading, router, oracle, collaboration-aware): "
          "bash scripts/reproduce_tiny.sh, or python eval.py runs/A runs/B ...")
    return final


if __name__ == "__main__":
    main()
