"""Prompt lookup's confidence: how often a continuation has followed the matched tail (SuffixDecoding's counts)."""

from __future__ import annotations

from hasten.adaptive.chooser import AcceptanceModel, coarser
from hasten.proposers.prompt_lookup import LookupMatch, PromptLookupProposer, frequency_bucket, lookup_features


def test_frequency_bucket_by_quarter_of_the_matches():
    assert frequency_bucket(1, 1) == 0  # one match tells nothing about frequency
    assert [frequency_bucket(a, 8) for a in (0, 1, 2, 3, 4, 6, 8)] == [1, 1, 2, 2, 3, 4, 4]


def test_lookup_counts_every_match_of_the_tail():
    context = [7, 1, 2, 9, 7, 1, 3, 9, 7, 1, 2, 9, 7, 5, 9, 7]
    lookup = PromptLookupProposer(num_tokens=4, max_ngram=4, min_ngram=1, branches=3)
    match = lookup.lookup(context, 2)
    assert match.ngram == 2 and match.paths == [[5, 9], [1, 2], [1, 3]]  # "9 7" matched: what followed it
    # "9 7" occurs 3 times before the tail: followed by 1 3, 1 2 and 5 9
    assert match.frequency == [[frequency_bucket(1, 3), frequency_bucket(1, 3)],
                               [frequency_bucket(2, 3), frequency_bucket(1, 3)],
                               [frequency_bucket(2, 3), frequency_bucket(1, 3)]]
    assert lookup.matches(context, 2) == (2, match.paths)


def test_features_end_with_the_frequency_and_back_off_to_the_old_feature():
    match = LookupMatch(2, [[5, 9], [1]], [[2, 3], [4]])
    features = lookup_features(match, 1)
    assert features == [[("pld", 1, 2, 0, 1, 2), ("pld", 2, 2, 0, 1, 3)], [("pld", 1, 2, 1, 1, 4)]]
    assert coarser(features[0][0]) == ("pld", 1, 2, 0, 1)  # learned without the frequency where it is rare


def test_the_acceptance_model_learns_frequent_continuations_apart():
    model = AcceptanceModel()
    frequent, rare = ("pld", 1, 1, 0, 0, 4), ("pld", 1, 1, 0, 0, 1)
    for _ in range(200):
        model.record(frequent, True)
        model.record(rare, False)
    assert model.estimate(frequent) > 0.9 > 0.1 > model.estimate(rare)
