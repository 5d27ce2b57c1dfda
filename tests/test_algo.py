"""Tests for algo.py against independently derived numbers: a closed-form gradient, hand-computed
advantages and caps, and gradients assembled response by response with separate autograd calls."""
import math

import pytest
import torch
import torch.nn as nn

from algo import (Rollout, accumulate_policy_gradient, capped_metrics, cloud_share,
                  filter_prompts, group_advantages, micro_batches, policy_gradient_loss,
                  sequence_token_logprobs, update_dual, update_policy)

# -----------------------------------------------------------------------------
# unbiasedness on a toy policy: softmax over K responses, fixed rewards

THETA = torch.tensor([0.5, -0.3, 1.0, 0.0, -1.2], dtype=torch.float64)
REWARD = torch.tensor([1.0, 0.25, 0.0, 0.25, 1.0], dtype=torch.float64)


def exact_gradient(theta, reward):
    """d/dtheta sum_k p_k r_k = p_k (r_k - sum_j p_j r_j) for p = softmax(theta)."""
    p = torch.softmax(theta, 0)
    return p * (reward - (p * reward).sum())


def estimator_samples(G, kind, reward, n_groups, seed):
    """g(x) = sum_i coef_i (onehot(y_i) - p) for n_groups independent groups: [n_groups, K]."""
    p = torch.softmax(THETA, 0)
    gen = torch.Generator().manual_seed(seed)
    y = torch.multinomial(p, n_groups * G, replacement=True, generator=gen).view(n_groups, G)
    coef = group_advantages(reward[y], kind)                       # [n_groups, G]
    g = torch.zeros(n_groups, len(p), dtype=torch.float64).scatter_add_(1, y, coef)
    return g - coef.sum(1, keepdim=True) * p                     # grad log softmax = onehot - p


@pytest.mark.parametrize("G", [2, 4, 8])
def test_gapg_is_unbiased(G):
    g = estimator_samples(G, "gapg", REWARD, 100_000, seed=G)
    mean, se = g.mean(0), g.std(0) / math.sqrt(len(g))
    exact = exact_gradient(THETA, REWARD)
    assert (exact.abs() > 0.01).all()
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    if G == 2:  # the test has power: dividing by G instead of G-1 (half the step) is caught
        assert ((mean * (G - 1) / G - exact).abs() > 10 * se).any()


def test_grpo_is_biased():
    # GRPO is scale invariant; the true gradient scales with the rewards. At 1/100 of the scale
    # the GRPO mean stays O(0.1) while the exact gradient is O(1e-3).
    small = REWARD / 100
    g = estimator_samples(4, "grpo", small, 100_000, seed=0)
    mean, se = g.mean(0), g.std(0) / math.sqrt(len(g))
    exact = exact_gradient(THETA, small)
    assert ((mean - exact).abs() > 10 * se).any(), (mean, exact, se)
    g_big = estimator_samples(4, "grpo", REWARD, 100_000, seed=0)   # same draws, 100x rewards
    assert (g_big.mean(0) - mean).abs().max() < 0.01 * mean.abs().max()   # equal up to eps

# -----------------------------------------------------------------------------
# advantages by hand

def test_hand_advantages_G4():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # mean 0.25; centred 0.75, -0.25 x3; unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5
    torch.testing.assert_close(group_advantages(r, "gapg"), r.new_tensor([[0.25, -1 / 12, -1 / 12, -1 / 12]]))
    torch.testing.assert_close(group_advantages(r, "dr_grpo"), r.new_tensor([[0.75, -0.25, -0.25, -0.25]]))
    torch.testing.assert_close(group_advantages(r, "grpo", eps=0.0), r.new_tensor([[1.5, -0.5, -0.5, -0.5]]))
    # zero-variance group: all advantages 0 under every kind (no NaN from 0 / (0 + eps))
    flat = torch.full((1, 4), 0.25, dtype=torch.float64)
    for kind in ("gapg", "grpo", "dr_grpo"):
        assert group_advantages(flat, kind).abs().max() == 0
    # also where the float32 mean is rounded (0.3, 0.2 are not binary fractions; G = 6, 8)
    for G in (6, 8):
        for value in (0.3, 0.2, 0.4, 0.7):
            flat = torch.full((2, G), value)
            help = torch.tensor([[True] * G, [False] * G])
            for kind in ("gapg", "grpo", "dr_grpo", "da_grpo"):
                assert group_advantages(flat, kind, help=help, dual=0.5).abs().max() == 0, \
                    (G, value, kind)


