"""model.py against transformers' own Llama / Qwen2 implementations (random small configs)."""
import io
import json
import re
import os
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from devices import DEVICES
from hf_models import FAMILIES, make_hf_model
from model import (ModelConfig, Tokenizer, Transformer, build_char_tokenizer, load_pretrained,
                   load_tokenizer, save_pretrained, status_line)

transformers = pytest.importorskip("transformers")


def positions_for(mask):
    return (mask.long().cumsum(1) - 1).clamp(min=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers(name, device, tmp_path):
    """Ours in fp32 on the device against transformers on the CPU."""
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path), dtype="float32", device=device).eval()
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, 90))  # positions beyond llama3's original 32 context
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids.to(device), torch.arange(90, device=device).expand(2, -1)).cpu()
    assert (ref - got).abs().max().item() <= 1e-4
    # a left-padded batch: real positions must match HF's masked forward
    mask = torch.ones(2, 90, dtype=torch.bool)
    mask[1, :37] = False
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask.long(), position_ids=positions_for(mask)).logits
        got = ours(ids.to(device), positions_for(mask).to(device), attn_mask=mask.to(device)).cpu()
    assert (ref - got)[mask].abs().max().item() <= 1e-4


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gradients_match_transformers(name, checkpointing, tmp_path):
    """The training signal itself: the gradient of a left-padded batch's summed next-token
    log-probabilities, for every parameter, equals transformers' (our recomputing backward too)."""
    hf = make_hf_model(name, seed=5)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path), dtype="float32").train()
    ours.gradient_checkpointing = checkpointing
    hf.train()  # no dropout in these configs: train mode changes nothing but our recompute path
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :13] = False

    def objective(logits):
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        return logp[mask[:, 1:] & mask[:, :-1]].sum()

    objective(hf(ids, attention_mask=mask.long(), position_ids=positions_for(mask)).logits) \
        .backward()
    objective(ours(ids, positions_for(mask), attn_mask=mask)).backward()
    hf_grads = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        ref = hf_grads["lm_head.weight" if n.startswith("lm_head.") else "model." + n].grad
        assert (p.grad - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item()), n


@pytest.mark.parametrize("name", ["qwen2_untied", "llama3_rope", "llama_untied_headdim"])
def test_save_roundtrip_and_transformers_loads_ours(name, tmp_path):
    hf = make_hf_model(name, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(str(tmp_path / "hf"))
    save_pretrained(ours, str(tmp_path / "ours"))
    again = load_pretrained(str(tmp_path / "ours"))
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    cfg = json.load(open(tmp_path / "ours" / "config.json"))
    assert "rope_parameters" not in cfg and "rope_theta" in cfg  # classic Hub style
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    ids = torch.randint(3, 97, (1, 70))
    with torch.no_grad():
        assert (reloaded(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4
        assert torch.equal(again(ids, torch.arange(70)[None]), ours(ids, torch.arange(70)[None]))


def test_tied_embedding_stored_once(tmp_path):
    model = Transformer(ModelConfig(tie_word_embeddings=True)).init_weights(0)
    save_pretrained(model, str(tmp_path))
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_pretrained(str(tmp_path))
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model("llama_gqa_tied")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ours = load_pretrained(str(tmp_path))
    ids = torch.randint(3, 97, (1, 20))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids, torch.arange(20)[None])).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["qwen2_untied", "llama_untied_headdim"])
def test_config_without_tie_key_is_untied_as_in_transformers(name, tmp_path):
    """A config.json that omits tie_word_embeddings means untied in transformers; ours must not
    silently tie the head to the embedding (different logits)."""
    make_hf_model(name, seed=4).save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    del cfg["tie_word_embeddings"]
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ours = load_pretrained(str(tmp_path))
    assert ours.lm_head.weight is not ours.embed_tokens.weight
    ids = torch.randint(3, 97, (1, 30))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids, torch.arange(30)[None])).abs().max().item() <= 1e-4


def test_tied_config_with_a_different_stored_head_is_an_error(tmp_path):
    save_pretrained(Transformer(ModelConfig(tie_word_embeddings=True)).init_weights(0),
                    str(tmp_path))
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, path)
    load_pretrained(str(tmp_path))  # a tied head stored anyway, equal to the embedding: fine
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"] + 1}, path)
    with pytest.raises(ValueError, match="lm_head.weight that differs"):
        load_pretrained(str(tmp_path))


def test_checkpoints_transformers_loads_with_extra_buffers_or_only_a_tied_head(tmp_path):
    """An old save's rotary_emb.inv_freq buffers, and a tied embedding stored only as
    lm_head.weight: transformers loads both; so do we, with its logits."""
    hf = make_hf_model("llama_gqa_tied", seed=5)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    buffers = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(head_dim // 2)
               for i in range(hf.config.num_hidden_layers)}
    ids = torch.randint(3, 97, (1, 30))
    for stored in ({**state, **buffers},
                   {**{k: v for k, v in state.items() if k != "model.embed_tokens.weight"},
                    "lm_head.weight": state["model.embed_tokens.weight"]}):
        save_file(stored, path, metadata={"format": "pt"})
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
        ours = load_pretrained(str(tmp_path))
        with torch.no_grad():
            assert (ref(ids).logits - ours(ids, torch.arange(30)[None])).abs().max().item() <= 1e-4


