"""The team-shared remote cache: `spar push` / `spar pull` / `spar apply --remote`.

Two "machines" are two project directories with their own runs dir (the default `./runs`, as a
teammate would have it) and their own call log; the remote is a local directory (file://) or
moto's S3 server on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Project

from spar.cli import main

ALL = ["dataset", "train", "sample_base", "sample_finetuned", "judge", "report", "plot"]
SECRET = "sk-remote-test-0123456789abcdef"


@dataclass
class Out:
    code: int
    out: str
    err: str


class Machine:
    """One teammate: a project directory, its ./runs, its call log."""

    def __init__(
        self, proj: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self.proj, self.mp, self.capsys = proj, monkeypatch, capsys

    @property
    def runs(self) -> Path:
        return self.proj.root / "runs"

    def spar(self, *args: str) -> Out:
        self.mp.chdir(self.proj.root)
        self.mp.setenv("FAKE_CALL_LOG", str(self.proj.calls))
        self.capsys.readouterr()
        code = main(list(args))
        cap = self.capsys.readouterr()
        return Out(code, cap.out, cap.err)

    def ok(self, *args: str) -> str:
        r = self.spar(*args)
        assert r.code == 0, r.err
        return r.out

    def plan(self) -> dict[str, dict]:
        return {row["stage"]: row for row in json.loads(self.ok("plan", "spec.yaml", "--json"))}

    def paid(self) -> dict[str, int]:
        """What this machine paid for: model calls, judge calls, training steps."""
        events = ("sample", "judge", "forward_backward", "optim_step")
        return {e: self.proj.calls_of(e) for e in events}


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPAR_RUNS_DIR", raising=False)
    monkeypatch.delenv("SPAR_REMOTE", raising=False)


@pytest.fixture
def alice(project: Project, monkeypatch, capsys) -> Machine:
    return Machine(project, monkeypatch, capsys)


@pytest.fixture
def bob(project: Project, tmp_path: Path, monkeypatch, capsys) -> Machine:
    root = tmp_path / "bob"
    root.mkdir()
    for name in ("spec.yaml", "docs.jsonl", "rubric.j2"):
        shutil.copy(project.root / name, root / name)
    proj = Project(root=root, spec=root / "spec.yaml", runs=root / "runs", calls=tmp_path / "b.log")
    return Machine(proj, monkeypatch, capsys)


def remote_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def nothing_paid(m: Machine) -> None:
    assert m.paid() == {"sample": 0, "judge": 0, "forward_backward": 0, "optim_step": 0}


# ------------------------------------------------------------------------- local fsspec remote


def test_round_trip_file_remote(alice: Machine, bob: Machine, tmp_path: Path, monkeypatch):
    remote = tmp_path / "team-cache"
    url = remote.as_uri()  # file:///...
    alice.ok("apply", "spec.yaml")
    assert alice.paid()["judge"] > 0 and alice.paid()["optim_step"] > 0
    out = alice.ok("push", "spec.yaml", "--remote", url)
    assert f"pushed {len(ALL)} stages" in out
    files = remote_files(remote)
    assert any(f.startswith("memo/sample/") for f in files)
    assert any(f.startswith("memo/judge/") for f in files)
    # the train output's local weights travelled with it (the fake engine's state files)
    entries = [json.loads(files[f]) for f in files if f.startswith("stages/")]
    train = next(e for e in entries if e["manifest"]["stage_kind"] == "train")
    assert train["scratch"] and all(k.startswith("engines/fake/") for k in train["scratch"])
    assert all(f"objects/{d[:2]}/{d}" in files for d in train["scratch"].values())
    # a second push sends nothing: everything is content-addressed and already there
    again = alice.ok("push", "--remote", url)
    assert again.startswith("pushed 0 stages (0 objects, 0 B) and 0 memo items")
    assert remote_files(remote) == files

    shutil.rmtree(alice.runs)  # nothing of alice's machine is left to find
    monkeypatch.setenv("SPAR_REMOTE", url)  # the default remote
    out = bob.ok("pull", "spec.yaml")
    assert out.count("restored exp / ") == len(ALL)
    rows = bob.plan()
    assert {s: rows[s]["status"] for s in ALL} == dict.fromkeys(ALL, "fresh")
    out = bob.ok("apply", "spec.yaml")
    assert "nothing to do" in out
    nothing_paid(bob)  # 0 model calls, 0 judge calls, 0 training steps

    # a partly different spec reuses the items already paid for: one more sample per question
    # draws (and judges) only the new index; the pulled weights serve the fine-tuned model
    bob.proj.edit(lambda d: d["eval"].update(samples_per_question=3))
    out = bob.ok("apply", "spec.yaml")
    questions = 4
    assert bob.paid()["sample"] == 2 * questions  # base + fine-tuned, index 2 only
    assert bob.paid()["judge"] == questions  # pairwise: one new pair per question
    assert bob.paid()["optim_step"] == 0  # the train stage stayed fresh
    finetuned = [
        json.loads(line)
        for line in (bob.runs / "exp/sample_finetuned/samples.jsonl").read_text().splitlines()
    ]
    assert len(finetuned) == 3 * questions
    # the fine-tuned model (trained on alice's machine) answered the new draws on bob's
    assert all(
        any(w in r["response"] for w in ("farming", "animal", "livestock")) for r in finetuned
    )


def test_pull_without_specs_then_apply_restores(alice: Machine, bob: Machine, tmp_path: Path):
    url = (tmp_path / "remote").as_uri()
    alice.ok("apply", "spec.yaml", "--remote", url)  # apply, then push what it made
    out = bob.ok("pull", "--remote", url)  # everything, into the run cache only
    assert f"pulled {len(ALL)} stages" in out and "restored" not in out
    rows = bob.plan()
    assert {rows[s]["action"] for s in ALL} == {"restore"}
    out = bob.ok("apply", "spec.yaml")
    assert out.count("restored exp / ") == len(ALL) and "ran " not in out
    nothing_paid(bob)


def test_apply_remote_pulls_first(alice: Machine, bob: Machine, tmp_path: Path):
    url = (tmp_path / "remote").as_uri()
    alice.ok("apply", "spec.yaml", "--remote", url)
    out = bob.ok("apply", "spec.yaml", "--remote", url)
    assert out.count("restored exp / ") == len(ALL)
    nothing_paid(bob)
    # bob's new items go back: alice pulls them and pays nothing for the same edit
    bob.proj.edit(lambda d: d["eval"].update(samples_per_question=3))
    bob.ok("apply", "spec.yaml", "--remote", url)
    paid = alice.paid()
    alice.proj.edit(lambda d: d["eval"].update(samples_per_question=3))
    out = alice.ok("apply", "spec.yaml", "--remote", url)
    assert alice.paid() == paid
    assert "ran " not in out


def test_sweep_round_trip(alice: Machine, bob: Machine, tmp_path: Path):
    """A sweep's points and its shared stages (read as `<name>/<stage>`) restore in order."""
    for m in (alice, bob):
        m.proj.edit(lambda d: d.update(sweep={"training.seed": [1, 2]}))
    url = (tmp_path / "remote").as_uri()
    alice.ok("apply", "spec.yaml", "--remote", url)
    out = bob.ok("pull", "spec.yaml", "--remote", url)
    rows = json.loads(bob.ok("plan", "spec.yaml", "--json"))
    assert len(rows) > len(ALL) and {r["status"] for r in rows} == {"fresh"}
    assert out.count("restored ") == len(rows)
    assert "nothing to do" in bob.ok("apply", "spec.yaml")
    nothing_paid(bob)


