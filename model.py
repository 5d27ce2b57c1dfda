"""The on-device model: a Llama / Qwen2 family transformer written out by hand.

One file, read top to bottom: the config (HF config.json fields), the layers (RMSNorm, RoPE in
HF's rotate-half convention with llama3 scaling, grouped-query attention through SDPA, SwiGLU),
the static KV cache the sampler fills, checkpoint load/save in the HF layout (safetensors, no
`transformers` needed) with the file helpers the scripts share (atomic writes, JSON and config
YAML reading), and the tokenizer with hand-written chat formats (ChatML, Llama-3).
Module names equal HF's parameter names minus the leading "model.", so checkpoints map 1:1.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import numbers
import os
import re
import shutil
import socket
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

# ----------------------------------------------------------------------------- config

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# ModelConfig's integer fields that must be >= 1; config.json must give the first five
POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")


def qwen2_sliding_layers(hf: dict) -> list[int]:
    """The layers that transformers' Qwen2 makes attend within a sliding window narrower than
    the context: `layer_types` if config.json gives it, else, with use_sliding_window on, layers
    max_window_layers.. (defaults as Qwen2Config's). A window of max_position_embeddings or more
    hides nothing: no layer then."""
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    if window is None or window >= hf.get("max_position_embeddings", 32768):
        return []
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(hf.get("num_hidden_layers") or 0)]
    return [i for i, kind in enumerate(types) if kind != "full_attention"]


@dataclass
class ModelConfig:
    """The fields of an HF Llama / Qwen2 config.json that change the computation, and the
    special token ids and dtype it records (written back by to_hf)."""
    model_type: str = "llama"  # "llama" or "qwen2"
    vocab_size: int = 32
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3", "factor", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Llama: bias on q, k, v and o. Qwen2 always has q/k/v bias.
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; allowed: "
                             f"{sorted(ARCHITECTURES)}")
        # a config.json's value of the wrong kind is an error here, not a silently other model
        # (the string "false" would tie the embeddings; 0 heads would divide by zero below)
        for name in POSITIVE_INTS + ("head_dim",):
            value, least = getattr(self, name), 0 if name == "head_dim" else 1
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name}={value!r} is not allowed: an integer >= {least}")
            setattr(self, name, int(value))
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not 0 < value < math.inf:
                raise ValueError(f"{name}={value!r} is not allowed: a finite number > 0")
            setattr(self, name, float(value))
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if getattr(self, name) not in (True, False):  # NumPy's bools too, not "false"
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: true or false")
            setattr(self, name, bool(getattr(self, name)))
        if self.model_type == "qwen2" and self.mlp_bias:
            raise ValueError("mlp_bias=true is not allowed for model_type 'qwen2' (Qwen2's MLP "
                             "has no bias)")
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim == 0:
                raise ValueError(f"hidden_size={self.hidden_size} over num_attention_heads="
                                 f"{self.num_attention_heads} leaves no head_dim; set head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        rope_type = (self.rope_scaling or {}).get("rope_type",
                                                  (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope scaling type {rope_type!r} is not supported; allowed: "
                             "none/'default', 'llama3'")
        if rope_type == "default":
            self.rope_scaling = None
        elif missing := [k for k in LLAMA3_ROPE_KEYS if self.rope_scaling.get(k) is None]:
            raise ValueError(f"llama3 rope scaling lacks {missing}; it needs all of "
                             f"{list(LLAMA3_ROPE_KEYS)}")
        else:  # 0 or less gives infinite / negative frequencies (a model of NaNs), text a TypeError
            for k in LLAMA3_ROPE_KEYS:
                value = self.rope_scaling[k]
                if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                        or not 0 < value < math.inf:
                    raise ValueError(f"llama3 rope scaling {k}={value!r} is not allowed: a "
                                     f"finite number > 0")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Parse an HF config.json dict, classic (rope_theta / rope_scaling) or newer
        (rope_parameters) style. Anything that would silently change the model is an error."""
        if not isinstance(hf, dict):
            raise ValueError(f"config.json holds a JSON {type(hf).__name__}; it must be an object "
                             f"of the model's settings")
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture: model_type={model_type!r}, architectures="
                             f"{hf.get('architectures')}; supported: {sorted(ARCHITECTURES)}")
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers: swish = SiLU
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; allowed: 'silu' "
                             f"(or its other name, 'swish')")
        if model_type == "qwen2" and (sliding := qwen2_sliding_layers(hf)):
            raise ValueError(f"Qwen2 sliding-window attention is not supported: config.json makes "
                             f"layers {sliding} attend within sliding_window="
                             f"{hf.get('sliding_window', 4096)} tokens, under "
                             f"max_position_embeddings={hf.get('max_position_embeddings', 32768)}; "
                             f"those layers would see more context here than they were trained on")
        # pretraining_tp (Llama 2's tensor-parallel slicing of its linear layers) only reorders
        # the sums: the outputs are the same, so it is passed over, as transformers 5 does.
        # With both keys, transformers reads rope_scaling and ignores rope_parameters: so do we
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"config.json's rope section is {rope!r}; it must be an object "
                             f"such as {{\"rope_type\": \"llama3\", \"factor\": 8.0, ...}}")
        rope = dict(rope)
        # a default or llama3 section with another key (the per-layer-type form
        # {"full_attention": {...}}, say) would be read as plain RoPE, silently another model;
        # other types are refused by their type
        unknown = [k for k in rope if k not in LLAMA3_ROPE_KEYS + (
            "rope_type", "type", "rope_theta", "partial_rotary_factor")]
        if unknown and rope.get("rope_type", rope.get("type", "default")) in ("default", "llama3"):
            raise ValueError(f"config.json's rope section {rope} has entries we cannot read: "
                             f"{unknown}; allowed: rope_type, rope_theta and llama3's "
                             f"{', '.join(LLAMA3_ROPE_KEYS)}")
        # a value given both at the top and in the rope section: transformers versions differ on
        # which one they read, so two different values are an error, not a guess
        top_theta, theta = hf.get("rope_theta"), rope.pop("rope_theta", None)
        if top_theta is not None and theta is not None and top_theta != theta:
            raise ValueError(f"config.json gives rope_theta={top_theta} at its top level and "
                             f"{theta} in its rope section; they must agree")
        theta = theta if theta is not None else top_theta if top_theta is not None else 10000.0
        top_len, length = hf.get("original_max_position_embeddings"), rope.get(
            "original_max_position_embeddings")
        if top_len is not None and top_len != length and \
                rope.get("rope_type", rope.get("type")) == "llama3":
            raise ValueError(f"config.json gives original_max_position_embeddings={top_len} at its "
                             f"top level and {'none' if length is None else length} in its llama3 "
                             f"rope section; transformers versions read one or the other: give "
                             f"the same value in both")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        rope.pop("partial_rotary_factor", None)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        if hf.get("attention_dropout"):  # Llama and Qwen2 releases set 0.0
            warnings.warn(f"config.json sets attention_dropout={hf['attention_dropout']}; this "
                          f"Transformer has no dropout, so training here does not apply it "
                          f"(inference, where dropout is off, is unchanged)", stacklevel=2)
        missing = [k for k in POSITIVE_INTS[:5] if hf.get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks {missing}: a {model_type} config needs them")
        kw = {f.name: hf[f.name] for f in fields(cls)
              if f.name in hf and f.name not in ("rope_theta", "rope_scaling", "head_dim")}
        # transformers' defaults: Qwen2Config's are 32 KV heads and a 32,768-token context;
        # a null num_key_value_heads, and an absent one for Llama, means no GQA
        qwen2 = model_type == "qwen2"
        if kw.get("num_key_value_heads") is None:
            absent = "num_key_value_heads" not in hf
            kw["num_key_value_heads"] = 32 if qwen2 and absent else hf["num_attention_heads"]
        kw.setdefault("max_position_embeddings", 32768 if qwen2 else 2048)
        kw.setdefault("tie_word_embeddings", False)  # transformers' default for both families
        kw["torch_dtype"] = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
        return cls(**kw, head_dim=hf.get("head_dim") or 0, rope_theta=theta,
                   rope_scaling=rope if rope.get("rope_type", "default") != "default" else None)

    def to_hf(self) -> dict:
        """The classic Hub-style config.json that both our loader and transformers read."""
        d = asdict(self)
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        d["hidden_act"] = "silu"
        d["use_cache"] = True
        if self.model_type == "qwen2":
            del d["attention_bias"], d["mlp_bias"]
            d.update(use_sliding_window=False, sliding_window=None,
                     max_window_layers=self.num_hidden_layers)
        return d


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32:
            # the lines below in fewer passes over x: mean(x^2) = |x|^2 / d, from one reduction
            # (the fp32 decode step is bound by the number of kernels; F.rms_norm runs 7 on CPU)
            ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]
            return x * torch.rsqrt(ms + self.eps) * self.weight
        # normalise in fp32, round, then scale in the input dtype (as HF does, for parity)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama-3's wavelength-dependent scaling if set."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    mid = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(mid, smoothed, scaled)