def test_strict_loading_names_the_tensor(tmp_path):
    save_pretrained(Transformer(ModelConfig(tie_word_embeddings=False)).init_weights(0),
                    str(tmp_path))
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    missing = dict(state)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, path)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_pretrained(str(tmp_path))
    save_file({**state, "model.layers.0.self_attn.q_proj.qweight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="q_proj.qweight'.*quantised checkpoints"):
        load_pretrained(str(tmp_path))
    save_file({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=r"q_proj.bias' in \S+$"):  # not a quantisation name
        load_pretrained(str(tmp_path))
    for dtype in (torch.int8, torch.float8_e4m3fn):  # float8 is floating point, but quantised
        quant = dict(state)
        quant["model.layers.0.mlp.down_proj.weight"] = torch.zeros(384, 128).to(dtype)
        save_file(quant, path)
        with pytest.raises(ValueError, match=f"down_proj.weight' .* {dtype}: quantised"):
            load_pretrained(str(tmp_path))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "gpt2"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
      "max_window_layers": 2}, r"layers \[2, 3\] attend within sliding_window=8 tokens"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
      "layer_types": ["full_attention", "sliding_attention"] * 2}, r"layers \[1, 3\]"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
     r"entries we cannot read: \['full_attention'\]"),  # was read as rope_theta 10000
])
def test_unsupported_config_is_an_error(change, message):
    hf = ModelConfig().to_hf()
    hf.update(change)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(hf)


def test_attention_dropout_that_training_would_not_apply_is_a_warning():
    """Released Llama / Qwen2 configs set attention_dropout 0.0; a config that trains with some
    is read (inference is the same without it), with a warning that training here has none."""
    import warnings
    hf = ModelConfig().to_hf()
    for value in (0.0, None):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ModelConfig.from_hf({**hf, "attention_dropout": value})
    with pytest.warns(UserWarning, match=r"attention_dropout=0.1; this Transformer has no dropout"):
        assert ModelConfig.from_hf({**hf, "attention_dropout": 0.1}) == ModelConfig.from_hf(hf)


def test_a_config_json_that_is_no_object_is_an_error():
    with pytest.raises(ValueError, match=r"^config.json holds a JSON list; it must be an object"):
        ModelConfig.from_hf([{"model_type": "llama"}])  # an AttributeError before


@pytest.mark.parametrize("change, message", [
    ({"tie_word_embeddings": "false"}, r"^tie_word_embeddings='false' is not allowed: true or "
                                       r"false$"),  # a truthy string would tie the embeddings
    ({"rope_theta": 0}, r"^rope_theta=0 is not allowed: a finite number > 0$"),  # not 10000
    ({"rms_norm_eps": "1e-5"}, r"^rms_norm_eps='1e-5' is not allowed"),  # YAML's 1e-5 is text
    ({"vocab_size": "97"}, r"^vocab_size='97' is not allowed: an integer >= 1$"),
    ({"num_key_value_heads": 0}, r"^num_key_value_heads=0 is not allowed: an integer >= 1$"),
    ({"head_dim": -8}, r"^head_dim=-8 is not allowed: an integer >= 0$"),
    ({"num_attention_heads": None}, r"^config.json lacks \['num_attention_heads'\]"),
    ({"model_type": "qwen2", "mlp_bias": True}, r"^mlp_bias=true is not allowed for model_type "
                                                r"'qwen2'"),
    ({"rope_scaling": "linear"}, r"^config.json's rope section is 'linear'; it must be an "
                                 r"object"),  # a bare ValueError from dict() before
    ({"rope_parameters": [["rope_type", "llama3"]]}, r"rope section is \[\['rope_type'"),
])
def test_config_values_of_the_wrong_kind_are_errors(change, message):
    hf = ModelConfig().to_hf()
    hf.update(change)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(hf)


def test_config_takes_numpy_values_as_plain_ones_and_needs_a_head_dim():
    import numpy as np
    cfg = ModelConfig(hidden_size=np.int64(64), rms_norm_eps=np.float32(1e-5),
                      tie_word_embeddings=np.True_)
    assert (cfg.hidden_size, cfg.head_dim, cfg.tie_word_embeddings) == (64, 16, True)
    assert type(cfg.hidden_size) is int and type(cfg.rms_norm_eps) is float
    assert type(cfg.tie_word_embeddings) is bool
    with pytest.raises(ValueError, match=r"^hidden_size=2 over num_attention_heads=4 leaves no "
                                         r"head_dim; set head_dim$"):
        ModelConfig(hidden_size=2, num_attention_heads=4, num_key_value_heads=4)


def test_config_styles_agree():
    classic = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
               "intermediate_size": 100, "num_hidden_layers": 2, "vocab_size": 10,
               "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    newer = dict(classic, rope_theta=None, rope_scaling=None,
                 rope_parameters=dict(classic["rope_scaling"], rope_theta=500000.0))
    a, b = ModelConfig.from_hf(classic), ModelConfig.from_hf(newer)
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling["factor"] == 32.0


def test_rope_values_at_two_places_must_agree():
    """rope_theta / original_max_position_embeddings both at the top of config.json and in its
    rope section: transformers versions read different ones, so a disagreement is an error (a
    silently different RoPE otherwise); agreeing values load."""
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "intermediate_size": 100, "num_hidden_layers": 2, "vocab_size": 10,
            "max_position_embeddings": 256}
    with pytest.raises(ValueError, match="rope_theta=500000.0 at its top level and 10000.0 in its "
                                         "rope section; they must agree"):
        ModelConfig.from_hf(dict(base, rope_theta=500000.0,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    for inner in (llama3, {k: v for k, v in llama3.items() if k != "original_max_position_embeddings"}):
        with pytest.raises(ValueError, match="original_max_position_embeddings=128 at its top level"):
            ModelConfig.from_hf(dict(base, original_max_position_embeddings=128, rope_scaling=inner))
    agree = ModelConfig.from_hf(dict(base, rope_theta=5e5, original_max_position_embeddings=64,
                                     rope_parameters=dict(llama3, rope_theta=5e5)))
    assert agree.rope_theta == 5e5 and agree.rope_scaling == llama3


def test_rope_scaling_wins_over_rope_parameters_as_in_transformers(tmp_path):
    """A config.json carrying both keys (one written by each transformers generation): the
    scaling and theta we read are the ones transformers' AutoConfig reads from the same file."""
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
          "intermediate_size": 100, "num_hidden_layers": 2, "vocab_size": 10,
          "max_position_embeddings": 256, "rope_scaling": scaling,
          "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    ref = transformers.AutoConfig.from_pretrained(str(tmp_path)).rope_parameters
    ours = ModelConfig.from_hf(hf)
    assert ours.rope_scaling == {k: v for k, v in ref.items() if k != "rope_theta"}
    assert ours.rope_theta == ref["rope_theta"]


def _tokenizer(chat_format, default_system=None):
    tk = build_char_tokenizer("abc").tk
    return Tokenizer(tk, [1], 0, chat_format=chat_format, default_system=default_system)


def test_chatml_format():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    tok = _tokenizer("chatml", default_system="You are Qwen.")
    assert tok.apply_chat(msgs) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                    "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat(msgs[1:], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n")


def test_llama3_format():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 2+2? "}]
    assert _tokenizer("llama3").apply_chat(msgs) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama31_format():
    """Llama-3.1 / 3.2: a system block with the cutoff and (fixed) date lines, always."""
    head = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
    user = "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
    reply = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    tok = _tokenizer("llama3.1")
    msgs = [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "2+2?"}]
    assert tok.apply_chat(msgs) == head + "Be brief.<|eot_id|>" + user + reply
    assert tok.apply_chat(msgs[1:], add_generation_prompt=False) == head + "<|eot_id|>" + user