def test_memo_items_merge_without_overwriting(alice: Machine, bob: Machine, tmp_path: Path):
    from spar.store import RunStore

    url = (tmp_path / "remote").as_uri()
    alice.ok("apply", "spec.yaml")
    alice.ok("push", "--remote", url)
    store = RunStore(alice.runs)
    judge_keys = list(store.state.memo_get_many("judge", _keys(alice.runs, "judge")).items())
    store.close()
    assert len(judge_keys) == 8  # 4 questions x 2 samples, pairwise
    kept_key, _ = judge_keys[0]
    bob_store = RunStore(bob.runs)
    bob_store.state.memo_put("judge", kept_key, {"bob's": "verdict"})
    bob_store.close()
    out = bob.ok("pull", "--remote", url)
    assert "already here: 0 stages, 1 memo items" in out
    bob_store = RunStore(bob.runs)
    got = bob_store.state.memo_get_many("judge", [k for k, _ in judge_keys])
    bob_store.close()
    assert got[kept_key] == {"bob's": "verdict"}  # never overwritten
    assert all(got[k] == v for k, v in judge_keys[1:])  # the others merged in


def _keys(runs: Path, ns: str) -> list[str]:
    import sqlite3

    with sqlite3.connect(runs / ".spar/state.db") as conn:
        return [k for (k,) in conn.execute("SELECT key FROM memo WHERE ns = ?", (ns,))]