def rope_cos_sin(inv_freq, positions, dtype):
    """RoPE tables [B, 1, T, head_dim] for explicit integer positions [B, T] (the 1 broadcasts
    over heads): cos, and sin with its first half negated, as apply_rope uses them."""
    freqs = positions.float()[:, None, :, None] * inv_freq
    return (torch.cat([freqs, freqs], dim=-1).cos().to(dtype),
            torch.cat([-freqs, freqs], dim=-1).sin().to(dtype))


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x [B, H, T, D] (HF convention: pairs (i, i + D/2)):
    x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]. Rolling x by D/2 gives
    [x2, x1]; the minus sign is folded into the first half of `sin` (sin(-f) = -sin(f))."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def attention_mask(key_valid, T: int, offset: int):
    """Boolean SDPA mask [B, 1, T, offset+T]: query t (at column offset+t) sees valid keys at
    columns <= its own. Each query also sees itself, so padding queries never get an all-masked
    row (which would make NaNs); their outputs are never used."""
    L = offset + T
    q_col = torch.arange(offset, L, device=key_valid.device)[:, None]
    k_col = torch.arange(L, device=key_valid.device)[None, :]
    mask = (k_col <= q_col) & key_valid[:, None, :L]
    return (mask | (k_col == q_col))[:, None]