def test_flattening_example_G8():
    r = torch.zeros(2, 8, dtype=torch.float64)
    r[0, 0], r[1, 0] = 1.0, 0.25
    grpo = group_advantages(r, "grpo")
    # unbiased std of [1, 0 x7] is sqrt((7/8) / 7) = 1/sqrt(8); top advantage (7/8) sqrt(8)
    assert grpo[0, 0].item() == pytest.approx(0.875 * math.sqrt(8), rel=1e-5)
    assert grpo[1, 0].item() == pytest.approx(0.875 * math.sqrt(8), rel=1e-4)   # identical: hierarchy erased
    gapg = group_advantages(r, "gapg")
    # top (1 - 1/8) / 7 = 1/8, others -(1/8) / 7 = -1/56; the 0.25 group is exactly 1/4 of that
    torch.testing.assert_close(gapg[0], r.new_tensor([1 / 8] + [-1 / 56] * 7))
    torch.testing.assert_close(gapg[1], r.new_tensor([1 / 32] + [-1 / 224] * 7))
    assert gapg[0, 0] / gapg[1, 0] == pytest.approx(4.0)


def test_da_grpo_hand_group():
    r = torch.tensor([[1.0, 0.25, 0.25, 0.0]], dtype=torch.float64)
    help = torch.tensor([[False, True, True, False]])
    # A_r = r - 0.375 = [.625, -.125, -.125, -.375]; c = [0,1,1,0], A_c = [-.5, .5, .5, -.5]
    # A = A_r - 0.5 A_c = [.875, -.375, -.375, -.125]
    torch.testing.assert_close(group_advantages(r, "da_grpo", help=help, dual=0.5),
                               r.new_tensor([[0.875, -0.375, -0.375, -0.125]]))
    torch.testing.assert_close(group_advantages(r, "da_grpo", help=help, dual=0.0),
                               r.new_tensor([[0.625, -0.125, -0.125, -0.375]]))


def test_update_dual_hand_sequence():
    # dual 0, tau 0.3, eta 0.5: 0 + .5*.5 = .25; +.5*.3 = .4; -.5*.2 = .3; .2; 0.2-.15 = .05; max(0, -.1) = 0
    dual, seen = 0.0, []
    for rate in (0.8, 0.6, 0.1, 0.1, 0.0, 0.0):
        dual = update_dual(dual, rate, tau=0.3, eta=0.5)
        seen.append(dual)
    assert seen == pytest.approx([0.25, 0.4, 0.3, 0.2, 0.05, 0.0])


def test_advantage_errors():
    with pytest.raises(ValueError, match="G=1"):
        group_advantages(torch.ones(3, 1), "gapg")
    with pytest.raises(ValueError, match="gapg.*grpo.*dr_grpo.*da_grpo"):
        group_advantages(torch.ones(3, 4), "ppo")
    with pytest.raises(ValueError, match="help"):
        group_advantages(torch.ones(3, 4), "da_grpo")
    for kind in ("dr_grpo", "da_grpo"):   # no group to compare with, whatever the method
        with pytest.raises(ValueError, match="G=1"):
            group_advantages(torch.ones(3, 1), kind, help=torch.ones(3, 1).bool())
    with pytest.raises(ValueError, match="finite.*nan"):
        group_advantages(torch.tensor([[1.0, float("nan")]]), "gapg")
    with pytest.raises(ValueError, match="help_rate=nan"):
        update_dual(0.5, float("nan"), tau=0.3, eta=0.5)
    for dual in (float("nan"), -1.0):   # a negative price would reward help calls
        with pytest.raises(ValueError, match=f"finite dual >= 0.*got {dual}"):
            group_advantages(torch.ones(1, 2), "da_grpo", help=torch.tensor([[True, False]]),
                             dual=dual)
    with pytest.raises(ValueError, match=r"0 <= tau <= 1 \(got 7.0\)"):
        update_dual(0.0, 0.5, tau=7.0, eta=0.5)
    with pytest.raises(ValueError, match=r"eta >= 0 \(got -3.0\)"):
        update_dual(0.0, 0.5, tau=0.3, eta=-3.0)

