import numpy as np
import pytest

from fastgen_diffusers.shapes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTE_VALUES,
    HELD_OUT_PAIRS,
    Attributes,
    build_dataset,
    evaluation_prompts,
    make_caption,
    parse_caption,
    render,
    render_attributes,
)
from fastgen_diffusers.shapes.dataset import EVAL_SEED_OFFSET
from fastgen_diffusers.shapes.judge import read_analytic_attributes
from fastgen_diffusers.shapes.tokenizer import build_tokenizer, vocabulary_words


FULL = "a large red triangle at the top left on a white background"


def test_caption_grammar_is_exact():
    attributes = Attributes(size="small", colour="blue", shape="cross", position="center", background="dark gray")
    assert make_caption(attributes) == "a small blue cross at the center on a dark gray background"
    assert make_caption(Attributes(colour="red", shape="circle")) == "a red circle"
    assert make_caption(Attributes(size="large", shape="square", background="white")) == (
        "a large square on a white background"
    )
    assert make_caption(Attributes()) == ""


@pytest.mark.parametrize("seed", range(5))
def test_parser_round_trips_full_and_partial_captions(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        values = {n: ATTRIBUTE_VALUES[n][rng.integers(len(ATTRIBUTE_VALUES[n]))] for n in ATTRIBUTE_NAMES}
        keep = rng.random(len(ATTRIBUTE_NAMES)) < 0.5
        attributes = Attributes(**{n: (v if k else None) for (n, v), k in zip(values.items(), keep)})
        assert parse_caption(make_caption(attributes)) == attributes


def test_parser_prefers_longest_phrases():
    assert parse_caption("a circle at the top left").position == "top left"
    assert parse_caption("a circle at the top").position == "top"
    assert parse_caption("a square on a light gray background").background == "light gray"


@pytest.mark.parametrize("bad", ["a red dog", "red circle", "a circle red", "a", "a circle at top left"])
def test_parser_rejects_text_outside_grammar(bad):
    with pytest.raises(ValueError, match="caption"):
        parse_caption(bad)


def test_attributes_reject_unknown_values():
    with pytest.raises(ValueError, match="colour"):
        Attributes(colour="pink")


def test_render_is_deterministic_and_seed_dependent():
    a, b, c = render(FULL, 7), render(FULL, 7), render(FULL, 8)
    assert a.size == (32, 32) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_render_matches_caption():
    image = np.asarray(render(FULL, 3))
    assert (image[-1, -1] > 240).all()  # white background in the far corner
    read = read_analytic_attributes(image)
    assert read == {"background": "white", "colour": "red", "position": "top left", "size": "large"}


def test_partial_caption_fills_missing_attributes_from_seed():
    images = {render("a red circle", seed).tobytes() for seed in range(6)}
    assert len(images) == 6
    for seed in range(6):
        assert read_analytic_attributes(np.asarray(render("a red circle", seed)))["colour"] == "red"


def test_images_are_anti_aliased():
    image = np.asarray(render("a large green circle at the center on a black background", 0))
    greens = np.unique(image[..., 1])
    assert len(greens) > 5  # edge pixels mix shape and background


def test_dataset_columns_and_caption_mix():
    ds = build_dataset(400, seed=1, partial_caption_prob=0.3, empty_caption_prob=0.1)
    assert set(ds.column_names) == {"caption", "seed", *ATTRIBUTE_NAMES}
    row = ds[0]
    assert row["image"].size == (32, 32)
    captions = ds[:]["caption"]
    empty = sum(c == "" for c in captions) / len(captions)
    assert 0.04 < empty < 0.18
    for i in range(50):
        row = ds[i]
        named = parse_caption(row["caption"])
        for name in ATTRIBUTE_NAMES:
            assert getattr(named, name) in (None, row[name])
        assert np.array_equal(
            np.asarray(row["image"]),
            np.asarray(render_attributes(Attributes(**{n: row[n] for n in ATTRIBUTE_NAMES}), row["seed"])),
        )


def test_train_split_holds_out_pairs_and_seeds():
    train = build_dataset(3000, seed=0, split="train").with_format(None)[:]
    pairs = set(zip(train["colour"], train["shape"]))
    assert not pairs & set(HELD_OUT_PAIRS)
    assert len(HELD_OUT_PAIRS) >= 4
    assert max(train["seed"]) < EVAL_SEED_OFFSET
    prompts = evaluation_prompts(1000)
    assert min(p.seed for p in prompts) >= EVAL_SEED_OFFSET
    assert sum(p.attributes.is_held_out() for p in prompts) > 50
    assert all(p.attributes.is_complete() for p in prompts)
    assert [p.caption for p in evaluation_prompts(20)] == [p.caption for p in prompts[:20]]


def test_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        build_dataset(10, split="test")
    with pytest.raises(ValueError, match="num_samples"):
        build_dataset(0)


def test_tokenizer_gives_each_word_its_own_token(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    ids = [tokenizer(word, add_special_tokens=False).input_ids for word in vocabulary_words()]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(ids)
    assert tokenizer.unk_token_id not in {i[0] for i in ids}
    padded = tokenizer(FULL, padding="max_length", truncation=True).input_ids
    assert len(padded) == tokenizer.model_max_length
    assert tokenizer("a dog").input_ids != tokenizer("a cat").input_ids  # other words still encode, byte by byte
