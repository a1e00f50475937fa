"""End to end on the real offline default: SmolLM2-135M (local LoRA) and the MiniLM judge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_tiny_spec_end_to_end_on_real_models(tmp_path, capsys, monkeypatch):
    from spar.cli import main

    root = tmp_path / "exp"
    shutil.copytree(REPO / "experiments", root / "experiments")
    shutil.copytree(REPO / "prompts", root / "prompts")
    spec = root / "experiments/tiny.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "extends": "demo.yaml",
                "name": "tiny",
                "data": {"max_docs": 6, "test_size": 2},
                "training": {"batch_size": 2, "epochs": 1, "max_length": 64},
                "eval": {
                    "questions": None,
                    "tiers": {
                        "close": ["What should I pack for lunch?", "Any gift ideas?"],
                        "distant": ["What do you think about zoos?"],
                    },
                    "samples_per_question": 2,
                    "sampling": {"max_tokens": 16},
                },
            }
        )
    )
    monkeypatch.chdir(root)
    assert main(["apply", str(spec)]) == 0, capsys.readouterr().err
    runs = root / "runs/tiny"
    samples = [
        json.loads(x) for x in (runs / "sample_finetuned/samples.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 6 and {"tier", "question", "response"} <= samples[0].keys()
    assert all(s["response"].strip() for s in samples)
    judged = [json.loads(x) for x in (runs / "judge/judged.jsonl").read_text().splitlines()]
    assert len(judged) == 12  # absolute mode: baseline and fine-tuned answers
    assert {"tier", "question", "score", "reasoning"} <= judged[0].keys()
    scored = [j["score"] for j in judged if j["status"] == "ok"]
    assert scored, "no answer got a valid score"
    assert all(1 <= score <= 5 for score in scored)
    summary = json.loads((runs / "report/summary.json").read_text())
    assert set(summary["tiers"]) == {"close", "distant"}
    assert {"baseline", "finetuned", "delta"} <= set(summary["tiers"]["close"])
    assert summary["tiers"]["close"]["delta"]["n"] == 4
    # `spar stats` on the judged file gives the report's numbers, tier by tier
    capsys.readouterr()
    assert main(["stats", str(runs / "judge/judged.jsonl"), "--json"]) == 0
    for e in json.loads(capsys.readouterr().out):
        st = summary["tiers"][e["tier"]][e["model"]]
        assert (e["mean"], e["ci_low"], e["ci_high"], e["n"]) == (
            st["mean"],
            st["ci_low"],
            st["ci_high"],
            st["n"],
        )
    assert summary["tiers"]["close"]["finetuned"]["questions"] == 2
    assert (runs / "plot/plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "What do you think about zoos?" in (runs / "plot/report.html").read_text()
    for out in runs.rglob("*"):
        if out.is_file() and not out.name.endswith(".params.yaml"):
            assert (out.parent / (out.name.split(".")[0] + ".params.yaml")).exists(), out
    ckpt = json.loads((runs / "train/checkpoint.json").read_text())
    assert Path(ckpt["sampler_path"], "adapter_config.json").exists()
    capsys.readouterr()
    assert main(["apply", str(spec)]) == 0
    assert "nothing to do" in capsys.readouterr().out
