"""sample.py: greedy parity with transformers, cache vs full forward, sharing, seeds, supports."""
import copy
from fractions import Fraction

import numpy as np
import pytest
import torch

from devices import CUDA, DEVICES
from hf_models import make_hf_model
import sample
from model import Linear, ModelConfig, Transformer, load_pretrained
from sample import generate, sample_next

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 9, 11], [7, 3, 3, 8, 21, 40, 2, 17, 6], [30], [12, 13, 14, 15, 16]]


def tiny_model(seed=0, **kw):
    cfg = ModelConfig(**{**dict(vocab_size=61, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2), **kw})
    return Transformer(cfg).init_weights(seed, std=0.3).eval()


def on(device, model):
    """A copy of a CPU model on the device (the CPU original stays the reference)."""
    return copy.deepcopy(model).to(device)


def atol(device, cpu_atol):
    """Tolerance against a CPU reference: CUDA's fp32 kernels sum in another order."""
    return cpu_atol if device == "cpu" else 1e-4


def full_forward_logprobs(model, prompt, completion):
    seq = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(seq, torch.arange(seq.shape[1])[None])[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2_untied"])
def test_greedy_equals_transformers_on_ragged_batch(name, device, tmp_path):
    """Ours in fp32 on the device against transformers' greedy generate on the CPU."""
    hf = make_hf_model(name, seed=4)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path), dtype="float32", device=device)
    out = generate(ours, PROMPTS, max_new_tokens=40, temperature=0)
    assert out.tokens.device.type == device
    for i, p in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          do_sample=False, max_new_tokens=40, min_new_tokens=40, eos_token_id=None,
                          pad_token_id=0)[0, len(p):]
        assert out.tokens[i].tolist() == ref.tolist(), f"prompt {i}"


@pytest.mark.parametrize("device", DEVICES)
def test_cached_decoding_equals_full_forward(device):
    model = tiny_model()
    out = generate(on(device, model), PROMPTS, n=3, max_new_tokens=24, temperature=1.0, seed=7)
    for row in range(len(PROMPTS) * 3):
        prompt = PROMPTS[row // 3]
        ref = full_forward_logprobs(model, prompt, out.tokens[row].tolist())
        assert torch.allclose(out.logprobs[row].cpu(), ref, atol=atol(device, 1e-5)), row
    # greedy: each token is the argmax, its log-prob that of the untempered softmax
    out = generate(on(device, model), PROMPTS, max_new_tokens=24, temperature=0)
    for row, prompt in enumerate(PROMPTS):
        completion = out.tokens[row].tolist()
        seq = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(seq, torch.arange(seq.shape[1])[None])[0, len(prompt) - 1:-1]
        assert logits.argmax(-1).tolist() == completion
        ref = full_forward_logprobs(model, prompt, completion)
        assert torch.allclose(out.logprobs[row].cpu(), ref, atol=atol(device, 1e-5)), row


def restricted_logprobs(logits, temperature, top_k, top_p):
    """Reference log-softmax of logits / T over the top-k, then top-p support, written out row
    by row: keep tokens in descending order until the kept mass reaches top_p."""
    logp = torch.log_softmax(logits / temperature, -1)
    out = torch.full_like(logp, float("-inf"))
    for i, row in enumerate(logp):
        order = row.argsort(descending=True)[:top_k or None]
        probs = torch.softmax(row[order], -1)  # renormalised over the top-k
        kept, mass = [], 0.0
        for tok, prob in zip(order.tolist(), probs.tolist()):
            if mass >= top_p:
                break
            kept.append(tok)
            mass += prob
        out[i, kept] = torch.log_softmax(row[kept], -1)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (6, 0.7)])
