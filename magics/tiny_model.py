"""Build a tiny, randomly initialised Llama model offline, so every feature can be tried
(and tested) without downloading weights.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on text already on the machine
(the Python standard library's sources), wrapped as a transformers fast tokenizer with a
ChatML chat template; the model is a 2-layer ``LlamaForCausalLM`` saved as safetensors. The
directory loads in transformers, PEFT, TRL and vLLM (vLLM's CPU attention needs a head size of
at least 32, hence hidden 128 with 2 heads).

``build_cached`` keys the result by a hash of everything that determines it, so a test run
builds it once and later runs reuse it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
COMPLETE_MARKER = ".aifab-tiny-model.json"


@dataclass(frozen=True)
class TinyModelSpec:
    vocab_size: int = 4096
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    intermediate: int = 256
    max_positions: int = 2048
    corpus_files: int = 300
    seed: int = 0
    # Llama's default 0.02 keeps every logit near zero on a model this small, so a LoRA
    # (which cannot touch lm_head) could never make a token likely; 0.1 leaves room to learn.
    init_std: float = 0.1

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.hidden // self.heads < 32:
            raise ValueError(
                f"hidden={self.hidden}, heads={self.heads}: the head size hidden/heads must be "
                "a whole number >= 32 (vLLM's CPU attention needs it)"
            )


def corpus_files(limit: int) -> list[str]:
    """The standard library's own sources: text every Python installation has."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(
        f
        for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if "site-packages" not in f and "test" not in os.path.relpath(f, root).split(os.sep)[0]
    )
    if not files:
        raise RuntimeError(f"no Python sources under {root} to train the tokenizer on")
    return files[:limit]


def content_hash(spec: TinyModelSpec) -> str:
    """Everything the output depends on: this builder, the spec, the corpus, the libraries."""
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update(platform.python_version().encode())
    for dist in ("torch", "transformers", "tokenizers"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=missing".encode())
    for f in corpus_files(spec.corpus_files):
        h.update(f"{os.path.basename(f)}:{os.path.getsize(f)}".encode())
    return h.hexdigest()[:16]


def build(out: str | os.PathLike, spec: TinyModelSpec | None = None) -> dict:
    """Write the tiny model to ``out`` (created; must be empty or absent). Returns a summary."""
    spec = spec or TinyModelSpec()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new directory or remove it first")
    # Never reach for a hub: everything below is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
        from transformers import (
            GenerationConfig,
            LlamaConfig,
            LlamaForCausalLM,
            PreTrainedTokenizerFast,
        )
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            f"building the tiny model needs torch, transformers and tokenizers ({exc}); "
            "install them with: pip install 'jupyter-aifab[tiny]'"
        ) from exc

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train(
        corpus_files(spec.corpus_files),
        trainers.BpeTrainer(
            vocab_size=spec.vocab_size,
            min_frequency=2,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=spec.max_positions,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE

    torch.manual_seed(spec.seed)
    eos_id = hf_tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = hf_tok.convert_tokens_to_ids("<|pad|>")
    cfg = LlamaConfig(
        vocab_size=((len(hf_tok) + 63) // 64) * 64,  # a multiple of 64 suits the kernels
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-5,
        initializer_range=spec.init_std,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=hf_tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    _make_tokenizer_config_portable(out / "tokenizer_config.json")
    summary = {
        "path": str(out.resolve()),
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": len(hf_tok),
        "spec": asdict(spec),
    }
    return summary


def _make_tokenizer_config_portable(path: Path) -> None:
    # transformers 5 writes tokenizer_class "TokenizersBackend" and a list under
    # "extra_special_tokens", which transformers 4 (still common on clusters) cannot read;
    # these spellings load in both.
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(cfg.get("extra_special_tokens"), list):
        cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2))


def build_cached(cache_root: str | os.PathLike, spec: TinyModelSpec | None = None) -> Path:
    """Return ``cache_root/<content hash>``, building it first if it is not there yet.

    The model is built in a temporary sibling directory and renamed into place, so a build
    that is interrupted never leaves a half-written model that a later run would trust.
    """
    spec = spec or TinyModelSpec()
    cache_root = Path(cache_root)
    target = cache_root / content_hash(spec)
    if (target / COMPLETE_MARKER).is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_root))
    try:
        summary = build(tmp / "model", spec)
        summary["path"] = str(target.resolve())
        (tmp / "model" / COMPLETE_MARKER).write_text(json.dumps(summary, indent=2))
        try:
            os.rename(tmp / "model", target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # world-readable: Slurm jobs of other users load it
    for dirpath, _dirs, files in os.walk(target):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    return target