def test_llama_template_version_is_recognised(tmp_path):
    build_char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))
    for template, fmt in [("{{ '<|start_header_id|>' }}", "llama3"),
                          ("{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
                           "{{ 'Cutting Knowledge Date: December 2023\\n' }}", "llama3.1")]:
        json.dump({"chat_template": template, "eos_token": "<eos>"},
                  open(tmp_path / "tokenizer_config.json", "w"))
        assert load_tokenizer(str(tmp_path)).chat_format == fmt


def test_raw_text_prompts_get_the_bos_the_tokenizer_adds():
    """A raw-text prompt is encoded as transformers' tokenizer(text) encodes it: a tokenizer
    whose post-processor adds <|begin_of_text|> (Llama-3's) starts the prompt with it; a chat
    prompt carries it once, from the chat format, not twice."""
    from tokenizers import processors
    tk = build_char_tokenizer("abc").tk
    tk.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>"])
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    tok = Tokenizer(tk, [1], 0, bos_id=bos, chat_format="llama3")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=tk)
    assert tok.prompt_ids("abca") == ref("abca").input_ids == [bos] + tok.encode("abca")
    chat = tok.prompt_ids([{"role": "user", "content": "ab"}])
    assert chat[0] == bos and chat.count(bos) == 1
    plain = _tokenizer(None)  # no post-processor (the from-scratch tokenizer): nothing added
    assert plain.prompt_ids("abca") == plain.encode("abca")


def test_raw_tokenizer_refuses_chat():
    with pytest.raises(ValueError, match="no chat format"):
        _tokenizer(None).apply_chat([{"role": "user", "content": "a"}])


@pytest.mark.parametrize("fmt", ["chatml", "llama3", "llama3.1"])
def test_no_chat_messages_is_a_clear_error(fmt):
    with pytest.raises(ValueError, match="no chat messages to render"):
        _tokenizer(fmt).apply_chat([])


def test_char_tokenizer_roundtrip(tmp_path):
    tok = build_char_tokenizer("0123456789,|=[]+-*#AH")
    text = "07,03,12|033=[007+003=010,010*012=120]10#23#03#H"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.decode([tok.eos_ids[0]]) == "<eos>"
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.encode(text) == ids and again.eos_ids == [1] and again.pad_id == 0


def test_load_tokenizer_reads_template_and_eos(tmp_path):
    build_char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))
    template = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a "
                "helpful AI assistant named SmolLM<|im_end|>\\n' }}{% endif %}")
    json.dump({"chat_template": template, "eos_token": "<eos>", "pad_token": {"content": "<pad>"}},
              open(tmp_path / "tokenizer_config.json", "w"))
    json.dump({"eos_token_id": [1, 0]}, open(tmp_path / "generation_config.json", "w"))
    tok = load_tokenizer(str(tmp_path))
    assert tok.chat_format == "chatml" and tok.eos_ids == [1, 0] and tok.pad_id == 0
    assert tok.default_system == "You are a helpful AI assistant named SmolLM"


def test_tokenizer_save_keeps_every_eos_and_reads_jinja_template(tmp_path):
    tok = build_char_tokenizer("abc")
    tok.eos_ids = [1, 2, 3]
    tok.save(str(tmp_path))
    os.remove(tmp_path / "tokenizer_config.json")
    (tmp_path / "chat_template.jinja").write_text("{{ '<|start_header_id|>' }}")
    again = load_tokenizer(str(tmp_path))
    assert again.eos_ids == [1, 2, 3] and again.chat_format == "llama3"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_by_hand_where_eps_matters(dtype):
    from model import RMSNorm
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.linspace(0.5, 2.0, 8)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 1e-3  # mean x^2 ~ eps
    x[2] = 0.0                                                                # no NaN from 0/0
    xd = x.double()
    want = norm.weight.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    got = norm.to(dtype)(x.to(dtype)).double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_config_without_kv_heads_is_full_multi_head_attention():
    """Transformers' default num_key_value_heads is num_attention_heads (no GQA), not our
    dataclass default of 4."""
    hf = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 8,
          "intermediate_size": 100, "num_hidden_layers": 2, "vocab_size": 10}
    assert ModelConfig.from_hf(hf).num_key_value_heads == 8


