"""Penalties, logit bias, min_p and grammars under speculation: each row shaped by its own path, losslessly."""

import llguidance
import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_sampling_lossless import assert_same_distribution

from hasten.backends import TransformersModel, TransformersTarget
from hasten.engine import DecodeStats, decode
from hasten.errors import HastenError
from hasten.grammar import Grammar
from hasten.logprobs import token_logprobs
from hasten.penalties import Penalties, PenaltyState
from hasten.proposers.base import Proposer
from hasten.proposers.draft_model import DraftModelProposer
from hasten.proposers.prompt_lookup import PromptLookupProposer
from hasten.sampling import SamplingParams
from hasten.shaping import Shaper
from hasten.tree import ROOT, TokenTree

VOCAB = 12
EOS = 1
PROMPT = [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4]
DRAWS = 3000
# A byte per token: ids 2..11 are the letters a..j (0 and 1 are specials, 1 the end of sequence).
LETTERS = [b"<s>", b"</s>", *(bytes([ord("a") + i]) for i in range(VOCAB - 2))]


class _LetterTokenizer:
    """The smallest tokenizer llguidance reads: one letter per token."""

    eos_token_id, bos_token_id = EOS, 0
    tokens = LETTERS
    special_token_ids = [0, 1]

    def __call__(self, text: bytes | str) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        return [LETTERS.index(bytes([b])) for b in data if bytes([b]) in LETTERS]


def letter_grammar(regex: str) -> Grammar:
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_LetterTokenizer()))
    return Grammar(llguidance.LLMatcher.grammar_from_regex(regex), tokenizer, VOCAB)


def ids(letters: str) -> list[int]:
    return [LETTERS.index(letter.encode()) for letter in letters]


# --- the rules, one row at a time ---------------------------------------------------------------------------

def test_penalties_follow_their_definitions_on_each_path():
    rules = Penalties(presence=0.5, frequency=0.25, repetition=2.0, logit_bias={9: 3.0, 10: -100.0})
    state = PenaltyState(rules, prompt=[2, 3], vocab_size=VOCAB)
    state.commit([4, 4])
    logits = torch.linspace(-3, 3, VOCAB)
    shaped = state.shape(logits.clone(), path=[5, 4])
    expected = logits.clone()
    for token in (2, 3, 4, 5):  # prompt and answer (path included) for the repetition penalty
        expected[token] = expected[token] / 2 if expected[token] > 0 else expected[token] * 2
    expected[4] -= 0.25 * 3 + 0.5  # three times in the answer so far (two committed, one on the path)
    expected[5] -= 0.25 + 0.5
    expected[9] += 3.0
    expected[10] -= 100.0
    torch.testing.assert_close(shaped, expected)
    assert torch.equal(state.shape(logits.clone(), path=[]), state.shape(logits.clone(), path=[]))
    assert not torch.equal(state.shape(logits.clone(), path=[]), shaped)  # the path counts


@pytest.mark.parametrize("bad", [dict(presence=3.0), dict(frequency=float("nan")), dict(repetition=0.0),
                                 dict(logit_bias={-1: 1.0}), dict(logit_bias={3: 101.0}), dict(logit_bias={"3": 1})])
def test_bad_penalties_are_refused(bad):
    with pytest.raises(HastenError):
        Penalties(**bad)


def test_min_p_drops_the_unlikely_and_renormalizes():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = SamplingParams(temperature=1.0, min_p=0.2).probs(logits)
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    with pytest.raises(HastenError):
        SamplingParams(temperature=1.0, min_p=1.5)


def test_logprobs_are_the_raw_log_softmax():
    rows = torch.randn(3, VOCAB)
    found = token_logprobs(rows, [4, 5, 6], top=2)
    reference = rows.log_softmax(-1)
    for i, entry in enumerate(found):
        assert entry.token_id == 4 + i
        assert entry.logprob == pytest.approx(float(reference[i, 4 + i]), abs=1e-6)
        best = reference[i].topk(2)
        assert [t for t, _ in entry.top] == best.indices.tolist()


def test_the_grammar_masks_each_row_by_its_path():
    shaper = Shaper(grammar=letter_grammar("ab(c|d)e").matcher())
    row = torch.zeros(VOCAB)
    assert torch.isfinite(shaper.shape(row, [])).nonzero().flatten().tolist() == ids("a")
    assert torch.isfinite(shaper.shape(row, ids("ab"))).nonzero().flatten().tolist() == ids("cd")
    assert torch.isfinite(shaper.shape(row, ids("a"))).nonzero().flatten().tolist() == ids("b")


