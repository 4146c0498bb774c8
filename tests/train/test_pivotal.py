"""Pivotal tuning on the tiny text encoder: new tokens, frozen original rows, init, schedule, files."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lorabake.config import Pivotal
from lorabake.models import bases
from lorabake.train import pivotal

TOK = Pivotal(token="TOK", num_new_tokens=2)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pivotal") / "tiny"
    bases.build_base("tiny-sd", directory)
    return directory


def _fresh(base_dir):
    """A fresh (tokenizer, text encoder) pair; the encoder frozen, as training loads it."""
    base = bases.load_base(base_dir, parts=("text_encoder",))
    return base.tokenizer, base.text_encoder


@pytest.fixture
def encoder(base_dir):
    return _fresh(base_dir)


def hidden_states(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids).last_hidden_state


def test_new_tokens_tokenize_as_single_ids(encoder):
    tokenizer, text_encoder = encoder
    vocab_size = text_encoder.get_input_embeddings().weight.shape[0]
    vectors = pivotal.add_tokens(tokenizer, text_encoder, TOK, seed=0)

    assert pivotal.new_token_names(TOK) == ["<s0>", "<s1>"]
    assert vectors.shape == (2, text_encoder.config.hidden_size)
    a, photo = (tokenizer(word, add_special_tokens=False).input_ids[0] for word in ("a", "photo"))
    expected = [a, vocab_size, vocab_size + 1, photo]
    assert tokenizer("a <s0><s1> photo", add_special_tokens=False).input_ids == expected
    assert tokenizer(pivotal.substitute("a TOK photo", TOK), add_special_tokens=False).input_ids == expected


def test_substitute_replaces_the_word_only():
    three = Pivotal(token="TOK", num_new_tokens=3)
    text = "TOK, a TOKEN of myTOK next to TOK_2 and TOKs (TOK) tok TOK"
    assert pivotal.substitute(text, three) == (
        "<s0><s1><s2>, a TOKEN of myTOK next to TOK_2 and TOKs (<s0><s1><s2>) tok <s0><s1><s2>")


def test_training_moves_the_new_vectors_and_nothing_else(encoder, base_dir):
    tokenizer, text_encoder = encoder
    original_rows = text_encoder.get_input_embeddings().weight.detach().clone()
    pristine = _fresh(base_dir)
    plain_prompt = "a photo of a cat"
    vectors = pivotal.add_tokens(tokenizer, text_encoder, TOK, seed=0)
    start = vectors.detach().clone()

    optimizer = torch.optim.AdamW([vectors], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        # Pull the tokens' final hidden states towards zero: only the new vectors can move.
        ids = tokenizer(pivotal.substitute("a photo of TOK", TOK), return_tensors="pt").input_ids
        loss = text_encoder(ids).last_hidden_state.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert not torch.allclose(vectors, start)
    embedding = text_encoder.get_input_embeddings()
    assert torch.equal(embedding.weight, original_rows) and embedding.weight.grad is None
    # Prompts without the tokens encode bit for bit as before the tokens were added.
    assert torch.equal(hidden_states(tokenizer, text_encoder, plain_prompt),
                       hidden_states(*pristine, plain_prompt))


def test_init_word_and_seeded_random_start(encoder, base_dir):
    tokenizer, text_encoder = encoder
    weight = text_encoder.get_input_embeddings().weight.detach().clone()
    cat = tokenizer("cat", add_special_tokens=False).input_ids[0]
    from_cat = pivotal.add_tokens(tokenizer, text_encoder, Pivotal(token="TOK", init="cat"), seed=0)
    assert torch.equal(from_cat.detach(), weight[cat].repeat(2, 1))

    def random_start(seed: int) -> torch.Tensor:
        return pivotal.add_tokens(*_fresh(base_dir), TOK, seed=seed).detach()

    assert torch.equal(random_start(1), random_start(1))
    assert not torch.equal(random_start(1), random_start(2))
    many = pivotal.add_tokens(*_fresh(base_dir), Pivotal(token="TOK", num_new_tokens=64), seed=3).detach()
    assert many.std().item() == pytest.approx(weight.std().item(), rel=0.1)


def test_schedule_trains_for_the_first_frac_of_steps():
    half = Pivotal(token="TOK", frac=0.5)
    assert [pivotal.is_training(step, 10, half) for step in range(1, 11)] == [True] * 5 + [False] * 5
    assert pivotal.pivot_step(4, Pivotal(token="TOK", frac=0.1)) == 1  # a short run still trains them
    assert pivotal.learning_rate(half, text_encoder_lr=5e-5) == 5e-5
    assert pivotal.learning_rate(Pivotal(token="TOK", lr=1e-3), text_encoder_lr=5e-5) == 1e-3


def test_frozen_vectors_stop_moving_despite_momentum(encoder):
    tokenizer, text_encoder = encoder
    vectors = pivotal.add_tokens(tokenizer, text_encoder, TOK, seed=0)
    optimizer = torch.optim.AdamW([vectors], lr=1e-2, weight_decay=0.1)
    ids = tokenizer("a <s0><s1>", return_tensors="pt").input_ids
    before_step = {}
    for step in range(1, 5):
        pivotal.freeze_after(vectors, step, total_steps=4, cfg=TOK)
        before_step[step] = vectors.detach().clone()
        loss = text_encoder(ids).last_hidden_state.pow(2).mean()
        optimizer.zero_grad(set_to_none=False)  # a zeroed (not dropped) gradient would still move Adam
        if loss.requires_grad:
            loss.backward()
        optimizer.step()
    assert not torch.equal(before_step[2], before_step[1])  # trained on steps 1 and 2
    assert not vectors.requires_grad
    assert torch.equal(vectors, before_step[3])  # untouched on steps 3 and 4


def test_saved_file_loads_into_a_fresh_encoder(encoder, base_dir, tmp_path):
    tokenizer, text_encoder = encoder
    vectors = pivotal.add_tokens(tokenizer, text_encoder, TOK, seed=0)
    with torch.no_grad():
        vectors.add_(torch.randn(vectors.shape, generator=torch.Generator().manual_seed(5)))
    path = tmp_path / "run.safetensors"
    pivotal.save_embeddings(path, vectors, TOK, {"ss_output_name": "run"})

    fresh_tokenizer, fresh_encoder = _fresh(base_dir)
    pivotal.load_embeddings(path, fresh_tokenizer, fresh_encoder, TOK)
    prompt = pivotal.substitute("a photo of TOK", TOK)
    trained = hidden_states(tokenizer, text_encoder, prompt)
    assert torch.equal(hidden_states(fresh_tokenizer, fresh_encoder, prompt), trained)
    unsaved = _fresh(base_dir)
    pivotal.add_tokens(*unsaved, TOK, seed=0)  # the start the saved vectors moved away from
    assert not torch.allclose(hidden_states(*unsaved, prompt), trained)

    # Loading again into the encoder that already has the tokens replaces its vectors.
    pivotal.load_embeddings(path, tokenizer, text_encoder, TOK)
    assert torch.equal(hidden_states(tokenizer, text_encoder, prompt), trained)


def test_file_is_what_webui_and_comfyui_read(encoder, tmp_path):
    tokenizer, text_encoder = encoder
    vectors = pivotal.add_tokens(tokenizer, text_encoder, TOK, seed=0)
    path = tmp_path / "run.safetensors"
    pivotal.save_embeddings(path, vectors, TOK, {"ss_output_name": "run"})

    with safe_open(path, framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        saved = f.get_tensor("emb_params")
    # A1111 asserts a lone tensor key; ComfyUI takes `clip_l` if present, else the first tensor.
    assert keys == ["emb_params"]
    assert saved.shape == (2, text_encoder.config.hidden_size) and saved.dtype == torch.float32
    assert torch.equal(saved, vectors.detach())
    assert metadata == {"ss_output_name": "run", "pivotal_token": "TOK", "pivotal_tokens": "<s0><s1>"}


def test_mismatched_file_is_refused(encoder, base_dir, tmp_path):
    tokenizer, text_encoder = encoder
    path = tmp_path / "three.safetensors"
    three = Pivotal(token="TOK", num_new_tokens=3)
    pivotal.save_embeddings(path, pivotal.add_tokens(tokenizer, text_encoder, three, seed=0), three, {})
    with pytest.raises(ValueError, match="num_new_tokens is 2"):
        pivotal.load_embeddings(path, *_fresh(base_dir), TOK)