@pytest.mark.parametrize("name, change", [
    ("llama_gqa_tied", {"pretraining_tp": 2}),  # as Llama-2-13b's first config.json had it
    ("llama_gqa_tied", {"hidden_act": "swish"}),
    ("qwen2_gqa_tied", {"use_sliding_window": True, "sliding_window": 512, "layer_types": None}),
    ("qwen2_gqa_tied", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3,
                        "layer_types": None}),
    ("qwen2_gqa_tied", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0,
                        "layer_types": ["full_attention"] * 3}),
])
def test_configs_that_mean_the_plain_model_load_as_transformers_reads_them(name, change,
                                                                           tmp_path):
    """Settings that leave the computation as it is were refused: Llama 2's pretraining_tp (it
    only splits the linear layers' sums), 'swish' (SiLU's other name) and a Qwen2 sliding window
    that no layer uses or that spans the whole context (a layer_types of None: recomputed)."""
    make_hf_model(name).save_pretrained(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    hf_config.update(change)
    hf_config = {k: v for k, v in hf_config.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_pretrained(str(tmp_path), dtype="float32")
    ids = torch.randint(3, 97, (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids, torch.arange(60).expand(2, -1))
    assert (ref - got).abs().max().item() <= 1e-4


def test_qwen2_config_defaults_are_qwen2s():
    """A Qwen2 config.json without num_key_value_heads or max_position_embeddings means
    Qwen2Config's 32 KV heads and 32,768 positions (we gave Llama's: full heads and 2,048)."""
    hf = {"model_type": "qwen2", "hidden_size": 512, "num_attention_heads": 64,
          "intermediate_size": 100, "num_hidden_layers": 2, "vocab_size": 10}
    theirs = transformers.Qwen2Config(**hf)
    ours = ModelConfig.from_hf(hf)
    assert (ours.num_key_value_heads, ours.max_position_embeddings) == \
        (theirs.num_key_value_heads, theirs.max_position_embeddings) == (32, 32768)
    assert ModelConfig.from_hf({**hf, "num_key_value_heads": None}).num_key_value_heads == 64


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                          "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
])
def test_more_unsupported_config_is_an_error(change, message):
    """It would silently change the computation."""
    hf = ModelConfig().to_hf()
    hf.update(change)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("kw, message", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (dict(hidden_size=12, num_attention_heads=4), "must be even for RoPE"),
])
def test_config_shape_checks(kw, message):
    """Heads must group evenly onto kv heads; RoPE needs an even head_dim."""
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kw)


def test_attention_mask_by_hand():
    """Causal over valid keys, and every query sees at least itself (a padding query's
    row is never all-masked, which would be NaN in SDPA on some backends / torch versions)."""
    from model import attention_mask
    valid = torch.tensor([[True, True, True], [False, False, True]])
    m = attention_mask(valid, 3, 0)
    assert m.shape == (2, 1, 3, 3)
    assert m[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert m[1, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    # with an offset: 2 new queries at columns 3, 4 over 5 keys, column 1 padding
    valid = torch.tensor([[True, False, True, True, True]])
    assert attention_mask(valid, 2, 3)[0, 0].tolist() == [[True, False, True, True, False],
                                                          [True, False, True, True, True]]


def test_shared_prefix_cache_refuses_more_than_one_token_or_a_mask():
    """The shared-prefix decode cache has no padding columns and one slot per step."""
    from model import KVCache, SharedPrefixCache
    cfg = ModelConfig(num_hidden_layers=1)
    prefix = KVCache(cfg, batch=2, max_len=4)
    prefix.begin(4, None)
    prefix.advance(4)
    cache = SharedPrefixCache(prefix, n=2, max_new=3)
    assert cache.begin(1, None) is None
    with pytest.raises(ValueError, match="one token per row per step"):
        cache.begin(2, None)
    with pytest.raises(ValueError, match="one token per row per step"):
        cache.begin(1, torch.ones(4, 1, dtype=torch.bool))


def test_sharded_checkpoint_reads_only_the_index_shards(tmp_path):
    """With model.safetensors.index.json the shards are the index's, not every
    model*.safetensors in the directory (a stray file from an older save is ignored)."""
    model = Transformer(ModelConfig(tie_word_embeddings=False)).init_weights(0)
    save_pretrained(model, str(tmp_path))
    state = load_file(tmp_path / "model.safetensors")
    os.rename(tmp_path / "model.safetensors", tmp_path / "model-00001-of-00001.safetensors")
    json.dump({"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors"
                                              for k in state}},
              open(tmp_path / "model.safetensors.index.json", "w"))
    save_file({"model.stray.weight": torch.zeros(2)}, tmp_path / "model-old.safetensors")
    loaded = load_pretrained(str(tmp_path))
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)


def test_a_tied_head_stored_alone_with_another_shape_is_an_error_naming_it(tmp_path):
    """A tied embedding stored as lm_head.weight alone got no shape check: torch's RuntimeError
    for embed_tokens.weight."""
    save_pretrained(Transformer(ModelConfig(vocab_size=32)).init_weights(0), str(tmp_path))
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    save_file(state, tmp_path / "model.safetensors")
    assert load_pretrained(str(tmp_path)).config.vocab_size == 32  # stored so, it loads
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 40}))
    with pytest.raises(ValueError, match=r"tensor 'lm_head.weight' in model.safetensors has shape "
                                         r"\[32, 128\], but config.json makes it \[40, 128\] "
                                         r"\(vocab_size, hidden_size\)"):
        load_pretrained(str(tmp_path))


@pytest.mark.parametrize("index", [{"metadata": {}}, {"weight_map": {}}, [],
                                   {"weight_map": {"model.norm.weight": 3}}])
def test_an_index_without_a_weight_map_is_an_error_naming_it(tmp_path, index):
    """It was a bare KeyError: 'weight_map' (a traceback past train.py's error handling)."""
    save_pretrained(Transformer(ModelConfig()).init_weights(0), str(tmp_path))
    os.rename(tmp_path / "model.safetensors", tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json has no weight_map "
                                         r"\(tensor name -> shard file name\)"):
        load_pretrained(str(tmp_path))


