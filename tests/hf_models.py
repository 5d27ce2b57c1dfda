"""Small random transformers models for parity tests (transformers is a dev dependency)."""
import torch

FAMILIES = {
    # name: (family, extra config) -- together they cover GQA, Qwen2 qkv bias, tied/untied
    # embeddings, llama3 rope scaling and head_dim != hidden / heads
    "llama_gqa_tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_untied_headdim": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False,
                                           head_dim=24)),
    "llama3_rope": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 32})),
    "llama_attn_bias": ("llama", dict(num_key_value_heads=1, attention_bias=True)),
    "qwen2_gqa_tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_untied": ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=False)),
}


def make_hf_model(name: str, seed: int = 0, vocab_size: int = 97):
    import transformers
    family, extra = FAMILIES[name]
    extra = dict(extra)
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=112,
                num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=512,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    rope = extra.pop("rope_scaling", None)
    if family == "llama":
        cfg = transformers.LlamaConfig(**base, **extra, rope_theta=10000.0, rope_scaling=rope)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(**base, **extra, rope_theta=10000.0)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # larger weights than HF's 0.02 init so greedy argmaxes are not ties
        for name_, p in model.named_parameters():
            if "norm" not in name_:
                p.copy_(torch.randn_like(p) * 0.15)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model
