from __future__ import annotations

from mtkit.errors import did_you_mean, unknown_name


def test_the_closest_name_is_suggested():
    assert did_you_mean("tranformer", ["lstm", "transformer", "gnmt"]) == "; did you mean 'transformer'?"
    assert unknown_name("model.arch value", "lstn", ["gnmt", "lstm"]) == (
        "unknown model.arch value 'lstn'; did you mean 'lstm'?"
    )


def test_without_a_close_name_the_choices_are_listed_in_the_order_given():
    assert did_you_mean("xyz", ["train", "average", "evaluate"]) == "; valid: train, average, evaluate"
    assert did_you_mean("xyz", ("b", "a"), listing="known") == "; known: b, a"
    assert unknown_name("stage", "zzz", iter(["preprocess", "train"])) == (
        "unknown stage 'zzz'; valid: preprocess, train"
    )


def test_no_listing_gives_only_a_close_suggestion():
    assert did_you_mean("xyz", ["adam", "sgd"], listing=None) == ""
    assert did_you_mean("adan", ["adam", "sgd"], listing=None) == "; did you mean 'adam'?"
