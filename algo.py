"""
The algorithm of SPEC.md sections 4-6, as pure functions on tensors.

Read top to bottom:
  1. group_advantages   the coefficient that multiplies grad log pi(y_i|x) (SPEC 5; baselines SPEC 8)
  2. update_dual        the DA-GRPO dual ascent step (SPEC 8, beyond the paper)
  3. filter_prompts     budget-aware adaptive prompt filtering (SPEC 6)
  4. sequence_token_logprobs, policy_gradient_loss, micro_batches, accumulate_policy_gradient
                        the training forward and the loss whose gradient is
                        (1/|S|) sum_{x in S} g(x) (SPEC 5)

Shapes: P prompts, G responses per prompt, N = rows of a flattened [P*G] batch, L tokens per row,
T = L - targets_start response tokens per row, V vocabulary size.
"""
import math
from dataclasses import dataclass

import torch

ADVANTAGE_KINDS = ("gapg", "grpo", "dr_grpo", "da_grpo")
FILTER_RULES = ("any_correct", "mixed", "none")

# -----------------------------------------------------------------------------
# advantages (SPEC 5, baselines SPEC 8)

def group_advantages(rewards, kind, help=None, dual=0.0, eps=1e-6):
    """Per-response coefficient [P, G] multiplying grad log pi(y_i|x) in the update (SPEC 5, 8).

    gapg:    (r_i - rbar) / (G - 1). Unbiased for every G >= 2; the 1/(G-1) lives here because
             the step averages g(x) over the selected prompts, (1/|S|) sum_x g(x).
    grpo:    (r_i - rbar) / (std + eps), std the unbiased (Bessel, divide by G-1) sample std of
             the group, as torch.std and TRL's GRPOTrainer compute it (DeepSeekMath does not say
             which). Biased and scale-free: it erases the reward hierarchy.
    dr_grpo: r_i - rbar (Dr. GRPO: no std, no length normalisation).
    da_grpo: (r_i - rbar) - dual * (c_i - cbar), c_i = 1.0 for a help call (arXiv 2602.00166).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G], got shape {tuple(rewards.shape)}")
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"unknown advantage kind {kind!r}; allowed: {', '.join(ADVANTAGE_KINDS)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    G = rewards.shape[1]
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if kind == "gapg":
        if G < 2:
            raise ValueError(f"gapg needs G >= 2 responses per prompt, got G={G}")
        return centred / (G - 1)
    if kind == "grpo":
        if G < 2:
            raise ValueError(f"grpo's sample std needs G >= 2 responses per prompt, got G={G}")
        return centred / (rewards.std(dim=1, keepdim=True, correction=1) + eps)
    if kind == "dr_grpo":
        return centred
    # da_grpo
    if help is None:
        raise ValueError("da_grpo needs the help-call flags `help` [P, G]")
    if help.shape != rewards.shape:
        raise ValueError(f"help shape {tuple(help.shape)} != rewards shape {tuple(rewards.shape)}")
    calls = help.to(rewards.dtype)
    return centred - dual * (calls - calls.mean(dim=1, keepdim=True))


def update_dual(dual, help_rate, tau, eta):
    """DA-GRPO dual ascent on the help-call rate: max(0, dual + eta * (help_rate - tau)) (SPEC 8)."""
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
    n_zero_variance: int            # groups of the whole batch whose G rewards are all equal
    n_zero_variance_selected: int   # of those, how many are in S (they add 0 to the sum but count in |S|)


def d2_cap(rho, n_d1):
    """floor(rho * |D1|), the most D2 prompts a step may keep (SPEC 4, 6).
    The 1e-9 absorbs binary rounding (0.29 * 100 = 28.999999999999996 must give 29)."""
    return math.floor(rho * n_d1 + 1e-9)


def filter_prompts(local_ok, cloud_ok, help, rho, rule="any_correct", generator=None, *, rewards):
    """Choose the prompts S = D1 u D2 whose groups enter the update (SPEC 6).

    local_ok [P, G] bool: response answered correctly without help. help [P, G] bool: response
    called for help. cloud_ok [P] bool: the cloud's answer is correct (read only where some
    response called for help). rewards [P, G]: only to count zero-variance groups.
    rule: "any_correct" D1 = some response correct; "mixed" D1 = some correct and some not (the
    paper's Algorithm 1; drops all-correct groups); "none" selects every prompt (no-filter
    baselines; the counts still describe the batch as "any_correct" would see it, none dropped).
    D2 = no response correct, some response called for help, cloud correct; at most
    floor(rho * |D1|) of them are kept, chosen uniformly at random with `generator`.
    An empty selection is legal: the caller skips the step.
    """
    if rule not in FILTER_RULES:
        raise ValueError(f"unknown filter rule {rule!r}; allowed: {', '.join(FILTER_RULES)}")
    if not (rho >= 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite number >= 0, got {rho}")
    local_ok, help, cloud_ok = local_ok.bool().cpu(), help.bool().cpu(), cloud_ok.bool().cpu()
    rewards = rewards.cpu()
    P = local_ok.shape[0]
    if local_ok.dim() != 2 or help.shape != local_ok.shape or cloud_ok.shape != (P,) \
            or rewards.shape != local_ok.shape:
        raise ValueError(f"need local_ok, help, rewards [P, G] and cloud_ok [P]; got "
                         f"{tuple(local_ok.shape)}, {tuple(help.shape)}, {tuple(rewards.shape)}, "
                         f"{tuple(cloud_ok.shape)}")

    any_ok = local_ok.any(dim=1)
    d1 = any_ok & ~local_ok.all(dim=1) if rule == "mixed" else any_ok
    candidates = torch.nonzero(~any_ok & help.any(dim=1) & cloud_ok).flatten()
    zero_var = (rewards == rewards[:, :1]).all(dim=1)

    if rule == "none":
        selected, n_d2 = torch.arange(P), len(candidates)
    else:
        n_d2 = min(len(candidates), d2_cap(rho, int(d1.sum())))
        keep = candidates[torch.randperm(len(candidates), generator=generator)[:n_d2]]
        selected = torch.sort(torch.cat([torch.nonzero(d1).flatten(), keep])).values

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

def sequence_token_logprobs(model, input_ids, position_ids, attn_mask, targets_start, temperature):
    """log pi(token_t | tokens_<t) at the sampling temperature, with grad, for t >= targets_start:
    [N, L - targets_start] (SPEC 5: log-probs recomputed on exactly the sampled ids).

    Rows hold [left-padded prompt | right-padded response]; the response starts at column
    targets_start for every row. Padding positions return finite junk; the loss masks them.
    log p = logit - logsumexp(logits) in at least float32 (bf16 logits are upcast), which never
    materialises a [N, T, V] log-softmax.
    """
    if not 1 <= targets_start < input_ids.shape[1]:
        raise ValueError(f"targets_start must be in [1, L), got {targets_start} with L={input_ids.shape[1]}")
    if not temperature > 0:
        raise ValueError(f"training needs the sampling temperature > 0, got {temperature}")
    logits = model(input_ids, position_ids, attn_mask=attn_mask)   # [N, L, V]
    logits = logits[:, targets_start - 1:-1]                        # position t-1 predicts token t
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    targets = input_ids[:, targets_start:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def policy_gradient_loss(token_logprobs, device_mask, coef, n_selected):
    """-(1/|S|) sum_i coef_i * sum_t mask_it * log pi_it, whose gradient is the SPEC 5 step
    (1/|S|) sum_x g(x) (negated for a minimiser). Sum over device tokens, no length normalisation.

    device_mask [N, T] is False for cloud tokens, padding and declared self-check tokens; they
    carry no gradient (torch.where, so even a -inf log-prob there gives 0, not NaN).
    n_selected is the number of selected prompts of the WHOLE step, also for a micro-batch.
    """
    if n_selected < 1:
        raise ValueError(f"n_selected must be >= 1 (skip the step when S is empty), got {n_selected}")
    logp = torch.where(device_mask, token_logprobs, torch.zeros_like(token_logprobs))
    per_response = logp.sum(dim=1)                                  # log pi(y_i | x), device tokens
    return -(coef.detach().to(per_response.dtype) * per_response).sum() / n_selected


def micro_batches(n, size):
    """Consecutive row slices of at most `size` rows covering range(n)."""
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def accumulate_policy_gradient(model, input_ids, position_ids, attn_mask, targets_start,
                               temperature, device_mask, coef, n_selected, micro_batch_size):
    """Backpropagate the step's policy_gradient_loss in micro-batches; returns the loss value.

    The loss is a sum over rows divided by the step's n_selected (not the micro-batch's), so the
    .grad accumulated over micro-batches equals the full batch's for any micro_batch_size.
    Zero the gradients before, step the optimizer after.
    """
    total = 0.0
    for rows in micro_batches(input_ids.shape[0], micro_batch_size):
        logp = sequence_token_logprobs(model, input_ids[rows], position_ids[rows],
                                       attn_mask[rows], targets_start, temperature)
        loss = policy_gradient_loss(logp, device_mask[rows], coef[rows], n_selected)
        loss.backward()
        total += loss.item()
    return total