def test_tempered_restricted_logprobs_equal_full_forward(device, top_k, top_p):
    """The sampler's logits buffer is tempered and masked in place each step: the recorded
    log-probs must still be those of the restricted, tempered distribution."""
    model = tiny_model(seed=2)
    out = generate(on(device, model), PROMPTS, n=2, max_new_tokens=16, temperature=0.7,
                   top_k=top_k, top_p=top_p, seed=1)
    for row in range(len(PROMPTS) * 2):
        prompt, completion = PROMPTS[row // 2], out.tokens[row].tolist()
        seq = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(seq, torch.arange(seq.shape[1])[None])[0, len(prompt) - 1:-1]
        logp = restricted_logprobs(logits, 0.7, top_k, top_p)
        ref = logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]
        assert torch.isfinite(ref).all()  # every sampled token lies in the support
        assert torch.allclose(out.logprobs[row].cpu(), ref, atol=atol(device, 1e-5)), row


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_logprobs_stay_close_to_fp32(device, tmp_path):
    """bf16 is the CUDA default (and can be asked for on the CPU)."""
    make_hf_model("llama_gqa_tied", seed=2).save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path), device=device,
                            dtype="bfloat16" if device == "cpu" else None)
    assert next(model.parameters()).dtype == torch.bfloat16
    # the fp32 reference uses the same bf16-rounded weights: only the bf16 compute differs
    ref = load_pretrained(str(tmp_path), dtype="bfloat16").float()
    out = generate(model, PROMPTS, n=4, max_new_tokens=32, seed=3)
    assert out.logprobs.dtype == torch.float32 and bool(out.mask.all())
    diffs = torch.cat([out.logprobs[r].cpu() - full_forward_logprobs(ref, PROMPTS[r // 4],
                                                                     out.tokens[r].tolist())
                       for r in range(len(PROMPTS) * 4)]).abs()
    assert diffs.mean() < 0.05 and diffs.max() < 0.5, (diffs.mean(), diffs.max())
    again = generate(model, PROMPTS, n=4, max_new_tokens=32, seed=3)
    assert torch.equal(out.tokens, again.tokens)


def test_forward_writes_logits_into_a_given_buffer():
    model = tiny_model()
    ids = torch.tensor([[5, 9, 11], [7, 3, 8]])
    pos = torch.arange(3).expand(2, 3)
    buf = torch.full((2, 1, 61), float("nan"))
    with torch.no_grad():
        ref = model(ids, pos, logits_from=-1)
        got = model(ids, pos, logits_from=-1, out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(buf, ref)


def test_generated_tensors_serve_a_training_step():
    """generate() decodes under inference_mode; what it returns must still be ordinary tensors:
    the trainer's forward feeds the tokens to the embedding (whose backward keeps them) and
    edits masks in place."""
    model = tiny_model().train()
    out = generate(model, PROMPTS, n=2, max_new_tokens=5, temperature=1.0)
    for x in (out.tokens, out.logprobs, out.mask, out.lengths, out.finished):
        assert not x.is_inference()
    out.mask[0, 0] = False
    logits = model(out.tokens, torch.arange(5).expand(len(out.tokens), 5))
    logits.float().logsumexp(-1).sum().backward()
    assert model.embed_tokens.weight.grad is not None


def test_ragged_batch_equals_one_prompt_at_a_time_and_shared_prefill():
    model = tiny_model(seed=1)
    batch = generate(model, PROMPTS, n=4, max_new_tokens=30, temperature=0)
    for i, p in enumerate(PROMPTS):
        single = generate(model, [p], n=1, max_new_tokens=30, temperature=0)
        one_prompt = generate(model, [p], n=3, max_new_tokens=30, temperature=0)
        assert all(torch.equal(row, single.tokens[0]) for row in one_prompt.tokens)
        separate = generate(model, [p] * 4, n=1, max_new_tokens=30, temperature=0)
        for j in range(4):  # n samples sharing one prefill == separately prefilled copies
            assert torch.equal(batch.tokens[4 * i + j], single.tokens[0])
            assert torch.equal(separate.tokens[j], single.tokens[0])
            assert torch.allclose(batch.logprobs[4 * i + j], single.logprobs[0], atol=1e-5)


def test_shared_prefill_equals_separate_prefills_when_sampling():
    """n samples of each prompt from one prefill == each prompt repeated n times with its own
    prefill: the same rows draw the same uniforms, so the samples must agree exactly."""
    model = tiny_model(seed=1)
    shared = generate(model, PROMPTS, n=4, max_new_tokens=30, temperature=1.0, seed=2)
    separate = generate(model, [p for p in PROMPTS for _ in range(4)], n=1, max_new_tokens=30,
                        temperature=1.0, seed=2)
    assert torch.equal(shared.tokens, separate.tokens)
    assert torch.allclose(shared.logprobs, separate.logprobs, atol=1e-5)
    assert len({tuple(r) for r in shared.tokens[:4].tolist()}) > 1  # the samples do differ


needs_packing = pytest.mark.skipif(not sample.can_pack(torch.device("cpu"), torch.float32),
                                   reason="oneDNN weight packing: an x86-64 CPU, torch with oneDNN")


@needs_packing
def test_packed_decoding_equals_unpacked_decoding(monkeypatch):
    """On an x86 CPU generate() multiplies through oneDNN-packed weights, with oneDNN turned off
    through F.linear: the same tokens, greedy and sampled, and log-probs within rounding."""
    model = tiny_model(seed=1)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(m.packed is not None))
    packed = {T: generate(model, PROMPTS, n=3, max_new_tokens=30, temperature=T, seed=4)
              for T in (0, 1.0)}
    assert len(seen) == 2 * 30 and all(seen)   # the prefill and every decode step
    seen.clear()
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    for T, out in packed.items():
        plain = generate(model, PROMPTS, n=3, max_new_tokens=30, temperature=T, seed=4)
        assert torch.equal(out.tokens, plain.tokens)
        assert torch.allclose(out.logprobs, plain.logprobs, atol=1e-5)
    assert seen and not any(seen)


@needs_packing
def test_cpu_autocast_decodes_without_packing():
    """Under CPU autocast F.linear multiplies an fp32 model in bf16; the packed product would not
    (oneDNN refused an fp32 packed weight with bf16 inputs), so nothing is packed there."""
    model = tiny_model(seed=1)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(m.packed is not None))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, PROMPTS, n=2, max_new_tokens=10, temperature=0)
    assert seen and not any(seen)
    assert out.mask.all() and torch.isfinite(out.logprobs).all()


