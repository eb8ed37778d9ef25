"""Metrics of the generation and QA tasks (SQuAD EM/F1, ROUGE-L, BLEU, GSM8K final numbers) on hand-checked cases."""
from __future__ import annotations

import math
from decimal import Decimal

import pytest

from papeft.tasks.metrics import (corpus_bleu, final_number_accuracy, predicted_final_number, rouge_l,
                                  squad_normalize, squad_scores, token_f1)


def test_squad_normalisation_and_exact_match():
    assert squad_normalize("The Cat!") == "cat"
    assert squad_normalize("  an  Apple, a day.") == "apple day"
    assert squad_normalize("theatre") == "theatre"  # articles only as whole words
    assert squad_scores(["The Cat!"], [["cat"]])["em"] == 100.0


def test_token_f1_partial_overlap():
    # "the big red dog" -> [big, red, dog]; "a red dog barked" -> [red, dog, barked]
    # 2 shared tokens: precision 2/3, recall 2/3, F1 2/3
    assert token_f1("the big red dog", "a red dog barked") == pytest.approx(2 / 3)
    assert token_f1("cat", "dog") == 0.0


def test_squad_scores_take_the_best_gold_answer():
    # "Broncos" vs "Denver Broncos": P 1, R 1/2 -> F1 2/3; vs "Carolina": 0. EM 0 against both
    scores = squad_scores(["Broncos", "the Denver Broncos."], [["Carolina", "Denver Broncos"],
                                                               ["Carolina", "Denver Broncos"]])
    assert scores["em"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx((2 / 3 + 1) / 2 * 100)
    assert scores["f1_em"] == pytest.approx((scores["em"] + scores["f1"]) / 2)
    with pytest.raises(ValueError):
        squad_scores(["a"], [])


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat was on the mat") = the cat on the mat = 5 of 6 and 6
    assert rouge_l(["the cat sat on the mat"], [["the cat was on the mat"]]) == pytest.approx(500 / 6)
    # LCS 2: precision 2/2, recall 2/4 -> F 2/3; mean with a second, exact input: (2/3 + 1) / 2
    assert rouge_l(["the cat", "a dog"], [["the cat sat down"], ["a dog"]]) == pytest.approx(250 / 3)
    # several references: the best one counts
    assert rouge_l(["the cat sat on the mat"], [["a dog", "the cat was on the mat"]]) == pytest.approx(500 / 6)


def test_corpus_bleu():
    assert corpus_bleu(["The cat sat on the mat."], [["the cat sat on the mat ."]]) == pytest.approx(100.0)
    assert corpus_bleu(["dogs bark loudly at night"], [["the cat sat on the mat"]]) == 0.0
    # every n-gram precision 1, 5 tokens vs a 6-token reference: brevity penalty exp(1 - 6/5)
    short = corpus_bleu(["the cat sat on the"], [["the cat sat on the mat"]])
    assert short == pytest.approx(100 * math.exp(-0.2))
    # a second reference of length 4 ties with 6 for closeness to 5: the shorter wins, no penalty
    two_refs = ["the cat sat on the mat", "the cat sat on"]
    assert corpus_bleu(["the cat sat on the"], [two_refs]) == pytest.approx(100.0)
    # clipping by the largest count in ONE reference (2, not 1 + 2): unigram precision 2/4
    assert corpus_bleu(["the the the the"], [["the cat", "the the dog dog"]], max_n=1) == pytest.approx(50.0)


@pytest.mark.parametrize("text,number", [
    ("So she has 1,234 apples.", Decimal(1234)), ("The answer is -5", Decimal(-5)),
    ("It costs $3.50.", Decimal("3.5")), ("5-3 = 2", Decimal(2)), ("no number here", None),
    ("48/2 = 24\n#### 72\n\nQuestion: another 5 cats", Decimal(72)),  # the marker wins over later numbers
    ("#### 1,450,000", Decimal(1450000)),
])
def test_final_number_extraction(text, number):
    assert predicted_final_number(text) == number


def test_final_number_accuracy():
    predictions = ["so 1,234", "-5", "3.50", "I don't know", "#### 7"]
    golds = ["1234", "-5", "3.5", "0", "8"]
    assert final_number_accuracy(predictions, golds) == pytest.approx(60.0)