class KVCache:
    """Static key/value buffers [layers, B, kv_heads, max_len, head_dim], allocated once.

    Every row writes its next tokens into the same columns (prompts are left-padded), so a
    forward of T tokens fills one column slice. `valid` [B, max_len] marks real (non-padding)
    slots; `pos` is the next column (a Python int, so no host sync).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=None):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, device=device, dtype=torch.bool)
        self.pos = 0

    def begin(self, T: int, attn_mask):
        """Mark the T incoming columns valid (or as attn_mask says); return the SDPA mask."""
        self.valid[:, self.pos:self.pos + T] = True if attn_mask is None else attn_mask
        return attention_mask(self.valid, T, self.pos)

    def attend(self, layer: int, q, k, v, mask):
        T = q.shape[2]
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.pos + T
        return F.scaled_dot_product_attention(q, self.k[layer, :, :, :end],
                                              self.v[layer, :, :, :end], attn_mask=mask,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def advance(self, T: int):
        self.pos += T


class SharedPrefixCache:
    """Decode-time cache for n samples of each of P prompts (rows prompt-major, R = P*n).

    The prompts' keys/values stay in the prefill's KVCache, ONE row per prompt; each sample
    stores only its own generated tokens, in a static [layers, P, kv_heads, n, max_new, head_dim]
    buffer laid out like the grouped queries below. Attention scores against the shared prefix
    are one matmul per (prompt, kv head) over all its n samples and grouped query heads, so the
    prompt's cache is read once per step instead of n * (heads / kv_heads) times.
    """

    def __init__(self, prefix: KVCache, n: int, max_new: int):
        L, P, Hkv, _, D = prefix.k.shape
        Lp = prefix.pos
        self.n, self.pos = n, 0
        # never zero-filled: attend() reads only the columns already written (:pos + 1)
        self.k = prefix.k.new_empty(L, P, Hkv, n, max_new, D)
        self.v = prefix.v.new_empty(L, P, Hkv, n, max_new, D)
        # each layer's prompt keys (transposed) and values as one batch of P*Hkv matrices, and
        # its generated keys/values as one batch of P*Hkv*n: views made once (the prompt's are
        # views when the prefill's cache is exactly Lp long, as generate() makes it), since the
        # decode step is bound by the number of operator calls and each indexing is one or more
        self.prefix_kt = [prefix.k[i, :, :, :Lp].reshape(P * Hkv, Lp, D).transpose(1, 2)
                          for i in range(L)]
        self.prefix_v = [prefix.v[i, :, :, :Lp].reshape(P * Hkv, Lp, D) for i in range(L)]
        self.gen_k, self.gen_v = (list(c.view(L, P * Hkv * n, max_new, D))
                                  for c in (self.k, self.v))
        # additive bias hiding the prompts' left padding, one row per (prompt, kv head): [P*Hkv, 1, Lp]
        hidden = ~prefix.valid[:, :Lp].repeat_interleave(Hkv, dim=0)[:, None]
        self.prefix_bias = prefix.k.new_zeros(hidden.shape).masked_fill_(hidden, float("-inf"))

    def begin(self, T: int, attn_mask):
        if T != 1 or attn_mask is not None:
            raise ValueError("SharedPrefixCache decodes one token per row per step, no padding")
        return None

    def store(self, layer: int, k, v):
        """This step's keys/values [P, Hkv, n, D] into column pos of each sample's buffer."""
        self.gen_k[layer].select(1, self.pos).view(k.shape).copy_(k)
        self.gen_v[layer].select(1, self.pos).view(v.shape).copy_(v)

    def columns(self):
        """-> (generated columns the step attends to, additive bias on their scores or None)."""
        return self.pos + 1, None

    def attend(self, layer: int, q, k, v, mask):
        R, H, _, D = q.shape
        P, Hkv, n, Lp = self.k.shape[1], self.k.shape[2], self.n, self.prefix_v[0].shape[1]
        r = H // Hkv
        # rows are (prompt, sample) and heads are (kv head, group member): regroup the queries
        # to [P, Hkv, n, r, D], scaled by 1/sqrt(D) as SDPA would, in one pass
        qg = q.new_empty(P, Hkv, n, r, D)
        torch.mul(q.view(P, n, Hkv, r, D).transpose(1, 2), D ** -0.5, out=qg)
        self.store(layer, *(x.view(P, n, Hkv, D).transpose(1, 2) for x in (k, v)))
        t1, gen_bias = self.columns()
        ks, vs = self.gen_k[layer][:, :t1], self.gen_v[layer][:, :t1]
        s_pre = torch.baddbmm(self.prefix_bias, qg.view(P * Hkv, n * r, D), self.prefix_kt[layer])
        s_gen = torch.bmm(qg.view(-1, r, D), ks.transpose(1, 2))   # [P*Hkv*n, r, t1]
        if gen_bias is not None:
            s_gen += gen_bias
        p = torch.cat([s_pre, s_gen.view(P * Hkv, n * r, t1)], dim=-1)
        p = torch.softmax(p, -1, dtype=torch.float32).to(p.dtype)  # (a bf16 step's in fp32)
        y_gen = torch.bmm(p[..., Lp:].view(-1, r, t1), vs).view(P * Hkv, n * r, D)
        y = torch.baddbmm(y_gen, p[..., :Lp], self.prefix_v[layer])  # + the prompt's share
        return y.view(P, Hkv, n, r, D).transpose(1, 2).reshape(R, H, 1, D)

    def advance(self, T: int):
        self.pos += T


class StaticPrefixCache(SharedPrefixCache):
    """A SharedPrefixCache whose decode step has the same shapes and tensor addresses at every
    step, so that one recorded CUDA graph can replay it (sample.DecodeGraphs). The step's column
    is the device tensor `col`, set by the caller before each step (advance() leaves it), and
    the step attends to a fixed `span` of generated columns, those after `col` hidden by an
    additive -inf bias. The buffers start zeroed: a hidden column is then 0, never stale memory
    that could hold NaN (0 * NaN in the value product is NaN)."""

    def __init__(self, prefix: KVCache, n: int, max_new: int):
        super().__init__(prefix, n, max_new)
        self.k.zero_()
        self.v.zero_()
        self.col = torch.zeros((), dtype=torch.long, device=self.k.device)
        self.span = max_new  # columns attended; the caller may set fewer (at least col + 1)

    def begin(self, T: int, attn_mask):
        super().begin(T, attn_mask)
        hidden = torch.arange(self.span, device=self.col.device) > self.col
        self.gen_bias = self.k.new_zeros(self.span).masked_fill_(hidden, float("-inf"))
        return None

    def store(self, layer: int, k, v):
        index = self.col.view(1)
        # (cast as slice assignment would: under autocast an fp32 model's k, v are bf16)
        self.k[layer].index_copy_(3, index, k[:, :, :, None].to(self.k.dtype))
        self.v[layer].index_copy_(3, index, v[:, :, :, None].to(self.v.dtype))

    def columns(self):
        return self.span, self.gen_bias

    def advance(self, T: int):
        pass


class Linear(nn.Linear):
    """nn.Linear that, while `packed` holds a copy of its weight in oneDNN's blocked layout
    (sample.pack_weights sets it for the length of a CPU generate call), multiplies through that
    copy. Gradient-enabled calls always use the weight itself: the copy has no backward, and the
    weight it was made from may have changed since."""
    packed = None

    def forward(self, x):
        if self.packed is None or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                  cfg.head_dim)
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # store this chunk's keys/values, attend to everything so far
            y = cache.attend(layer, q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj = Linear(h, i, bias=b), Linear(h, i, bias=b)
        self.down_proj = Linear(i, h, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # fp32 RoPE frequencies, deliberately not a buffer so model.to(bf16) cannot round them
        self.inv_freq = rope_inv_freq(cfg)
        self.gradient_checkpointing = False  # recompute each block in backward (saves memory)

    def forward(self, tokens, positions, attn_mask=None, cache=None, logits_from: int = 0,
                out=None):
        """tokens, positions: [B, T] ints. attn_mask: [B, T] bool, False for padding tokens.
        With a cache, the T tokens are written at columns cache.pos.. and attend to all earlier
        valid columns; cache.pos then advances (a StaticPrefixCache writes at the column its
        caller set in cache.col instead). Returns logits [B, T - logits_from, V] ([B, 1, V] for
        -1: the last only): the vocabulary projection is skipped for positions before logits_from.
        out: a preallocated logits tensor to write them into (the sampler's static buffer: a
        fresh [B, V] tensor every decode step is cold memory, page faults included, on CPU)."""
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        if self.inv_freq.device != tokens.device:
            self.inv_freq = self.inv_freq.to(tokens.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        if cache is not None:
            mask = cache.begin(T, attn_mask)
        elif attn_mask is not None:
            mask = attention_mask(attn_mask, T, 0)
        else:
            mask = None  # plain causal attention over a batch without padding
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, i,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        h = self.norm(x[:, logits_from:])
        if out is None:
            return self.lm_head(h)
        return torch.matmul(h, self.lm_head.weight.t(), out=out)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Random initialisation for models trained from scratch (normal(0, std), norms at 1)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self


# ----------------------------------------------------------------------------- checkpoints

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there, not ask: assume it runs
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def temp_path(path: str) -> str:
    """PATH.tmp.PID@HOST: where this process writes PATH before renaming it into place. The
    host is part of the name because a shared file system (a cluster's home directory) is seen
    by processes of other machines, whose PIDs mean nothing here."""
    return f"{path}.tmp.{os.getpid()}@{socket.gethostname()}"


def remove_dead_temps(pattern: str) -> None:
    """Remove the temp_path() files or directories matching PATTERN.tmp.* (a glob: escape the
    literal parts) whose writer was killed: a process of this host that no longer runs. A live
    writer's stay, and so does another host's, whose liveness cannot be checked from here (a
    name without a host is an older version's, of this host)."""
    for partial in glob.glob(pattern + ".tmp.*"):
        pid, _, host = partial.rsplit(".tmp.", 1)[1].partition("@")
        if pid.isdigit() and host in ("", socket.gethostname()) and not process_alive(int(pid)):
            if os.path.isdir(partial):
                shutil.rmtree(partial, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(partial)


def fsync_dir(path: str):
    """fsync the directory `path`, so that a rename into it (or a file made in it) survives a
    crash of the machine, not just of the process. Where a directory cannot be opened (Windows)
    or fsynced (some network filesystems), nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write):
    """Write through a temp file in the same directory (temp_path), fsync, rename, fsync the
    directory: never a torn file. The temp files of writers of `path` killed meanwhile go first."""
    remove_dead_temps(glob.escape(path))
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a failed write leaves the old file as it was, and no temp file
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            reraise_naming(e, path)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def reraise_naming(e: OSError, path):
    """Raise `e` again, naming the file it concerns: a failed write() or fsync() (e.g. a full
    disk) names none, so one-line reports of it would not say which file could not be written.
    Call it while handling `e`."""
    if e.filename is None and e.errno is not None:
        raise OSError(e.errno, e.strerror, str(path)) from e
    raise e


def atomic_write_text(path: str, text: str):
    atomic_write(path, lambda f: f.write(text.encode()))


def check_writable(path, name):
    """A ValueError now, before long work, if directory `path` (created later if missing)
    cannot take new files: it, or its nearest existing parent, must be a directory we can write.
    `name` says what the path is (an option or a config key)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{name} {path!r} cannot be written: {existing} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"{name} {path!r} cannot be written: no new file can be made in "
                         f"{existing} ({e.strerror})") from e


class ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load's loader for train.py's config files and the runs' config.yaml (train.py
    and eval.py read them alike), but a key given twice in one mapping is an error: YAML keeps
    the last one silently (`rl: {steps: 2}` then `rl: {lr: 0.1}` would lose steps)."""


def _unique_mapping(loader, node, deep=False):
    named = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]  # not "<<: *base"
    keys = [loader.construct_object(k, deep=True) for k in named]
    for i, key in enumerate(keys):
        if key in keys[:i]:  # the mark: where it is given the second time
            raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                    named[i].start_mark)
    return loader.construct_mapping(node, deep)


ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


class ConfigDumper(yaml.SafeDumper):
    """yaml.safe_dump's dumper, quoting text that ConfigLoader reads as a number ('1e5')."""


# PyYAML (YAML 1.1) reads 1e-3 and 2.5e3 (no point, or no exponent sign) as text, so a file's
# `cloud: {p_correct: 1e-1}` would reach the backend as '1e-1' while the same command-line
# override is a number: ConfigLoader reads them as numbers, and ConfigDumper quotes such text
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
for _cls in (ConfigLoader, ConfigDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


def read_json(path: str):
    """A JSON file's contents; a file that is not valid JSON is a ValueError naming it."""
    with open(path, encoding="utf-8") as f:  # what HF writes, whatever this machine's locale
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def status_line(text: str, stream=None):
    """Overwrite the console's progress line on `stream` (default stdout) with text. On a
    terminal the line is cut to its width, since a line that wraps can no longer be overwritten
    by \\r; written to a log file it is kept whole."""
    stream = sys.stdout if stream is None else stream
    tty = stream.isatty()
    width = shutil.get_terminal_size().columns - 1 if tty else 99
    print("\r" + (text[:width] if tty else text).ljust(width), end="", file=stream, flush=True)


def resolve_device(device=None, name: str = "--device") -> torch.device:
    """The --device option of eval.py and bench.py (or the setting `name`): cpu, cuda or cuda:N
    (N below the number of visible GPUs); None: cuda when available, else cpu. Anything else is
    a ValueError naming what this machine allows."""
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is None:
        return torch.device("cuda" if n_gpu else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        d = None
    if d is not None and (d.type == "cpu" or (d.type == "cuda" and (d.index or 0) < n_gpu)):
        return d
    allowed = (f"cpu, cuda or cuda:N with N in 0..{n_gpu - 1}" if n_gpu else
               "cpu (no CUDA device is available here)")
    raise ValueError(f"{name}={device!r} is not allowed; use {allowed}")


def _hf_name(ours: str) -> str:
    return ours if ours.startswith("lm_head.") else "model." + ours


# tensor names that only quantised checkpoints have (FP8 scales, GPTQ/AWQ, bitsandbytes)
QUANTISED_TENSOR = re.compile(r"(weight_scale|weight_scale_inv|input_scale|qweight|qzeros|scales"
                              r"|g_idx|absmax|quant_map|quant_state\S*)$")


def check_shape(name: str, tensor, want, shard: str):
    """A ValueError naming the HF tensor `name` when its shape is not the `want` config.json
    gives it."""
    if tensor.shape != want:
        raise ValueError(f"tensor {name!r} in {shard} has shape {list(tensor.shape)}, but "
                         f"config.json makes it {list(want)} ({shape_fields(name)}): config.json "
                         f"and the weights do not belong together")


def shape_fields(name: str) -> str:
    """The config.json fields that set the shape of the HF tensor `name` (a weight's rows,
    columns; a bias has the rows only)."""
    *_, module, kind = name.split(".")
    q, kv = "num_attention_heads x head_dim", "num_key_value_heads x head_dim"
    rows_cols = {"embed_tokens": "vocab_size, hidden_size", "lm_head": "vocab_size, hidden_size",
                 "q_proj": f"{q}, hidden_size", "k_proj": f"{kv}, hidden_size",
                 "v_proj": f"{kv}, hidden_size", "o_proj": f"hidden_size, {q}",
                 "gate_proj": "intermediate_size, hidden_size",
                 "up_proj": "intermediate_size, hidden_size",
                 "down_proj": "hidden_size, intermediate_size"}.get(module, "hidden_size")
    return rows_cols.split(", ")[0] if kind == "bias" else rows_cols


def weights_dtype(dtype, device) -> torch.dtype:
    """The dtype load_pretrained gives the weights: `dtype` (a torch.dtype or a name in DTYPES),
    or by default bf16 on CUDA and fp32 elsewhere."""
    if not (dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point
                              and dtype.itemsize >= 2)
            or (isinstance(dtype, str) and dtype in DTYPES)):
        raise ValueError(f"dtype {dtype!r} is not supported; allowed: {sorted(DTYPES)} "
                         "or a floating-point torch.dtype of 16 bits or more")
    default = torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32
    return DTYPES.get(dtype, dtype) or default


def load_pretrained(path: str, dtype=None, device=None) -> Transformer:
    """Load an HF Llama/Qwen2 directory (config.json + model*.safetensors, sharded or not),
    strictly: a missing or unexpected tensor is an error that names it (as transformers does,
    an old save's rotary_emb.inv_freq buffers are passed over, and a tied embedding may be
    stored as lm_head.weight alone). dtype defaults to fp32 on CPU and bf16 on CUDA."""
    from safetensors import SafetensorError, safe_open
    cfg = ModelConfig.from_hf(read_json(os.path.join(path, "config.json")))
    device = torch.device(device or "cpu")
    dtype = weights_dtype(dtype, device)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index) and os.path.exists(os.path.join(path, "model.safetensors")):
        # we would read the index's shards, transformers model.safetensors: two different models
        raise ValueError(f"{path} holds both model.safetensors and model.safetensors.index.json "
                         "(a single-file and a sharded checkpoint); remove the stale one")
    if os.path.exists(index):
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(v, str) for v in weight_map.values())):
            raise ValueError(f"{index} has no weight_map (tensor name -> shard file name) to "
                             f"read the shards from")
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(n for n in os.listdir(path)
                        if n.startswith("model") and n.endswith(".safetensors"))
    if not shards:
        raise FileNotFoundError(f"no model*.safetensors in {path}")
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    expected = {_hf_name(n): n for n in shapes}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state, tied_head, source = {}, None, {}
    for shard in shards:
        try:
            with safe_open(os.path.join(path, shard), framework="pt") as f:
                for name in f.keys():
                    if name in source:  # which copy is meant? (e.g. a stray file of an old save)
                        raise ValueError(f"tensor {name!r} is stored twice in {path}: in "
                                         f"{source[name]} and in {shard}; remove the stale file")
                    source[name] = shard
                    if name.endswith(".rotary_emb.inv_freq"):  # an old save's buffer: RoPE is
                        continue                                 # computed from config.json
                    if cfg.tie_word_embeddings and name == "lm_head.weight":
                        tied_head = f.get_tensor(name)  # stored anyway: must be the embedding
                        check_shape(name, tied_head, shapes["embed_tokens.weight"], shard)
                        continue
                    if name not in expected:
                        hint = ("; quantised checkpoints are not supported, use an unquantised one"
                                if QUANTISED_TENSOR.search(name) else "")
                        raise ValueError(f"unexpected tensor {name!r} in "
                                         f"{os.path.join(path, shard)}{hint}")
                    t = f.get_tensor(name)
                    if not t.is_floating_point() or t.element_size() == 1:  # ints, float8
                        raise ValueError(f"tensor {name!r} in {shard} has dtype {t.dtype}: "
                                         "quantised checkpoints are not supported; dequantise "
                                         "to float first")
                    check_shape(name, t, shapes[expected[name]], shard)
                    state[expected[name]] = t.to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise ValueError(f"{os.path.join(path, shard)}: the weights cannot be read ({e}); "
                             "is the file complete?") from e
    if tied_head is not None and "embed_tokens.weight" not in state:  # tied, stored as the head
        state["embed_tokens.weight"] = tied_head.to(device=device, dtype=dtype)
    missing = [hf for hf, ours in expected.items() if ours not in state]
    if missing:
        raise ValueError(f"checkpoint {path} is missing tensors: {missing[:8]}"
                         + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    if tied_head is not None and not torch.equal(
            tied_head.to(device=device, dtype=dtype), state["embed_tokens.weight"]):
        raise ValueError(f"checkpoint {path} has tie_word_embeddings=true but stores an "
                         "lm_head.weight that differs from embed_tokens.weight")
    model.load_state_dict(state, strict=False, assign=True)  # the loaded tensors become the params
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model


def save_pretrained(model: Transformer, path: str, tokenizer: "Tokenizer | None" = None):
    """Write config.json + model.safetensors in the HF layout (a tied embedding stored once),
    each file atomically; with a tokenizer also its files. Loads in ours and in transformers."""
    from safetensors.torch import save
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    state = {_hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        del state["lm_head.weight"]
    blob = save(state, metadata={"format": "pt"})
    atomic_write(os.path.join(path, "model.safetensors"), lambda f: f.write(blob))
    atomic_write_text(os.path.join(path, "config.json"), json.dumps(hf, indent=2))
    # a sharded checkpoint saved here before: drop its index (which the loader would otherwise
    # read instead of the new weights) and then the shards it lists
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        stale = set(read_json(index).get("weight_map", {}).values()) - {"model.safetensors"}
        os.remove(index)
        for shard in stale:
            if os.path.basename(shard) == shard and os.path.isfile(os.path.join(path, shard)):
                os.remove(os.path.join(path, shard))
    if tokenizer is not None:
        tokenizer.save(path)


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """tokenizers.Tokenizer plus what generation needs: eos ids, pad id, and the chat format
    ("chatml" for Qwen2-style, "llama3" for Llama-3.0, "llama3.1" for Llama-3.1 / 3.2, or None
    for raw-text models), written by hand."""

    def __init__(self, tk, eos_ids, pad_id, bos_id=None, chat_format=None, default_system=None,
                 special_tokens=None, generation=None, chat_bos=None):
        self.tk, self.eos_ids, self.pad_id, self.bos_id = tk, list(eos_ids), pad_id, bos_id
        self.chat_format, self.default_system = chat_format, default_system
        # the BOS text a ChatML template writes before the messages ({{ bos_token }}, as the
        # Llama-3 Hermes finetunes' do); None: it writes none (Qwen2's, SmolLM2's)
        self.chat_bos = chat_bos
        # tokenizer_config.json entries written back on save: the loaded file's (unk token,
        # tokenizer class, model_max_length, ...) with the special token strings and the
        # original chat template (so a saved checkpoint keeps e.g. SmolLM2's default system message)
        self.special_tokens = special_tokens or {}
        # generation_config.json's other entries (bos, the model's sampling defaults), kept too
        self.generation = generation or {}

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of text, adding nothing (chat markup and BOS come from apply_chat)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token_id(self, text: str) -> int | None:
        return self.tk.token_to_id(text)

    def prompt_ids(self, prompt) -> list[int]:
        """Token ids of a task prompt. Chat messages go through the chat format, which writes any
        BOS itself; raw text is encoded as transformers' tokenizer(text) encodes it, so a family
        whose tokenizer adds a BOS (Llama-3) gets it and one that adds none (Qwen2) does not."""
        if isinstance(prompt, str):
            return self.tk.encode(prompt, add_special_tokens=True).ids
        return self.encode(self.apply_chat(prompt))

    def single_token_ids(self, texts) -> list[int]:
        """The id of each text, which must be exactly one token (stop / banned texts)."""
        ids = [self.encode(t) for t in texts]
        bad = [t for t, i in zip(texts, ids) if len(i) != 1]
        if bad:
            raise ValueError(f"texts {bad} are not single tokens of this tokenizer")
        return [i[0] for i in ids]

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages as the model family's own template does."""
        if not messages:  # (an IndexError below)
            raise ValueError("no chat messages to render: give at least one {'role': ..., "
                             "'content': ...}")
        if self.chat_format == "chatml":
            if messages[0]["role"] != "system" and self.default_system is not None:
                messages = [{"role": "system", "content": self.default_system}] + messages
            text = (self.chat_bos or "") + "".join(
                f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if self.chat_format in ("llama3", "llama3.1"):
            text = "<|begin_of_text|>"
            if self.chat_format == "llama3.1":
                # Llama-3.1 / 3.2 always open with a system block that starts with the knowledge
                # cutoff and a date. The date is the templates' fixed fallback: 3.2's template
                # writes the rendering day's date when its renderer offers one, which would make
                # the same prompt tokenize differently from day to day.
                system = ""
                if messages[0]["role"] == "system":
                    system, messages = messages[0]["content"].strip(), messages[1:]
                text += ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                         f"December 2023\nToday Date: 26 Jul 2024\n\n{system}<|eot_id|>")
            text += "".join(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                for m in messages)
            return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n"
                           if add_generation_prompt else "")
        if self.special_tokens.get("chat_template"):
            raise ValueError("this tokenizer's chat template is neither ChatML (<|im_start|>) nor "
                             "Llama-3 (<|start_header_id|>), the formats written here; give the "
                             "prompt as a string, not as chat messages")
        raise ValueError("this tokenizer has no chat format (a raw-text model): give the prompt "
                         "as a string, not as chat messages")

    def save(self, path: str):
        atomic_write_text(os.path.join(path, "tokenizer.json"), self.tk.to_str(pretty=True))
        conf = dict(self.special_tokens)
        if self.chat_format:
            conf["chat_format"] = self.chat_format
        atomic_write_text(os.path.join(path, "tokenizer_config.json"), json.dumps(conf, indent=2))
        # a chat_template.jinja already there (saved over an HF checkpoint) would be read instead
        # of the template just written, by load_tokenizer and by transformers: it is this one now
        jinja = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja):
            if isinstance(conf.get("chat_template"), str) and conf["chat_template"]:
                atomic_write_text(jinja, conf["chat_template"])
            else:  # none, or named templates, which tokenizer_config.json holds
                os.remove(jinja)
        # every eos id, not only the first (Llama-3 instruct stops on several)
        atomic_write_text(os.path.join(path, "generation_config.json"),
                          json.dumps({**self.generation, "eos_token_id": self.eos_ids,
                                      "pad_token_id": self.pad_id}, indent=2))


