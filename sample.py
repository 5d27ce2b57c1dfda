"""Batched generation with a static KV cache: the rollout engine (DESIGN.md: sample.py).

generate() left-pads the ragged prompts and prefills each prompt once (not once per sample; a
prompt listed twice is prefilled twice); its n sample rows then share that prompt cache
(model.SharedPrefixCache) and decode together, one token per step, each row writing its own
keys/values into one column of a static buffer allocated once at exactly max_new_tokens - 1
columns. Rows stop independently on a stop id; the only host sync in the loop is an "all
finished?" check every `check_every` steps. On a GPU the decode step is replayed from recorded
CUDA graphs (DecodeGraphs), since launching its many small kernels one by one from Python, not
the GPU's work, is what bounds eager decoding there. On an x86 CPU the linear layers multiply
through copies of their weights packed for oneDNN (pack_weights), made once per call;
`torch.backends.mkldnn.enabled = False` turns that off.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from model import KVCache, Linear, SharedPrefixCache, StaticPrefixCache, Transformer


@dataclass
class Generation:
    """Rows are prompt-major: rows i*n .. i*n+n-1 are the samples of prompt i."""
    tokens: torch.Tensor    # [R, max_new_tokens] long; pad_id after a row stopped
    logprobs: torch.Tensor  # [R, max_new_tokens] log-prob of each token under the sampling dist.
    mask: torch.Tensor      # [R, max_new_tokens] bool; generated tokens incl. the stop token
    lengths: torch.Tensor   # [R] long; number of generated tokens (mask.sum(1))
    finished: torch.Tensor  # [R] bool; the row ended on a stop id (False: hit max_new_tokens)


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def left_pad(prompts: list[list[int]], pad_id: int, device=None, vocab_size=None):
    """Ragged prompts -> (ids [P, L], real-token mask [P, L], positions [P, L]), right-aligned
    so that every row's next token goes in the same column. With vocab_size, a prompt holding
    anything but token ids 0..vocab_size-1 is an error naming it."""
    rows = []
    for i, p in enumerate(prompts):
        try:
            row = torch.as_tensor(p)
        except (TypeError, ValueError, RuntimeError, OverflowError):  # None, text, 2**70, ...
            row = None
        token_ids = row is not None and row.dim() == 1 and len(row) > 0 and not (
            row.is_floating_point() or row.is_complex() or row.dtype == torch.bool)
        if not token_ids or (vocab_size is not None
                             and not 0 <= row.min() <= row.max() < vocab_size):
            shown = (f"{p[:8]}{' ...' if len(p) > 8 else ''}" if isinstance(p, (list, tuple))
                     else repr(p))
            allowed = "" if vocab_size is None else f" 0..{vocab_size - 1}"
            raise ValueError(f"prompt {i} holds {shown}; prompts must be non-empty lists of "
                             f"token ids{allowed}")
        rows.append(row)
    L = max(len(row) for row in rows)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, L - len(row):] = row
        mask[i, L - len(row):] = True
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def monotone_cdf(cdf, shifted):
    """The running total `cdf` of exp(shifted) [R, V], made non-decreasing and flat (equal to its
    left neighbour) at every token of probability 0 (shifted = -inf), as inverse-CDF sampling
    needs. CUDA's cumsum is a parallel scan that sums neighbouring prefixes in different orders,
    so one can come out a rounding step above or below the next: a zero-probability token (banned,
    outside top-k / top-p) one step above its neighbour is drawn when u falls in that step, and a
    step down breaks searchsorted's sorted input. Zeroing those tokens' totals, then a running
    max, gives each exactly the largest total before it."""
    return cdf.masked_fill_(shifted.isneginf(), 0).cummax(-1).values


CDF_BLOCK = 128  # tokens per block of the CPU's two-level inverse CDF (draw_two_level)


def draw_two_level(weights, generator, block: int = CDF_BLOCK):
    """Inverse-CDF draw of one token per row from unnormalised weights [R, V] (V a multiple of
    block), in two levels: the running total over blocks of `block` tokens picks a block, the
    running total inside that block picks the token. On CPU a cumulative sum is a serial scan of
    each row, so one over the whole vocabulary cost about as much as the exponentials before it;
    block sums are vectorised and the scans are V / block and block long. Totals in float64.
    Returns (token [R, 1], total weight [R, 1] float64)."""
    R, V = weights.shape
    blocks = weights.view(R, V // block, block)
    cum = blocks.sum(-1).double().cumsum_(-1)                   # [R, V / block]
    total = cum[:, -1:]
    zero = torch.zeros((), dtype=torch.float64, device=weights.device)
    # u < total, so the first block whose running total exceeds u has weight (a block of
    # weight 0 has the running total of the block before it, never the first to exceed u)
    u = torch.minimum(torch.rand(R, 1, generator=generator, dtype=torch.float64,
                                 device=weights.device) * total, torch.nextafter(total, zero))
    b = torch.searchsorted(cum, u, right=True)
    inside = blocks.gather(1, b[:, :, None].expand(R, 1, block))[:, 0].double().cumsum_(-1)
    before = cum.gather(1, (b - 1).clamp_min(0)).masked_fill_(b == 0, 0)
    # the block's own running total may end a rounding step from its sum in cum: the target
    # stays below its end, so the draw is the first token whose total exceeds it, one of weight
    target = torch.minimum(u - before, torch.nextafter(inside[:, -1:], zero))
    return b * block + torch.searchsorted(inside, target, right=True), total


def sample_next(logits, temperature: float, top_k: int, top_p: float, generator, scratch=None):
    """Draw one token per row from softmax(logits / T) restricted to the top-k / top-p
    support (top-k keeps every token tied with the k-th largest logit, as transformers' top-k
    does); return (token, its log-prob under that restricted distribution). T = 0: greedy,
    with the log-prob of the untempered softmax. logits [R, V] (fp32) is overwritten; scratch,
    when given, is a tensor of its shape that receives the unnormalised probabilities (and,
    off the CPU's two-level draw, their running total; the sampler's static buffers: fresh
    [R, V] temporaries every step are cold memory on CPU)."""
    if temperature == 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
    if temperature != 1.0:
        logits.div_(temperature)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits.scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # inverse-CDF sampling on the unnormalised cdf: one uniform per row (torch.multinomial draws
    # one exponential per vocabulary entry on CPU, which dominated the step). u < cdf[-1] and
    # right=True mean a token of probability 0 (cdf equal to its left neighbour's) is never the
    # first entry with cdf > u. On CPU, in two levels (draw_two_level) where the vocabulary allows.
    shifted = logits.sub_(logits.amax(-1, keepdim=True))
    cdf = torch.exp(shifted, out=scratch if scratch is not None else torch.empty_like(shifted))
    if cdf.device.type == "cpu" and cdf.shape[-1] % CDF_BLOCK == 0:
        token, total = draw_two_level(cdf, generator)
        return token[:, 0], (shifted.gather(-1, token) - total.log().float())[:, 0]
    cdf.cumsum_(-1)
    if cdf.device.type != "cpu":
        # the CPU's cumsum adds left to right (in double): already exact where it matters, so
        # the CPU (the benchmark's device) skips this extra pass
        cdf = monotone_cdf(cdf, shifted)
    total = cdf[:, -1:]
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * total
    token = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1)
    return token[:, 0], (shifted.gather(-1, token) - total.log())[:, 0]


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decoding on `device` in `dtype` packs its weights for oneDNN (pack_weights): an
    x86-64 CPU, fp32 or bf16, torch built with oneDNN and not told to avoid it
    (`torch.backends.mkldnn.enabled = False`), and no CPU autocast (which F.linear obeys and the
    packed product would not: an fp32 model's packed weights meet bf16 inputs there)."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu"))


def packed_copy_fits(linears: list[Linear]) -> bool:
    """Whether a second copy of these layers' weights (what pack_weights holds while a call
    lasts) takes at most half of the memory free now, so that packing a large model on a small
    machine cannot exhaust its memory; where the free memory is unknown (not Linux), yes."""
    need = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return need <= free / 2


@contextlib.contextmanager
def pack_weights(model: Transformer, rows: int):
    """Inside it every model.Linear of `model` multiplies through a copy of its weight that
    oneDNN has packed for products of `rows` rows (the decode batch); on exit, an error
    included, the copies are dropped. On a 2-core AMD EPYC (Zen 4) torch's own fp32 products
    (MKL's) reached 66-72% of a large matmul's speed for the bench's decode products, the packed
    ones about 100%: a quarter off a decode step there. On a Zen 5 one, oneDNN's large product
    ran at 2.3x MKL's, and the bench's sampler at 3.4-3.7x transformers' rate against 2.0x
    without packing. It costs one pass over the weights per generate call (about 20 ms for 12M
    parameters) and a second copy of them while it lasts. The products round differently from
    F.linear's (log-probs ~2e-6 apart).
    Packs only where can_pack and packed_copy_fits allow it, and yields whether it did."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    param = next(model.parameters())
    if not (can_pack(param.device, param.dtype) and packed_copy_fits(linears)):
        yield False
        return
    try:
        for m in linears:
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
        yield True
    finally:
        for m in linears:
            m.packed = None


class DecodeGraphs:
    """The decode step replayed from recorded CUDA graphs (GPU only). Eager decoding on a GPU is
    bound by launching the step's hundreds of small kernels from Python, not by the GPU's work;
    a graph launches them all at once. A graph fixes every shape and address, so the step reads
    its token from a static buffer and its column from cache.col, and attends to a fixed span of
    generated columns (model.StaticPrefixCache): one graph per `bucket` columns, recorded when
    decoding first reaches them (graphs of short spans keep early steps cheap)."""

    streams: dict = {}  # one side stream per device for every recording (see record)

    def __init__(self, model: Transformer, cache: StaticPrefixCache, next_pos, out,
                 bucket: int = 128):
        self.model, self.cache, self.next_pos, self.out, self.bucket = (model, cache, next_pos,
                                                                        out, bucket)
        self.token = torch.zeros_like(next_pos)
        self.graphs, self.pool = {}, None

    def forward(self):
        return self.model(self.token, self.next_pos + self.cache.col, cache=self.cache,
                          out=self.out)

    def __call__(self, token, t: int):
        """Logits [R, 1, V] (the static `out` buffer) after feeding `token` [R] at step t."""
        self.token.copy_(token[:, None])
        self.cache.col.fill_(t)
        span = min((t // self.bucket + 1) * self.bucket, self.cache.k.shape[4])
        with torch.cuda.device(self.out.device):  # the model's GPU, whichever is current
            if span not in self.graphs:
                self.graphs[span] = self.record(span)
            self.graphs[span].replay()
        return self.out

    def record(self, span: int):
        self.cache.span = span
        # one eager run on a side stream first, as CUDA graph capture requires (it lets the
        # libraries set up their workspaces); it writes the same column the replay rewrites.
        # Always the same stream: cuBLAS keeps a 32 MiB workspace for each stream it meets,
        # so a new stream per recording held on to another 32 MiB every time.
        device = self.out.device
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        side = self.streams[device]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.forward()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # graphs of one call share a memory pool: each is replayed only until the next is recorded
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            self.forward()
        self.pool = graph.pool()
        return graph


def generate(model: Transformer, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_ids=(),
             banned_ids=(), seed: int = 0, pad_id: int = 0, check_every: int = 8,
             cuda_graphs: bool | None = None) -> Generation:
    """Sample n continuations of each prompt (lists of token ids, any lengths). Tokens in
    stop_ids end their row (and are part of it); tokens in banned_ids are never produced.
    cuda_graphs: decode through recorded CUDA graphs (DecodeGraphs); None: on a CUDA device.

    Runs under torch.inference_mode, not just no_grad: each of the decode step's ~500 operator
    calls then skips autograd's bookkeeping (about 2% of a step on CPU). Inference tensors
    cannot be saved for backward, so the returned tensors are ordinary copies (the trainer's
    forward feeds these tokens to the embedding, whose backward keeps them)."""
    with torch.inference_mode():
        out = _generate(model, prompts, n=n, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
                        banned_ids=banned_ids, seed=seed, pad_id=pad_id, check_every=check_every,
                        cuda_graphs=cuda_graphs)
    return Generation(*(x.clone() for x in vars(out).values()))


def _generate(model, prompts, *, n, max_new_tokens, temperature, top_k, top_p, stop_ids,
              banned_ids, seed, pad_id, check_every, cuda_graphs) -> Generation:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of non-empty token-id lists, got "
                         f"{type(prompts).__name__} {str(prompts)[:60]}")
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens), ("top_k", top_k),
                        ("check_every", check_every), ("pad_id", pad_id), ("seed", seed)):
        if not _integer(value):
            raise ValueError(f"{name}={value!r} must be an integer")
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n={n} and max_new_tokens={max_new_tokens} must both be >= 1")
    if check_every < 1:
        raise ValueError(f"check_every={check_every} must be >= 1 (steps between finished checks)")
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed={seed} is not allowed: use an integer 0..2**64-1")
    # a temperature below 1e-6 (or nan / inf) would overflow logits / T into NaN: use 0, greedy
    if not _real(temperature) or not (temperature == 0 or 1e-6 <= temperature < float("inf")):
        raise ValueError(f"temperature={temperature!r} is not allowed: use 0 (greedy) or a "
                         f"finite number >= 1e-6")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} is not allowed: use 0 (off) or a positive integer")
    if not _real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is not allowed: use a number in (0, 1] (1: off)")
    # plain Python numbers from here (NumPy scalars and Fractions pass the checks above)
    seed, temperature, top_p = int(seed), float(temperature), float(top_p)
    # (NumPy's narrow integers would overflow in sums below: n=np.uint8(200) * 2 prompts is 144)
    n, max_new_tokens, top_k, pad_id, check_every = map(int, (n, max_new_tokens, top_k, pad_id,
                                                              check_every))
    V = model.config.vocab_size
    if not 0 <= pad_id < V:
        raise ValueError(f"pad_id={pad_id} is not a token id of this model (0..{V - 1})")
    id_sets = []
    for name, ids in (("stop_ids", stop_ids), ("banned_ids", banned_ids)):
        if not isinstance(ids, Iterable) or isinstance(ids, (str, bytes)):
            raise ValueError(f"{name}={ids!r} must be a list of token ids")
        # a tensor or NumPy array, 0-d included, becomes a plain list
        ids = ids.reshape(-1).tolist() if hasattr(ids, "reshape") else list(ids)
        outside = [i for i in ids if not (_integer(i) and 0 <= i < V)]
        if outside:
            raise ValueError(f"{name} {outside} are not token ids of this model (0..{V - 1})")
        id_sets.append({int(i) for i in ids})
    stop_ids, banned_ids = id_sets
    if len(banned_ids) == V:
        raise ValueError(f"banned_ids cover the whole vocabulary (vocab_size={V}): nothing is left "
                         f"to sample; ban at most {V - 1} of the ids 0..{V - 1}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    elif cuda_graphs not in (True, False):
        raise ValueError(f"cuda_graphs={cuda_graphs!r} must be True, False or None (on CUDA)")
    elif cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}")
    P, R = len(prompts), len(prompts) * n
    ids, real, positions = left_pad(prompts, pad_id, device, vocab_size=V)
    Lp = ids.shape[1]
    if Lp + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"longest prompt ({Lp}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    generator = torch.Generator(device).manual_seed(seed)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    banned = torch.tensor(sorted(banned_ids), dtype=torch.long, device=device)

    # on an x86 CPU the linear layers multiply through weights packed for oneDNN (pack_weights)
    with pack_weights(model, R) as packed:
        # prefill each prompt once (not each sample); its n samples then share that cache (the
        # last sampled token is never fed back, so the per-row cache needs max_new_tokens - 1
        # columns)
        prefix = KVCache(model.config, P, Lp, device, dtype)
        logits = model(ids, positions, attn_mask=real, cache=prefix, logits_from=-1)
        cache = (StaticPrefixCache if cuda_graphs else SharedPrefixCache)(
            prefix, n, max(max_new_tokens - 1, 1))
        logits = logits[:, -1].float().repeat_interleave(n, dim=0)
        next_pos = (positions[:, -1] + 1).repeat_interleave(n)[:, None]
        # static per-step buffers: the model's logits and the sampler's cumulative distribution
        # (a packed LM head writes a fresh tensor: oneDNN's product takes no out=)
        out = None if packed else torch.empty(R, 1, V, device=device, dtype=dtype)
        scratch = torch.empty_like(logits)
        graphs = DecodeGraphs(model, cache, next_pos, out) if cuda_graphs else None

        tokens = torch.full((R, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(R, max_new_tokens, device=device)
        mask = torch.zeros(R, max_new_tokens, dtype=torch.bool, device=device)
        done = torch.zeros(R, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            if len(banned):
                logits.index_fill_(1, banned, float("-inf"))
            token, lp = sample_next(logits, temperature, top_k, top_p, generator, scratch)
            token = token.masked_fill(done, pad_id)
            tokens[:, t], logprobs[:, t], mask[:, t] = token, lp.masked_fill(done, 0.0), ~done
            done = done | torch.isin(token, stop)
            if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
                break
            if graphs is not None:
                logits = graphs(token, t)[:, -1].float()
            else:
                logits = model(token[:, None], next_pos + t, cache=cache, out=out)[:, -1].float()
    return Generation(tokens, logprobs, mask, mask.sum(1), done)