def test_prepare_puts_forced_tokens_first_merges_agreeing_drafts_and_prunes_rejected_ones():
    shaper = Shaper(grammar=letter_grammar("ab(c|d)e").matcher())
    # The proposer drafted a-b-c (agrees with the forced a-b, then c is allowed), a-c (rejected) and b (rejected).
    proposed = TokenTree([*ids("abc"), ids("c")[0], ids("b")[0]], [ROOT, 0, 1, 0, ROOT])
    prepared = shaper.prepare(proposed, room=8)
    assert prepared.tree.tokens == ids("abc")
    assert prepared.tree.parents == [ROOT, 0, 1]
    assert prepared.origin == [0, 1, 2]  # every kept node is the proposer's own (merged with the forced chain)
    unshaped = Shaper(grammar=letter_grammar("ab(c|d)e").matcher(), jump_forward=False)
    assert unshaped.prepare(TokenTree(), room=8).tree.tokens == []  # ``ar``: no forced draft


def test_pruned_sampled_rows_are_restricted_to_the_grammar():
    shaper = Shaper(grammar=letter_grammar("(a|b)c").matcher())
    rows = torch.full((2, VOCAB), 1.0 / VOCAB)
    tree = TokenTree(ids("a") + ids("e"), [ROOT, ROOT], rows)
    prepared = shaper.prepare(tree, room=4)
    assert prepared.tree.tokens == ids("a") and prepared.origin == [0]
    row = prepared.tree.draft_probs[0]
    assert row[ids("a")[0]] == pytest.approx(0.5) and row[ids("b")[0]] == pytest.approx(0.5)
    assert row.sum() == pytest.approx(1.0)


class _CountingMatcher:
    """An LLMatcher that counts the tokens it is asked to check or consume."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher, self.tokens = matcher, 0

    def validate_tokens(self, tokens: list[int]) -> int:
        self.tokens += len(tokens)
        return self.matcher.validate_tokens(tokens)

    def consume_token(self, token: int) -> bool:
        self.tokens += 1
        return self.matcher.consume_token(token)

    def __getattr__(self, name: str):
        return getattr(self.matcher, name)


def test_pruning_checks_each_node_by_its_own_token():
    state = letter_grammar("(ab)*c").matcher()
    counting = state.matcher = _CountingMatcher(state.matcher)
    chain = TokenTree.chain(ids("abababababababab"))  # 16 tokens: the whole path of each node would be 136
    assert Shaper(grammar=state).prepare(chain, room=0).tree.tokens == chain.tokens
    assert counting.tokens <= 2 * len(chain)  # one check per node, one step of the matcher per level


def test_pruning_keeps_what_the_whole_path_allows():
    grammar = letter_grammar("(de|f|bc|g)+")
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        size = int(torch.randint(1, 24, (), generator=generator))
        parents = [ROOT] + [int(torch.randint(-1, i, (), generator=generator)) for i in range(1, size)]
        tokens = ids("bcdefg")
        tree = TokenTree([tokens[int(torch.randint(0, 6, (), generator=generator))] for _ in parents], parents)
        prepared = Shaper(grammar=grammar.matcher(), jump_forward=False).prepare(tree, room=0)
        expected = [node for node in range(size) if grammar.matcher().matcher.validate_tokens(
            path := path_to(tree, node)) == len(path)]  # each node on its own, its whole path from the start
        assert prepared.origin == expected
        assert prepared.tree.tokens == [tree.tokens[node] for node in expected]


def path_to(tree: TokenTree, node: int) -> list[int]:
    path = []
    while node != ROOT:
        path.append(tree.tokens[node])
        node = tree.parents[node]
    return path[::-1]


def test_a_mask_goes_to_a_device_once_per_path_and_step():
    state = letter_grammar("ab(c|d)e").matcher()
    shaper = Shaper(grammar=state)
    placed = state.allowed(ids("ab"), "meta")
    assert placed.device.type == "meta" and state.allowed(ids("ab"), "meta") is placed
    assert shaper.shape(torch.zeros(VOCAB, device="meta"), ids("ab")).device.type == "meta"
    assert state.allowed(ids("ab"), "meta") is placed  # the row was masked by the copy already there
    assert state.allowed(ids("ab")) is state.allowed(ids("ab"), "cpu")  # the CPU mask is not copied
    shaper.commit(ids("a"))
    assert state.allowed(ids("b"), "meta") is not placed  # a new step, a new answer: masks made again


# --- lossless end to end on a tiny model -----------------------------------------------------------------------

def makers(params, draft_model):
    return {
        "ar": lambda gen: Proposer(),
        "pld": lambda gen: PromptLookupProposer(num_tokens=3, branches=2),
        "draft": lambda gen: DraftModelProposer(TransformersModel(draft_model), params, num_tokens=3, generator=gen),
    }


def shaped_decode(model, proposer, params, shaper_factory, generator=None, max_new_tokens=3, stats=None, eos=(EOS,)):
    target = TransformersTarget(model)
    shaper = shaper_factory()
    chunks = decode(target, proposer, PROMPT, max_new_tokens, params, set(eos), stats, generator, shaper)
    return [t for chunk in chunks for t in chunk]


def penalty_shaper():
    return Shaper(PenaltyState(Penalties(0.3, 0.2, 1.1, {5: 1.0, 8: -2.0}), PROMPT, VOCAB))


def grammar_shaper():
    return Shaper(grammar=letter_grammar("(de|f|bc|g)+").matcher())


@pytest.mark.parametrize("shaper_factory", [penalty_shaper, grammar_shaper])
@pytest.mark.parametrize("method", ["pld", "draft"])
def test_greedy_shaped_output_equals_plain_shaped_decoding(method, shaper_factory):
    params = SamplingParams()
    stats = DecodeStats()
    for seed in range(3):
        model = tiny_model("llama", 30 + seed, vocab_size=VOCAB, init_std=0.3)
        draft = tiny_model("llama", 30 + seed, vocab_size=VOCAB, init_std=0.3)  # the target's twin, unshaped
        plain = shaped_decode(model, Proposer(), params, shaper_factory, max_new_tokens=24, eos=())
        fast = shaped_decode(model, makers(params, draft)[method](None), params, shaper_factory,
                             max_new_tokens=24, stats=stats, eos=())
        assert fast == plain
    assert stats.accepted_drafts > 0  # drafts were really verified and kept


@torch.inference_mode()
def exact_shaped_joint(model, params, shaper_factory) -> np.ndarray:
    """P(first two tokens) from the model's rows, each shaped by its own path, then processed."""
    shaper = shaper_factory()
    first = params.probs(shaper.shape(model(torch.tensor([PROMPT])).logits[0, -1], []))
    joint = np.zeros((VOCAB, VOCAB))
    for x in range(VOCAB):
        if first[x] == 0:
            continue
        row = model(torch.tensor([PROMPT + [x]])).logits[0, -1]
        if x == EOS:  # the answer ends after one token: counted as (EOS, 0)
            joint[x, 0] = float(first[x])
            continue
        joint[x] = (first[x] * params.probs(shaper.shape(row, [x]))).double().numpy()
    return joint


