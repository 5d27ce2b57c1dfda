"""
The algorithm of SPEC.md: pure functions on tensors (1-3, and 4's loss), then the parts that
drive the model, the sampler and the cloud (4's training forward, 5-6).

Read top to bottom:
  1. group_advantages   the coefficient that multiplies grad log pi(y_i|x) (SPEC 5; baselines SPEC 8)
  2. update_dual        the DA-GRPO dual ascent step (SPEC 8, beyond the paper)
  3. filter_prompts     budget-aware adaptive prompt filtering (SPEC 6)
  4. sequence_token_logprobs, policy_gradient_loss, micro_batches, accumulate_policy_gradient
                        the training forward and the loss whose gradient is
                        (1/|S|) sum_{x in S} g(x) (SPEC 5)
  5. rollout, update_policy
                        one step's samples, help calls, verdicts and rewards (SPEC 1-3), and the
                        update over the selected prompts
  6. cloud_share, cloud_cap, capped_metrics, evaluate_policy
                        evaluation under the budget's hard cap (SPEC 4, 7)

A new coefficient rule or filter rule: its name in ADVANTAGE_KINDS / FILTER_RULES (train.py
checks rl.algo / rl.filter against them) and its branch in group_advantages / filter_prompts.

Shapes: P prompts, G responses per prompt, N = rows of a flattened [P*G] batch, L tokens per row,
T = L - targets_start response tokens per row, V vocabulary size.
"""
import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import torch

ADVANTAGE_KINDS = ("gapg", "grpo", "dr_grpo", "da_grpo")
FILTER_RULES = ("any_correct", "mixed", "none")

# -----------------------------------------------------------------------------
# advantages (SPEC 5, baselines SPEC 8)

def zero_variance(rewards):
    """[P] bool: the group's G rewards are all equal (no learning signal; SPEC 5)."""
    return (rewards == rewards[:, :1]).all(dim=1)