@pytest.mark.parametrize("change, tensor, fields", [
    ({"head_dim": 16}, "model.layers.0.self_attn.k_proj.weight",  # the first in the file
     "num_key_value_heads x head_dim, hidden_size"),
    ({"num_attention_heads": 8, "head_dim": 32},
     "model.layers.0.self_attn.o_proj.weight", "hidden_size, num_attention_heads x head_dim"),
    ({"intermediate_size": 100}, "model.layers.0.mlp.down_proj.weight",
     "hidden_size, intermediate_size"),
    ({"vocab_size": 40}, "model.embed_tokens.weight", "vocab_size, hidden_size"),
    ({"model_type": "qwen2", "num_key_value_heads": 2}, "model.layers.0.self_attn.k_proj.bias",
     "num_key_value_heads x head_dim"),
])
def test_weights_of_another_shape_than_config_json_says_are_an_error_naming_them(
        tmp_path, change, tensor, fields):
    """They were torch's RuntimeError from load_state_dict, in our module names, with no word of
    config.json (and a traceback past train.py's and eval.py's error handling)."""
    model_type = change.get("model_type", "llama")
    save_pretrained(Transformer(ModelConfig(model_type=model_type)).init_weights(0),
                    str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(tensor)}' in model.safetensors has "
                                         rf"shape \[\d+(, \d+)?\], but config.json makes it "
                                         rf"\[\d+(, \d+)?\] \({fields}\): config.json and the "
                                         rf"weights do not belong together"):
        load_pretrained(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads fds' paths from /proc")
def test_atomic_write_makes_the_rename_durable(tmp_path, fsync_log):
    """The file's data is flushed before the rename and its directory after it: otherwise a
    crash of the machine can lose the rename (the old file, or none, comes back)."""
    from model import atomic_write_text
    log = fsync_log
    atomic_write_text(str(tmp_path / "a.json"), "{}")
    assert [event for event, _ in log] == ["fsync", "replace", "fsync"]
    assert log[1:] == [("replace", str(tmp_path / "a.json")), ("fsync", str(tmp_path))]


def test_atomic_write_removes_the_temp_files_of_killed_writers(tmp_path):
    """PATH.tmp.PID@HOST of a process of this host that no longer runs goes when PATH is written
    again (eval.py's report.md.tmp.PID stayed for ever), as does an older version's PATH.tmp.PID;
    a running writer's (here the parent), another host's and a file only named like one stay."""
    from model import atomic_write_text
    path, host = tmp_path / "report.md", socket.gethostname()
    dead, old = tmp_path / f"report.md.tmp.4194399@{host}", tmp_path / "report.md.tmp.4194398"
    alive = tmp_path / f"report.md.tmp.{os.getppid()}@{host}"
    elsewhere = tmp_path / "report.md.tmp.4194399@another-host"
    other = tmp_path / "report.md.tmp.draft"
    for leftover in (dead, old, alive, elsewhere, other):
        leftover.write_text("half")
    atomic_write_text(str(path), "whole")
    assert path.read_text() == "whole"
    assert not dead.exists() and not old.exists()
    assert alive.exists() and elsewhere.exists() and other.exists()


def test_a_writer_on_another_host_keeps_its_temp_file(tmp_path, monkeypatch):
    """Two machines writing into one shared directory: a PID of the other machine is no process
    here, so its temp file must not be taken for a killed writer's and removed mid-write."""
    import model
    path = tmp_path / "metrics.json"

    def write_from_host_a(f):  # while host A writes, host B (this process) writes the same path
        monkeypatch.setattr(socket, "gethostname", lambda: "host-b")
        monkeypatch.setattr(os, "getpid", real_getpid)
        model.atomic_write_text(str(path), "from B")
        f.write(b"from A")

    real_getpid = os.getpid
    monkeypatch.setattr(socket, "gethostname", lambda: "host-a")
    monkeypatch.setattr(os, "getpid", lambda: 4194399)  # A's PID: above Linux's largest
    model.atomic_write(str(path), write_from_host_a)
    assert path.read_text() == "from A"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_saved_config_states_the_weights_dtype(tmp_path):
    """Config.json's torch_dtype is what the safetensors hold, not the config's field."""
    model = Transformer(ModelConfig()).init_weights(0).to(torch.bfloat16)
    save_pretrained(model, str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16


def test_load_tokenizer_falls_back_to_config_json_eos_and_pads_with_eos(tmp_path):
    """No generation_config.json and no eos_token: config.json's eos_token_id; no
    pad_token: the first eos id pads."""
    build_char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))
    json.dump({"eos_token_id": [2, 1]}, open(tmp_path / "config.json", "w"))
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_ids == [2, 1] and tok.pad_id == 2


def test_load_tokenizer_reads_the_pad_id_of_generation_config_json(tmp_path):
    """No pad_token in tokenizer_config.json: generation_config.json's pad_token_id pads (then
    config.json's), not the first eos id; an id the tokenizer lacks is an error naming it."""
    build_char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))   # ids 0..4
    json.dump({"eos_token": "<eos>"}, open(tmp_path / "tokenizer_config.json", "w"))
    json.dump({"eos_token_id": 1, "pad_token_id": 3}, open(tmp_path / "config.json", "w"))
    assert load_tokenizer(str(tmp_path)).pad_id == 3
    json.dump({"pad_token_id": 4}, open(tmp_path / "generation_config.json", "w"))
    assert load_tokenizer(str(tmp_path)).pad_id == 4
    json.dump({"eos_token": "<eos>", "pad_token": "a"}, open(tmp_path / "tokenizer_config.json", "w"))
    assert load_tokenizer(str(tmp_path)).pad_id == 2          # pad_token named: it wins
    json.dump({"eos_token": "<eos>"}, open(tmp_path / "tokenizer_config.json", "w"))
    for bad in (5, -1, "3", True):
        json.dump({"pad_token_id": bad}, open(tmp_path / "generation_config.json", "w"))
        with pytest.raises(ValueError, match=re.escape(
                f"generation_config.json: pad_token_id={bad!r} is not a token id of this "
                f"tokenizer (0..4)")):
            load_tokenizer(str(tmp_path))