# -----------------------------------------------------------------------------
# filtering (SPEC 6). A group is a string: L = locally correct, W = wrong, H = help call.

def batch(groups, cloud):
    local_ok = torch.tensor([[c == "L" for c in g] for g in groups])
    help = torch.tensor([[c == "H" for c in g] for g in groups])
    cloud_ok = torch.tensor(cloud)
    rewards = local_ok.double() + 0.25 * (help & cloud_ok[:, None]).double()   # v3, alpha_c = 0.25
    return local_ok, cloud_ok, help, rewards


def run_filter(groups, cloud, rho=3 / 7, rule="any_correct", seed=0):
    local_ok, cloud_ok, help, rewards = batch(groups, cloud)
    return filter_prompts(local_ok, cloud_ok, help, rho, rule,
                          torch.Generator().manual_seed(seed), rewards=rewards)


def test_excluded_prompts_are_in_no_set_and_not_in_the_cap():
    # D1 = {0, 1, 2, 3}: cap floor(3/7 * 4) = 1; excluding D1 prompt 0 and D2 candidate 4
    # leaves |D1| = 3, cap floor(3/7 * 3) = 1 of the candidates 5, 6
    local_ok, cloud_ok, help, rewards = batch(["LW"] * 4 + ["HW"] * 3, [True] * 7)
    exclude = torch.tensor([True, False, False, False, True, False, False])
    res = filter_prompts(local_ok, cloud_ok, help, 3 / 7, "any_correct",
                         torch.Generator().manual_seed(0), rewards=rewards, exclude=exclude)
    assert res.n_d1 == 3 and res.n_d2_candidates == 2 and res.n_d2 == 1
    assert res.selected.tolist()[:3] == [1, 2, 3] and res.selected.tolist()[3] in (5, 6)
    # two excluded D1 prompts: |D1| = 2, cap floor(6/7) = 0
    exclude[1] = True
    res = filter_prompts(local_ok, cloud_ok, help, 3 / 7, rewards=rewards, exclude=exclude)
    assert res.selected.tolist() == [2, 3] and res.n_d2 == 0
    res = filter_prompts(local_ok, cloud_ok, help, 3 / 7, "none", rewards=rewards, exclude=exclude)
    assert res.selected.tolist() == [2, 3, 5, 6]
    # the zero-variance count is of usable groups too: "HH" groups whose cloud call failed
    local_ok, cloud_ok, help, rewards = batch(["HH", "HH", "WW", "LW"], [False] * 4)
    res = filter_prompts(local_ok, cloud_ok, help, 3 / 7, rewards=rewards,
                         exclude=torch.tensor([True, True, False, False]))
    assert res.n_zero_variance == 1 and res.n_zero_variance_selected == 0


@pytest.mark.parametrize("n_d1,cap", list(enumerate([0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 4])))
def test_cap_is_floor_rho_d1(n_d1, cap):
    groups = ["LW"] * n_d1 + ["HW"] * 10
    res = run_filter(groups, [True] * len(groups))
    assert (res.n_d1, res.n_d2, res.n_d2_candidates, res.n_d2_dropped) == (n_d1, cap, 10, 10 - cap)
    assert res.selected.dtype == torch.long
    assert res.selected[:n_d1].tolist() == list(range(n_d1))          # all of D1, sorted
    assert len(res.selected) == n_d1 + cap and (res.selected[n_d1:] >= n_d1).all()
    assert res.selected.tolist() == sorted(set(res.selected.tolist()))