@needs_packing
def test_no_packing_where_the_copy_would_take_over_half_the_free_memory(monkeypatch):
    model = tiny_model()
    need = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, Linear))
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(m.packed is not None))
    page = 4096
    for free_pages, packs in ((need * 2 // page + 1, True), (need * 2 // page - 1, False)):
        sizes = {"SC_AVPHYS_PAGES": free_pages, "SC_PAGE_SIZE": page}
        monkeypatch.setattr(sample.os, "sysconf", sizes.__getitem__)
        seen.clear()
        generate(model, PROMPTS, n=2, max_new_tokens=3)
        assert seen and all(x == packs for x in seen), (free_pages, seen)


@needs_packing
def test_packed_weights_are_dropped_after_a_call_and_after_an_error(monkeypatch):
    """A packed copy left behind would multiply by weights the optimizer has since changed."""
    model = tiny_model()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 7 * 2 + 1
    generate(model, PROMPTS, n=2, max_new_tokens=4)
    assert all(m.packed is None for m in linears)

    def fail(*args, **kwargs):  # the first draw, after the packed prefill
        assert all(m.packed is not None for m in linears)
        raise RuntimeError("cut short")

    monkeypatch.setattr(sample, "sample_next", fail)
    with pytest.raises(RuntimeError, match="cut short"):
        generate(model, PROMPTS, n=2, max_new_tokens=4)
    assert all(m.packed is None for m in linears)


@needs_packing
def test_a_packed_linear_multiplies_by_its_weight_and_trains_through_the_weight():
    """Without gradients a packed Linear multiplies through its packed copy; with gradients it
    uses the weight itself (exact gradient), whatever the copy holds."""
    torch.manual_seed(0)
    lin = Linear(48, 40)
    x = torch.randn(5, 3, 48)

    def exact(x):
        return (x.double() @ lin.weight.double().T + lin.bias.double()).float()

    with sample.pack_weights(lin, rows=15):
        with torch.no_grad():
            assert torch.allclose(lin(x), exact(x), atol=1e-5)
            lin.weight.mul_(2)                      # as an optimizer step would
            assert not torch.allclose(lin(x), exact(x), atol=1e-2)  # the stale packed copy
        y = lin(x)
        assert torch.allclose(y, exact(x), atol=1e-5)
        y.sum().backward()
    assert torch.allclose(lin.weight.grad, x.sum((0, 1)).expand(40, 48), atol=1e-4)
    assert torch.allclose(lin.bias.grad, torch.full((40,), 15.0))
    assert lin.packed is None


def test_caches_are_allocated_once_at_the_exact_size(monkeypatch):
    import model as model_module
    import sample
    made = []

    class KV(model_module.KVCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    class Shared(model_module.SharedPrefixCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.ptrs = (self.k.data_ptr(), self.v.data_ptr())
            made.append(self)

        def attend(self, *a, **k):  # the buffers are written in place, never replaced
            assert (self.k.data_ptr(), self.v.data_ptr()) == self.ptrs
            return super().attend(*a, **k)

    monkeypatch.setattr(sample, "KVCache", KV)
    monkeypatch.setattr(sample, "SharedPrefixCache", Shared)
    model = tiny_model()
    cfg = model.config
    generate(model, PROMPTS, n=3, max_new_tokens=12, seed=0)
    (prefix, shared), longest = made, max(map(len, PROMPTS))
    layout = (cfg.num_hidden_layers, len(PROMPTS), cfg.num_key_value_heads)
    assert prefix.k.shape == prefix.v.shape == (*layout, longest, cfg.head_dim)
    assert shared.k.shape == shared.v.shape == (*layout, 3, 12 - 1, cfg.head_dim)
    assert prefix.pos == longest and shared.pos == 12 - 1  # every column used, none spare


@pytest.mark.parametrize("device", DEVICES)
def test_seeds(device):
    model = tiny_model().to(device)
    a = generate(model, PROMPTS, n=2, max_new_tokens=20, seed=3)
    b = generate(model, PROMPTS, n=2, max_new_tokens=20, seed=3)
    c = generate(model, PROMPTS, n=2, max_new_tokens=20, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    g0 = generate(model, PROMPTS, max_new_tokens=20, temperature=0, seed=0)
    g1 = generate(model, PROMPTS, max_new_tokens=20, temperature=0, seed=99)
    assert torch.equal(g0.tokens, g1.tokens)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_stop_independently(device):
    model = tiny_model(seed=2).to(device)
    free = generate(model, PROMPTS, n=2, max_new_tokens=25, seed=5)
    stop = int(free.tokens[0, 3])  # a token row 0 samples at step 3
    out = generate(model, PROMPTS, n=2, max_new_tokens=25, seed=5, stop_ids=[stop], pad_id=60)
    for r in range(out.tokens.shape[0]):
        row = free.tokens[r].tolist()
        length = row.index(stop) + 1 if stop in row else 25
        assert out.lengths[r] == length and bool(out.finished[r]) == (stop in row)
        # identical to the free run up to the stop, padding after it
        assert out.tokens[r, :length].tolist() == row[:length]
        assert (out.tokens[r, length:] == 60).all() and not out.mask[r, length:].any()
        assert (out.logprobs[r, length:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_top_p_supports_and_frequencies(device):
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    g = torch.Generator(device).manual_seed(0)
    draws = 20000
    many = logits.to(device).expand(draws, -1)  # sample_next overwrites its input: pass copies
    tok, lp = (t.cpu() for t in sample_next(many.clone(), 1.0, 3, 1.0, g))
    top3 = set(order[:3].tolist())
    assert set(tok.tolist()) <= top3
    renorm = probs[order[:3]] / probs[order[:3]].sum()
    for k, t in enumerate(order[:3].tolist()):
        freq = (tok == t).float().mean()
        assert abs(freq - renorm[k]) < 4 * (renorm[k] * (1 - renorm[k]) / draws) ** 0.5
        assert torch.allclose(lp[tok == t], renorm[k].log(), atol=1e-5)
    # top-p: the smallest prefix of the sorted distribution whose mass reaches p; p is set
    # halfway between the mass of the top 3 and the top 4, so exactly 4 tokens are kept
    cum = probs[order].cumsum(0)
    p = float(cum[2] + cum[3]) / 2
    tok, lp = (t.cpu() for t in sample_next(many.clone(), 1.0, 0, p, g))
    assert set(tok.tolist()) == set(order[:4].tolist())
    renorm = probs[order[:4]] / cum[3]
    for k, t in enumerate(order[:4].tolist()):
        freq = (tok == t).float().mean()
        assert abs(freq - renorm[k]) < 4 * (renorm[k] * (1 - renorm[k]) / draws) ** 0.5
        assert torch.allclose(lp[tok == t], renorm[k].log(), atol=1e-5)
    # temperature 1 without filters follows the softmax
    tok, _ = sample_next(many.clone(), 1.0, 0, 1.0, g)
    freq = torch.bincount(tok.cpu(), minlength=12).float() / draws
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / draws).sqrt() + 1e-3).all()


def test_bad_arguments():
    model = tiny_model()
    for prompts in ([], torch.tensor([[5, 6]]), "ab"):
        with pytest.raises(ValueError, match="^prompts must be a non-empty list of non-empty "
                                             "token-id lists, got "):
            generate(model, prompts, max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], max_new_tokens=4, temperature=-1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[1] * 10], max_new_tokens=5000)
    # ids outside the vocabulary, or not integers (1.7 would be read as token 1)
    for prompts, shown in (([[1, 2], [3, 61]], r"prompt 1 holds \[3, 61\]"),
                           ([[-1, 2]], r"prompt 0 holds \[-1, 2\]"),
                           ([[1.7, 2]], r"prompt 0 holds \[1.7, 2\]"),
                           ([[1], []], r"prompt 1 holds \[\]"),
                           ([5, 6], r"prompt 0 holds 5"),
                           (["ab"], r"prompt 0 holds 'ab'"),
                           ([[[5], [6]]], r"prompt 0 holds \[\[5\], \[6\]\]"),
                           ([[5, None]], r"prompt 0 holds \[5, None\]"),
                           ([[2 ** 70]], r"prompt 0 holds \[1180591620717411303424\]")):
        with pytest.raises(ValueError, match=shown + "; prompts must be non-empty lists of token "
                                                     r"ids 0..60"):
            generate(model, prompts, max_new_tokens=4)


def test_banned_ids_are_never_sampled():
    model = tiny_model(seed=3)
    free = generate(model, PROMPTS, n=4, max_new_tokens=30, seed=1, temperature=1.5)
    common = torch.bincount(free.tokens.flatten()).topk(3).indices.tolist()
    out = generate(model, PROMPTS, n=4, max_new_tokens=30, seed=1, temperature=1.5,
                   banned_ids=common)
    assert not torch.isin(out.tokens, torch.tensor(common)).any()
    greedy = generate(model, PROMPTS, max_new_tokens=30, temperature=0, banned_ids=common)
    assert not torch.isin(greedy.tokens, torch.tensor(common)).any()


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    # two tied tokens of 0.5 each: the first alone reaches top_p = 0.5, so the second is dropped
    logits = torch.tensor([[0.0, 0.0, -float("inf"), -float("inf")]]).repeat(200, 1)
    token, lp = sample_next(logits.clone(), 1.0, 0, 0.5, torch.Generator().manual_seed(0))
    assert len(set(token.tolist())) == 1 and torch.allclose(lp, torch.zeros(200))


def test_a_uniform_of_exactly_zero_never_picks_a_token_of_probability_zero(monkeypatch):
    # torch.rand can return 0.0: the draw must still land on the first token with mass
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.zeros(*shape))
    logits = torch.tensor([[-float("inf"), -float("inf"), 1.0, 2.0]] * 3)
    token, lp = sample_next(logits.clone(), 1.0, 0, 1.0, torch.Generator())
    assert token.tolist() == [2, 2, 2] and torch.isfinite(lp).all()
    token, _ = sample_next(torch.tensor([[5.0, 1.0, 0.0]]), 1.0, 1, 1.0, torch.Generator())
    assert token.tolist() == [0]   # top-k 1: only token 0 has mass
    token, _ = sample_next(torch.tensor([[1.0, 5.0, 0.0]]), 1.0, 1, 1.0, torch.Generator())
    assert token.tolist() == [1]


@pytest.mark.parametrize("kwargs,needle", [
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, r"^top_k=-1 is not allowed: use 0 \(off\) or a positive integer$"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, r"^temperature=nan is not allowed: use 0 \(greedy\) or a "
                                    r"finite number >= 1e-6$"),
    ({"temperature": float("inf")}, r"^temperature=inf is not allowed"),
    ({"temperature": 1e-38}, r"^temperature=1e-38 is not allowed"),  # logits / T -> NaN
    ({"temperature": "1.0"}, r"^temperature='1.0' is not allowed"),
    ({"temperature": True}, r"^temperature=True is not allowed"),
    ({"top_p": None}, r"^top_p=None is not allowed: use a number in \(0, 1\] \(1: off\)$"),
    ({"seed": None}, r"^seed=None must be an integer$"),
    ({"seed": 1.5}, r"^seed=1.5 must be an integer$"),
    ({"seed": 2 ** 70}, r"^seed=1180591620717411303424 is not allowed: use an integer "
                        r"0..2\*\*64-1$"),
    ({"stop_ids": 2}, r"^stop_ids=2 must be a list of token ids$"),
    ({"stop_ids": None}, r"^stop_ids=None must be a list of token ids$"),
    ({"banned_ids": torch.tensor(61)}, r"^banned_ids \[61\] are not token ids"),
    ({"banned_ids": np.array(61)}, r"^banned_ids \[61\] are not token ids"),  # 0-d NumPy
    ({"banned_ids": [-1]}, r"banned_ids \[-1\] are not token ids of this model \(0..60\)"),
    ({"banned_ids": [61]}, r"banned_ids \[61\] are not"),
    ({"n": 0}, "n=0"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"stop_ids": [61]}, r"stop_ids \[61\] are not token ids of this model \(0..60\)"),  # never met
    ({"banned_ids": [1.7]}, r"banned_ids \[1.7\] are not"),           # not token 1
    ({"pad_id": -1}, r"pad_id=-1 is not a token id of this model \(0..60\)"),
    ({"pad_id": 61}, r"pad_id=61 is not"),
    ({"n": 2.0}, r"n=2.0 must be an integer"),
    ({"max_new_tokens": 3.5}, r"max_new_tokens=3.5 must be an integer"),
    ({"top_k": 2.5}, r"top_k=2.5 must be an integer"),
    ({"check_every": True}, r"check_every=True must be an integer"),
])
def test_bad_sampler_options_raise(kwargs, needle):
    model = tiny_model()
    with pytest.raises(ValueError, match=needle):
        generate(model, [[1, 2]], **{"max_new_tokens": 4, **kwargs})


