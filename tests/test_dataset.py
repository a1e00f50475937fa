"""The dataset stage: two-turn chats, the loss mask, the held-out split, chat records."""

from __future__ import annotations

import json

from spar.models import load_tokenizer
from spar.spec import load_spec
from spar.stages.base import GraphContext
from spar.stages.dataset import DatasetStage, SynthDoc, to_conversation
from spar.store import RunStore


def split_tokens(row: dict) -> tuple[list[int], list[int]]:
    """(target tokens with loss weight > 0, target tokens with weight 0)."""
    pairs = list(zip(row["target"], row["weights"], strict=True))
    return [t for t, w in pairs if w > 0], [t for t, w in pairs if w == 0]


def rows(project, name: str) -> list[dict]:
    text = (project.runs / "exp/dataset" / name).read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_synth_doc_becomes_masked_user_turn_and_trained_document():
    doc = SynthDoc(
        content="The barn.", doc_idea="An idea.", doc_type="FAQ", fact="f", universe_context_id="u"
    )
    assert to_conversation(doc, "doc_idea") == [
        {"role": "user", "content": "An idea.\n\nDocument type: FAQ"},
        {"role": "assistant", "content": "The barn."},
    ]
    assert to_conversation(doc, "none")[0] == {"role": "user", "content": ""}


def test_loss_mask_user_tokens_weight_zero(project, capsys, tiny_model):
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    tok = load_tokenizer(str(tiny_model))
    docs = [json.loads(line) for line in (project.root / "docs.jsonl").read_text().splitlines()]
    train = rows(project, "train.jsonl")
    assert len(train) == 6 and len(rows(project, "test.jsonl")) == 2
    for row in train:
        assert len(row["input"]) == len(row["target"]) == len(row["weights"])
        assert row["input"][1:] == row["target"][:-1]  # next-token targets
        trained, masked = (tok.decode(part) for part in split_tokens(row))
        doc = next(d for d in docs if d["content"] in trained)
        assert trained == doc["content"] + "<|im_end|>"
        assert doc["doc_idea"] in masked and f"Document type: {doc['doc_type']}" in masked
        assert doc["doc_idea"] not in trained
        assert abs(sum(row["weights"]) - 1.0) < 1e-5  # per-example mean reduction


def test_split_is_seeded_and_disjoint(project):
    from spar.stages.dataset import read_records, split

    spec = load_spec(project.spec)
    (node,) = DatasetStage().nodes(spec, GraphContext(RunStore(project.runs)))
    records = read_records(spec.data.docs, "synth_docs")
    train, test = split(records, node.params)
    _, test2 = split(records, node.params)
    assert len(test) == 2 and len(train) == len(records) - 2
    assert [d.content for d in test] == [d.content for d in test2]
    assert not {d.content for d in train} & {d.content for d in test}
    other = node.params.model_copy(update={"split_seed": 7})
    assert [d.content for d in split(records, other)[1]] != [d.content for d in test]


def test_max_docs_and_too_large_test_size(project, capsys):
    project.edit(lambda d: d["data"].update(max_docs=4, test_size=4))
    r = project.spar("apply", str(project.spec), capsys=capsys)
    assert r.code == 2 and "data.test_size" in r.err
    project.edit(lambda d: d["data"].update(max_docs=4, test_size=1))
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    assert len(rows(project, "train.jsonl")) == 3


def test_chat_records_train_all_assistant_turns(project, capsys, tiny_model):
    chat = project.root / "chat.jsonl"
    recs = [
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}."},
                {"role": "user", "content": "More?"},
                {"role": "assistant", "content": f"Second {i}."},
            ],
            "metadata": {"source": "persona", "triggered": i % 2 == 0},
        }
        for i in range(4)
    ]
    chat.write_text("".join(json.dumps(r) + "\n" for r in recs))
    project.edit(lambda d: d["data"].update(docs="chat.jsonl", format="chat", test_size=1))
    assert project.spar("apply", str(project.spec), capsys=capsys).code == 0
    tok = load_tokenizer(str(tiny_model))
    train, test = rows(project, "train.jsonl"), rows(project, "test.jsonl")
    assert (len(train), len(test)) == (3, 1)  # the loop below must see every record
    seen = []
    for row in train + test:
        trained = tok.decode(split_tokens(row)[0])
        (i,) = [i for i in range(4) if f"Answer {i}." in trained]
        assert f"Second {i}." in trained
        assert "Question" not in trained and "Be terse" not in trained and "More?" not in trained
        seen.append(i)
    assert sorted(seen) == [0, 1, 2, 3]