def test_partial_upload_never_looks_complete(
    alice: Machine, bob: Machine, tmp_path: Path, monkeypatch
):
    from spar.store import remote as remote_mod

    remote = tmp_path / "remote"
    url = remote.as_uri()
    alice.ok("apply", "spec.yaml")
    real = remote_mod.Remote.put_bytes

    def crash_on_entries(self, rel: str, data: bytes) -> None:
        if rel.startswith("stages/"):
            raise KeyboardInterrupt  # the push dies after the objects, before any entry
        real(self, rel, data)

    monkeypatch.setattr(remote_mod.Remote, "put_bytes", crash_on_entries)
    assert alice.spar("push", "--remote", url).code == 130  # interrupted
    monkeypatch.setattr(remote_mod.Remote, "put_bytes", real)
    files = remote_files(remote)
    assert any(f.startswith("objects/") for f in files)
    assert not any(f.startswith("stages/") for f in files)
    assert not any(Path(f).name.startswith(".") for f in files)  # no temp file left visible
    out = bob.ok("pull", "spec.yaml", "--remote", url)
    assert out.startswith("pulled 0 stages") and "restored" not in out
    assert {r["action"] for r in bob.plan().values()} == {"run"}

    # the push again completes it; a damaged object is caught by its hash, never restored
    alice.ok("push", "--remote", url)
    train = next(
        json.loads(p.read_text())
        for p in (remote / "stages").glob("*.json")
        if json.loads(p.read_text())["manifest"]["stage_kind"] == "train"
    )
    digest = train["manifest"]["outputs"]["checkpoint.json"]
    obj = remote / "objects" / digest[:2] / digest
    obj.write_bytes(obj.read_bytes()[:-5])  # truncated
    r = bob.spar("pull", "spec.yaml", "--remote", url)
    assert r.code == 0
    assert "does not match its hash" in r.err
    rows = bob.plan()
    assert rows["dataset"]["status"] == "fresh"
    assert rows["train"]["action"] == "run"  # not restored from a damaged copy
    assert not (bob.runs / "exp/train/checkpoint.json").exists()


def test_push_never_uploads_secrets(alice: Machine, tmp_path: Path, monkeypatch):
    remote = tmp_path / "remote"
    url = remote.as_uri()
    # a secret set while running is redacted from outputs and memo items before they are kept
    monkeypatch.setenv("TEAM_API_KEY", SECRET)
    alice.proj.edit(lambda d: d["eval"].update(system_prompt=f"You are helpful. {SECRET}"))
    alice.ok("apply", "spec.yaml")
    alice.ok("push", "spec.yaml", "--remote", url)
    assert not any(SECRET.encode() in data for data in remote_files(remote).values())

    # a value that became a secret later (here: text in the sampled answers) is refused, and
    # nothing at all is sent
    other = tmp_path / "other"
    monkeypatch.setenv("LATER_TOKEN", "I suggest")
    r = alice.spar("push", "--remote", other.as_uri())
    assert r.code == 2
    assert "$LATER_TOKEN" in r.err and "refusing to push" in r.err
    assert "I suggest" not in r.err and len(r.err.strip().splitlines()) == 1
    assert not other.exists() or not remote_files(other)


def test_push_checks_memo_items_for_secrets(bob: Machine, tmp_path: Path, monkeypatch):
    from spar.store import RunStore

    store = RunStore(bob.runs)
    store.state.memo_put("judge", "ab" * 32, {"reasoning": f"the key is {SECRET}"})
    store.state.memo_put("judge", "cd" * 32, {"reasoning": "fine"})
    store.close()
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)  # set after the item was kept
    remote = tmp_path / "remote"
    r = bob.spar("push", "--remote", remote.as_uri())
    assert r.code == 2 and "memo item judge abababababab" in r.err and "$ANTHROPIC_API_KEY" in r.err
    assert not remote.exists() or not remote_files(remote)
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    assert "and 2 memo items" in bob.ok("push", "--remote", remote.as_uri())


def test_bad_remote_is_one_clear_line(alice: Machine, monkeypatch):
    r = alice.spar("push")
    assert r.code == 2 and "no remote given" in r.err and "SPAR_REMOTE" in r.err
    r = alice.spar("pull", "--remote", "nosuchproto://bucket/x")
    assert r.code == 2 and "--remote nosuchproto://bucket/x" in r.err
    assert len(r.err.strip().splitlines()) == 1
    r = alice.spar("pull", "--remote", "s3://")
    assert r.code == 2 and "names no bucket" in r.err


# ------------------------------------------------------------------------- S3 (moto) remote


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, fake credentials in this test's environment only; the
    endpoint reaches s3fs through AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-access-key-for-moto")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    import boto3

    boto3.client("s3").create_bucket(Bucket="team")
    try:
        yield "s3://team/spar-cache"
    finally:
        server.stop()