def test_prompt_plus_new_tokens_may_fill_but_not_exceed_the_context():
    model = tiny_model(max_position_embeddings=16)
    out = generate(model, [[1] * 10, [2] * 4], max_new_tokens=6, temperature=0)  # 10 + 6 == 16
    assert out.tokens.shape == (2, 6)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[1] * 10], max_new_tokens=7, temperature=0)  # 17 > 16


def test_banning_the_whole_vocabulary_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"whole vocabulary \(vocab_size=61\)"):
        generate(model, [[1, 2]], max_new_tokens=4, banned_ids=range(61))
    with pytest.raises(ValueError, match="whole vocabulary"):  # a tensor's ids are ids too
        generate(model, [[1, 2]], max_new_tokens=4, banned_ids=torch.arange(61))
    # one token left: it is the only one drawn, with probability 1 (log-prob 0)
    for temperature in (1.0, 0):
        out = generate(model, [[1, 2]], n=3, max_new_tokens=4, temperature=temperature,
                       banned_ids=[i for i in range(61) if i != 17])
        assert (out.tokens == 17).all() and (out.logprobs == 0).all()


def test_check_every_below_one_is_an_error():
    with pytest.raises(ValueError, match="check_every=0 must be >= 1"):
        generate(tiny_model(), [[1, 2]], max_new_tokens=4, check_every=0)


