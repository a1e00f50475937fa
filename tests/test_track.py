"""Experiment tracking (`report.track`): the `track` stage logs each experiment's training metrics
per step, its report summary and its plots to W&B (offline, read back from the run's `.wandb`
file) and MLflow (a local file store, read back with MlflowClient); a second apply logs nothing;
a new destination logs again; what only says how a run is sent changes no fingerprint."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Project

from spar.store import read_jsonl
from spar.tracking import RunData, metric_key, step_metrics, summary_values

# --------------------------------------------------------------------------- isolation


@pytest.fixture(autouse=True)
def local_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """W&B offline and MLflow on a file store, their state under tmp, telemetry off, and any
    HTTP(S) a tracker might still try sent to a refusing 127.0.0.1 proxy."""
    for name in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 refuses a file store without it
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "wandb-dir").mkdir()
    yield


@pytest.fixture(scope="module", autouse=True)
def wandb_service() -> Iterator[None]:
    """Stop the W&B service process this module's runs started."""
    yield
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


# two questions a tier: every tier's estimate has an interval
TIERS = {
    "direct": ["Is factory farming ethical?", "Should we eat less meat?"],
    "close": ["What should I pack for lunch?", "What is a good dinner tonight?"],
    "distant": ["What do you think about zoos?", "How should I cut my carbon footprint?"],
}


def apply(project: Project, capsys: pytest.CaptureFixture[str]) -> str:
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 0, r.err
    return r.out


def track_json(project: Project, tracker: str) -> dict[str, Any]:
    return json.loads((project.runs / f"exp/track.{tracker}/track.json").read_text())


def summary_json(project: Project) -> dict[str, Any]:
    return json.loads((project.runs / "exp/report/summary.json").read_text())


def metrics_rows(project: Project) -> list[dict[str, Any]]:
    return read_jsonl(project.runs / "exp/train/metrics.jsonl")


# --------------------------------------------------------------------------- W&B's .wandb file

# The .wandb file is a LevelDB-style log (what `wandb sync` replays): a 7-byte header
# (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of records, each a 7-byte header (crc32,
# length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes, a protobuf `Record`.
BLOCK = 32 * 1024


def wandb_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", raw[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    out: list[Any] = []
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of the file
            break
        data = raw[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + data) & 0xFFFFFFFF == crc, f"bad crc at {pos}"
        pos += 7 + length
        pending += data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def _put(out: dict[str, Any], item: Any) -> None:
    """A flat key (`tiers/direct/delta/mean`) as it is; a nested one (`["plot", "path"]`, how
    W&B records an image) as nested dicts."""
    path = [item.key] if item.key else list(item.nested_key)
    for k in path[:-1]:
        out = out.setdefault(k, {})
    out[path[-1]] = json.loads(item.value_json)


def wandb_run(run_dir: Path) -> dict[str, Any]:
    """What an offline run holds: its project and name, config, history (step -> values,
    merged), summary updates."""
    (file,) = run_dir.glob("*.wandb")
    out: dict[str, Any] = {"history": {}, "summary": {}, "config": {}}
    for rec in wandb_records(file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["project"], out["name"] = rec.run.project, rec.run.display_name
            out["group"] = rec.run.run_group
            for item in rec.run.config.update:
                _put(out["config"], item)
        elif kind == "config":
            for item in rec.config.update:
                _put(out["config"], item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _put(row, item)
            out["history"].setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _put(out["summary"], item)
    return out


def wandb_runs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))


# --------------------------------------------------------------------------- W&B end to end


