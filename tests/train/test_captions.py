"""Caption processing (kohya's shuffle / keep_tokens / dropouts), A1111 emphasis, and the text
encoding the UNet sees (kohya's 75-token windows, clip skip, weighted captions), on tiny-sd."""
from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import torch

from lorabake.config import Captions
from lorabake.models import bases
from lorabake.train.captions import encode_captions, parse_weighted, process_caption, window_ids

TAGS = [f"tag{i}" for i in range(10)]
CAPTION = ", ".join(TAGS)

# 97 words that the CLIP tokenizer keeps whole, so word n is token n of a caption.
WORDS = ("red green blue black white yellow orange purple pink brown gray gold silver dark light big "
         "small tall short long round square cat dog bird fish horse cow sheep pig lion tiger bear wolf "
         "fox tree flower grass river lake sea sky cloud sun moon star rain snow wind fire water stone "
         "rock sand city house road bridge car boat train plane door window table chair bed book lamp "
         "cup bowl plate hat shirt dress shoe coat bag ring watch phone girl boy man woman child hair "
         "eye hand face smile morning night summer winter spring autumn").split()
LONG = " ".join(WORDS[:90])       # 90 tokens: past the first window of 75
FIRST_75 = " ".join(WORDS[:75])


# ---------------------------------------------------------------- process_caption

def test_keep_tokens_stay_in_place_while_the_rest_is_shuffled():
    cfg = Captions(shuffle=True, keep_tokens=3)
    rng = random.Random(0)
    orders = set()
    for _ in range(300):
        tags = process_caption(CAPTION, cfg, rng, epoch=1).split(", ")
        assert tags[:3] == TAGS[:3]
        assert sorted(tags[3:]) == sorted(TAGS[3:])
        orders.add(tuple(tags[3:]))
    assert len(orders) > 250         # 7! = 5040 orders: nearly every draw is a new one


def test_tag_dropout_drops_flexible_tags_at_the_rate():
    cfg = Captions(keep_tokens=2, tag_dropout_rate=0.3)
    rng = random.Random(1)
    kept = 0
    for _ in range(2000):
        tags = process_caption(CAPTION, cfg, rng, epoch=1).split(", ")
        assert tags[:2] == TAGS[:2]                     # kept tags are never dropped
        assert tags[2:] == [t for t in TAGS[2:] if t in tags[2:]]   # no shuffle: order kept
        kept += len(tags) - 2
    assert kept / (2000 * 8) == pytest.approx(0.7, abs=0.02)


def test_dropout_every_n_epochs_empties_exactly_those_epochs():
    cfg = Captions(dropout_every_n_epochs=3, shuffle=True, keep_tokens=1)
    rng = random.Random(2)
    empty = [epoch for epoch in range(1, 13) if process_caption(CAPTION, cfg, rng, epoch) == ""]
    assert empty == [3, 6, 9, 12]


def test_dropout_rate_empties_captions_at_the_rate():
    rng = random.Random(3)
    draws = [process_caption(CAPTION, Captions(dropout_rate=0.25), rng, epoch=1) for _ in range(4000)]
    assert draws.count("") / 4000 == pytest.approx(0.25, abs=0.03)
    assert set(draws) == {"", CAPTION}
    assert process_caption(CAPTION, Captions(dropout_rate=1.0), rng, epoch=1) == ""


def test_nothing_applies_returns_the_same_string_and_draws_nothing():
    caption = "a,, b ,c"                # odd spacing is left alone when nothing rewrites the tags
    rng = random.Random(4)
    state = rng.getstate()
    assert process_caption(caption, Captions(keep_tokens=2), rng, epoch=5) is caption
    assert rng.getstate() == state


def test_separator_splits_strips_and_drops_empty_tags():
    cfg = Captions(shuffle=True, keep_tokens=1, separator=";")
    out = process_caption(" a ;b;; c ;", cfg, random.Random(5), epoch=1)
    assert out.startswith("a; ") and sorted(out.split("; ")) == ["a", "b", "c"]


def test_same_seed_same_captions():
    cfg = Captions(shuffle=True, tag_dropout_rate=0.2, dropout_rate=0.1)
    runs = [[process_caption(CAPTION, cfg, rng, e) for e in range(1, 50)]
            for rng in (random.Random(7), random.Random(7))]
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- parse_weighted