def test_round_trip_s3_remote(alice: Machine, bob: Machine, s3: str):
    import boto3

    alice.ok("apply", "spec.yaml")
    out = alice.ok("push", "spec.yaml", "--remote", s3)
    assert f"pushed {len(ALL)} stages" in out
    client = boto3.client("s3")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="team")["Contents"]]
    assert all(k.startswith("spar-cache/") for k in keys)
    assert any(k.startswith("spar-cache/memo/judge/") for k in keys)
    bodies = [client.get_object(Bucket="team", Key=k)["Body"].read() for k in keys]
    assert not any(b"fake-secret-access-key-for-moto" in b for b in bodies)  # no credential

    shutil.rmtree(alice.runs)
    out = bob.ok("pull", "spec.yaml", "--remote", s3)
    assert out.count("restored exp / ") == len(ALL)
    memo_keys = [k for k in keys if k.startswith("spar-cache/memo/")]
    assert f"and {len(memo_keys)} memo items from {s3}" in out  # every item, merged
    rows = bob.plan()
    assert {rows[s]["status"] for s in ALL} == {"fresh"}
    assert "nothing to do" in bob.ok("apply", "spec.yaml")
    nothing_paid(bob)


def test_unreachable_s3_is_one_clear_line(alice: Machine, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nobody there
    r = alice.spar("pull", "--remote", "s3://team/x")
    assert r.code == 1
    assert "remote s3://team/x: cannot reach it" in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_local_engine_weights_travel(alice: Machine, bob: Machine, tmp_path: Path):
    """Engine `local` (the tiny model, for real): the LoRA adapter a train output names comes
    with it, so a teammate samples from the fine-tuned model without training it — from a runs
    dir at another absolute path (the output names the pusher's path, which is gone)."""
    for m in (alice, bob):
        m.proj.edit(lambda d: d["model"].update(engine="local"))
        m.proj.edit(lambda d: d["eval"]["sampling"].update(max_tokens=4))
    url = (tmp_path / "remote").as_uri()
    a_runs = tmp_path / "alice-runs"
    out = alice.ok("apply", "spec.yaml", "--remote", url, "--runs-dir", str(a_runs))
    assert "ran exp / train" in out
    entries = [json.loads(p.read_text()) for p in (tmp_path / "remote/stages").glob("*.json")]
    train = next(e for e in entries if e["manifest"]["stage_kind"] == "train")
    assert any(k.endswith("adapter_model.safetensors") for k in train["scratch"])
    assert any(k.startswith("engines/local/sampler_weights/") for k in train["scratch"])
    shutil.rmtree(a_runs)

    out = bob.ok("pull", "spec.yaml", "--remote", url)
    assert out.count("restored exp / ") == len(ALL)
    assert {r["status"] for r in bob.plan().values()} == {"fresh"}
    bob.proj.edit(lambda d: d["eval"].update(samples_per_question=3))
    out = bob.ok("apply", "spec.yaml")
    assert "ran exp / sample_finetuned" in out and "ran exp / train" not in out
    assert bob.paid()["judge"] == 4  # only the new index is judged
    rows = (bob.runs / "exp/sample_finetuned/samples.jsonl").read_text().splitlines()
    assert len(rows) == 3 * 4
    ckpt = json.loads((bob.runs / "exp/train/checkpoint.json").read_text())
    assert ckpt["sampler_path"].startswith(str(a_runs)) and not a_runs.exists()


def test_absolute_runs_dirs_stay_fresh(alice: Machine, bob: Machine, tmp_path: Path):
    """Runs dirs at different absolute paths: the weights land in the puller's runs/.spar/,
    where local_scratch finds them, and everything is still fresh."""
    from spar.store.remote import local_scratch

    url = (tmp_path / "remote").as_uri()
    a_runs, b_runs = str(tmp_path / "a-runs"), str(tmp_path / "b-runs")
    alice.ok("apply", "spec.yaml", "--runs-dir", a_runs)
    alice.ok("push", "--remote", url, "--runs-dir", a_runs)
    r = bob.spar("pull", "spec.yaml", "--remote", url, "--runs-dir", b_runs)
    assert r.code == 0 and r.out.count("restored exp / ") == len(ALL)
    assert "warning" not in r.err, r.err
    r = bob.spar("apply", "spec.yaml", "--runs-dir", b_runs)
    assert r.code == 0 and "nothing to do" in r.out
    nothing_paid(bob)
    ckpt = json.loads((Path(b_runs) / "exp/train/checkpoint.json").read_text())
    recorded = ckpt["state_path"]
    assert recorded.startswith(a_runs)
    shutil.rmtree(a_runs)
    here = local_scratch(recorded, Path(b_runs) / ".spar")
    assert here.startswith(b_runs) and Path(here).is_file()
    assert json.loads(Path(here).read_text())["steps"] > 0
    assert local_scratch("tinker://run/weights/final", Path(b_runs) / ".spar") == (
        "tinker://run/weights/final"
    )
