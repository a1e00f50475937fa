"""A real Tinker-protocol server for the tests: skyrl's API server (JAX backend, CPU) on 127.0.0.1.

`ensure_venv()` builds skyrl's own Python 3.12 venv once into a cache outside the repository
(`~/.cache/spar-test/`, or `$SPAR_TEST_CACHE`), keyed by a hash of `requirements.txt`, the skyrl
pin and the interpreter; `running_server()` starts `launch.py` (run from here, not installed) in
it and stops it again.
Everything happens on this machine: the only network use is pip reaching the package registry.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
LAUNCHER = HERE / "launch.py"
SKYRL = "skyrl==0.4.0"
READY_TIMEOUT_S = 180.0


class ServerUnavailable(Exception):
    """No Python 3.12 to build skyrl's venv with (the tests that need the server skip)."""


def python312() -> str:
    """A working Python 3.12 interpreter (its real path: pyenv shims may not resolve)."""
    pyenv_roots = [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")]
    pyenv = shutil.which("pyenv")
    if pyenv:  # e.g. /root/.pyenv/bin/pyenv (also found when HOME points elsewhere)
        pyenv_roots.append(str(Path(pyenv).resolve().parents[1]))
    candidates = [
        os.environ.get("SPAR_TEST_PYTHON312", ""),
        *(
            p
            for root in dict.fromkeys(filter(None, pyenv_roots))
            for p in sorted(glob.glob(f"{root}/versions/3.12*/bin/python3.12"))
        ),
        shutil.which("python3.12") or "",
    ]
    for c in filter(None, candidates):
        probe = subprocess.run(
            [c, "-c", "import sys; print(sys.version_info[:2] == (3, 12), sys.executable)"],
            capture_output=True,
            text=True,
            check=False,
        )
        ok, _, exe = probe.stdout.strip().partition(" ")
        if probe.returncode == 0 and ok == "True":
            return exe
    raise ServerUnavailable("no working python3.12 found (set SPAR_TEST_PYTHON312)")


def cache_root() -> Path:
    return Path(os.environ.get("SPAR_TEST_CACHE", Path.home() / ".cache" / "spar-test"))


def _run(cmd: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(
            f"{' '.join(cmd[:4])} ... failed ({done.returncode}); log {log}:\n{tail}"
        )


def ensure_venv() -> Path:
    """skyrl's venv, built once per requirements hash (about a minute and 1 GB)."""
    from filelock import FileLock

    python = python312()
    key = hashlib.sha256(
        b"\0".join([REQUIREMENTS.read_bytes(), SKYRL.encode(), python.encode()])
    ).hexdigest()[:16]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"skyrl-venv-{key}"
    done = venv / ".spar-complete"
    if done.exists():
        return venv
    with FileLock(str(root / "skyrl-venv.lock")):
        if done.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        log = root / f"skyrl-venv-{key}.log"
        log.write_text("")
        _run([python, "-m", "venv", str(venv)], log)
        py = str(venv / "bin" / "python")
        pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        _run([*pip, "-r", str(REQUIREMENTS)], log)
        _run([*pip, "--no-deps", SKYRL], log)
        _run([py, str(LAUNCHER), "check"], log)  # the server's modules import with the stand-ins
        done.write_text(json.dumps({"python": python, "skyrl": SKYRL}))
    return venv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    db: Path  # skyrl's SQLite database: every request it received, with its result
    log: Path
    proc: subprocess.Popen[bytes]

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/v1/healthz", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


BACKENDS = ("jax", "null")  # skyrl's JAX backend; launch.py's compute-free one (benchmarks)


def add_backend_option(ap: argparse.ArgumentParser, what: str = "") -> None:
    """A benchmark's `--backend jax|null` (default jax), passed to `running_server`."""
    ap.add_argument(
        "--backend",
        choices=BACKENDS,
        default="jax",
        help=f"the skyrl server's backend{what} (null: no compute, latency only)",
    )


@contextlib.contextmanager
def running_server(
    venv: Path, base_model: Path, workdir: Path, backend: str = "jax"
) -> Iterator[Server]:
    """skyrl's API server + engine for `base_model` (a local HF dir, also its name) on 127.0.0.1.

    `backend` "jax" is skyrl's JAX backend (every test); "null" is launch.py's compute-free
    stand-in, for benchmarks that measure spar against a service whose only cost is latency.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: jax or null")
    jax_config = {"max_lora_adapters": 64, "sample_max_num_sequences": 4}
    # the null backend has nothing to size: no --backend-config
    config_args = ["--backend-config", json.dumps(jax_config)] if backend == "jax" else []
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    db = workdir / "tinker.db"
    log = workdir / "server.log"
    cmd = [
        str(venv / "bin" / "python"),
        str(LAUNCHER),
        "api",
        "--port",
        str(port),
        "--base-model",
        str(base_model),
        "--backend",
        backend,
        *config_args,
        "--checkpoints-base",
        str(workdir / "checkpoints"),
        "--database-url",
        f"sqlite:///{db}",
        "--external-inference-lora-base",
        str(workdir / "lora"),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "JAX_PLATFORMS": "cpu",
        # XLA compiles (about 10 s per shape here) are kept across test runs
        "JAX_COMPILATION_CACHE_DIR": str(venv.parent / f"{venv.name}-jax-cache"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PYTHONPATH", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
        )
    server = Server(f"http://127.0.0.1:{port}", db, log, proc)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _healthy(server.url):
            if proc.poll() is not None:
                raise RuntimeError(f"skyrl server exited ({proc.returncode}):\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"skyrl server not healthy in {READY_TIMEOUT_S:g} s")
            time.sleep(0.2)
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group (API server and the engine it started)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the engine, should it outlive the API server
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