def _token_str(v):
    return v.get("content") if isinstance(v, dict) else v


def _default_system_message(template: str) -> str | None:
    """The default system message a ChatML template inserts when none is given, read from the
    template's own text (e.g. Qwen2.5's "You are Qwen, ..."); None if it inserts none. It lies
    inside one string literal, in single or double quotes (no unescaped quote of that kind, so
    that Jinja code between two literals, '<|im_start|>system\\n' + messages[0]['content'] +
    '<|im_end|>', never matches), read with Jinja's own escapes; or in plain template text
    between two tags (Qwen2-VL). The newline after "system" is a "\\n" escape (Qwen2.5) or a raw
    one (SmolLM2)."""
    # Jinja reads a template's line breaks, \r\n included, as \n (in string literals too)
    template = template.replace("\r\n", "\n").replace("\r", "\n")
    m = re.search(r"(['\"])<\|im_start\|>system(?:\\n|\n)((?:(?!\1)[^\\]|\\.)*?)<\|im_end\|>",
                  template, flags=re.DOTALL)
    if m:  # decoded as Jinja's lexer decodes a string literal (an unknown escape such as \{
        with warnings.catch_warnings():  # keeps its backslash; Python warns of it)
            warnings.simplefilter("ignore", DeprecationWarning)
            return m.group(2).encode("ascii", "backslashreplace").decode("unicode-escape")
    m = re.search(r"(?:%}|}}|^)<\|im_start\|>system\n([^{}]*?)<\|im_end\|>", template)
    return m.group(1) if m else None


