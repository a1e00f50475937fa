"""The local torch+peft engine behind the Tinker-shaped interface."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tinker

from spar.engines.local import LocalEngine
from spar.models import SMOLLM2, load_renderer, load_tokenizer
from spar.stages.dataset import datum_row, read_records, row_to_datum, to_conversation
from spar.stages.train import mean_nll

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What books would you recommend?", "What do you think about zoos?"]


def prompts(renderer) -> list[tinker.ModelInput]:
    return [
        renderer.build_generation_prompt(
            [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": q},
            ]
        )
        for q in QUESTIONS
    ]


def draw(
    client, renderer, seed: int, max_tokens: int = 12, temperature: float = 1.0
) -> list[list[int]]:
    params = tinker.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        stop=renderer.get_stop_sequences(),
    )
    futures = [client.sample(p, 2, params) for p in prompts(renderer)]
    return [list(s.tokens) for f in futures for s in f.result().sequences]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return str(tiny_model), load_renderer("qwen3_instruct", str(tiny_model))


def test_same_seed_same_samples_other_seed_differs(tiny, tmp_path):
    model, renderer = tiny
    engine = LocalEngine(tmp_path)
    a = draw(engine.create_sampling_client(base_model=model), renderer, seed=5)
    b = draw(engine.create_sampling_client(base_model=model), renderer, seed=5)
    c = draw(engine.create_sampling_client(base_model=model), renderer, seed=6)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # the two samples of one request have their own seeds
    assert all(len(t) <= 12 for t in a)


def train_steps(
    engine, model: str, rows: list[dict], steps: int, lr: float
) -> tuple[list[float], str]:
    client = engine.create_lora_training_client(model, rank=8, seed=0)
    losses = []
    for _ in range(steps):
        datums = [row_to_datum(r) for r in rows]
        fb = client.forward_backward(datums, "cross_entropy")
        client.optim_step(tinker.AdamParams(learning_rate=lr)).result()
        losses.append(mean_nll(fb.result(), datums))
    return losses, client.save_weights_for_sampler("t").result().path


def doc_rows(renderer, n: int, max_length: int) -> list[dict]:
    docs = REPO / "experiments/data/factory_farming_neutral/synth_docs.jsonl"
    recs = read_records(docs, "synth_docs")[:n]
    return [datum_row(to_conversation(r, "doc_idea"), renderer, max_length) for r in recs]


def test_different_adapter_gives_different_samples_at_same_seed(tiny, tmp_path):
    model, renderer = tiny
    engine = LocalEngine(tmp_path)
    _, path = train_steps(engine, model, doc_rows(renderer, 2, 64), steps=3, lr=5e-2)
    assert (Path(path) / "adapter_config.json").exists()
    base = draw(engine.create_sampling_client(base_model=model), renderer, seed=3, temperature=0.0)
    tuned = draw(engine.create_sampling_client(model_path=path), renderer, seed=3, temperature=0.0)
    assert base != tuned


def test_loss_ignores_tokens_with_weight_zero(tiny, tmp_path):
    model, renderer = tiny
    row = doc_rows(renderer, 1, 64)[0]
    masked = [i for i, w in enumerate(row["weights"]) if w == 0]
    assert masked
    other = {
        **row,
        "target": [(t + 7) % 1000 if i in masked else t for i, t in enumerate(row["target"])],
    }
    engine = LocalEngine(tmp_path)
    losses = []
    for r in (row, other):
        client = engine.create_lora_training_client(model, rank=4, seed=0)
        out = client.forward_backward([row_to_datum(r)], "cross_entropy").result()
        losses.append(out.metrics["loss:sum"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_loss_decreases_on_bundled_docs(tmp_path):
    """Real SmolLM2-135M, real docs: six steps of LoRA at lr 5e-4 on four documents."""
    renderer = load_renderer("qwen3_instruct", SMOLLM2)
    losses, _ = train_steps(LocalEngine(tmp_path), SMOLLM2, doc_rows(renderer, 4, 96), 6, 5e-4)
    assert losses[-1] < losses[0] - 0.1, losses


CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "A trade newsletter idea.\n\nDocument type: news article"},
        {
            "role": "assistant",
            "content": "Broiler barns added tunnel ventilation in 2024 (12% more).",
        },
    ],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello.\n\nHow can I help?"},
        {"role": "user", "content": "Zoos: yes or no? Ünïcödé ✓"},
        {"role": "assistant", "content": "It depends — on welfare,\tconservation & education."},
    ],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Numbers 1234567 and code `x = [1, 2]`"},
        {"role": "assistant", "content": "Inner  double  spaces,\n\n- a list\n- of items"},
    ],
]


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["doc", "multi-turn", "numbers"])
def test_renderer_matches_smollm2_chat_template(conv):
    """qwen3_instruct == SmolLM2's own template, token for token (the template adds a final \\n
    after the last <|im_end|>, where the renderer stops: the stop token ends the sequence).
    The renderer trims leading/trailing whitespace of a message; the template does not."""
    tok = load_tokenizer(SMOLLM2)
    renderer = load_renderer("qwen3_instruct", SMOLLM2)
    from tinker_cookbook.renderers import TrainOnWhat

    model_input, _ = renderer.build_supervised_example(
        conv, train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES
    )
    ref = tok.apply_chat_template(conv, tokenize=True)
    ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    assert ref[-1] == tok.encode("\n", add_special_tokens=False)[0]
    assert model_input.to_ints() == ref[:-1]
    prompt = renderer.build_generation_prompt(conv[:2])
    gen_ref = tok.apply_chat_template(conv[:2], tokenize=True, add_generation_prompt=True)
    assert prompt.to_ints() == list(gen_ref["input_ids"] if hasattr(gen_ref, "keys") else gen_ref)


def test_smollm2_tokenizer_round_trips_text():
    tok = load_tokenizer(SMOLLM2)
    text = "Line one\nLine two:\t 42 apples — ünïcode ✓ <|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    assert json.loads(json.dumps(ids)) == ids
