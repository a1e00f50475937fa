"""engine `tinker` against a real Tinker-protocol server, and resuming the one training loop.

The server is skyrl's open-source Tinker API server (JAX backend, CPU) on 127.0.0.1, serving the
`tiny_model` fixture; see tests/tinker_server/. Its SQLite database records every request it
received and the result it gave, which is what the server-side assertions below read.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
import yaml
from conftest import Project
from tinker_server.bootstrap import Server, ServerUnavailable, ensure_venv, running_server

from spar.engines.local import LocalEngine
from spar.engines.tinker import TinkerEngine
from spar.errors import RunError
from spar.models import load_renderer
from spar.stages.dataset import datum_row, read_records, row_to_datum, to_conversation
from spar.stages.train import (
    CHECKPOINTS,
    LoopConfig,
    TrainJournal,
    TrainResult,
    batches,
    learning_rate,
    resume_point,
    run_id,
    train_loop,
)
from spar.store import read_jsonl
from spar.store.state import State

DATA = Path(__file__).parent / "data"
UNREACHABLE = "http://127.0.0.1:9"
MAX_LENGTH = 48  # every datum pads to one sequence bucket on the server: one JIT compile
CFG = LoopConfig(
    lora_rank=4,
    learning_rate=1e-3,
    lr_schedule="linear",
    batch_size=2,
    epochs=1,
    seed=0,
    save_every=1,
)


class Crash(Exception):
    """Raised from an on_step hook: the run dies after that step's batch was applied."""


def crash_at(step: int) -> Any:
    def hook(row: dict[str, Any]) -> None:
        if row["step"] == step:
            raise Crash(step)

    return hook


def doc_rows(base_model: str) -> list[dict[str, Any]]:
    renderer = load_renderer("qwen3_instruct", base_model)
    records = read_records(DATA / "docs.jsonl", "synth_docs")[:6]
    return [datum_row(to_conversation(r, "doc_idea"), renderer, MAX_LENGTH) for r in records]


def batch_keys(rows: list[dict[str, Any]], cfg: LoopConfig) -> dict[tuple[Any, ...], int]:
    """What identifies each planned batch in a forward_backward request -> its batch index."""
    return {
        tuple(tuple(r["target"]) for r in batch): i for i, batch in enumerate(batches(rows, cfg))
    }


def assert_complete_metrics(metrics: list[dict[str, Any]], total: int, cfg: LoopConfig) -> None:
    assert [m["step"] for m in metrics] == list(range(total))  # every step, exactly once
    for m in metrics:
        assert m["learning_rate"] == pytest.approx(learning_rate(cfg, m["step"], total))
        assert m["learning_rate"] == pytest.approx(cfg.learning_rate * (1 - m["step"] / total))
        assert math.isfinite(m["loss"]) and m["loss"] > 0


# ---------------------------------------------------------------------------------------------
# the server's own record of what it was asked


@dataclass
class Request:
    id: int
    type: str
    model: str | None
    data: dict[str, Any]
    result: Any


@dataclass
class ServerLog:
    requests: list[Request]
    models: dict[str, str]  # model id -> session id
    sampling_sessions: list[dict[str, Any]]

    def of(self, model: str, kind: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.model == model and kind in (None, r.type)]

    def batch_index(self, req: Request, keys: dict[tuple[Any, ...], int]) -> int:
        sent = tuple(tuple(d["loss_fn_inputs"]["target_tokens"]["data"]) for d in req.data["data"])
        return keys[sent]

    def lineage(
        self, resumed_from: str, final_model: str, keys: dict[tuple[Any, ...], int]
    ) -> list[int]:
        """Batch indices applied to the weights that the final model ends with.

        `resumed_from` is the `tinker://<model>/weights/<name>` state the final model loaded:
        the batches of its model up to that save, then every batch of the final model.
        """
        src_model, _, name = resumed_from.removeprefix("tinker://").partition("/weights/")
        (save,) = [r for r in self.of(src_model, "SAVE_WEIGHTS") if r.data["path"] == name]
        before = [r for r in self.of(src_model, "FORWARD_BACKWARD") if r.id < save.id]
        after = self.of(final_model, "FORWARD_BACKWARD")
        return [self.batch_index(r, keys) for r in before + after]