def load_tokenizer(path: str) -> Tokenizer:
    """tokenizer.json through `tokenizers`; eos/pad/bos from tokenizer_config.json and
    generation_config.json; the chat format recognised from the template's markup."""
    from tokenizers import Tokenizer as HFTokenizer
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no such file (a checkpoint needs its tokenizer)")
    try:
        tk = HFTokenizer.from_file(file)
    except Exception as e:  # the tokenizers package raises a bare Exception for a bad file
        raise ValueError(f"{file}: cannot be read as a tokenizer ({e})") from e

    def read(name):
        p = os.path.join(path, name)
        return read_json(p) if os.path.exists(p) else {}

    tc, gc, mc = read("tokenizer_config.json"), read("generation_config.json"), read("config.json")
    template = tc.get("chat_template") or ""
    # where transformers >= 4.5x writes it; when both are there, transformers renders this file's
    # template, not tokenizer_config.json's (which may be an older one left behind)
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read() or template
    written = template  # what a save writes back: named templates all, not only the default
    if isinstance(template, list):  # named templates: use the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    fmt = tc.get("chat_format")
    if fmt is None and "<|im_start|>" in template:
        fmt = "chatml"
    elif fmt is None and "<|start_header_id|>" in template:
        fmt = "llama3.1" if "Cutting Knowledge Date" in template else "llama3"
    eos = gc.get("eos_token_id", mc.get("eos_token_id"))
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    eos_tok = _token_str(tc.get("eos_token"))
    if eos_tok is not None and tk.token_to_id(eos_tok) is not None:
        eos_ids = [tk.token_to_id(eos_tok)] + [e for e in eos_ids if e != tk.token_to_id(eos_tok)]
    if not eos_ids:
        raise ValueError(f"no eos token found in {path} (tokenizer_config.json eos_token or "
                         "generation_config.json eos_token_id)")
    pad_tok = _token_str(tc.get("pad_token"))
    pad_id = tk.token_to_id(pad_tok) if pad_tok else None
    if pad_id is None:  # no pad_token: generation_config.json's pad_token_id (or config.json's)
        name, pad_id = next(((f, c["pad_token_id"]) for f, c in (("generation_config.json", gc),
                            ("config.json", mc)) if c.get("pad_token_id") is not None), (None, None))
        vocab = tk.get_vocab_size(with_added_tokens=True)
        if pad_id is not None and not (isinstance(pad_id, int) and not isinstance(pad_id, bool)
                                       and 0 <= pad_id < vocab):
            raise ValueError(f"{os.path.join(path, name)}: pad_token_id={pad_id!r} is not a token "
                             f"id of this tokenizer (0..{vocab - 1})")
    bos_tok = _token_str(tc.get("bos_token"))
    specials = {**tc, **{k: _token_str(tc[k]) for k in ("eos_token", "pad_token", "bos_token")
                         if tc.get(k) is not None}}
    if template:
        specials["chat_template"] = written
    # a ChatML template that opens with {{ bos_token }} renders the tokenizer's BOS first (with
    # no bos_token named, transformers renders the undefined name as nothing: so do we)
    chat_bos = bos_tok if fmt == "chatml" and re.search(r"\{\{-?\s*bos_token\b", template) \
        else None
    return Tokenizer(tk, eos_ids, eos_ids[0] if pad_id is None else pad_id,
                     tk.token_to_id(bos_tok) if bos_tok else None, fmt,
                     _default_system_message(template) if fmt == "chatml" else None, specials, gc,
                     chat_bos or None)


def build_char_tokenizer(alphabet: str) -> Tokenizer:
    """A character-level tokenizer for models trained from scratch: one id per character of
    `alphabet`, plus <pad> (0) and <eos> (1)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    chars = sorted(set(alphabet))
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(["<pad>", "<eos>"])
    return Tokenizer(tk, [1], 0, None, None, None, {"eos_token": "<eos>", "pad_token": "<pad>"})