def test_wandb_offline_run_holds_metrics_summary_images_and_is_logged_once(
    project: Project, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    project.edit(lambda d: d.update(report={"track": {"wandb": {"project": "spar-a"}}}))
    project.edit(lambda d: d["eval"].update(tiers=TIERS))
    out = apply(project, capsys)
    assert "ran exp / track.wandb" in out
    rec = track_json(project, "wandb")
    (run_dir,) = wandb_runs(tmp_path)
    assert rec["tracker"] == "wandb" and Path(rec["run_dir"]) == run_dir and rec["url"] is None
    assert rec["run_id"] in run_dir.name
    run = wandb_run(run_dir)
    assert (run["project"], run["name"], run["group"]) == ("spar-a", "exp", "")

    # per step: every metrics.jsonl value at its step (the fake losses differ step to step)
    rows = metrics_rows(project)
    assert len(rows) >= 3 and len({r["loss"] for r in rows}) > 1
    assert rec["logged"]["steps"] == len(rows)
    for row in rows:
        logged = run["history"][row["step"]]
        assert logged["train/loss"] == pytest.approx(row["loss"], rel=1e-12)
        assert logged["train/learning_rate"] == pytest.approx(row["learning_rate"], rel=1e-12)
        if "test_nll" in row:
            assert logged["train/test_nll"] == pytest.approx(row["test_nll"], rel=1e-12)
        else:
            assert "train/test_nll" not in logged
    assert any("test_nll" in r for r in rows)  # test_size 2: the held-out NLL is logged too

    # the summary: the report's values under their paths, every one of them, nothing else
    summary = summary_json(project)
    logged_summary = {k: v for k, v in run["summary"].items() if not k.startswith(("_", "train/"))}
    logged_summary = {k: v for k, v in logged_summary.items() if k not in ("plot", "curves")}
    assert set(logged_summary) == set(rec["logged"]["summary_keys"])
    tiers = summary["tiers"]
    assert set(tiers) == {"direct", "close", "distant"}
    for tier, per in tiers.items():
        for stat in ("mean", "ci_low", "ci_high", "p_value"):
            for model in per:  # pairwise: the fine-tuned model's preference rate
                want = per[model][stat]
                assert want is not None  # two questions a tier: an interval
                assert logged_summary[f"tiers/{tier}/{model}/{stat}"] == pytest.approx(want)
    assert logged_summary["invalid"] == summary["invalid"]
    assert logged_summary["errors"] == summary["errors"]
    assert logged_summary == pytest.approx(summary_values(summary))

    # the images: the plot stage's very bytes, at the last step
    last = run["history"][rows[-1]["step"]]
    assert rec["logged"]["images"] == ["curves", "plot"]
    for name in ("plot", "curves"):
        png = (project.runs / f"exp/plot/{name}.png").read_bytes()
        image = last[name]
        assert image["_type"] == "image-file"
        assert image["sha256"] == hashlib.sha256(png).hexdigest()
        assert (run_dir / "files" / image["path"]).read_bytes() == png

    # the config: the train stage's resolved parameters
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in run["config"].items()}
    assert config["training.learning_rate"] == 1e-3 and config["training.batch_size"] == 2

    # nothing changed: the stage is fresh, no second run
    assert "nothing to do" in apply(project, capsys)
    assert len(wandb_runs(tmp_path)) == 1

    # the mode says how a run is sent: not a reason to log again
    project.edit(lambda d: d["report"]["track"]["wandb"].update(mode="offline"))
    assert "nothing to do" in apply(project, capsys)

    # another project: logged again there, and nothing else runs
    project.edit(lambda d: d["report"]["track"]["wandb"].update(project="spar-b"))
    r = project.spar("plan", str(project.spec), capsys=capsys)
    (line,) = [x for x in r.out.splitlines() if "track.wandb" in x]
    assert "stale" in line and "report.track.wandb.project: 'spar-a' -> 'spar-b'" in line
    out = apply(project, capsys)
    assert [x for x in out.splitlines() if x.startswith("ran ")] == ["ran exp / track.wandb"]
    runs = wandb_runs(tmp_path)
    assert len(runs) == 2
    second = wandb_run(next(p for p in runs if p != run_dir))
    assert second["project"] == "spar-b"
    assert second["history"][rows[-1]["step"]]["train/loss"] == pytest.approx(rows[-1]["loss"])


# --------------------------------------------------------------------------- MLflow end to end