def test_load_tokenizer_puts_the_eos_token_first_and_reads_bos(tmp_path):
    """Tokenizer_config.json's eos_token leads the eos ids even when
    generation_config.json lists others first (Llama-3.1 instruct: <|eot_id|> last); its
    bos_token gives bos_id."""
    build_char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))
    json.dump({"eos_token": "<eos>", "bos_token": {"content": "a"}},
              open(tmp_path / "tokenizer_config.json", "w"))
    json.dump({"eos_token_id": [3, 4, 1]}, open(tmp_path / "generation_config.json", "w"))
    tok = load_tokenizer(str(tmp_path))
    assert tok.eos_ids == [1, 3, 4] and tok.pad_id == 1
    assert tok.bos_id == tok.token_id("a") and tok.bos_id is not None


def test_load_tokenizer_uses_the_default_of_named_templates(tmp_path):
    """A list of named chat templates: the one named "default"."""
    build_char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))
    json.dump({"eos_token": "<eos>", "chat_template": [
        {"name": "tool_use", "template": "{{ '<|start_header_id|>' }}"},
        {"name": "default", "template": "{{ '<|im_start|>' }}"}]},
        open(tmp_path / "tokenizer_config.json", "w"))
    assert load_tokenizer(str(tmp_path)).chat_format == "chatml"


def test_tokenizer_save_keeps_named_templates(tmp_path):
    """Named chat templates (Hermes-2-Pro's default + tool_use): the default one gives the
    format, and a save writes all of them back (the others were dropped), also over a
    directory holding a chat_template.jinja (which would otherwise win on reading)."""
    build_char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))
    named = [{"name": "default", "template": "{{ '<|im_start|>' }}"},
             {"name": "tool_use", "template": "{{ '<|start_header_id|>' }}"}]
    json.dump({"eos_token": "<eos>", "chat_template": named},
              open(tmp_path / "tokenizer_config.json", "w"))
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "chat_template.jinja").write_text("{{ '<|start_header_id|>' }}")
    load_tokenizer(str(tmp_path)).save(str(tmp_path / "saved"))
    assert json.load(open(tmp_path / "saved" / "tokenizer_config.json"))["chat_template"] == named
    assert load_tokenizer(str(tmp_path / "saved")).chat_format == "chatml"
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    msgs = [{"role": "user", "content": "a"}]
    assert ref.apply_chat_template(msgs, tokenize=False) == "<|im_start|>"
    assert ref.apply_chat_template(msgs, tokenize=False, chat_template="tool_use") == \
        "<|start_header_id|>"


def test_default_system_message_after_a_raw_newline(tmp_path):
    """SmolLM2's template has a raw newline after "system" (Qwen2.5's a "\\n" escape)."""
    build_char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))
    template = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
                "You are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}")
    json.dump({"chat_template": template, "eos_token": "<eos>"},
              open(tmp_path / "tokenizer_config.json", "w"))
    tok = load_tokenizer(str(tmp_path))
    assert tok.default_system == "You are a helpful AI assistant named SmolLM"


@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")  # jinja2's, on \{
@pytest.mark.parametrize("literal", [
    r"'<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n'",
    "\"<|im_start|>system\\nYou're a careful assistant.<|im_end|>\\n\"",
    r"'<|im_start|>system\nSay \'hi\' then\tgo.<|im_end|>\n'",
    r"'<|im_start|>system\nUse \{braces\} and \d, caf\u00e9 \x41.<|im_end|>\n'",  # kept, decoded
    "'<|im_start|>system\nCafé: raw text.<|im_end|>\n'",
    "'<|im_start|>system\r\nWindows\r\nline breaks.<|im_end|>\r\n'",  # Jinja reads them as \n
])
def test_default_system_message_reads_the_literal_as_jinja_renders_it(literal):
    """Jinja's escapes (\\ for one backslash, \' in single quotes) and double-quoted literals
    holding an apostrophe: the default system message is the text the template renders."""
    from model import _default_system_message
    jinja2 = pytest.importorskip("jinja2")
    template = "{%- if messages[0]['role'] != 'system' %}{{- " + literal + " }}{%- endif %}"
    rendered = jinja2.Environment().from_string(template).render(messages=[{"role": "user"}])
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_end|>\n")
    assert _default_system_message(template) == rendered[len("<|im_start|>system\n"):-len("<|im_end|>\n")]


def test_tokenizer_save_keeps_the_loaded_config_entries(tmp_path):
    """unk_token, tokenizer_class, model_max_length, the model's sampling defaults...: a
    checkpoint saved after RL keeps what transformers reads from tokenizer_config.json and
    generation_config.json (they were dropped)."""
    build_char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))
    conf = {"eos_token": {"content": "<eos>", "special": True}, "unk_token": "<pad>",
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192}
    json.dump(conf, open(tmp_path / "tokenizer_config.json", "w"))
    (tmp_path / "saved").mkdir()
    json.dump({"bos_token_id": 2, "eos_token_id": 1, "temperature": 0.6, "top_p": 0.9},
              open(tmp_path / "generation_config.json", "w"))
    load_tokenizer(str(tmp_path)).save(str(tmp_path / "saved"))
    saved = json.load(open(tmp_path / "saved" / "tokenizer_config.json"))
    assert saved == {**conf, "eos_token": "<eos>"}
    assert json.load(open(tmp_path / "saved" / "generation_config.json")) == {
        "bos_token_id": 2, "eos_token_id": [1], "temperature": 0.6, "top_p": 0.9, "pad_token_id": 1}


def test_an_unknown_chat_template_is_named_as_such(tmp_path):
    """A template in another markup (DeepSeek-R1-Distill's) is not 'no chat format'."""
    build_char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))
    json.dump({"chat_template": "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}"
                                "{% endfor %}", "eos_token": "<eos>"},
              open(tmp_path / "tokenizer_config.json", "w"))
    tok = load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="chat template is neither ChatML .* nor Llama-3"):
        tok.apply_chat([{"role": "user", "content": "a"}])


def test_default_system_message_in_plain_template_text():
    """Qwen2-VL writes it as template text between two tags, not in a string literal."""
    from model import _default_system_message
    jinja2 = pytest.importorskip("jinja2")
    template = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
                "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}")
    rendered = jinja2.Environment().from_string(template).render(
        messages=[{"role": "user", "content": "hi"}])
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert _default_system_message(template) == "You are a helpful assistant."