@pytest.mark.parametrize("rho,n_d1,cap", [(3 / 7, 7, 3), (0.29, 100, 29), (0.58, 50, 29), (0.7, 90, 63)])
def test_cap_rounding(rho, n_d1, cap):
    # 0.29 * 100 = 28.999999999999996 in binary floating point; the cap must still be 29
    res = run_filter(["LW"] * n_d1 + ["HW"] * 100, [True] * (n_d1 + 100), rho=rho)
    assert res.n_d2 == cap


def test_empty_d1_keeps_no_d2():
    res = run_filter(["HH", "HW", "WH"], [True, True, True])
    assert res.selected.tolist() == [] and (res.n_d1, res.n_d2, res.n_d2_dropped) == (0, 0, 3)


def test_everything_in_d2_kept_when_under_cap():
    res = run_filter(["LL", "LW", "HW", "WL", "HH"], [True] * 5, rho=1.0)
    assert res.selected.tolist() == [0, 1, 2, 3, 4]
    assert (res.n_d1, res.n_d2, res.n_d2_candidates, res.n_d2_dropped) == (3, 2, 2, 0)


def test_rho_zero_keeps_no_d2():
    res = run_filter(["LW", "HW"], [True, True], rho=0.0)
    assert res.selected.tolist() == [0] and res.n_d2_dropped == 1


def test_d2_needs_a_help_call_and_a_correct_cloud():
    # 0: no help call (cloud verdict meaningless); 1: cloud wrong; 2: a real candidate
    res = run_filter(["LW", "LW", "LW", "WW", "HW", "WH"], [True, True, True, True, False, True], rho=1.0)
    assert res.n_d2_candidates == 1 and res.selected.tolist() == [0, 1, 2, 5]


def test_all_correct_groups_under_both_rules():
    groups, cloud = ["LLLL", "LWLW", "LLLL", "HWHW", "WWWW"], [True] * 5
    res = run_filter(groups, cloud, rho=1.0, rule="any_correct")
    assert res.selected.tolist() == [0, 1, 2, 3] and res.n_d1 == 3 and res.n_d2 == 1
    res = run_filter(groups, cloud, rho=1.0, rule="mixed")
    assert res.selected.tolist() == [1, 3] and res.n_d1 == 1 and res.n_d2 == 1
    # zero-variance groups: the two LLLL and WWWW; the mixed rule selects none of them
    assert res.n_zero_variance == 3 and res.n_zero_variance_selected == 0
    # the smaller D1 of "mixed" also shrinks the cap: floor(0.5 * 1) = 0
    assert run_filter(groups, cloud, rho=0.5, rule="mixed").selected.tolist() == [1]


def test_zero_variance_count():
    groups = ["LLLL", "WWWW", "HHHH", "HHHH", "LWHW", "HWWW"]
    cloud = [True, True, True, False, True, True]   # HHHH with cloud right: all 0.25; wrong: all 0
    res = run_filter(groups, cloud, rho=1.0)
    assert res.n_zero_variance == 4
    assert res.selected.tolist() == [0, 2, 4, 5] and res.n_zero_variance_selected == 2


def test_rule_none_selects_everything():
    res = run_filter(["LL", "WW", "HW", "HH"], [True, True, True, False], rho=0.0, rule="none")
    assert res.selected.tolist() == [0, 1, 2, 3]
    assert (res.n_d1, res.n_d2, res.n_d2_candidates, res.n_d2_dropped) == (1, 1, 1, 0)


def test_filter_is_deterministic_given_the_generator():
    groups = ["LW"] * 10 + ["HW"] * 10
    picks = [run_filter(groups, [True] * 20, seed=s).selected.tolist() for s in (1, 1, 2, 3)]
    assert picks[0] == picks[1]
    assert len({tuple(p) for p in picks}) > 1


def test_d2_choice_is_uniform():
    # 5 candidates, cap floor(0.4 * 5) = 2: each of the 10 pairs has probability 1/10
    local_ok, cloud_ok, help, rewards = batch(["LW"] * 5 + ["HW"] * 5, [True] * 10)
    gen, n, pairs = torch.Generator().manual_seed(0), 4000, {}
    for _ in range(n):
        kept = tuple(filter_prompts(local_ok, cloud_ok, help, 0.4, generator=gen, rewards=rewards).selected[5:].tolist())
        pairs[kept] = pairs.get(kept, 0) + 1
    assert len(pairs) == 10
    sd = math.sqrt(n * 0.1 * 0.9)
    assert all(abs(c - n / 10) < 5 * sd for c in pairs.values()), pairs