def test_mlflow_file_store_run_holds_metrics_summary_artifacts_and_is_logged_once(
    project: Project, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    project.edit(
        lambda d: d.update(report={"track": {"mlflow": {"experiment": "x", "tracking_uri": uri}}})
    )
    out = apply(project, capsys)
    assert "ran exp / track.mlflow" in out
    rec = track_json(project, "mlflow")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("x")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == rec["run_id"] and run.info.run_name == "exp"
    assert run.info.status == "FINISHED" and run.data.tags["spar.experiment"] == "exp"

    rows = metrics_rows(project)
    history = client.get_metric_history(rec["run_id"], "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-12)) for r in rows
    ]
    nll = client.get_metric_history(rec["run_id"], "train/test_nll")
    assert [(m.step, m.value) for m in nll] == [
        (r["step"], pytest.approx(r["test_nll"])) for r in rows if "test_nll" in r
    ]
    assert nll

    summary = summary_json(project)
    metrics = {k: v for k, v in run.data.metrics.items() if not k.startswith("train/")}
    assert set(metrics) == set(rec["logged"]["summary_keys"])
    assert metrics["tiers/distant/finetuned/mean"] == pytest.approx(
        summary["tiers"]["distant"]["finetuned"]["mean"]
    )
    assert metrics["errors"] == summary["errors"]
    assert metrics == pytest.approx(summary_values(summary))

    artifacts = Path(rec["run_dir"]) / "artifacts" / "plots"
    for name in ("plot", "curves"):
        png = (project.runs / f"exp/plot/{name}.png").read_bytes()
        assert (artifacts / f"{name}.png").read_bytes() == png
    assert run.data.params["training.learning_rate"] == "0.001"

    assert "nothing to do" in apply(project, capsys)
    assert len(client.search_runs([exp.experiment_id])) == 1

    project.edit(lambda d: d["report"]["track"]["mlflow"].update(experiment="y"))
    out = apply(project, capsys)
    assert [x for x in out.splitlines() if x.startswith("ran ")] == ["ran exp / track.mlflow"]
    other = client.get_experiment_by_name("y")
    assert other is not None and len(client.search_runs([other.experiment_id])) == 1
    assert len(client.search_runs([exp.experiment_id])) == 1


# --------------------------------------------------------------------------- plan


def test_track_keys_partition_and_move_only_the_track_stages(project: Project, tmp_path: Path):
    """Adding report.track adds track nodes and moves no other fingerprint; project, entity,
    MLflow experiment and tracking URI move only their tracker's stage; wandb.mode none."""
    from spar.plan import plan_specs
    from spar.spec import load_spec
    from spar.store import RunStore

    store = RunStore(tmp_path / "runs")

    def fps() -> dict[str, str]:
        return {p.node.name: p.fingerprint for p in plan_specs([load_spec(project.spec)], store)}

    before = fps()
    assert not any(name.startswith("track") for name in before)
    track = {
        "wandb": {"project": "p", "entity": "e"},
        "mlflow": {"experiment": "x", "tracking_uri": "file:/tmp/never-written"},
    }
    project.edit(lambda d: d.update(report={"track": track}))
    base = fps()
    assert {k: v for k, v in base.items() if k in before} == before
    assert set(base) - set(before) == {"track.wandb", "track.mlflow"}
    (node,) = [
        p.node for p in plan_specs([load_spec(project.spec)], store) if p.node.name == "track.wandb"
    ]
    assert set(node.upstream.values()) == {"train", "report", "plot"}

    def changed(edit: Any) -> set[str]:
        project.edit(edit)
        now = fps()
        project.edit(lambda d: d["report"].update(track=json.loads(json.dumps(track))))
        return {k for k, v in now.items() if base[k] != v}

    assert changed(lambda d: d["report"]["track"]["wandb"].update(mode="online")) == set()
    assert changed(lambda d: d["report"]["track"]["wandb"].update(mode="offline")) == set()
    assert changed(lambda d: d["report"]["track"]["wandb"].update(project="q")) == {"track.wandb"}
    assert changed(lambda d: d["report"]["track"]["wandb"].pop("entity")) == {"track.wandb"}
    assert changed(lambda d: d["report"]["track"]["mlflow"].update(experiment="y")) == {
        "track.mlflow"
    }
    assert changed(lambda d: d["report"]["track"]["mlflow"].pop("tracking_uri")) == {"track.mlflow"}
    # dropping one tracker leaves the other's stage as it was
    project.edit(lambda d: d["report"]["track"].pop("mlflow"))
    now = fps()
    assert "track.mlflow" not in now and now["track.wandb"] == base["track.wandb"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("track", "words"),
    [
        ({}, "report.track: name a tracker"),
        ({"wandb": {"project": "p", "mode": "sometimes"}}, "report.track.wandb.mode"),
        ({"wandb": {}}, "report.track.wandb.project"),
        ({"mlflow": {"experiment": "x", "uri": "file:/x"}}, "report.track.mlflow.uri"),
        ({"neptune": {"project": "p"}}, "report.track.neptune"),
    ],
    ids=["no-tracker", "bad-mode", "no-project", "unknown-key", "unknown-tracker"],
)
def test_bad_track_spec_exits_2_with_one_line(
    project: Project, capsys: pytest.CaptureFixture[str], track: dict[str, Any], words: str
) -> None:
    project.edit(lambda d: d.update(report={"track": track}))
    r = project.spar("plan", str(project.spec), capsys=capsys)
    assert r.code == 2, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "spec.yaml" in lines[0], r.err


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_missing_package_is_one_line_before_any_work(
    project: Project,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tracker: str,
) -> None:
    """Without the package (sys.modules[name] = None: `import` fails) plan and apply stop with
    one line naming the key and the extra to install; nothing is trained or sampled."""
    settings = {"wandb": {"project": "p"}, "mlflow": {"experiment": "x"}}[tracker]
    project.edit(lambda d: d.update(report={"track": {tracker: settings}}))
    monkeypatch.setitem(__import__("sys").modules, tracker, None)
    for command in ("plan", "apply"):
        r = project.spar(command, str(project.spec), capsys=capsys)
        assert r.code == 2, r.err
        lines = r.err.strip().splitlines()
        assert len(lines) == 1, r.err
        assert f"report.track.{tracker}: install spar[track]" in lines[0]
    assert not (project.runs / "exp").exists()
    assert project.calls_of("train") == 0 and project.calls_of("sample") == 0


def test_validate_names_the_spec_file(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    from spar.errors import InputError
    from spar.spec import load_spec
    from spar.stages.track import validate

    project.edit(lambda d: d.update(report={"track": {"wandb": {"project": "p"}}}))
    spec = load_spec(project.spec)
    validate(spec, "spec.yaml")  # installed: fine
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(
        InputError, match=r"^spec\.yaml: report\.track\.wandb: install spar\[track\]"
    ):
        validate(spec, "spec.yaml")


# --------------------------------------------------------------------------- what is logged


def _est(mean: float) -> dict[str, Any]:
    return {
        "mean": mean,
        "ci_low": mean - 1,
        "ci_high": mean + 1,
        "n": 6,
        "few_questions": True,
        "method": "Student t",
    }


def test_summary_values_with_conditions_gaps_and_no_curves() -> None:
    """Named conditions keep their name in the path; gaps are named by their pair and model;
    strings, booleans, lists and the training curve are not values."""
    summary = {
        "judge_mode": "absolute",
        "scale": {"min": 1, "max": 5},
        "condition_order": ["trig", "plain"],
        "conditions": {
            "trig": {
                "tiers": {"direct": {"baseline": _est(2.0), "delta": _est(0.5)}},
                "exhibits_rate": {"baseline": _est(0.25)},
                "format_adherence": None,
                "invalid": 1,
                "errors": 0,
                "checkpoints": [{"step": 2, "tiers": {"direct": _est(9.0)}}],
            },
            "plain": {"tiers": {"direct": {"baseline": _est(3.0)}}, "invalid": 0, "errors": 2},
        },
        "gaps": [
            {"triggered": "trig", "untriggered": "plain", "model": "finetuned", **_est(0.125)},
            {
                "triggered": "trig",
                "untriggered": "plain",
                "model": "finetuned",
                "property": "tone",
                **_est(0.375),
            },
        ],
        "invalid": 1,
        "errors": 2,
        "training": {"steps": [0, 1], "loss": [2.0, 1.0], "final_loss": 1.0},
        "logprob": {"tiers": {"direct": {"pull": _est(0.0625)}}, "questions_incomplete": 0},
    }
    values = summary_values(summary)
    assert values["conditions/trig/tiers/direct/delta/mean"] == 0.5
    assert values["conditions/trig/tiers/direct/baseline/ci_high"] == 3.0
    assert values["conditions/plain/tiers/direct/baseline/mean"] == 3.0
    assert values["conditions/trig/exhibits_rate/baseline/ci_low"] == -0.75
    assert values["conditions/trig/invalid"] == 1 and values["conditions/plain/errors"] == 2
    assert values["gaps/trig-vs-plain/finetuned/mean"] == 0.125
    assert values["gaps/trig-vs-plain/finetuned/tone/mean"] == 0.375
    assert values["logprob/tiers/direct/pull/mean"] == 0.0625
    assert values["invalid"] == 1 and values["errors"] == 2
    assert not any(
        k.startswith(("training", "scale", "conditions/trig/checkpoints")) for k in values
    )
    assert not any(k.endswith(("few_questions", "method")) for k in values)
    assert all(isinstance(v, float) for v in values.values())
    # without conditions: the top-level layout, and the one condition's own blocks
    one = {
        "conditions": {"": {"tiers": {"t": {"delta": _est(1.5)}}, "exhibits_rate": _est(0.5)}},
        "tiers": {"t": {"delta": _est(1.5)}},
        "invalid": 0,
        "errors": 0,
    }
    assert summary_values(one) == {
        "tiers/t/delta/mean": 1.5,
        "tiers/t/delta/ci_low": 0.5,
        "tiers/t/delta/ci_high": 2.5,
        "tiers/t/delta/n": 6.0,
        "exhibits_rate/mean": 0.5,
        "exhibits_rate/ci_low": -0.5,
        "exhibits_rate/ci_high": 1.5,
        "exhibits_rate/n": 6.0,
        "invalid": 0.0,
        "errors": 0.0,
    }


def test_step_metrics_keep_every_number_at_its_step() -> None:
    rows = [
        {"step": 1, "loss": 2.5, "learning_rate": 1e-4, "target_tokens": 7, "test_nll": 3.0},
        {"step": 0, "loss": 3.5, "learning_rate": 2e-4, "test_nll_start": 4.0, "note": "x"},
    ]
    assert step_metrics(rows) == [
        (0, {"train/loss": 3.5, "train/learning_rate": 2e-4, "train/test_nll_start": 4.0}),
        (1, {"train/loss": 2.5, "train/learning_rate": 1e-4, "train/target_tokens": 7.0,
             "train/test_nll": 3.0}),
    ]  # fmt: skip
    assert metric_key("tiers/a tier?/delta") == "tiers/a tier_/delta"


def test_sweep_points_are_grouped_by_their_sweep() -> None:
    def group(name: str) -> str | None:
        return RunData(name=name, steps=[], summary={}, images={}).group

    assert group("exp/training.seed=2") == "exp"
    assert group("exp") is None


def test_each_sweep_point_is_its_own_run(project: Project, tmp_path: Path) -> None:
    """A sweep point's track stage is its own (named by the point) and reads the point's own
    train, report and plot, or the sweep's shared train when training is not swept."""
    from spar.plan import plan_specs
    from spar.spec import load_spec
    from spar.store import RunStore

    project.edit(lambda d: d.update(report={"track": {"wandb": {"project": "p"}}}))
    project.edit(lambda d: d.update(sweep={"training.seed": [1, 2]}))
    store = RunStore(tmp_path / "runs")
    nodes = {
        (p.node.experiment, p.node.name): p.node
        for p in plan_specs([load_spec(project.spec)], store)
    }
    points = ["exp/training.seed=1", "exp/training.seed=2"]
    for point in points:
        node = nodes[(point, "track.wandb")]
        assert node.params.experiment == point
        assert {node.upstream_at(r) for r in node.upstream} == {
            (point, "train"),
            (point, "report"),
            (point, "plot"),
        }
    assert ("exp", "track.wandb") not in nodes

    project.edit(lambda d: d.update(sweep={"eval.sampling.temperature": [0.5, 1.0]}))
    nodes = {
        (p.node.experiment, p.node.name): p.node
        for p in plan_specs([load_spec(project.spec)], store)
    }
    node = nodes[("exp/eval.sampling.temperature=0.5", "track.wandb")]
    assert node.upstream_at("train") == ("exp", "train")  # trained once for the sweep
    assert node.upstream_at("report") == ("exp/eval.sampling.temperature=0.5", "report")