def test_tokenizer_save_keeps_a_chat_format_without_template(tmp_path):
    """A tokenizer whose chat format has no template text still loads with that format."""
    tok = build_char_tokenizer("abc")
    tok.chat_format = "llama3.1"
    tok.save(str(tmp_path))
    assert load_tokenizer(str(tmp_path)).chat_format == "llama3.1"


def test_every_saved_file_arrives_by_rename(tmp_path, monkeypatch):
    """DESIGN: files are written atomically (temp file, then rename), tokenizer.json included."""
    renamed, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(dst), replace(src, dst)))
    tok = build_char_tokenizer("abc")
    save_pretrained(Transformer(ModelConfig()).init_weights(0), str(tmp_path), tok)
    assert "tokenizer.json" in os.listdir(tmp_path)
    assert sorted(os.path.basename(p) for p in renamed) == sorted(os.listdir(tmp_path))
    assert load_tokenizer(str(tmp_path)).encode("cab") == tok.encode("cab")


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    from model import atomic_write
    path = tmp_path / "config.json"
    path.write_text("old")

    def write(f):
        f.write(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), write)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_saving_over_a_sharded_checkpoint_replaces_it(tmp_path):
    """Saving into a directory that holds a sharded HF checkpoint: both our loader and
    transformers must then load what was saved, and the old index and shards are gone."""
    hf = make_hf_model("llama_untied_headdim", seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len([n for n in os.listdir(tmp_path) if n.startswith("model-")]) > 1
    new = load_pretrained(str(tmp_path)).init_weights(seed=5, std=0.15)
    save_pretrained(new, str(tmp_path))
    assert [n for n in os.listdir(tmp_path) if n.startswith("model")] == ["model.safetensors"]
    ours = load_pretrained(str(tmp_path))
    for name, t in new.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ids = torch.randint(3, 97, (1, 30))
    with torch.no_grad():
        want = new(ids, torch.arange(30)[None])
        assert (theirs(ids).logits - want).abs().max().item() <= 1e-4
        assert (hf(ids).logits - want).abs().max().item() > 1e-1  # the old model is not loaded


def test_a_single_file_next_to_an_index_is_an_error(tmp_path):
    """Our loader would read the index's shards, transformers model.safetensors."""
    save_pretrained(Transformer(ModelConfig()).init_weights(0), str(tmp_path))
    os.link(tmp_path / "model.safetensors", tmp_path / "model-00001-of-00001.safetensors")
    json.dump({"metadata": {}, "weight_map": {"model.norm.weight":
                                              "model-00001-of-00001.safetensors"}},
              open(tmp_path / "model.safetensors.index.json", "w"))
    with pytest.raises(ValueError, match="both model.safetensors and model.safetensors.index"):
        load_pretrained(str(tmp_path))


def test_a_tensor_stored_in_two_files_is_an_error(tmp_path):
    """Without an index every model*.safetensors is read: two copies of one tensor are
    ambiguous (which one is meant?), not the later file's silently."""
    save_pretrained(Transformer(ModelConfig()).init_weights(0), str(tmp_path))
    save_file({"model.norm.weight": torch.zeros(128)}, tmp_path / "model-old.safetensors")
    with pytest.raises(ValueError) as e:
        load_pretrained(str(tmp_path))
    for part in ["'model.norm.weight'", "model-old.safetensors", "and in model.safetensors"]:
        assert part in str(e.value)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("key", ["factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings"])
def test_llama3_rope_scaling_without_a_key_is_a_config_error(key):
    hf = dict(ModelConfig().to_hf(), rope_scaling={k: v for k, v in LLAMA3_ROPE.items()
                                                   if k != key})
    with pytest.raises(ValueError, match=f"lacks \\['{key}'\\]"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_null_kv_heads_means_one_kv_head_per_attention_head_as_in_transformers(family):
    hf = {"model_type": family, "hidden_size": 64, "num_attention_heads": 8,
          "num_key_value_heads": None, "intermediate_size": 100, "num_hidden_layers": 2,
          "vocab_size": 10}
    ref = transformers.AutoConfig.for_model(**hf)
    assert ModelConfig.from_hf(hf).num_key_value_heads == ref.num_key_value_heads == 8


def test_an_unknown_dtype_name_is_an_error(tmp_path):
    save_pretrained(Transformer(ModelConfig()).init_weights(0), str(tmp_path))
    with pytest.raises(ValueError, match=r"dtype 'fp16' is not supported; allowed: \['bfloat16', "
                                         r"'float16', 'float32'\]"):
        load_pretrained(str(tmp_path), dtype="fp16")
    assert load_pretrained(str(tmp_path), dtype="float16").norm.weight.dtype == torch.float16


def test_weights_dtype_is_the_dtype_load_pretrained_gives(tmp_path):
    """The local cloud backend names its answers by weights_dtype: it must be what loads."""
    from model import weights_dtype
    save_pretrained(Transformer(ModelConfig()).init_weights(0), str(tmp_path))
    for dtype, expected in ((None, torch.float32), ("bfloat16", torch.bfloat16),
                            (torch.float16, torch.float16)):
        assert load_pretrained(str(tmp_path), dtype=dtype).norm.weight.dtype == \
            weights_dtype(dtype, "cpu") == expected
    assert weights_dtype(None, "cuda") == weights_dtype(None, torch.device("cuda:1")) == torch.bfloat16
    for bad in (torch.int8, torch.float8_e4m3fn, "fp32"):   # int8 failed inside load_state_dict
        with pytest.raises(ValueError, match=f"dtype {re.escape(repr(bad))} is not supported"):
            load_pretrained(str(tmp_path), dtype=bad)


def test_chat_template_jinja_wins_over_tokenizer_config_as_in_transformers(tmp_path):
    """A checkpoint holding both chat_template.jinja and a chat_template in tokenizer_config.json
    (an older one left behind): transformers renders the .jinja file's, so the format and the
    default system message come from that file."""
    build_char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))
    old = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nOld default.<|im_end|>"
           "\\n' }}{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + "
           "m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    new = old.replace("Old default.", "Nouveau défaut — bref.")
    json.dump({"chat_template": old, "eos_token": "<eos>"},
              open(tmp_path / "tokenizer_config.json", "w"))
    (tmp_path / "chat_template.jinja").write_bytes(new.encode("utf-8"))
    tok = load_tokenizer(str(tmp_path))
    assert tok.default_system == "Nouveau défaut — bref."
    transformers = pytest.importorskip("transformers")
    msgs = [{"role": "user", "content": "ab"}]
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat(msgs) == ref