def test_monotone_cdf_repairs_a_parallel_scans_rounding_by_hand():
    """Probabilities [1, 0, 0, 1, 0, 0]: the exact running total is [1, 1, 1, 2, 2, 2]. A
    parallel scan may give a zero-probability token a total one rounding step above or below
    its neighbour's; u = 1 must then still draw token 3, the first with mass after token 0."""
    from sample import monotone_cdf
    inf = float("inf")
    shifted = torch.tensor([[0.0, -inf, -inf, 0.0, -inf, -inf]])
    up = 1.0 + 2 ** -23  # one rounding step above 1; 2 - 2 ** -23 is one below 2
    scanned = torch.tensor([[1.0, up, up, 2.0, 2.0 - 2 ** -23, 2.0]])
    u = torch.tensor([[1.0]])
    assert torch.searchsorted(scanned, u, right=True).item() == 1  # a token of probability 0
    fixed = monotone_cdf(scanned.clone(), shifted)
    assert fixed.tolist() == [[1.0, 1.0, 1.0, 2.0, 2.0, 2.0]]
    assert torch.searchsorted(fixed, u, right=True).item() == 3


@pytest.mark.parametrize("device", [CUDA])
def test_top_k_draws_on_cuda_never_leave_the_support(device):
    """CUDA's cumsum is a parallel scan, not exactly monotone: over ~1.6M draws from a large
    vocabulary, every token must still lie in the top-k and have a finite log-prob."""
    g = torch.Generator(device).manual_seed(0)
    logits = torch.randn(4096, 8192, generator=g, device=device) * 3
    top = logits.argsort(-1, descending=True)[:, :40]
    support = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
    bad = torch.zeros((), dtype=torch.long, device=device)
    for _ in range(400):
        tok, lp = sample_next(logits.clone(), 1.0, 40, 1.0, g)
        bad += (~support.gather(-1, tok[:, None])[:, 0] | ~torch.isfinite(lp)).sum()
    # one row of a Qwen-sized vocabulary: CUDA scans a single row with another kernel
    one = torch.randn(1, 151936, generator=g, device=device) * 3
    support = torch.zeros_like(one, dtype=torch.bool).scatter_(-1, one.topk(40).indices, True)
    for _ in range(2000):
        tok, lp = sample_next(one.clone(), 1.0, 40, 1.0, g)
        bad += (~support[0, tok] | ~torch.isfinite(lp)).sum()
    assert bad.item() == 0