@pytest.mark.parametrize("text, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("[[x]] y", [("x", 1 / 1.1 ** 2), (" y", 1.0)]),
    ("(x:1.3)", [("x", 1.3)]),
    ("( x : 0.5 ) y", [(" x ", 0.5), (" y", 1.0)]),
    ("a) b] c:1.2)", [("a) b] c:1.2)", 1.0)]),      # closers with no opener are text
    ("[a (b", [("a ", 1 / 1.1), ("b", 1.1 / 1.1)]),   # still open at the end: applies to the rest
    ("(x:1.2.3)", [("x:1.2.3", 1.1)]),               # not a number: text (A1111 would raise)
    (r"a\\b", [("a\\b", 1.0)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
])
def test_parse_weighted_reads_a1111_emphasis(text, expected):
    parsed = parse_weighted(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


# ---------------------------------------------------------------- encode_captions

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("base") / "tiny-sd"
    bases.build_base("tiny-sd", base_dir)
    return bases.load_base(base_dir, parts=("text_encoder",))


def plain_states(base, captions: list[str], **tokenizer_args) -> torch.Tensor:
    ids = base.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt", **tokenizer_args).input_ids
    return base.text_encoder(ids)[0]


def test_75_tokens_is_the_plain_sd1_encoding(base):
    captions = ["a photo of a cat", "", LONG, "(cat:1.5), [dog]"]
    with torch.no_grad():
        ours = encode_captions(base.tokenizer, base.text_encoder, captions)
        assert torch.equal(ours, plain_states(base, captions))


def test_150_tokens_follows_kohyas_window_layout(base):
    """Rebuild kohya's ids (tokenize to 152, cut BOS + 75 + last id windows) and join its way."""
    ids = base.tokenizer([LONG], padding="max_length", max_length=152, truncation=True).input_ids[0]
    windows = torch.tensor([[ids[0], *ids[i : i + 75], ids[-1]] for i in (1, 76)])
    with torch.no_grad():
        states = base.text_encoder(windows)[0]
        expected = torch.cat([states[0, :1], states[0, 1:-1], states[1, 1:-1], states[1, -1:]])
        ours = encode_captions(base.tokenizer, base.text_encoder, [LONG], max_token_length=150)
    assert ours.shape == (1, 152, 32)
    assert torch.equal(ours[0], expected)


def test_a_long_caption_reaches_the_second_window(base):
    tok, te = base.tokenizer, base.text_encoder
    with torch.no_grad():
        long_150, short_150 = encode_captions(tok, te, [LONG, FIRST_75], max_token_length=150)
        long_75 = encode_captions(tok, te, [LONG])[0]
        long_225 = encode_captions(tok, te, [LONG], max_token_length=225)[0]
    # The first window is the 75-token encoding of the first 75 tokens, whatever follows.
    torch.testing.assert_close(long_150[:76], long_75[:76], rtol=0, atol=1e-6)
    torch.testing.assert_close(short_150[:76], long_75[:76], rtol=0, atol=1e-6)
    # Tokens 76-90 exist only in LONG: the second window differs where they are.
    assert (long_150[76:91] - short_150[76:91]).abs().amax(dim=-1).min() > 1e-3
    assert long_225.shape == (227, 32)
    torch.testing.assert_close(long_225[:151], long_150[:151], rtol=0, atol=1e-6)


def test_clip_skip_takes_the_normed_earlier_layer(base):
    tok, te = base.tokenizer, base.text_encoder
    captions = ["a photo of a cat", "red dog"]
    with torch.no_grad():
        skip_1 = encode_captions(tok, te, captions, clip_skip=1)
        skip_2 = encode_captions(tok, te, captions, clip_skip=2)
        ids = tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
        layers = te(ids, output_hidden_states=True).hidden_states
        expected = te.final_layer_norm(layers[-2])
    assert not torch.allclose(skip_1, skip_2, atol=1e-3)
    torch.testing.assert_close(skip_2, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="clip_skip 4"):
        encode_captions(tok, te, captions, clip_skip=4)    # tiny-sd has 3 layers


def with_biased_norm(text_encoder, bias: float):
    """A copy whose final layer norm has a bias, so its states have a mean to keep (a real CLIP's
    trained norm does; tiny-sd's untrained one gives states of mean ~0)."""
    biased = copy.deepcopy(text_encoder)
    with torch.no_grad():
        biased.final_layer_norm.bias.fill_(bias)
    return biased


def test_weights_scale_their_tokens_and_keep_the_mean(base):
    tok, te = base.tokenizer, with_biased_norm(base.text_encoder, 0.5)
    with torch.no_grad():
        plain = encode_captions(tok, te, ["a photo of a cat"])[0]
        emphasized = encode_captions(tok, te, ["a photo of a (cat:1.5)"], weighted=True)[0]
        bare = encode_captions(tok, te, ["cat"], weighted=True)
        heavy = encode_captions(tok, te, ["(cat:1.5)"], weighted=True)
    # Same tokens, so every position is the plain state times its weight times one rescale.
    ratio = emphasized / plain
    rescale = ratio[0, 0]
    torch.testing.assert_close(ratio[5], torch.full_like(ratio[5], 1.5 * rescale), rtol=1e-4, atol=1e-5)
    others = torch.cat([ratio[:5], ratio[6:]])
    torch.testing.assert_close(others, torch.full_like(others, rescale), rtol=1e-4, atol=1e-5)
    # One of 77 positions weighs 1.5: the mean would grow by 0.5/77 without the rescale.
    assert rescale.item() == pytest.approx(1 / (1 + 0.5 / 77 * plain[5].mean().item() / plain.mean().item()),
                                          rel=1e-4)
    torch.testing.assert_close(emphasized.mean(), plain.mean(), rtol=1e-5, atol=0)
    assert not torch.allclose(bare, heavy, atol=1e-4)


def test_zero_mean_states_get_the_plain_product(base):
    """tiny-sd's states have mean ~0 (0.0 exactly for some captions): 0/0 would give NaN states."""
    tok, te = base.tokenizer, base.text_encoder
    with torch.no_grad():
        plain = encode_captions(tok, te, ["a cat", "a cat"], clip_skip=2)
        ours = encode_captions(tok, te, ["a [cat]", "a (cat:1.2)"], clip_skip=2, weighted=True)
    assert plain.mean().abs() < 1e-6 * plain.abs().mean()
    expected = plain.clone()
    expected[0, 2] /= 1.1
    expected[1, 2] *= 1.2
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


def test_weights_of_one_reproduce_the_unweighted_encoding(base):
    tok, te = base.tokenizer, base.text_encoder
    with torch.no_grad():
        plain = encode_captions(tok, te, ["a photo of a cat", LONG], max_token_length=150)
        unit = encode_captions(tok, te, ["a photo of a (cat:1.0)", LONG], max_token_length=150, weighted=True)
    assert torch.equal(unit, plain)


def test_weights_reach_the_second_window(base):
    tok, te = base.tokenizer, base.text_encoder
    emphasized = " ".join(WORDS[:80]) + f" ({WORDS[80]}:2)"     # token 81: position 81 of 152
    with torch.no_grad():
        plain = encode_captions(tok, te, [" ".join(WORDS[:81])], max_token_length=150)[0]
        ours = encode_captions(tok, te, [emphasized], max_token_length=150, weighted=True)[0]
    ratio = ours / plain
    torch.testing.assert_close(ratio[81], torch.full_like(ratio[81], 2 * ratio[0, 0]), rtol=1e-4, atol=1e-5)


def test_unweighted_brackets_are_text(base):
    with torch.no_grad():
        ours = encode_captions(base.tokenizer, base.text_encoder, ["(cat:1.5), [dog]"])
        assert torch.equal(ours, plain_states(base, ["(cat:1.5), [dog]"]))
        assert not torch.equal(ours, plain_states(base, ["cat, dog"]))


@pytest.mark.parametrize("bias", [0.0, 0.5])     # weights without and with the mean rescale
def test_gradients_reach_a_training_text_encoder(base, bias):
    text_encoder = with_biased_norm(base.text_encoder, bias).requires_grad_(True)
    states = encode_captions(base.tokenizer, text_encoder, ["a (cat:1.3)", LONG],
                             max_token_length=150, clip_skip=2, weighted=True)
    states.square().mean().backward()
    used = [text_encoder.embeddings, *text_encoder.encoder.layers[:-1], text_encoder.final_layer_norm]
    grads = [p.grad for module in used for p in module.parameters()]     # clip skip 2: not the last layer
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert text_encoder.embeddings.token_embedding.weight.grad.abs().sum() > 0


def test_states_keep_the_text_encoders_dtype(base):
    text_encoder = copy.deepcopy(base.text_encoder).to(torch.bfloat16)
    with torch.no_grad():
        states, reference = (encode_captions(base.tokenizer, encoder, ["a [cat]"], max_token_length=150, weighted=True)
                             for encoder in (text_encoder, base.text_encoder))
    assert states.dtype == torch.bfloat16 and states.shape == (1, 152, 32)
    torch.testing.assert_close(states.float(), reference, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------- window ids with a separate pad (SD2)

def test_windows_with_a_separate_pad_token_follow_kohya():
    tokenizer = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0, model_max_length=77)
    short = window_ids(tokenizer, [9] * 10, 150)
    assert short[0] == [1] + [9] * 10 + [2] + [0] * 64 + [0]
    assert short[1] == [1, 2] + [0] * 74 + [0]      # a window past the caption opens with EOS
    full = window_ids(tokenizer, [9] * 75, 150)
    assert full[0] == [1] + [9] * 75 + [2]           # text to the end: closed with EOS
    assert full[1] == [1, 2] + [0] * 74 + [0]
    assert window_ids(tokenizer, [9] * 200, 150) == [[1] + [9] * 75 + [2]] * 2