def test_tokenizer_files_are_read_as_utf8_whatever_the_locale(tmp_path):
    """tokenizer_config.json and chat_template.jinja are UTF-8 (transformers writes non-ASCII
    unescaped); a machine whose locale encoding is ASCII (Python's, with locale coercion off)
    still reads them."""
    import subprocess
    import sys
    build_char_tokenizer("abc").tk.save(str(tmp_path / "tokenizer.json"))
    template = "{{ '<|im_start|>system\\nRéponds — brièvement.<|im_end|>\\n' }}"
    (tmp_path / "tokenizer_config.json").write_bytes(json.dumps(
        {"chat_template": template, "eos_token": "<eos>"}, ensure_ascii=False).encode("utf-8"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; from model import load_tokenizer; "
            f"sys.stdout.buffer.write(load_tokenizer({str(tmp_path)!r}).default_system.encode())")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0",
           "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, cwd=root)
    assert out.returncode == 0, out.stderr.decode()[-400:]
    assert out.stdout.decode("utf-8") == "Réponds — brièvement."


def test_tokenizer_saved_over_a_checkpoint_with_chat_template_jinja_keeps_its_own(tmp_path):
    """Saving over an HF directory that holds a chat_template.jinja: the saved tokenizer's
    template is what loads back (the old file, read first, would have replaced it)."""
    tok = build_char_tokenizer("abc")
    tok.special_tokens["chat_template"] = "{{ '<|start_header_id|>' }}"
    (tmp_path / "chat_template.jinja").write_text("{{ '<|im_start|>' }}")
    tok.save(str(tmp_path))
    assert load_tokenizer(str(tmp_path)).special_tokens["chat_template"] == "{{ '<|start_header_id|>' }}"
    plain = build_char_tokenizer("abc")  # no template: the old file goes
    (tmp_path / "chat_template.jinja").write_text("{{ '<|im_start|>' }}")
    plain.save(str(tmp_path))
    assert not (tmp_path / "chat_template.jinja").exists()
    assert load_tokenizer(str(tmp_path)).chat_format is None


@pytest.mark.parametrize("key", ["factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings"])
@pytest.mark.parametrize("value", [0, -2.0, float("nan"), float("inf"), "8", True])
def test_llama3_rope_scaling_values_must_be_positive_numbers(key, value):
    """0 divides the frequencies by zero (RoPE of inf / NaN), a negative value turns them round,
    text fails inside the arithmetic: each is a config error naming the key and the value."""
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
        ModelConfig(rope_scaling=dict(LLAMA3_ROPE, **{key: value}))
    ok = ModelConfig(rope_scaling=dict(LLAMA3_ROPE, **{key: 2}))  # integers are numbers too
    assert torch.isfinite(Transformer(ok).inv_freq).all()


def test_a_chatml_template_opening_with_bos_token_gets_it_as_in_transformers(tmp_path):
    """A ChatML template that writes {{bos_token}} before the messages (Hermes-2-Pro-Llama-3's,
    a Llama-3 model): the prompt starts with that BOS, as transformers renders it; one that
    writes none (Qwen2's, SmolLM2's) gets none, whatever bos_token the tokenizer names."""
    tk = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz\n ").tk
    tk.add_special_tokens(["<|begin_of_text|>", "<|im_start|>", "<|im_end|>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    hermes = ("{{bos_token}}{% for message in messages %}{{'<|im_start|>' + message['role'] + "
              "'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    for template in (hermes, hermes.replace("{{bos_token}}", "")):
        json.dump({"chat_template": template, "eos_token": "<|im_end|>",
                   "bos_token": "<|begin_of_text|>"}, open(tmp_path / "tokenizer_config.json", "w"))
        tok = load_tokenizer(str(tmp_path))
        ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text.startswith("<|begin_of_text|>") == (template == hermes)
        assert tok.apply_chat(msgs) == text
        assert tok.prompt_ids(msgs) == ref(text, add_special_tokens=False).input_ids
        os.makedirs(tmp_path / "saved", exist_ok=True)
        tok.save(str(tmp_path / "saved"))  # and so after a save
        assert load_tokenizer(str(tmp_path / "saved")).apply_chat(msgs) == text


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_line_fits_the_terminal_and_is_whole_in_a_log(monkeypatch):
    """status_line, the progress line of train.py, eval.py and cloud.py's prefill. A line wider
    than the terminal wraps, and \\r then overwrites only its last row: on a terminal (80
    columns here) the line is cut to 79 characters; a log file keeps it whole."""
    monkeypatch.setenv("COLUMNS", "80")
    text = "step 12/400 | " + "x" * 120
    for stream, shown in ((_Terminal(), text[:79]), (io.StringIO(), text)):
        monkeypatch.setattr(sys, "stdout", stream)
        status_line(text)
        assert stream.getvalue() == "\r" + shown
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    status_line("short")   # padded, so it hides the tail of a longer line before it
    assert terminal.getvalue() == "\r" + "short".ljust(79)
    stderr = _Terminal()   # the stream named (eval and cloud write to stderr), not stdout
    status_line(text, stderr)
    assert stderr.getvalue() == "\r" + text[:79] and terminal.getvalue().count("\r") == 1