def test_static_decode_cache_equals_the_growing_one():
    """StaticPrefixCache (what a CUDA graph replays: the column a device tensor, attention over
    a fixed span with the later columns hidden) gives the logits of SharedPrefixCache, which
    attends to exactly the columns written so far: here on the CPU, eagerly, with ragged prompts
    (left padding), n=2 samples sharing each prefix, and spans from exactly t + 1 to the whole
    buffer."""
    from model import KVCache, SharedPrefixCache, StaticPrefixCache
    from sample import left_pad
    model = tiny_model(seed=2)
    prompts, n, steps = PROMPTS[:3], 2, 9
    ids, real, positions = left_pad(prompts, 0)
    next_pos = (positions[:, -1] + 1).repeat_interleave(n)[:, None]
    tokens = torch.randint(0, 61, (len(prompts) * n, steps),
                           generator=torch.Generator().manual_seed(1))
    caches = []
    for cls in (SharedPrefixCache, StaticPrefixCache):
        prefix = KVCache(model.config, len(prompts), ids.shape[1])
        with torch.no_grad():
            model(ids, positions, attn_mask=real, cache=prefix, logits_from=-1)
        caches.append(cls(prefix, n, steps))
    grow, static = caches
    for t in range(steps):
        with torch.no_grad():
            ref = model(tokens[:, t:t + 1], next_pos + t, cache=grow)
            static.col.fill_(t)
            static.span = [t + 1, steps, min(t + 3, steps)][t % 3]
            got = model(tokens[:, t:t + 1], next_pos + static.col, cache=static)
        assert static.pos == 0 and grow.pos == t + 1
        assert torch.allclose(got, ref, atol=1e-5), t
    assert torch.allclose(static.k, grow.k, atol=1e-5)