def test_filter_errors():
    with pytest.raises(ValueError, match="rho"):
        run_filter(["LW"], [True], rho=-0.1)
    with pytest.raises(ValueError, match="any_correct"):
        run_filter(["LW"], [True], rule="both")
    local_ok, cloud_ok, help, rewards = batch(["LW", "WW"], [True, True])
    with pytest.raises(ValueError, match=r"exclude must be \[P\] = \[2\], got \(1,\)"):
        filter_prompts(local_ok, cloud_ok, help, 3 / 7, rewards=rewards, exclude=torch.tensor([True]))
    with pytest.raises(ValueError, match=r"rewards must be finite, got \[nan, nan, nan, nan\]"):
        filter_prompts(local_ok, cloud_ok, help, 3 / 7, rewards=torch.full((2, 2), float("nan")))
    for rho in ("0.3", None):
        with pytest.raises(ValueError, match=f"rho must be a finite number >= 0, got {rho!r}"):
            filter_prompts(local_ok, cloud_ok, help, rho, rewards=rewards)
    with pytest.raises(ValueError, match=r"need local_ok.*got \(\), \(2, 2\)"):
        filter_prompts(torch.tensor(True), cloud_ok, help, 3 / 7, rewards=rewards)


def test_flags_that_are_not_booleans_or_0_1_are_refused():
    """A cast to bool read 0.5 or NaN as True: such a help flag counted as a help call."""
    local_ok, cloud_ok, help, rewards = batch(["LW", "WW"], [True, True])
    for bad in (float("nan"), 0.5):
        odd = help.float()
        odd[1, 0] = bad
        with pytest.raises(ValueError, match=r"help must hold flags \(True/False or 0/1\), got "
                                             + ("\\[nan\\]" if bad != bad else "\\[0.5\\]")):
            filter_prompts(local_ok, cloud_ok, odd, 3 / 7, rewards=rewards)
        with pytest.raises(ValueError, match="cloud_ok must hold flags"):
            capped_metrics([True, False], [False, True], [1.0, bad], 0.5)
        with pytest.raises(ValueError, match="exclude must hold flags"):
            filter_prompts(local_ok, cloud_ok, help, 3 / 7, rewards=rewards,
                           exclude=torch.tensor([0.0, bad]))
    # 0/1 numbers are flags, as before
    local_ok, cloud_ok, help, rewards = batch(["LW", "HW", "WW"], [True, True, False])
    as_numbers = filter_prompts(local_ok.float(), cloud_ok.long(), help.double(), 1.0,
                                rewards=rewards)
    as_bools = filter_prompts(local_ok, cloud_ok, help, 1.0, rewards=rewards)
    assert as_numbers.selected.tolist() == as_bools.selected.tolist() == [0, 1]
    assert (as_numbers.n_d1, as_numbers.n_d2) == (as_bools.n_d1, as_bools.n_d2) == (1, 1)
    assert capped_metrics([1, 0], [0, 1], [1.0, 0.0], 0.5) == \
        capped_metrics([True, False], [False, True], [True, False], 0.5)


def test_a_help_call_flagged_correct_is_not_a_local_solve():
    # a task that marks a help call locally correct too must not put its prompt in D1 (SPEC 2):
    # group "HW" with both flags on the help call is a D2 candidate, as capped_metrics scores it
    local_ok, cloud_ok, help, rewards = batch(["HW", "LW"], [True, True])
    local_ok[0, 0] = True
    res = filter_prompts(local_ok, cloud_ok, help, 1.0, rewards=rewards)
    assert res.n_d1 == 1 and res.n_d2_candidates == 1 and res.selected.tolist() == [0, 1]

# -----------------------------------------------------------------------------
# the loss on a tiny stand-in causal model with model.py's call signature