def server_log(server: Server) -> ServerLog:
    con = sqlite3.connect(server.db, timeout=30)
    try:
        requests = [
            Request(rid, rtype, model or None, json.loads(data), json.loads(res) if res else None)
            for rid, rtype, model, data, res in con.execute(
                "SELECT request_id, request_type, model_id, request_data, result_data "
                "FROM futures ORDER BY request_id"
            )
        ]
        models = dict(con.execute("SELECT model_id, session_id FROM models"))
        cols = ["sampling_session_id", "session_id", "base_model", "model_path"]
        sessions = [
            dict(zip(cols, row, strict=True))
            for row in con.execute(f"SELECT {', '.join(cols)} FROM sampling_sessions")
        ]
    finally:
        con.close()
    return ServerLog(requests, models, sessions)


def model_of(path: str) -> str:
    return path.removeprefix("tinker://").split("/")[0]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def skyrl(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    try:
        venv = ensure_venv()
    except ServerUnavailable as e:
        if os.environ.get("CI"):  # CI must run these: a missing Python 3.12 is a failure there
            raise
        pytest.skip(f"skyrl Tinker server: {e}")
    with running_server(venv, tiny_model, tmp_path_factory.mktemp("skyrl")) as server:
        yield server


@pytest.fixture
def on_skyrl(skyrl: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """The SDK's environment pointed at the local server (any API key does for it)."""
    monkeypatch.setenv("TINKER_BASE_URL", skyrl.url)
    monkeypatch.setenv("TINKER_API_KEY", "tml-spar-test")
    return skyrl


@pytest.fixture
def load_mode(on_skyrl: Server) -> Iterator[Callable[[str], None]]:
    """How the server answers the one-request load (see tests/tinker_server/launch.py): "skyrl"
    (422, as skyrl does), "one-request" (it takes it) or a status; back to "skyrl" after."""

    def set_mode(mode: str) -> None:
        httpx.post(f"{on_skyrl.url}/spar-test/load-mode", json={"mode": mode}).raise_for_status()

    yield set_mode
    set_mode("skyrl")


def shim_loads(server: Server) -> list[dict[str, Any]]:
    """Every load_weights request the server received, in order, with its form and answer."""
    return httpx.get(f"{server.url}/spar-test/loads").json()


# ---------------------------------------------------------------------------------------------
# no server needed


def test_unreachable_service_is_one_line_naming_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINKER_BASE_URL", UNREACHABLE)
    monkeypatch.setenv("TINKER_API_KEY", "tml-spar-test")
    engine = TinkerEngine(tmp_path)
    with pytest.raises(RunError) as err:
        engine.create_lora_training_client("some/model", rank=4)
    msg = str(err.value)
    assert f"{UNREACHABLE}/api/v1/healthz" in msg
    assert "\n" not in msg


def test_spar_apply_on_unreachable_tinker_exits_1_with_one_line(project: Project) -> None:
    project.edit(lambda d: d["model"].update(engine="tinker"))
    start = time.monotonic()
    proc = project.spar_proc(
        "apply", str(project.spec), TINKER_BASE_URL=UNREACHABLE, TINKER_API_KEY="tml-spar-test"
    )
    out, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("spar: failed: ") and UNREACHABLE in lines[0]
    assert "Traceback" not in err
    # the SDK alone would retry an unreachable server for about 300 s
    assert elapsed < 30, elapsed


def test_resume_point_is_the_last_complete_checkpoint(tmp_path: Path) -> None:
    """`batch` = batches applied; the last saved state, if every step before it is journaled."""
    from tinker_cookbook import checkpoint_utils

    state, mirror = State(tmp_path / "state.db"), tmp_path / "mirror"
    j = TrainJournal(state, "run", mirror)
    assert resume_point(j, total=5) is None
    assert not (tmp_path / "state.db").exists()  # a read creates nothing

    def step(i: int) -> dict[str, Any]:
        return {"step": i, "learning_rate": 0.1, "loss": 1.0, "batch_size": 2}

    for i in range(3):
        j.step(step(i))
    for b in (1, 2):
        j.checkpoint(f"step{b:06d}", b, state_path=f"s{b}")
    j.checkpoint("sampler000003", 3, sampler_path="w3")  # no state: not a resume point
    got = resume_point(j, total=5)
    assert got is not None
    assert (got.batch, got.state_path) == (2, "s2")
    assert got.metrics == [step(0), step(1)]  # step 2 was applied after "s2": redone
    # the mirror is tinker-cookbook's checkpoints.jsonl: its own reader finds the same state
    assert read_jsonl(mirror / CHECKPOINTS) == j.checkpoints()
    last = checkpoint_utils.get_last_checkpoint(str(mirror))
    assert last is not None and (last.batch, last.state_path) == (2, "s2")
    # every batch of the plan applied: a finished run, resumable at its end
    done = resume_point(j, total=2)
    assert done is not None and done.batch == 2
    assert resume_point(j, total=1) is None  # a checkpoint beyond `total`: not of this plan

    # a checkpoint row whose steps are missing (step 3): cannot resume completely
    j.checkpoint("step000004", 4, state_path="s4")
    assert resume_point(j, total=5) is None
    other = TrainJournal(state, "other", tmp_path / "other")
    other.step(step(0))
    other.step(step(2))
    other.checkpoint("step000002", 2, state_path="o2")  # step 1's metrics missing
    assert resume_point(other, total=5) is None
    # each run has its own journal
    assert [c["state_path"] for c in other.checkpoints()] == ["o2"]
    assert [m["step"] for m in j.steps()] == [0, 1, 2]

    j.reset()
    assert resume_point(j, total=5) is None and j.steps() == []
    assert checkpoint_utils.get_last_checkpoint(str(mirror)) is None
    assert resume_point(other, total=5) is None and len(other.checkpoints()) == 1
    state.close()


def test_local_engine_resumes_without_replaying_a_batch(tiny_model: Path, tmp_path: Path) -> None:
    """The same loop on engine `local`: a resumed run ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    base = str(tiny_model)
    rows = doc_rows(base)
    cfg = CFG.model_copy(update={"learning_rate": 2e-2})
    total = len(batches(rows, cfg))
    keys = batch_keys(rows, cfg)
    applied: list[list[int]] = []

    class Recording(LocalEngine):  # records the batches each training client is given
        def _wrap(self, client: Any) -> Any:
            seen: list[int] = []
            applied.append(seen)
            fb = client.forward_backward

            def forward_backward(data: list[tinker.Datum], loss_fn: str) -> Any:
                sent = tuple(tuple(d.loss_fn_inputs["target_tokens"].tolist()) for d in data)
                seen.append(keys[sent])
                return fb(data, loss_fn)

            client.forward_backward = forward_backward
            return client

        def create_lora_training_client(self, *a: Any, **k: Any) -> Any:
            return self._wrap(super().create_lora_training_client(*a, **k))

        def create_training_client_from_state_with_optimizer(self, *a: Any, **k: Any) -> Any:
            return self._wrap(super().create_training_client_from_state_with_optimizer(*a, **k))

    state = State(tmp_path / "state.db")
    ref_journal = TrainJournal(state, "ref", tmp_path / "ref-log")
    ref = train_loop(LocalEngine(tmp_path / "ref"), base, rows, cfg, "ref", ref_journal)
    engine, log_dir = Recording(tmp_path / "eng"), tmp_path / "log"
    j = TrainJournal(state, "run", log_dir)
    with pytest.raises(Crash):
        train_loop(engine, base, rows, cfg, "run", j, on_step=crash_at(1))
    assert [r["batch"] for r in j.checkpoints()] == [1]
    assert [m["step"] for m in j.steps()] == [0, 1]
    # the mirror is tinker-cookbook's own format: its checkpoint_utils finds the resumable state
    from tinker_cookbook import checkpoint_utils

    last = checkpoint_utils.get_last_checkpoint(str(log_dir))
    assert last is not None and last.batch == 1 and Path(last.state_path).exists()
    res = train_loop(engine, base, rows, cfg, "run", j)

    assert res.resumed_at == 1
    assert applied == [[0, 1], [1, 2]]  # batch 1 of the first client died with it
    assert_complete_metrics(res.metrics, total, cfg)
    assert j.steps() == res.metrics
    assert [m["loss"] for m in res.metrics] == pytest.approx([m["loss"] for m in ref.metrics])
    # the journal is kept: a re-run resumes at the end, applies no batch and saves nothing again
    final = {p: p.stat().st_mtime_ns for p in Path(res.sampler_path).parent.parent.rglob("*")}
    again = train_loop(engine, base, rows, cfg, "run", j)
    assert applied == [[0, 1], [1, 2]]
    assert again == TrainResult(res.sampler_path, res.state_path, res.metrics, resumed_at=total)
    assert {p: p.stat().st_mtime_ns for p in final} == final
    got = load_file(str(Path(res.sampler_path) / "adapter_model.safetensors"))
    want = load_file(str(Path(ref.sampler_path) / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:  # adapter *and* Adam state came back: the same weights as never stopping
        assert got[k].allclose(want[k], atol=1e-6), k


# ---------------------------------------------------------------------------------------------
# against the skyrl server


@pytest.mark.parametrize("protocol", ["one-request", "fallback"])
def test_train_loop_on_tinker_resumes_at_the_saved_batch(
    on_skyrl: Server,
    load_mode: Callable[[str], None],
    tiny_model: Path,
    tmp_path: Path,
    protocol: str,
) -> None:
    """Both ways to resume: the one-request load the Tinker service takes
    (`create_training_client_from_state_with_optimizer`: the server makes the model from the
    checkpoint), and the older sequence for a server that answers it 422 (skyrl as it is): a new
    LoRA client, then `load_state_with_optimizer` as its first request. The server's record of
    the loads it received says which one ran."""
    # Fails if TinkerEngine never sent the one-request load (always the older sequence), if it
    # did not fall back on a 422 (OLD_PROTOCOL_STATUS without it: RunError), or if either path
    # loaded the weights without the optimizer state (load_optimizer False).
    load_mode("one-request" if protocol == "one-request" else "skyrl")
    run = f"t1{protocol[0]}"
    base = str(tiny_model)
    rows = doc_rows(base)
    total = len(batches(rows, CFG))
    keys = batch_keys(rows, CFG)
    db, log_dir = tmp_path / "state.db", tmp_path / "train"

    with State(db) as state, pytest.raises(Crash):
        j = TrainJournal(state, "fp-t1", log_dir)
        train_loop(TinkerEngine(tmp_path), base, rows, CFG, run, j, on_step=crash_at(1))
    (row,) = read_jsonl(log_dir / CHECKPOINTS)
    assert row["name"] == "step000001" and row["batch"] == 1
    assert row["state_path"].startswith("tinker://") and "/weights/" in row["state_path"]
    first_model, resumed_from = model_of(row["state_path"]), row["state_path"]
    loads_before = len(shim_loads(on_skyrl))

    state = State(db)  # as a new process would open it
    j = TrainJournal(state, "fp-t1", log_dir)
    assert j.checkpoints() == [row]
    assert [m["step"] for m in j.steps()] == [0, 1]
    res: TrainResult = train_loop(TinkerEngine(tmp_path), base, rows, CFG, run, j)
    assert res.resumed_at == 1
    assert_complete_metrics(res.metrics, total, CFG)
    assert j.steps() == res.metrics
    ckpts = j.checkpoints()
    assert read_jsonl(log_dir / CHECKPOINTS) == ckpts
    assert [(c["name"], c["batch"]) for c in ckpts] == [
        ("step000001", 1),
        ("step000002", 2),
        ("final", 3),
    ]
    final = ckpts[-1]
    assert final["final"] is True
    assert final["state_path"] == res.state_path and final["sampler_path"] == res.sampler_path
    assert res.sampler_path.startswith("tinker://") and res.state_path.startswith("tinker://")

    srv = server_log(on_skyrl)
    final_model = model_of(res.state_path)
    assert final_model != first_model
    # which load ran: the server's own record of the loads it received on resuming
    loads = shim_loads(on_skyrl)[loads_before:]
    one_request = {"form": "one-request", "path": resumed_from}
    if protocol == "one-request":
        assert loads == [{**one_request, "status": 200, "model_id": final_model}]
    else:
        assert [{k: v for k, v in x.items() if k != "model_id"} for x in loads] == [
            {**one_request, "status": 422},
            {"form": "model_id", "path": resumed_from, "status": 200},
        ]
        assert loads[1]["model_id"] == final_model != loads[0]["model_id"]
    # either way the resumed model's first request after its creation loads the saved state
    # and optimizer
    assert [r.type for r in srv.of(final_model)][:2] == ["CREATE_MODEL", "LOAD_WEIGHTS"]
    (load,) = srv.of(final_model, "LOAD_WEIGHTS")
    assert load.data == {
        "source_model_id": first_model,
        "checkpoint_id": f"{run}-step000001",
        "load_optimizer": True,
    }
    # the first run applied batches 0 and 1 (1 was lost with it); the resumed one 1 and 2
    assert [srv.batch_index(r, keys) for r in srv.of(first_model, "FORWARD_BACKWARD")] == [0, 1]
    assert [srv.batch_index(r, keys) for r in srv.of(final_model, "FORWARD_BACKWARD")] == [1, 2]
    assert srv.lineage(resumed_from, final_model, keys) == [0, 1, 2]
    # the learning rate the server applied at each step of that lineage: the linear schedule
    steps = srv.of(first_model, "OPTIM_STEP")[:1] + srv.of(final_model, "OPTIM_STEP")
    for step, req in enumerate(steps):
        want = CFG.learning_rate * (1 - step / total)
        assert req.data["adam_params"]["learning_rate"] == pytest.approx(want, rel=1e-12)
        assert req.result["metrics"]["skyrl.ai/learning_rate"] == pytest.approx(want, rel=1e-6)
    state.close()


@pytest.mark.parametrize("status", [400, 404, 405, 403])
def test_a_refused_one_request_load_falls_back_only_for_the_old_protocols_statuses(
    on_skyrl: Server, load_mode: Callable[[str], None], tmp_path: Path, status: int
) -> None:
    # 400/404/405/422 say "I do not know that request": the older sequence starts, whose first
    # step asks the server what the state is (here it has no such state: one line naming it).
    # Any other refusal (403) is an error of its own, one line, no second attempt. Fails if
    # OLD_PROTOCOL_STATUS lost a status, or took 403 in.
    load_mode(str(status))
    path = "tinker://no_such_model/weights/none"
    before = len(shim_loads(on_skyrl))
    with pytest.raises(RunError) as err:
        TinkerEngine(tmp_path).create_training_client_from_state_with_optimizer(path)
    msg = str(err.value)
    assert "\n" not in msg and "tml-spar-test" not in msg
    loads = shim_loads(on_skyrl)[before:]
    assert [(x["form"], x["status"], x["path"]) for x in loads] == [("one-request", status, path)]
    if status == 403:
        assert f"loading {path}: " in msg and "403" in msg
    else:
        assert f"weights info of {path}: " in msg and "404" in msg


def test_loss_mask_reaches_the_server(on_skyrl: Server, tiny_model: Path, tmp_path: Path) -> None:
    """The server computes the loss with our per-token weights: zero on the masked prompt."""
    base = str(tiny_model)
    rows = doc_rows(base)[:2]
    datums = [row_to_datum(r) for r in rows]
    client = TinkerEngine(tmp_path).create_lora_training_client(base, rank=4, seed=0)
    out = client.forward_backward(datums, "cross_entropy").result()

    srv = server_log(on_skyrl)
    (req,) = [r for r in srv.requests if r.type == "FORWARD_BACKWARD"][-1:]
    for row, sent, got in zip(rows, req.data["data"], req.result["loss_fn_outputs"], strict=True):
        weights = row["weights"]
        assert sent["loss_fn_inputs"]["weights"]["data"] == pytest.approx(weights)
        assert 0 in weights and any(w > 0 for w in weights)  # a prompt part and a document part
        logprobs = got["logprobs"]["data"]
        loss = got["elementwise_loss"]["data"]
        assert loss == pytest.approx([-lp * w for lp, w in zip(logprobs, weights, strict=True)])
        assert all((x == 0) == (w == 0) for x, w in zip(loss, weights, strict=True))
    # and what the SDK handed back is that same server result
    for got, sent in zip(out.loss_fn_outputs, req.result["loss_fn_outputs"], strict=True):
        assert got["logprobs"].tolist() == pytest.approx(sent["logprobs"]["data"])


def test_spar_apply_on_tinker_resumes_after_sigkill_and_samples_trained_weights(
    on_skyrl: Server, project: Project
) -> None:
    """Full `spar apply` (engine tinker, keyword judge), SIGKILLed mid-training, then re-run."""

    def tinker_spec(d: dict[str, Any]) -> None:
        d["model"]["engine"] = "tinker"
        d["training"].update(save_every=1, max_length=MAX_LENGTH)
        d["eval"]["samples_per_question"] = 1
        d["eval"]["sampling"]["max_tokens"] = 16

    project.edit(tinker_spec)
    env = {"TINKER_BASE_URL": on_skyrl.url, "TINKER_API_KEY": "tml-spar-test"}
    killed = project.spar_proc(
        "apply",
        str(project.spec),
        SPAR_PLUGINS="fake_plugin,tinker_server.kill_plugin",
        SPAR_KILL_AT_FORWARD_BACKWARD="3",  # dies before its third batch: two were applied
        **env,
    )
    out, err = killed.communicate(timeout=600)
    assert killed.returncode == -9, (out, err)
    (log_dir,) = (project.runs / ".spar" / "train").iterdir()
    ckpts = read_jsonl(log_dir / CHECKPOINTS)
    assert [(c["name"], c["batch"]) for c in ckpts] == [("step000001", 1), ("step000002", 2)]
    resumed_from = ckpts[-1]["state_path"]

    again = project.spar_proc("apply", str(project.spec), **env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, (out, err)
    assert "ran exp / train" in out and "ran exp / sample_finetuned" in out

    spec = yaml.safe_load(project.spec.read_text())
    cfg = LoopConfig(**{k: v for k, v in spec["training"].items() if k != "max_length"})
    rows = read_jsonl(project.runs / "exp/dataset/train.jsonl")
    keys = batch_keys(rows, cfg)
    total = len(keys)
    assert total == 3
    metrics = read_jsonl(project.runs / "exp/train/metrics.jsonl")
    assert_complete_metrics(metrics, total, cfg)
    record = json.loads((project.runs / "exp/train/checkpoint.json").read_text())
    assert record["engine"] == "tinker" and record["steps"] == total
    sampler = record["sampler_path"]
    assert sampler.startswith("tinker://")

    srv = server_log(on_skyrl)
    final_model = model_of(record["state_path"])
    assert model_of(sampler) == final_model
    assert srv.lineage(resumed_from, final_model, keys) == [0, 1, 2]  # each batch exactly once

    # the training journal is kept, under the train stage's fingerprint
    state = State(project.runs / ".spar" / "state.db")
    (fingerprint,) = state.train_runs()
    assert log_dir.name == run_id(fingerprint)
    journal = TrainJournal(state, fingerprint, log_dir)
    assert journal.steps() == metrics
    ckpts = journal.checkpoints()
    assert [(c["name"], c["batch"]) for c in ckpts] == [
        ("step000001", 1),
        ("step000002", 2),
        ("final", 3),
    ]
    assert (ckpts[-1]["state_path"], ckpts[-1]["sampler_path"]) == (record["state_path"], sampler)
    assert read_jsonl(log_dir / CHECKPOINTS) == ckpts
    # ... so the loop, run again on it, resumes at the end: no batch applied, nothing saved anew
    res = train_loop(
        TinkerEngine(project.root),
        str(spec["model"]["base_model"]),
        rows,
        cfg,
        log_dir.name,
        journal,
    )
    assert res == TrainResult(sampler, record["state_path"], metrics, resumed_at=total)
    assert journal.checkpoints() == ckpts
    state.close()
    rerun = server_log(on_skyrl).requests[len(srv.requests) :]
    assert not [r for r in rerun if r.type == "FORWARD_BACKWARD"]
    assert rerun == []  # not even a training client: the final state is already the result

    # sampling: fresh sampling clients of their own sessions, from the sampler path / base model
    tuned = [s for s in srv.sampling_sessions if s["model_path"] == sampler]
    assert len(tuned) == 1
    assert tuned[0]["session_id"] != srv.models[final_model]  # not the training client's session
    base_model = str(spec["model"]["base_model"])
    assert [s for s in srv.sampling_sessions if s["base_model"] == base_model]
    n_questions = sum(len(v) for v in spec["eval"]["tiers"].values())
    tuned_samples = [
        r
        for r in srv.requests
        if r.type == "SAMPLE" and r.data["sampling_session_id"] == tuned[0]["sampling_session_id"]
    ]
    assert len(tuned_samples) == n_questions
    assert {r.data["checkpoint_id"] for r in tuned_samples} == {sampler.rsplit("/", 1)[1]}
    sampled = read_jsonl(project.runs / "exp/sample_finetuned/samples.jsonl")
    assert len(sampled) == n_questions and all(s["response"] is not None for s in sampled)
    assert len(read_jsonl(project.runs / "exp/judge/judged.jsonl")) == n_questions