def test_cuda_graphs_is_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"^cuda_graphs=True needs the model on a CUDA device; "
                                         r"it is on cpu$"):
        generate(model, [[1]], max_new_tokens=4, cuda_graphs=True)
    with pytest.raises(ValueError, match=r"^cuda_graphs='yes' must be True, False or None"):
        generate(model, [[1]], max_new_tokens=4, cuda_graphs="yes")


@pytest.mark.parametrize("device", [CUDA])
def test_cuda_graph_decoding_equals_eager_decoding(device):
    """On CUDA, generate() replays recorded graphs by default; decoding eagerly (cuda_graphs=
    False) must give the same tokens. 300 new tokens cross the 128-column graph spans twice;
    ragged prompts, n=3 samples, and a stop id that ends rows at different steps. Then the
    lengths at the spans' edges (1 and 2: no graph or a span of one column; 129, 130: a second
    graph of one or two columns, the cache's end), greedy."""
    model = on(device, tiny_model(seed=3))
    for temperature in (0, 1.0):
        kw = dict(n=3, max_new_tokens=300, temperature=temperature, seed=5, stop_ids=[7])
        graphed = generate(model, PROMPTS, **kw)
        eager = generate(model, PROMPTS, cuda_graphs=False, **kw)
        assert torch.equal(graphed.tokens, eager.tokens), temperature
        assert torch.equal(graphed.mask, eager.mask)
        assert torch.allclose(graphed.logprobs, eager.logprobs, atol=1e-4)
        assert int(graphed.lengths.max()) > 128  # the rows really reached the second graph
    for new in (1, 2, 129, 130):
        graphed = generate(model, PROMPTS, n=2, max_new_tokens=new, temperature=0)
        eager = generate(model, PROMPTS, n=2, max_new_tokens=new, temperature=0,
                         cuda_graphs=False)
        assert torch.equal(graphed.tokens, eager.tokens), new


@pytest.mark.parametrize("device", [CUDA])
def test_cuda_graph_decoding_holds_no_memory_after_the_call(device):
    """Every graph, its memory pool and the static buffers go with the call: the memory held
    after each further call is what it was after the first. A fresh side stream per recording
    left cuBLAS a new 32 MiB workspace each time (a training run's rollouts grew by that)."""
    model = on(device, tiny_model(seed=3))
    generate(model, PROMPTS, n=2, max_new_tokens=140, seed=1)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    for seed in range(3):
        generate(model, PROMPTS, n=2, max_new_tokens=140, seed=seed)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == held, seed