class TinyCausal(nn.Module):
    """Embedding, causal mean over real tokens, position embedding, linear head: logits [N, L, V]."""
    def __init__(self, vocab=7, dim=4, max_len=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok = nn.Parameter(torch.randn(vocab, dim, generator=g, dtype=torch.float64))
        self.pos = nn.Parameter(0.5 * torch.randn(max_len, dim, generator=g, dtype=torch.float64))
        self.head = nn.Parameter(torch.randn(dim, vocab, generator=g, dtype=torch.float64))

    def forward(self, tokens, positions, attn_mask=None, cache=None, logits_from=0):
        real = torch.ones_like(tokens, dtype=torch.bool) if attn_mask is None else attn_mask
        x = self.tok[tokens] * real[..., None]
        h = x.cumsum(1) / real.cumsum(1).clamp(min=1)[..., None]
        return (torch.tanh(h + self.pos[positions]) @ self.head)[:, logits_from:]


START, TEMP = 3, 0.7


def loss_batch():
    """7 rows of [3 prompt | 5 response] tokens, some left padding, some masked response tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (7, 8), generator=g)
    attn = torch.ones(7, 8, dtype=torch.bool)
    attn[1, :1] = attn[4, :2] = False                               # left-padded prompts
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    mask = torch.rand(7, 5, generator=g) < 0.7                      # device tokens of the response
    mask[2, 3:] = False                                             # right padding / cloud tokens
    coef = torch.randn(7, generator=g, dtype=torch.float64)
    return ids, pos, attn, mask, coef


def hand_gradient(model, ids, pos, attn, mask, coef, n_selected):
    """-(1/n_selected) sum_i coef_i grad log pi(y_i): one forward and one autograd.grad per response,
    log pi(y_i) summed over its device tokens t as log_softmax(logits[t-1] / T)[token_t]."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(ids)):
        logits = model(ids[i:i + 1], pos[i:i + 1], attn_mask=attn[i:i + 1])[0]
        terms = [torch.log_softmax(logits[START + j - 1] / TEMP, -1)[ids[i, START + j]]
                 for j in range(mask.shape[1]) if mask[i, j]]
        grads = torch.autograd.grad(torch.stack(terms).sum(), params)
        total = [t - coef[i] * g / n_selected for t, g in zip(total, grads)]
    return total


def test_loss_gradient_matches_hand_assembled():
    model = TinyCausal()
    ids, pos, attn, mask, coef = loss_batch()
    logp = sequence_token_logprobs(model, ids, pos, attn, START, TEMP)
    assert logp.shape == (7, 5)
    policy_gradient_loss(logp, mask, coef, n_selected=3).backward()
    for p, h in zip(model.parameters(), hand_gradient(model, ids, pos, attn, mask, coef, 3)):
        torch.testing.assert_close(p.grad, h, rtol=1e-10, atol=1e-12)


def test_banned_tokens_are_outside_the_logprobs_distribution():
    """The sampler never draws banned ids: the update's log-probs renormalise without them."""
    model = TinyCausal()
    ids, pos, attn, _, _ = loss_batch()
    ids = ids.masked_fill((ids == 2) | (ids == 5), 0)  # the sampled ids avoid the banned 2, 5
    got = sequence_token_logprobs(model, ids, pos, attn, START, TEMP, banned_ids=[2, 5])
    with torch.no_grad():
        logits = model(ids, pos, attn_mask=attn)[:, START - 1:-1] / TEMP
    allowed = [0, 1, 3, 4, 6]
    ref = torch.log_softmax(logits[..., allowed], -1)  # the 5 allowed ids, renormalised
    targets = torch.tensor([allowed.index(int(i)) for i in ids[:, START:].flatten()])
    expected = ref.reshape(-1, 5).gather(-1, targets[:, None]).view(got.shape)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [1, 3, 7])