def group_advantages(rewards, kind, help=None, dual=0.0, eps=1e-6):
    """Per-response coefficient [P, G] multiplying grad log pi(y_i|x) in the update (SPEC 5, 8).

    gapg:    (r_i - rbar) / (G - 1). Unbiased for every G >= 2; the 1/(G-1) lives here because
             the step averages g(x) over the selected prompts, (1/|S|) sum_x g(x).
    grpo:    (r_i - rbar) / (std + eps), std the unbiased (Bessel, divide by G-1) sample std of
             the group, as torch.std and TRL's GRPOTrainer compute it (DeepSeekMath does not say
             which). Biased and scale-free: it erases the reward hierarchy.
    dr_grpo: r_i - rbar (Dr. GRPO: no std, no length normalisation).
    da_grpo: (r_i - rbar) - dual * (c_i - cbar), c_i = 1.0 for a help call (arXiv 2602.00166).
    Every rule feeds the same loss (policy_gradient_loss: summed token log-probs, 1/|S|): grpo
    is GRPO's advantage without its 1/|o_i| length normalisation or ratio clipping.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"unknown advantage kind {kind!r}; allowed: {', '.join(ADVANTAGE_KINDS)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards must be finite, got {rewards[~torch.isfinite(rewards)][:4].tolist()}")
    G = rewards.shape[1]
    if G < 2:  # one response has no group to compare with: every method needs G >= 2
        raise ValueError(f"{kind} needs G >= 2 responses per prompt, got G={G}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    # a group of equal rewards carries no signal: exactly 0, not the ~1e-8 a rounded float32
    # mean leaves (which grpo's division by std + eps would blow up to a real coefficient)
    centred = centred.masked_fill(zero_variance(rewards)[:, None], 0.0)
    if kind == "gapg":
        return centred / (G - 1)
    if kind == "grpo":
        return centred / (rewards.std(dim=1, keepdim=True, correction=1) + eps)
    if kind == "dr_grpo":
        return centred
    if kind == "da_grpo":
        if help is None:
            raise ValueError("da_grpo needs the help-call flags `help` [P, G]")
        if not (math.isfinite(dual) and dual >= 0):
            raise ValueError(f"da_grpo needs a finite dual >= 0 (the help-call price), got {dual}")
        help = torch.as_tensor(help)
        if help.shape != rewards.shape:
            raise ValueError(f"help shape {tuple(help.shape)} != rewards shape {tuple(rewards.shape)}")
        calls = help.to(rewards.dtype)
        return centred - dual * (calls - calls.mean(dim=1, keepdim=True))
    raise NotImplementedError(f"advantage kind {kind!r} is in ADVANTAGE_KINDS but has no branch")


def update_dual(dual, help_rate, tau, eta):
    """DA-GRPO dual ascent on the help-call rate: max(0, dual + eta * (help_rate - tau)) (SPEC 8)."""
    if not all(math.isfinite(v) for v in (dual, help_rate, tau, eta)):
        raise ValueError(f"update_dual needs finite numbers, got dual={dual}, help_rate={help_rate}, "
                         f"tau={tau}, eta={eta}")
    if not (0 <= tau <= 1 and eta >= 0):
        raise ValueError(f"update_dual needs a target rate 0 <= tau <= 1 (got {tau}) and a step "
                         f"eta >= 0 (got {eta})")
    return max(0.0, dual + eta * (help_rate - tau))

# -----------------------------------------------------------------------------
# adaptive prompt filtering (SPEC 6)

@dataclass
class FilterResult:
    selected: torch.Tensor          # LongTensor [|S|] of prompt indices, sorted ascending (CPU)
    n_d1: int                       # prompts solvable locally (by the rule)
    n_d2: int                       # unsolvable-but-cloud-correct prompts kept
    n_d2_candidates: int            # D2 candidates before the floor(rho * |D1|) cap
    n_d2_dropped: int               # candidates the cap removed
    n_zero_variance: int            # groups not excluded whose G rewards are all equal
    n_zero_variance_selected: int   # of those, how many are in S (they count in |S|; their
                                    # coefficients are 0 except da_grpo's help-rate term)


def check_rho(rho):
    """rho (the budget P(cloud) <= rho P(local), SPEC 4) must be a finite real number >= 0."""
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not (
            rho >= 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")


def floor_share(n: int, share: float) -> int:
    """floor(n * share), exact in rationals: the share is read as the nearest fraction of
    denominator <= 10^6, so 100 x 0.29 (28.999999999999996 in floats) gives 29, and 1/3 rounded
    to 12 decimals gives floor(n/3) for every n, however large. A share with more than six
    significant decimals can read one off either way (0.4999999 reads as 1/2)."""
    return math.floor(n * Fraction(float(share)).limit_denominator(10 ** 6))  # float: numpy's too


def d2_cap(rho, n_d1):
    """floor(rho * |D1|), the most D2 prompts a step may keep (SPEC 4, 6)."""
    return floor_share(n_d1, rho)


def as_flags(name: str, value):
    """`value` as a CPU bool tensor. Only booleans and the numbers 0 and 1 are flags: a cast
    would read 0.5 or NaN as True."""
    t = torch.as_tensor(value).cpu()
    if t.dtype != torch.bool:
        bad = ~((t == 0) | (t == 1))
        if bad.any():
            raise ValueError(f"{name} must hold flags (True/False or 0/1), got "
                             f"{t[bad][:4].tolist()}")
        t = t.bool()
    return t


def filter_prompts(local_ok, cloud_ok, help, rho, rule="any_correct", generator=None, *, rewards,
                   exclude=None):
    """Choose the prompts S = D1 u D2 whose groups enter the update (SPEC 6).

    local_ok [P, G] bool: response answered correctly without help. help [P, G] bool: response
    called for help. cloud_ok [P] bool: the cloud's answer is correct (read only where some
    response called for help). rewards [P, G]: only to count zero-variance groups.
    rule: "any_correct" D1 = some response correct; "mixed" D1 = some correct and some not (the
    paper's Algorithm 1; drops all-correct groups); "none" selects every prompt (no-filter
    baselines; the counts still describe the batch as "any_correct" would see it, none dropped).
    D2 = no response correct, some response called for help, cloud correct; at most
    floor(rho * |D1|) of them are kept, chosen uniformly at random with `generator`.
    exclude [P] bool (optional): prompts left out before any of this, in neither D1 nor D2 nor
    |D1| (e.g. their cloud call failed, so their help responses could not be scored).
    An empty selection is legal: the caller skips the step.
    """
    if rule not in FILTER_RULES:
        raise ValueError(f"unknown filter rule {rule!r}; allowed: {', '.join(FILTER_RULES)}")
    check_rho(rho)
    local_ok, help, cloud_ok = (as_flags(name, t) for name, t in
                                (("local_ok", local_ok), ("help", help), ("cloud_ok", cloud_ok)))
    rewards = torch.as_tensor(rewards).cpu()
    P = local_ok.shape[0] if local_ok.dim() else 0
    if local_ok.dim() != 2 or help.shape != local_ok.shape or cloud_ok.shape != (P,) \
            or rewards.shape != local_ok.shape:
        raise ValueError(f"need local_ok, help, rewards [P, G] and cloud_ok [P]; got "
                         f"{tuple(local_ok.shape)}, {tuple(help.shape)}, {tuple(rewards.shape)}, "
                         f"{tuple(cloud_ok.shape)}")

    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards must be finite, got {rewards[~torch.isfinite(rewards)][:4].tolist()}")
    if exclude is not None:
        exclude = as_flags("exclude", exclude)
        if exclude.shape != (P,):
            raise ValueError(f"exclude must be [P] = [{P}], got {tuple(exclude.shape)}")
    usable = torch.ones(P, dtype=torch.bool) if exclude is None else ~exclude
    local_ok = local_ok & ~help  # a help call is never a local answer (SPEC 2)
    any_ok = local_ok.any(dim=1)
    d1 = (any_ok & ~local_ok.all(dim=1) if rule == "mixed" else any_ok) & usable
    candidates = torch.nonzero(~any_ok & help.any(dim=1) & cloud_ok & usable).flatten()
    zero_var = zero_variance(rewards) & usable

    if rule == "none":
        selected, n_d2 = torch.nonzero(usable).flatten(), len(candidates)
    elif rule in ("any_correct", "mixed"):
        n_d2 = min(len(candidates), d2_cap(rho, int(d1.sum())))
        keep = candidates[torch.randperm(len(candidates), generator=generator)[:n_d2]]
        selected = torch.sort(torch.cat([torch.nonzero(d1).flatten(), keep])).values
    else:
        raise NotImplementedError(f"filter rule {rule!r} is in FILTER_RULES but has no branch")

    return FilterResult(
        selected=selected,
        n_d1=int(d1.sum()),
        n_d2=n_d2,
        n_d2_candidates=len(candidates),
        n_d2_dropped=len(candidates) - n_d2,
        n_zero_variance=int(zero_var.sum()),
        n_zero_variance_selected=int(zero_var[selected].sum()),
    )

# -----------------------------------------------------------------------------
# the policy-gradient loss (SPEC 5)

def sequence_token_logprobs(model, input_ids, position_ids, attn_mask, targets_start, temperature,
                            banned_ids=()):
    """log pi(token_t | tokens_<t) at the sampling temperature, with grad, for t >= targets_start:
    [N, L - targets_start] (SPEC 5: log-probs recomputed on exactly the sampled ids), under the
    distribution the sampler drew from: tokens in banned_ids (never sampled) are excluded.

    Rows hold [left-padded prompt | right-padded response]; the response starts at column
    targets_start for every row. Padding positions return finite junk; the loss masks them.
    log p = logit - logsumexp(logits) in at least float32 (bf16 logits are upcast), which never
    materialises a [N, T, V] log-softmax.
    """
    if not 1 <= targets_start < input_ids.shape[1]:
        raise ValueError(f"targets_start must be in [1, L), got {targets_start} with L={input_ids.shape[1]}")
    if not temperature > 0:
        raise ValueError(f"training needs the sampling temperature > 0, got {temperature}")
    # position t-1 predicts token t; the prompt's other positions need no vocabulary projection
    logits = model(input_ids, position_ids, attn_mask=attn_mask, logits_from=targets_start - 1)
    logits = logits[:, :-1]                                         # [N, L - targets_start, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if len(banned_ids):
        logits = logits.index_fill(-1, torch.as_tensor(banned_ids, device=logits.device),
                                   float("-inf"))
    targets = input_ids[:, targets_start:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def policy_gradient_loss(token_logprobs, device_mask, coef, n_selected):
    """-(1/|S|) sum_i coef_i * sum_t mask_it * log pi_it, whose gradient is the SPEC 5 step
    (1/|S|) sum_x g(x) (negated for a minimiser). Sum over device tokens, no length normalisation.

    device_mask [N, T] is False for padding and declared self-check tokens (cloud tokens never
    enter the rows); they carry no gradient (torch.where, so even a -inf log-prob there gives 0,
    not NaN).
    n_selected is the number of selected prompts of the WHOLE step, also for a micro-batch.
    """
    if n_selected < 1:
        raise ValueError(f"n_selected must be >= 1 (skip the step when S is empty), got {n_selected}")
    if device_mask.shape != token_logprobs.shape or coef.shape != token_logprobs.shape[:1]:
        raise ValueError(f"need token_logprobs and device_mask [N, T] and coef [N]; got "
                         f"{tuple(token_logprobs.shape)}, {tuple(device_mask.shape)}, "
                         f"{tuple(coef.shape)}")
    logp = torch.where(device_mask, token_logprobs, torch.zeros_like(token_logprobs))
    per_response = logp.sum(dim=1)                                  # log pi(y_i | x), device tokens
    return -(coef.detach().to(per_response.dtype) * per_response).sum() / n_selected


def micro_batches(n, size):
    """Consecutive row slices of at most `size` rows covering range(n)."""
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def accumulate_policy_gradient(model, input_ids, position_ids, attn_mask, targets_start,
                               temperature, device_mask, coef, n_selected, micro_batch_size,
                               banned_ids=()):
    """Backpropagate the step's policy_gradient_loss in micro-batches; returns the loss value.

    The loss is a sum over rows divided by the step's n_selected (not the micro-batch's), so the
    .grad accumulated over micro-batches equals the full batch's for any micro_batch_size.
    Zero the gradients before, step the optimizer after.
    """
    total = 0.0  # summed on the device: one host sync for the step, not one per micro-batch
    banned_ids = torch.as_tensor(banned_ids, dtype=torch.long, device=input_ids.device)
    for rows in micro_batches(input_ids.shape[0], micro_batch_size):
        logp = sequence_token_logprobs(model, input_ids[rows], position_ids[rows],
                                       attn_mask[rows], targets_start, temperature, banned_ids)
        loss = policy_gradient_loss(logp, device_mask[rows], coef[rows], n_selected)
        loss.backward()
        total = total + loss.detach().double()
    return float(total)

# -----------------------------------------------------------------------------
# rollout (SPEC 1-3): sample G responses per prompt, detect help calls, verify local answers,
# ask the cloud once per prompt that needs it, and score every response

@dataclass
class Sampling:
    max_new_tokens: int = 64
    max_prompt_tokens: int = 0  # train.py leaves out longer training prompts (SPEC 9); 0: no limit
    temperature: float = 1.0   # 0 = greedy (evaluation)
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class Rollout:
    prompt_ids: list            # P lists of prompt token ids
    tokens: torch.Tensor        # [P*G, T] sampled ids, prompt-major rows
    device_mask: torch.Tensor   # [P*G, T] bool: generated tokens that carry policy gradient
    lengths: torch.Tensor       # [P*G] generated tokens per row (incl. the stop token)
    finished: torch.Tensor      # [P*G] bool: ended on a stop token (False: hit max_new_tokens)
    texts: list                 # P*G decoded device responses
    help: torch.Tensor          # [P, G] bool: response is a help call (SPEC 2)
    local_ok: torch.Tensor      # [P, G] bool: correct answer without help
    formatted: torch.Tensor     # [P, G] bool: format check (v1 reward)
    cloud_ok: torch.Tensor      # [P] bool: the cloud's (cached) answer is correct; False if not asked
    cloud_asked: torch.Tensor   # [P] bool: some response called for help, so the cloud was asked
    cloud_failed: torch.Tensor  # [P] bool: the cloud call failed (not cached; cloud_ok is False)
    rewards: torch.Tensor       # [P, G]
    components: dict            # name -> [P, G] reward components (SPEC 3)

    @property
    def G(self) -> int:
        return self.help.shape[1]


def rollout(model, tokenizer, examples, G, sampling: Sampling, task, cloud, reward_cfg, seed=0):
    """SPEC 1-3 for one batch: G device responses per prompt; the cloud answers the prompt alone,
    only where some response asked for help (and help is allowed), through its cache."""
    from reward import reward as hierarchical_reward
    from sample import generate
    prompts = [tokenizer.prompt_ids(ex.prompt) for ex in examples]
    out = generate(model, prompts, n=G, max_new_tokens=sampling.max_new_tokens,
                   temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                   stop_ids=tokenizer.eos_ids + tokenizer.single_token_ids(task.stop_texts),
                   banned_ids=tokenizer.single_token_ids(task.banned_texts), seed=seed,
                   pad_id=tokenizer.pad_id)
    tokens, lengths = out.tokens.cpu(), out.lengths.cpu()
    device_mask = out.mask.cpu().clone()
    texts = []
    for r in range(tokens.shape[0]):
        ids = tokens[r, :lengths[r]].tolist()
        texts.append(tokenizer.decode([i for i in ids if i not in tokenizer.eos_ids]))
        if task.has_self_check:  # SPEC 5 [ours]: self-check tokens get no policy gradient
            check = task.self_check_mask([tokenizer.decode([i]) for i in ids])
            device_mask[r, :len(ids)] &= ~torch.tensor(check, dtype=torch.bool)
    P = len(examples)
    ex_of = lambda r: examples[r // G]
    marker = torch.tensor([task.help_called(t) for t in texts]).view(P, G)
    # help disabled (the task-tuning baseline): a help marker is no call, asks no cloud and counts
    # as a local answer (local_correct reads none in it), outside the task's format
    help = marker & task.allow_help
    local_ok = torch.tensor([task.local_correct(ex_of(r), t) for r, t in enumerate(texts)]).view(P, G)
    formatted = torch.tensor([task.formatted(t) for t in texts]).view(P, G) & (help | ~marker)
    cloud_asked = help.any(dim=1)
    cloud_ok, cloud_failed = torch.zeros(P, dtype=torch.bool), torch.zeros(P, dtype=torch.bool)
    asked = torch.nonzero(cloud_asked).flatten().tolist()
    if asked:
        for p, answer in zip(asked, cloud.ask(task, [examples[p] for p in asked])):
            cloud_ok[p], cloud_failed[p] = answer.correct, answer.error is not None
    scored = [hierarchical_reward(bool(help.view(-1)[r]), bool(local_ok.view(-1)[r]),
                                  bool(cloud_ok[r // G]), bool(formatted.view(-1)[r]), reward_cfg)
              for r in range(P * G)]
    rewards = torch.tensor([s.total for s in scored]).view(P, G)
    components = {k: torch.tensor([s.components[k] for s in scored]).view(P, G)
                  for k in scored[0].components}
    return Rollout(prompts, tokens, device_mask, lengths, out.finished.cpu(), texts, help,
                   local_ok, formatted, cloud_ok, cloud_asked, cloud_failed, rewards, components)


def update_inputs(ro: Rollout, rows, pad_id: int):
    """Training-forward inputs for the given response rows: [left-padded prompt | response],
    so every response starts at column targets_start. Returns (input_ids, position_ids,
    attn_mask, targets_start, device_mask) with device_mask aligned to the response columns."""
    from sample import left_pad
    rows = torch.as_tensor(rows, dtype=torch.long)
    prompt_ids, prompt_real, _ = left_pad([ro.prompt_ids[int(r) // ro.G] for r in rows], pad_id)
    Lp = prompt_ids.shape[1]
    T = max(int(ro.lengths[rows].max()), 1)
    ids = torch.cat([prompt_ids, ro.tokens[rows, :T]], dim=1)
    real = torch.cat([prompt_real, torch.arange(T)[None, :] < ro.lengths[rows][:, None]], dim=1)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    return ids, positions, real, Lp, ro.device_mask[rows, :T]


def update_policy(model, ro: Rollout, coef, selected, temperature, micro_batch_size, pad_id,
                  banned_ids=()):
    """Accumulate the gradient of the SPEC 5 step over the selected prompts' responses:
    (1/|S|) sum_{x in S} g(x). Responses with coefficient 0 (e.g. zero-variance groups) add
    nothing to the sum, so their forward pass is skipped; |S| still counts their prompt."""
    rows = torch.cat([torch.arange(p * ro.G, (p + 1) * ro.G) for p in selected.tolist()]) \
        if len(selected) else torch.zeros(0, dtype=torch.long)
    coef = coef.reshape(-1)
    rows = rows[coef[rows] != 0]
    if len(rows) == 0:
        return 0.0
    device = next(model.parameters()).device
    ids, pos, real, start, mask = (t.to(device) if torch.is_tensor(t) else t
                                   for t in update_inputs(ro, rows, pad_id))
    return accumulate_policy_gradient(model, ids, pos, real, start, temperature, mask,
                                      coef[rows].to(device), len(selected),
                                      micro_batch_size or len(rows), banned_ids)

# -----------------------------------------------------------------------------
# evaluation under the budget (SPEC 4, 7): greedy decoding, a hard cap on cloud calls

DEFAULT_RHO = 3 / 7  # the paper's budget: P(cloud) <= 3/7 P(local), i.e. 30% of queries (SPEC 4)


def cloud_share(rho: float) -> float:
    """rho / (1 + rho): the share of queries the cloud may take when P(cloud) <= rho P(local)
    (SPEC 4), the default evaluation budget. Rounded to 12 decimals, so rho = 3/7 gives 0.3."""
    check_rho(rho)
    return round(rho / (1 + rho), 12)


def cloud_cap(n: int, budget: float) -> int:
    """floor(N * budget): the most cloud calls an evaluation of N prompts may make (SPEC 7)."""
    return floor_share(n, budget)


def capped_metrics(help, local_ok, cloud_ok, budget, len_tokens=None):
    """SPEC 7 metrics for N prompts, one greedy response each (help, local_ok, cloud_ok [N] bool).

    The cap is floor(N * budget) cloud calls, served to help calls in dataset order; later help
    calls are scored wrong [ours]. Uncapped figures serve every help call. A ratio over no
    prompts (conditional local accuracy when every prompt asked for help) is None.
    """
    help, local_ok, cloud_ok = (as_flags(name, t) for name, t in
                                (("help", help), ("local_ok", local_ok), ("cloud_ok", cloud_ok)))
    N = len(help) if help.dim() == 1 else 0
    if N == 0 or local_ok.shape != (N,) or cloud_ok.shape != (N,):
        raise ValueError(f"need help, local_ok, cloud_ok of one shape [N], N >= 1; got shapes "
                         f"{tuple(help.shape)}, {tuple(local_ok.shape)}, {tuple(cloud_ok.shape)}")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 <= budget <= 1:
        raise ValueError(f"budget must be a share of prompts in [0, 1], got {budget!r}")
    local_ok = local_ok & ~help  # a help call is never a local answer (SPEC 2)
    cap = cloud_cap(N, budget)
    served = help & (help.long().cumsum(0) <= cap)
    n_local = int((~help).sum())
    m = {
        "n": N,
        "budget": budget,
        "cap": cap,
        "call_ratio": float(help.double().mean()),
        "calls_served": int(served.sum()),
        "local_acc": float(local_ok.double().mean()),
        "cond_local_acc": float(local_ok.sum()) / n_local if n_local else None,  # 0/0: none
        "acc_capped": float((local_ok | (served & cloud_ok)).double().mean()),
        "acc_uncapped": float((local_ok | (help & cloud_ok)).double().mean()),
    }
    if len_tokens is not None:
        lens = torch.as_tensor(len_tokens, dtype=torch.float64).cpu()
        if lens.shape != (N,):
            raise ValueError(f"len_tokens must be [N] = [{N}], got shape {tuple(lens.shape)}")
        m["len_help"] = float(lens[help].mean()) if help.any() else None
        m["len_local"] = float(lens[~help].mean()) if (~help).any() else None
    return m


@torch.no_grad()
def evaluate_policy(model, tokenizer, task, examples, cloud, budget, max_new_tokens,
                    batch_size=256, progress=None):
    """Greedy decoding of every example, cloud verdicts for its help calls, SPEC 7 metrics.
    A help call whose cloud call failed is scored wrong; metrics["cloud_failed"] counts them.
    Returns (metrics, per-example outcomes as a dict of lists)."""
    from reward import RewardConfig
    if not examples:
        raise ValueError("evaluate_policy needs at least one example, got none")
    greedy = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    parts = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        parts.append(rollout(model, tokenizer, chunk, 1, greedy, task, cloud, RewardConfig()))
        if progress:
            progress(min(i + batch_size, len(examples)), len(examples))
    outcome = {
        "help": torch.cat([p.help[:, 0] for p in parts]),
        "local_ok": torch.cat([p.local_ok[:, 0] for p in parts]),
        "cloud_ok": torch.cat([p.cloud_ok & p.help[:, 0] for p in parts]),
        "cloud_failed": torch.cat([p.cloud_failed & p.help[:, 0] for p in parts]),
        "length": torch.cat([p.lengths for p in parts]),
        "finished": torch.cat([p.finished for p in parts]),
        "text": sum((p.texts for p in parts), []),
    }
    outcome["answered"] = torch.tensor([task.answered(t) for t in outcome["text"]])
    outcome["formatted"] = torch.cat([p.formatted[:, 0] for p in parts])
    metrics = capped_metrics(outcome["help"], outcome["local_ok"], outcome["cloud_ok"], budget,
                             outcome["length"])
    metrics["cloud_failed"] = int(outcome["cloud_failed"].sum())      # help calls left unanswered
    metrics["clipped_ratio"] = float((~outcome["finished"]).double().mean())
    metrics["answer_rate"] = float(outcome["answered"].double().mean())    # a final answer given
    metrics["format_rate"] = float(outcome["formatted"].double().mean())   # the task's full format
    return metrics, outcome