def test_static_decode_cache_takes_autocast_keys():
    """Under autocast (training's bf16-mixed), an fp32 model's keys/values come out in bf16;
    the static cache stores them in its own dtype, as the growing cache's slice assignment
    does (index_copy_ refuses a dtype mismatch; seen on CUDA)."""
    from model import KVCache, SharedPrefixCache, StaticPrefixCache
    model = tiny_model(seed=2)
    ids, positions = torch.tensor([[5, 9, 11]]), torch.arange(3)[None]
    logits = []
    for cls in (SharedPrefixCache, StaticPrefixCache):
        prefix = KVCache(model.config, 1, 3)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, positions, cache=prefix, logits_from=-1)
            cache = cls(prefix, 2, 4)
            logits.append(model(torch.tensor([[3], [4]]), torch.tensor([[3], [3]]), cache=cache))
        assert cache.k.dtype == torch.float32
    assert torch.allclose(logits[0], logits[1], atol=1e-2)


def test_numpy_and_fraction_arguments_sample_as_plain_numbers():
    """NumPy scalars and Fractions are real numbers, so the checks let them through; the
    sampler then uses them as the plain numbers they equal (they used to fail in the sampler)."""
    model = tiny_model(seed=1)
    plain = generate(model, PROMPTS, n=2, max_new_tokens=6, temperature=0.5, top_p=0.9, seed=3,
                     stop_ids=[7])
    other = generate(model, PROMPTS, n=2, max_new_tokens=6, temperature=Fraction(1, 2),
                     top_p=np.float64(0.9), seed=np.int64(3), stop_ids=np.array(7))
    assert torch.equal(plain.tokens, other.tokens)
    assert torch.equal(plain.logprobs, other.logprobs)
    # NumPy's narrow integers overflowed in the sampler's own sums (200 samples of 2 prompts as
    # a uint8 is 144 rows: a shape error building the cache)
    wide = generate(model, PROMPTS[:2], n=200, max_new_tokens=3, seed=3, top_k=5, pad_id=1)
    narrow = generate(model, PROMPTS[:2], n=np.uint8(200), max_new_tokens=np.uint8(3), seed=3,
                      top_k=np.int8(5), pad_id=np.uint8(1), check_every=np.int8(8))
    assert torch.equal(wide.tokens, narrow.tokens)


def test_two_level_draw_follows_the_distribution_on_its_support():
    """On CPU a vocabulary of whole 128-token blocks is drawn in two levels (block, then token):
    a block without weight, weight only at a block's first and last token, and tokens of
    probability 0 inside a block; frequencies follow the softmax, log-probs are its logs, a
    token of probability 0 is never drawn, and the same seed draws the same tokens."""
    from sample import CDF_BLOCK
    assert CDF_BLOCK == 128
    torch.manual_seed(0)
    logits = torch.randn(384) * 2
    logits[1:127] = float("-inf")            # block 0: weight at tokens 0 and 127 only
    logits[0], logits[127] = 2.0, 1.0
    logits[128:256] = float("-inf")          # block 1: none
    logits[256::2] = float("-inf")           # block 2: every other token
    probs = torch.softmax(logits, -1)
    draws = 30000
    many = logits.expand(draws, -1)
    tok, lp = sample_next(many.clone(), 1.0, 0, 1.0, torch.Generator().manual_seed(1))
    assert (probs[tok] > 0).all()
    freq = torch.bincount(tok, minlength=384).float() / draws
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / draws).sqrt() + 1e-3).all()
    assert freq[0] > 0 and freq[127] > 0
    assert torch.allclose(lp, torch.log_softmax(logits, -1)[tok], atol=1e-5)
    again, _ = sample_next(many.clone(), 1.0, 0, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(again, tok)


def test_two_level_draw_keeps_to_tokens_of_weight_when_sums_round_apart(monkeypatch):
    """A block's sum (float32, as its level-one weight) can round above the running total of
    its tokens in float64; a uniform at the top of the range then lands past the block's last
    token: the draw must still be a token of weight in that block, never one after it."""
    from sample import draw_two_level
    g = torch.Generator().manual_seed(0)
    for _ in range(1000):   # a block whose float32 sum exceeds its exact total
        w = torch.rand(1, 128, generator=g)
        w[0, 100:] = 0
        if w.sum(-1).double().item() > w.double().sum().item():
            break
    else:
        pytest.fail("no block found whose float32 sum rounds up")
    top = 1 - 2 ** -53   # the largest value torch.rand draws in float64
    monkeypatch.setattr(torch, "rand", lambda *a, dtype=None, **k: torch.full(a, top, dtype=dtype))
    token, total = draw_two_level(w, None)
    assert 0 <= token.item() < 100 and token.item() == 99   # the last token with weight
    assert total.item() == w.sum(-1).double().item()
