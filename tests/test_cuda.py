"""The model and sampler on CUDA (skipped without a GPU): fp32 parity with transformers run on
the CPU, the sampler's log-probs against a full forward on the CPU, bf16 as the CUDA default,
seeds and sampling supports drawn by the CUDA generator."""
import pytest
import torch

from hf_models import make_hf_model
from model import load_pretrained
from sample import generate, sample_next

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"
PROMPTS = [[5, 9, 11], [7, 3, 3, 8, 21, 40, 2, 17, 6], [30], [12, 13, 14, 15, 16]]


def saved(name, tmp_path, seed=0):
    hf = make_hf_model(name, seed=seed)
    hf.save_pretrained(tmp_path)
    return hf


def cpu_logprobs(model, prompt, completion, temperature=1.0, top_k=0):
    """Log-probs of completion under a full forward (no cache) of a CPU fp32 model."""
    seq = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(seq, torch.arange(seq.shape[1])[None])[0, len(prompt) - 1:-1].float()
    logits = logits / temperature
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], float("-inf"))
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("name", ["llama_gqa_tied", "llama3_rope", "llama_untied_headdim",
                                  "qwen2_gqa_tied", "qwen2_untied"])
def test_fp32_logits_on_cuda_match_transformers_on_cpu(name, tmp_path):
    hf = saved(name, tmp_path)
    ours = load_pretrained(str(tmp_path), dtype="float32", device=DEV)
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids.to(DEV), torch.arange(13, device=DEV).expand(2, 13)).cpu()
    assert (got - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2_untied"])
def test_greedy_on_cuda_equals_transformers_on_cpu(name, tmp_path):
    hf = saved(name, tmp_path, seed=4)
    ours = load_pretrained(str(tmp_path), dtype="float32", device=DEV)
    out = generate(ours, PROMPTS, max_new_tokens=40, temperature=0)
    assert out.tokens.device.type == "cuda"
    for i, p in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          do_sample=False, max_new_tokens=40, min_new_tokens=40, eos_token_id=None,
                          pad_token_id=0)[0, len(p):]
        assert out.tokens[i].tolist() == ref.tolist(), f"prompt {i}"


def test_sampled_logprobs_on_cuda_equal_a_cpu_full_forward(tmp_path):
    saved("qwen2_gqa_tied", tmp_path, seed=1)
    cpu = load_pretrained(str(tmp_path))
    gpu = load_pretrained(str(tmp_path), dtype="float32", device=DEV)
    for temperature, top_k in ((1.0, 0), (0.7, 5)):
        out = generate(gpu, PROMPTS, n=3, max_new_tokens=24, temperature=temperature,
                       top_k=top_k, seed=7)
        for row in range(len(PROMPTS) * 3):
            completion = out.tokens[row].tolist()
            ref = cpu_logprobs(cpu, PROMPTS[row // 3], completion, temperature, top_k)
            assert torch.allclose(out.logprobs[row].cpu(), ref, atol=1e-4), (temperature, row)


def test_bf16_is_the_cuda_default_and_its_logprobs_stay_close_to_fp32(tmp_path):
    saved("llama_gqa_tied", tmp_path, seed=2)
    gpu = load_pretrained(str(tmp_path), device=DEV)
    assert next(gpu.parameters()).dtype == torch.bfloat16
    # the fp32 reference uses the same bf16-rounded weights: only the bf16 compute differs
    cpu = load_pretrained(str(tmp_path), dtype="bfloat16").float()
    out = generate(gpu, PROMPTS, n=4, max_new_tokens=32, seed=3)
    assert out.logprobs.dtype == torch.float32 and bool(out.mask.all())
    diffs = torch.cat([out.logprobs[r].cpu() - cpu_logprobs(cpu, PROMPTS[r // 4],
                                                            out.tokens[r].tolist())
                       for r in range(len(PROMPTS) * 4)]).abs()
    assert diffs.mean() < 0.05 and diffs.max() < 0.5, (diffs.mean(), diffs.max())
    again = generate(gpu, PROMPTS, n=4, max_new_tokens=32, seed=3)
    assert torch.equal(out.tokens, again.tokens)


def test_seeds_and_rows_stopping_on_cuda(tmp_path):
    saved("qwen2_untied", tmp_path, seed=3)
    model = load_pretrained(str(tmp_path), dtype="float32", device=DEV)
    a = generate(model, PROMPTS, n=2, max_new_tokens=20, seed=3)
    b = generate(model, PROMPTS, n=2, max_new_tokens=20, seed=3)
    c = generate(model, PROMPTS, n=2, max_new_tokens=20, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    stop = int(a.tokens[0, 3])
    out = generate(model, PROMPTS, n=2, max_new_tokens=20, seed=3, stop_ids=[stop], pad_id=96)
    for r in range(out.tokens.shape[0]):
        row = a.tokens[r].tolist()
        length = row.index(stop) + 1 if stop in row else 20
        assert int(out.lengths[r]) == length and bool(out.finished[r]) == (stop in row)
        assert out.tokens[r, :length].tolist() == row[:length]
        assert (out.tokens[r, length:] == 96).all() and not out.mask[r, length:].any()


def test_cuda_draws_follow_the_restricted_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    g = torch.Generator(DEV).manual_seed(0)
    draws = 20000
    many = logits.to(DEV).expand(draws, -1)
    tok, lp = sample_next(many.clone(), 1.0, 3, 1.0, g)
    tok, lp = tok.cpu(), lp.cpu()
    renorm = probs[order[:3]] / probs[order[:3]].sum()
    assert set(tok.tolist()) <= set(order[:3].tolist())
    for k, t in enumerate(order[:3].tolist()):
        assert abs((tok == t).float().mean() - renorm[k]) < 4 * (renorm[k] * (1 - renorm[k]) / draws) ** 0.5
        assert torch.allclose(lp[tok == t], renorm[k].log(), atol=1e-5)
    cum = probs[order].cumsum(0)
    keep = order[: int((cum < 0.6).sum()) + 1].tolist()
    tok, _ = sample_next(many.clone(), 1.0, 0, 0.6, g)
    assert set(tok.cpu().tolist()) == set(keep)
    tok, _ = sample_next(many.clone(), 1.0, 0, 1.0, g)
    freq = torch.bincount(tok.cpu(), minlength=12).float() / draws
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / draws).sqrt() + 1e-3).all()