def test_micro_batches_give_the_same_gradient(size):
    model = TinyCausal()
    ids, pos, attn, mask, coef = loss_batch()
    hand = hand_gradient(model, ids, pos, attn, mask, coef, 3)
    loss = accumulate_policy_gradient(model, ids, pos, attn, START, TEMP, mask, coef, 3, size)
    for p, h in zip(model.parameters(), hand):
        torch.testing.assert_close(p.grad, h, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the returned value: -(1/3) sum_i coef_i log pi(y_i), by hand
        logits = model(ids, pos, attn_mask=attn)[:, START - 1:-1] / TEMP
        picked = torch.log_softmax(logits, -1).gather(-1, ids[:, START:, None])[..., 0]
        want = -(coef * (picked * mask).sum(1)).sum() / 3
    assert loss == pytest.approx(float(want), rel=1e-9, abs=1e-12)


def test_micro_batch_slices():
    assert micro_batches(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert micro_batches(7, 7) == [slice(0, 7)] and micro_batches(0, 2) == []
    assert micro_batches(3, 10) == [slice(0, 3)]


def test_update_policy_is_the_spec_step_over_the_selected_prompts():
    """SPEC 5: -(1/|S|) sum over selected prompts and their G responses of coef * grad log pi,
    with |S| counting a selected zero-variance group (all coefficients 0) and an unselected
    prompt adding nothing. Reference: each response as its own unpadded sequence."""
    P, G, T = 4, 3, 5
    g = torch.Generator().manual_seed(2)
    prompt_ids = [[1, 2], [3, 4, 5], [6], [2, 2, 4, 1]]                # ragged prompts
    tokens = torch.randint(0, 7, (P * G, T), generator=g)
    lengths = torch.tensor([5, 3, 4, 2, 5, 1, 5, 5, 5, 4, 3, 5])
    device_mask = (torch.arange(T)[None, :] < lengths[:, None]) & (
        torch.rand(P * G, T, generator=g) < 0.8)                     # some tokens are not the device's
    coef = torch.tensor([[0.5, -1.0, 0.5], [1.0, -0.5, -0.5], [0.0, 0.0, 0.0], [-0.3, 0.6, -0.3]],
                        dtype=torch.float64)
    selected = torch.tensor([0, 2, 3])                                # prompt 1 filtered out
    flags = torch.zeros(P, G, dtype=torch.bool)
    ro = Rollout(prompt_ids, tokens, device_mask, lengths, flags.reshape(-1), [""] * (P * G),
                 flags, flags, flags, flags[:, 0], flags[:, 0], flags[:, 0], coef, {})
    model = TinyCausal()
    update_policy(model, ro, coef, selected, TEMP, micro_batch_size=2, pad_id=0)
    params = list(model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for p in selected.tolist():
        for j in range(G):
            row = p * G + j
            n = int(lengths[row])
            seq = torch.tensor([prompt_ids[p] + tokens[row, :n].tolist()])
            logits = model(seq, torch.arange(seq.shape[1])[None])[0] / TEMP
            start = len(prompt_ids[p])
            logp = sum(torch.log_softmax(logits[start + k - 1], -1)[seq[0, start + k]]
                       for k in range(n) if device_mask[row, k])
            grads = torch.autograd.grad(logp, params)
            expected = [e - coef[p, j] * gr / len(selected) for e, gr in zip(expected, grads)]
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


def test_masked_tokens_carry_no_gradient():
    mask = torch.tensor([[True, False, True], [False, True, False]])
    coef = torch.tensor([2.0, -1.0])
    grads = []
    for masked_value in (0.0, 123.0, -math.inf):
        logp = torch.tensor([[-1.0, 0.0, -2.0], [0.0, -0.5, 0.0]])
        logp[~mask] = masked_value
        logp.requires_grad_(True)
        loss = policy_gradient_loss(logp, mask, coef, n_selected=2)
        # -(2 * (-1 - 2) + (-1) * (-0.5)) / 2 = -(-6 + 0.5) / 2 = 2.75
        assert loss.item() == pytest.approx(2.75)
        loss.backward()
        grads.append(logp.grad)
    expected = torch.tensor([[-1.0, 0.0, -1.0], [0.0, 0.5, 0.0]])   # -coef_i / n_selected on device tokens
    for g in grads:
        torch.testing.assert_close(g, expected)


def test_loss_errors():
    with pytest.raises(ValueError, match="n_selected"):
        policy_gradient_loss(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.ones(1), 0)
    # a [N, 1] coef or a [N] mask would broadcast to a silently wrong loss
    with pytest.raises(ValueError, match=r"coef \[N\]; got \(2, 2\), \(2, 2\), \(2, 1\)"):
        policy_gradient_loss(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 1), 1)
    with pytest.raises(ValueError, match=r"got \(2, 2\), \(2,\), \(2,\)"):
        policy_gradient_loss(torch.zeros(2, 2), torch.ones(2, dtype=torch.bool), torch.ones(2), 1)


def test_a_listed_rule_without_a_branch_is_an_error_not_another_rule(monkeypatch):
    """A forker who adds a name to ADVANTAGE_KINDS / FILTER_RULES but no branch gets an error,
    not (as a fall-through would give) da_grpo's coefficients or the default filter."""
    import algo
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.25]])
    help = torch.tensor([[False, False, False, True]])
    monkeypatch.setattr(algo, "ADVANTAGE_KINDS", algo.ADVANTAGE_KINDS + ("median",))
    with pytest.raises(NotImplementedError, match="'median' is in ADVANTAGE_KINDS"):
        algo.group_advantages(rewards, "median", help=help)
    monkeypatch.setattr(algo, "FILTER_RULES", algo.FILTER_RULES + ("uncapped",))
    with pytest.raises(NotImplementedError, match="'uncapped' is in FILTER_RULES"):
        algo.filter_prompts(rewards > 0.5, torch.tensor([True]), help, 0.5, "uncapped",
                            rewards=rewards)