@pytest.mark.slow
@pytest.mark.parametrize("shaper_factory", [penalty_shaper, grammar_shaper])
@pytest.mark.parametrize("method", ["ar", "pld", "draft"])
def test_sampled_shaped_output_has_the_shaped_distribution(method, shaper_factory):
    params = SamplingParams(temperature=1.0, min_p=0.05)
    model = tiny_model("llama", 21, vocab_size=VOCAB, init_std=0.1)
    draft = tiny_model("llama", 22, vocab_size=VOCAB, layers=1, init_std=0.1)
    generator = torch.Generator().manual_seed(7)
    counts = np.zeros((VOCAB, VOCAB))
    stats = DecodeStats()
    for _ in range(DRAWS):
        tokens = shaped_decode(model, makers(params, draft)[method](generator), params, shaper_factory, generator,
                               stats=stats)
        counts[tokens[0], (tokens + [0])[1]] += 1
    assert_same_distribution(counts, exact_shaped_joint(model, params, shaper_factory))
    if method != "ar":  # drafts were verified, some kept (with the grammar, ``ar`` too: its forced tokens)
        assert stats.accepted_drafts > 0


def test_a_tokenizer_llguidance_cannot_read_is_a_one_line_error():
    from conftest import tiny_tokenizer

    from hasten.grammar import compile_constraint

    with pytest.raises(HastenError, match="not available for this model's tokenizer"):
        compile_constraint(tiny_tokenizer(), 64, {"type": "json_object"})


@pytest.mark.parametrize("bad", [
    5, {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": {}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
])
def test_a_response_format_is_checked_by_check_response_format_alone(bad):
    from hasten.grammar import compile_constraint
    from hasten.response_format import check_response_format

    with pytest.raises(HastenError) as expected:
        check_response_format(bad)
    with pytest.raises(HastenError) as got:
        compile_constraint(None, VOCAB, bad)  # refused before the tokenizer is read
    assert str(got.value) == str(expected.value)
