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


def test_a_seed_gives_the_same_sample_whatever_else_is_in_the_batch(tiny, tmp_path):
    """The item memo relies on it: a sample depends only on its prompt and its own seed, not on
    the other requests queued with it (their number, prompt lengths, seeds) or its place in the
    left-padded batch. Sample k of a request has seed `seed + k`."""
    # Fails if the rows of a batch shared one generator, or if left padding leaked into a row's
    # result (position ids counted from the padded start, padding not masked out).
    model, renderer = tiny
    engine = LocalEngine(tmp_path)
    stop = renderer.get_stop_sequences()

    def params(seed: int) -> tinker.SamplingParams:
        return tinker.SamplingParams(max_tokens=10, temperature=1.0, seed=seed, stop=stop)

    short, other = prompts(renderer)
    long = renderer.build_generation_prompt(
        [{"role": "user", "content": "Tell me, at some length, " * 12 + "about zoos."}]
    )
    assert len(long.to_ints()) > len(short.to_ints()) + 20  # short is padded by 20+ tokens

    def tokens(response: tinker.SampleResponse) -> list[list[int]]:
        return [list(s.tokens) for s in response.sequences]

    (alone,) = tokens(
        engine.create_sampling_client(base_model=model).sample(short, 1, params(5)).result()
    )
    client = engine.create_sampling_client(base_model=model)
    queued = [
        client.sample(long, 2, params(9)),
        client.sample(other, 1, params(5)),
        client.sample(short, 2, params(4)),  # its second sample has seed 5
        client.sample(short, 1, params(6)),
    ]
    together = [tokens(f.result()) for f in queued]
    assert together[2][1] == alone
    assert together[2][0] != alone and together[3][0] != alone  # the seed matters
    assert together[1][0] != alone  # and so does the prompt


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


# SmolLM2's own token ids for a few strings: byte-level BPE tokens (Ġ a space, Ċ a newline, ĉ a
# tab), digits one by one (llama.cpp's `smollm` pre-tokenizer; this vocabulary has no multi-digit
# token anyway), every special token of the GGUF (token type 3) whole. Each id is checked against
# the GGUF's own vocabulary below; the splits agree with a plain GPT-2 BPE over its merges.
REFERENCE: list[tuple[str, list[tuple[str, int]]]] = [
    ("Hello world", [("Hello", 19556), ("Ġworld", 905)]),
    ("factory farming", [("factory", 14996), ("Ġfarming", 7723)]),
    (
        "Line one\nLine two:\t 42 apples",
        [
            ("Line", 11907),
            ("Ġone", 582),
            ("Ċ", 198),
            ("Line", 11907),
            ("Ġtwo", 827),
            (":", 42),
            ("ĉ", 197),
            ("Ġ", 216),
            ("4", 36),
            ("2", 34),
            ("Ġapples", 13855),
        ],
    ),
    ("1234567", [(str(d), 32 + d) for d in range(1, 8)]),
    (
        "ünïcode ✓",
        [("Ã¼n", 47682), ("Ã¯", 25972), ("code", 4635), ("Ġâ", 4636), ("ľ", 246), ("ĵ", 237)],
    ),
    (
        "a<file_sep>b<|endoftext|> <jupyter_code>",
        [
            ("a", 81),
            ("<file_sep>", 5),
            ("b", 82),
            ("<|endoftext|>", 0),
            ("Ġ", 216),
            ("<jupyter_code>", 13),
        ],
    ),
    (
        "<|im_start|>user\nHi!<|im_end|>",
        [
            ("<|im_start|>", 1),
            ("user", 4093),
            ("Ċ", 198),
            ("Hi", 26843),
            ("!", 17),
            ("<|im_end|>", 2),
        ],
    ),
]


def test_smollm2_tokenizer_gives_smollm2s_own_ids():
    # Fails if the tokenizer rebuilt from the GGUF lost its merges, shifted the vocabulary, lost
    # the byte-level mapping (pre-tokenizer or decoder) or the special tokens (<file_sep> in
    # pieces), and if the tokenizer spar serves for SmolLM2 (the converted directory's) differs.
    from gguf import GGUFReader

    from spar.models import _tokenizer_from_gguf, smollm2_gguf

    vocab = GGUFReader(str(smollm2_gguf())).fields["tokenizer.ggml.tokens"].contents()
    assert len(vocab) == 49152
    for _, pieces in REFERENCE:
        for piece, token_id in pieces:
            assert vocab[token_id] == piece, (piece, token_id)  # the table is the GGUF's
    for tok in (_tokenizer_from_gguf(smollm2_gguf()), load_tokenizer(SMOLLM2)):
        for text, pieces in REFERENCE:
            ids = tok.encode(text, add_special_tokens=False)
            assert ids == [i for _, i in pieces], (text, [vocab[i] for i in ids])
            assert tok.decode(ids) == text


def test_smollm2_tokenizer_round_trips_text():
    tok = load_tokenizer(SMOLLM2)
    text = "Line one\nLine two:\t 42 apples — ünïcode ✓ <|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    assert json.loads(json.dumps(ids)) == ids