def test_evaluation_decodes_greedily():
    """SPEC 7 evaluates the greedy policy: every token of every evaluated response is the argmax
    of a full forward pass over the prompt and the response so far (a sampled decode would be
    just as repeatable, since its seed is fixed, so repeatability proves nothing)."""
    from algo import evaluate_policy
    from cloud import NoCloud
    from model import ModelConfig, Transformer, build_char_tokenizer
    from tasks import make_task
    task = make_task("tiny_countdown", n_train=4, n_test=12)
    tok = build_char_tokenizer(task.alphabet)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, max_position_embeddings=64,
                                    eos_token_id=1)).init_weights(3, std=0.5).eval()
    examples = task.examples("test")
    _, out = evaluate_policy(model, tok, task, examples, NoCloud(), 0.3, max_new_tokens=20,
                             batch_size=5)
    checked = 0
    for ex, text in zip(examples, out["text"]):
        prompt, response = tok.prompt_ids(ex.prompt), tok.encode(text)
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1])[None])[0]
        for j, token in enumerate(response):
            assert int(logits[len(prompt) + j - 1].argmax()) == token
            checked += 1
    assert checked >= 5 * len(examples)  # responses long enough for the check to bite


def test_numpy_budgets_and_rhos_work_like_floats():
    """A NumPy scalar (say, read from an array of budgets) is a real number: it passed the
    checks and then crashed in Fraction. The caps are those of the same plain floats:
    floor(7 * 3/7) = 3 (float32(3/7) is 0.42857143), floor(10 * 0.3) = 3."""
    import numpy as np
    res = run_filter(["LW"] * 7 + ["HW"] * 5, [True] * 12, rho=np.float32(3 / 7))
    assert res.n_d2 == 3
    m = capped_metrics([True] * 5 + [False] * 5, [False] * 10, [True] * 10, np.float32(0.3))
    assert m["cap"] == 3 and m["calls_served"] == 3


@pytest.mark.parametrize("rho", [-0.5, -1.0, float("nan"), float("inf"), True, "0.4"])
def test_cloud_share_refuses_what_is_no_rho(rho):
    with pytest.raises(ValueError, match=r"^rho must be a finite number >= 0, got "):
        cloud_share(rho)
    with pytest.raises(ValueError, match=r"^rho must be a finite number >= 0, got "):
        run_filter(["LW", "HW"], [True, True], rho=rho)
