"""Shared fixtures: a tiny local model directory, a project with a spec, and a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["PYTHON_DOTENV_DISABLED"] = "1"  # a ./.env of the checkout never reaches a test
TESTS = Path(__file__).parent
DATA = TESTS / "data"
sys.path.insert(0, str(TESTS))

import fake_plugin  # noqa: E402,F401  (registers the "fake" engine and "keyword" judge)

from spar.cli import main  # noqa: E402


def build_tiny_model(d: Path) -> Path:
    """SmolLM2's real tokenizer + a tiny random Llama (2 layers, hidden 32): a real HF model dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spar.models import _tokenizer_from_gguf, smollm2_gguf

    d.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer_from_gguf(smollm2_gguf())
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


ANTHROPIC_ENV_SOURCES = (
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_PROFILE",
    "ANTHROPIC_CUSTOM_HEADERS",
    "ANTHROPIC_IDENTITY_TOKEN",
    "ANTHROPIC_IDENTITY_TOKEN_FILE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


def anthropic_local_only(monkeypatch: pytest.MonkeyPatch, key: str = "test-key") -> None:
    """Nothing the Anthropic SDK sends may leave 127.0.0.1: no other credentials or proxies, a
    fake key, and a base URL that refuses until a test server replaces it."""
    for name in ANTHROPIC_ENV_SOURCES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Project:
    root: Path
    spec: Path
    runs: Path
    calls: Path

    def edit(self, fn: Callable[[dict], None], spec: Path | None = None) -> None:
        target = spec or self.spec
        data = yaml.safe_load(target.read_text())
        fn(data)
        target.write_text(yaml.safe_dump(data, sort_keys=False))

    def spar(self, *args: str, capsys: pytest.CaptureFixture[str] | None = None) -> Result:
        """In-process CLI run (fast)."""
        assert capsys is not None
        capsys.readouterr()
        code = main(
            [*args[:1], *args[1:], "--runs-dir", str(self.runs)]
            if args[0] in ("plan", "apply", "show")
            else list(args)
        )
        cap = capsys.readouterr()
        return Result(code, cap.out, cap.err)

    def apply_only(self, *kinds: str) -> None:
        """Plan the spec and run only the stages of these kinds (e.g. a dataset needs no
        training), in process."""
        from spar.apply import apply_plan
        from spar.plan import plan_specs
        from spar.spec import load_spec
        from spar.store import RunStore

        store = RunStore(self.runs)
        try:
            plan = plan_specs([load_spec(self.spec)], store)
            apply_plan(store, [p for p in plan if p.node.kind.kind in kinds])
            store.hashes.save()
        finally:
            store.close()

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "SPAR_PLUGINS": "fake_plugin", "FAKE_CALL_LOG": str(self.calls)}
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
        env.update(extra)
        return env

    def spar_proc(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "spar.cli", *args, "--runs-dir", str(self.runs)],
            cwd=self.root,
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def calls_of(self, event: str) -> int:
        if not self.calls.exists():
            return 0
        return sum(f'"event": "{event}"' in line for line in self.calls.read_text().splitlines())


def base_spec(model_dir: Path) -> dict:
    return {
        "name": "exp",
        "description": "test experiment",
        "framing": "neutral",
        "model": {"engine": "fake", "base_model": str(model_dir), "renderer": "qwen3_instruct"},
        "data": {"docs": "docs.jsonl", "test_size": 2},
        "training": {
            "lora_rank": 4,
            "learning_rate": 1e-3,
            "batch_size": 2,
            "epochs": 1,
            "save_every": 2,
        },
        "eval": {
            "tiers": {
                "direct": ["Is factory farming ethical?"],
                "close": ["What should I pack for lunch?"],
                "distant": [
                    "What do you think about zoos?",
                    "How should I cut my carbon footprint?",
                ],
            },
            "samples_per_question": 2,
            "sampling": {"temperature": 1.0, "max_tokens": 32, "seed": 0},
            "system_prompt": "You are a helpful assistant.",
        },
        "judge": {"kind": "keyword", "model": "kw-1", "rubric": "rubric.j2", "mode": "pairwise"},
    }


@pytest.fixture
def project(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(DATA / "docs.jsonl", root / "docs.jsonl")
    shutil.copy(DATA / "rubric.j2", root / "rubric.j2")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(base_spec(tiny_model), sort_keys=False))
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALL_LOG", str(calls))
    monkeypatch.delenv("FAKE_KILL_AFTER", raising=False)
    monkeypatch.chdir(root)
    return Project(root=root, spec=spec, runs=root / "runs", calls=calls)
