"""`./.env` is read by the CLI (spar.cli.main) only: it fills the environment, never overrides it.

The Anthropic judge runs against the local Messages server (tests/anthropic_server.py), which
records the headers of every request, so each test sees which key actually reached the API.
conftest sets PYTHON_DOTENV_DISABLED=1 for the whole suite; these tests lift it (monkeypatch
restores the environment afterwards, including every variable a .env file set).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from anthropic_server import AnthropicServer
from conftest import Project, anthropic_local_only

DOTENV_KEY = "fake-test-key-from-dotenv-5b1f0c9e"  # not a real key: the local server
ENV_KEY = "fake-test-key-from-environment-77d2a4"


@pytest.fixture
def server() -> Iterator[AnthropicServer]:
    s = AnthropicServer(api_key=DOTENV_KEY).start()
    yield s
    s.stop()


def dotenv_on(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Lift the suite's PYTHON_DOTENV_DISABLED and let monkeypatch restore every variable a .env
    file will set."""
    monkeypatch.delenv("PYTHON_DOTENV_DISABLED", raising=False)
    for name in names:
        monkeypatch.delenv(name, raising=False)


def use_claude(project: Project) -> None:
    project.edit(lambda d: d["judge"].update(kind="anthropic", model="claude-test"))


def sent_keys(server: AnthropicServer) -> set[str]:
    keys = set()
    for seen in server.requests:
        h = {k.lower(): v for k, v in seen.headers.items()}
        keys.add(h.get("x-api-key") or h.get("authorization", "").removeprefix("Bearer "))
    return keys


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_key_in_dotenv_reaches_the_sdk_and_no_file(
    project: Project,
    server: AnthropicServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Fails if main() did not load ./.env (the judge would have no key: "no credentials"), loaded
    # it from somewhere else than the current directory, or if the key were written into any
    # output, params file, memo or state under the runs dir, or printed.
    anthropic_local_only(monkeypatch)
    dotenv_on(monkeypatch, "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(project.root / "no-anthropic-profile"))
    (project.root / ".env").write_text(
        f"# credentials\nANTHROPIC_API_KEY={DOTENV_KEY}\nANTHROPIC_BASE_URL={server.url}\n"
    )
    use_claude(project)
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    assert len(server.requests) == 8  # 4 questions x 2 samples, pairwise
    assert sent_keys(server) == {DOTENV_KEY}
    assert os.environ["ANTHROPIC_API_KEY"] == DOTENV_KEY  # main() put it in the environment
    assert (project.runs / "exp/judge/judged.jsonl").is_file()
    assert files_holding(project.runs, DOTENV_KEY) == []
    assert DOTENV_KEY not in r.out + r.err


def test_a_key_already_in_the_environment_wins_over_dotenv(
    project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Fails if load_dotenv overrode the environment (override=True): the server (which only takes
    # the environment's key) would answer 401 and the stage fail.
    anthropic_local_only(monkeypatch, key=ENV_KEY)
    dotenv_on(monkeypatch, "SPAR_DOTENV_PROBE")
    s = AnthropicServer(api_key=ENV_KEY).start()
    try:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", s.url)
        (project.root / ".env").write_text(
            f"ANTHROPIC_API_KEY={DOTENV_KEY}\nANTHROPIC_BASE_URL=http://127.0.0.1:9\n"
            "SPAR_DOTENV_PROBE=loaded\n"
        )
        use_claude(project)
        r = project.spar("apply", str(project.spec), capsys=capsys)
        assert r.code == 0, r.err
        assert s.requests and sent_keys(s) == {ENV_KEY}
    finally:
        s.stop()
    assert os.environ["ANTHROPIC_API_KEY"] == ENV_KEY
    assert os.environ["SPAR_DOTENV_PROBE"] == "loaded"  # the file was read: only set keys kept
    assert files_holding(project.runs, ENV_KEY) == []


PROBE = """
import os, sys
import spar, spar.spec, spar.plan, spar.apply, spar.schema, spar.store, spar.cli
before = os.environ.get("SPAR_DOTENV_PROBE")
code = spar.cli.main(["schema", "--check", "--file", "missing.json"])
print(before, os.environ.get("SPAR_DOTENV_PROBE"), code)
"""


def test_only_the_cli_loads_dotenv_and_only_from_the_current_directory(tmp_path: Path) -> None:
    # Fails if importing spar (the library, or spar.cli itself) loaded .env, if main() did not
    # (the positive control), if a .env in a parent directory were found (find_dotenv-style
    # search), or if PYTHON_DOTENV_DISABLED=1 did not turn it off.
    here = tmp_path / "project"
    here.mkdir()
    (here / ".env").write_text("SPAR_DOTENV_PROBE=here\n")
    (tmp_path / ".env").write_text("SPAR_DOTENV_PROBE=parent\nSPAR_DOTENV_PARENT=1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPAR_", "PYTHON_DOTENV"))}

    def run(cwd: Path, **extra: str) -> str:
        p = subprocess.run(
            [sys.executable, "-c", PROBE],
            cwd=cwd,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
        )
        return p.stdout.strip().splitlines()[-1]

    assert run(here) == "None here 1"  # `schema --check` of a missing file exits 1
    assert run(here, PYTHON_DOTENV_DISABLED="1") == "None None 1"
    nested = here / "sub"
    nested.mkdir()
    assert run(nested) == "None None 1"  # ../.env is not read
