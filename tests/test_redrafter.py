"""ReDrafter: beam search, prefix merging, exactness (greedy and sampled), errors and the trainer."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from conftest import EOS, exact_sequence_probs, greedy_reference, random_prompts, tiny_loaded, tiny_model
from scipy.stats import chisquare

import hasten
from hasten.backends.transformers.target import TransformersTarget
from hasten.engine import decode, pass_layout
from hasten.errors import HastenError
from hasten.proposers.base import Proposal
from hasten.proposers.redrafter import SHIPPED_HEAD, HeadDrafter, ReDrafterProposer
from hasten.redrafter.beam import beam_search
from hasten.redrafter.head import HeadConfig, ReDrafterHead
from hasten.sampling import SamplingParams
from hasten.training.redrafter import STATE_FILE, TrainConfig, train
from hasten.training.selfdistill import DistillData, teacher_force
from hasten.tree import ROOT, TokenTree, ancestor_mask, depths_of


def random_head(vocab_size: int = 64, hidden: int = 32, draft_vocab: int = 48, seed: int = 1) -> ReDrafterHead:
    """An untrained head whose residual blocks are random too (not the identity they start as)."""
    torch.manual_seed(seed)
    config = HeadConfig(hidden_size=hidden, embed_size=hidden, vocab_size=vocab_size, draft_vocab_size=draft_vocab,
                        state_size=16)
    head = ReDrafterHead(config, torch.randperm(vocab_size)[:draft_vocab])
    for block in head.blocks:
        torch.nn.init.normal_(block.linear.weight, std=0.2)
    return head.eval()


class BigramDrafter:
    """A drafter whose log-probs depend only on the last token, from a hand-written table."""

    def __init__(self, table: dict[int, list[float]], vocab: list[int]) -> None:
        self._vocab = torch.tensor(vocab)
        self.table = {k: torch.tensor(v).log() for k, v in table.items()}

    @property
    def vocab(self) -> torch.Tensor:
        return self._vocab

    def start(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, 1)

    def advance(self, state, tokens):
        return state + 1, torch.stack([self.table[int(t)] for t in tokens])


BIGRAM = BigramDrafter(
    {10: [0.1, 0.5, 0.4, 0.0], 11: [0.2, 0.1, 0.1, 0.6], 12: [0.9, 0.05, 0.05, 0.0], 13: [0.4, 0.2, 0.2, 0.2]},
    vocab=[10, 11, 12, 13],
)


def test_beam_search_hand_worked():
    # Step 1 from root 10 keeps 11 (0.5) and 12 (0.4); step 2: 12->10 = 0.36 beats 11->13 = 0.30, so the
    # best beam starts with the second-best first token.
    beams = beam_search(BIGRAM, root=10, width=2, length=2)
    assert beams.tokens.tolist() == [[12, 10], [11, 13]]
    assert torch.allclose(beams.scores, torch.tensor([0.36, 0.30]).log())
    # Step 3: [12, 10] grows 11 (0.18) and 12 (0.144); [11, 13] can reach only 0.12.
    beams = beam_search(BIGRAM, root=10, width=2, length=3)
    assert beams.tokens.tolist() == [[12, 10, 11], [12, 10, 12]]
    assert torch.allclose(beams.scores, torch.tensor([0.18, 0.144]).log())
    # Width 1 is greedy decoding of the drafter.
    assert beam_search(BIGRAM, root=10, width=1, length=3).tokens.tolist() == [[11, 13, 10]]


def test_beam_scores_are_the_heads_own_sequence_log_probs():
    """Recompute each returned beam alone through the head: the recurrent states were gathered correctly."""
    loaded = tiny_loaded("llama", 0)
    head = random_head().attach(loaded.model)
    hidden = torch.randn(1, 32)
    drafter = HeadDrafter(head, hidden)
    with torch.no_grad():
        beams = beam_search(drafter, root=5, width=6, length=4)
        assert beams.tokens.shape == (6, 4)
        assert len({tuple(b) for b in beams.tokens.tolist()}) == 6
        assert torch.all(beams.scores[:-1] >= beams.scores[1:])
        column = {int(t): i for i, t in enumerate(head.draft_ids)}
        for beam, score in zip(beams.tokens.tolist(), beams.scores, strict=True):
            state, total, last = drafter.start(1), 0.0, 5
            for token in beam:
                state, log_probs = drafter.advance(state, torch.tensor([last]))
                total += float(log_probs[0, column[token]])
                last = token
            assert math.isclose(total, float(score), rel_tol=1e-4, abs_tol=1e-4)


def test_beams_merge_by_shared_prefix_hand_worked():
    beams = torch.tensor([[5, 6, 7], [5, 6, 8], [5, 9, 7], [4, 6, 7]])
    tree = TokenTree.from_paths(beams.tolist())  # nodes in beam-major order: the best beam's path comes first
    assert tree.tokens == [5, 6, 7, 8, 9, 7, 4, 6, 7]
    assert tree.parents == [ROOT, 0, 1, 1, 0, 4, ROOT, 6, 7]
    assert tree.depths() == [1, 2, 3, 3, 2, 3, 1, 2, 3]
    layout = pass_layout(Proposal(tree), root=3)
    assert layout.tokens == [3, 5, 6, 7, 8, 9, 7, 4, 6, 7]
    assert depths_of(layout.parents) == [0, 1, 2, 3, 3, 2, 3, 1, 2, 3]
    mask = ancestor_mask(layout.parents)
    # rows/cols: root, then the nodes; each row sees the root, its ancestors and itself.
    sees = {1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 2, 4], 5: [0, 1, 5], 6: [0, 1, 5, 6],
            7: [0, 7], 8: [0, 7, 8], 9: [0, 7, 8, 9]}
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[0, 0] = True
    for row, cols in sees.items():
        expected[row, cols] = True
    assert torch.equal(mask, expected)
    # Identical beams collapse to one path; a lone beam is a chain.
    assert TokenTree.from_paths([[1, 2], [1, 2]]).tokens == [1, 2]
    assert TokenTree.from_paths([[1, 2, 3]]).is_chain


def test_proposer_records_the_saving_of_merged_prefixes():
    loaded = tiny_loaded("llama", 0)
    proposer = ReDrafterProposer(random_head().attach(loaded.model), beam_width=6, beam_length=5)
    target = TransformersTarget(loaded.model, want_hidden=True)
    list(decode(target, proposer, random_prompts(1)[0], 40, SamplingParams()))
    stats = proposer.tree_stats
    assert stats.steps > 5 and stats.beam_tokens <= 6 * 4 * stats.steps
    assert stats.tree_tokens < stats.beam_tokens  # every beam shares at least its first token with another
    assert 0 < stats.saving < 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_greedy_exact_with_untrained_head(arch):
    loaded = tiny_loaded(arch, seed=3)
    head = random_head(seed=4)
    for i, prompt in enumerate(random_prompts(10, seed=5)):
        reference = greedy_reference(loaded.model, prompt, 24)
        for width, length in ((1, 2), (3, 4), (8, 6))[i % 3 :][:2]:
            result = hasten.generate(loaded, prompt, "redrafter", max_new_tokens=24, head=head,
                                     beam_width=width, beam_length=length)
            assert result.token_ids == reference, (arch, prompt, width, length)


class OracleDrafter(HeadDrafter):
    """Beam 0 follows the target's true greedy continuation; the other beams are the head's."""

    def __init__(self, head, hidden, continuation):
        super().__init__(head, hidden)
        self.continuation = continuation
        self.column = {int(t): i for i, t in enumerate(head.draft_ids)}

    def advance(self, state, tokens):
        state, log_probs = super().advance(state, tokens)
        step = int(self._steps)
        self._steps += 1
        if step < len(self.continuation) and self.continuation[step] in self.column:
            best = log_probs.max() + 5.0 if step == 0 else 0.0
            log_probs[0, self.column[self.continuation[step]]] = best
        return state, log_probs

    def start(self, rows):
        self._steps = 0
        return super().start(rows)


class OracleProposer(ReDrafterProposer):
    """The real proposer with a drafter that knows the target's greedy answer (so acceptance happens)."""

    def __init__(self, head, answer, prompt_len, **kwargs):
        super().__init__(head, **kwargs)
        self.answer, self.prompt_len = answer, prompt_len

    def propose(self, context, max_depth):
        done = len(context) - self.prompt_len
        continuation = self.answer[done:]
        length = min(self.beam_length - 1, max_depth)
        if length <= 0 or self._hidden is None:
            return Proposal(TokenTree())
        drafter = OracleDrafter(self.head, self._hidden, continuation)
        beams = beam_search(drafter, context[-1], self.beam_width, length)
        return Proposal(TokenTree.from_paths(beams.tokens.tolist()))


def test_greedy_exact_when_drafts_are_accepted():
    loaded = tiny_loaded("llama", seed=2)
    head = random_head(draft_vocab=64, seed=6).attach(loaded.model)
    for prompt in random_prompts(8, seed=7):
        reference = greedy_reference(loaded.model, prompt, 30)
        # The oracle knows the answer, except its last token, so a wrong guess happens too.
        proposer = OracleProposer(head, reference[:-1] + [(reference[-1] + 1) % 64], len(prompt),
                                  beam_width=3, beam_length=5)
        target = TransformersTarget(loaded.model, want_hidden=True)
        out = [t for chunk in decode(target, proposer, prompt, 30, SamplingParams(), {EOS}) for t in chunk]
        assert out == reference
    # With the oracle in beam 0, most passes accept several tokens.
    prompt = random_prompts(1, seed=8)[0]
    reference = greedy_reference(loaded.model, prompt, 30)
    proposer = OracleProposer(head, reference, len(prompt), beam_width=3, beam_length=5)
    result_stats = hasten.engine.DecodeStats()
    target = TransformersTarget(loaded.model, want_hidden=True)
    out = [t for chunk in decode(target, proposer, prompt, 30, SamplingParams(), {EOS}, result_stats) for t in chunk]
    assert out == reference
    assert result_stats.mean_accepted > 3


def test_sampling_is_lossless_chi_square():
    vocab, draws = 6, 2000
    model = tiny_model("llama", seed=11, vocab_size=vocab, layers=1, hidden=16, init_std=0.6)
    head = random_head(vocab_size=vocab, hidden=16, draft_vocab=vocab, seed=12).attach(model)
    params = SamplingParams(temperature=1.0, seed=0)
    prompt = [2, 3, 4, 5, 2]
    expected = exact_sequence_probs(model, prompt, params.probs, 3)  # the head drafts after the prefill's token
    generator = params.generator()
    proposer = ReDrafterProposer(head, beam_width=3, beam_length=3)
    target = TransformersTarget(model, want_hidden=True)
    counts: Counter[tuple[int, ...]] = Counter()
    stats = hasten.engine.DecodeStats()
    for _ in range(draws):
        out = [t for chunk in decode(target, proposer, prompt, 3, params, frozenset(), stats, generator) for t in chunk]
        counts[tuple(out)] += 1
    # drafts really were accepted, and rejected, along the way
    assert 100 < stats.accepted_drafts < stats.drafted_tokens / 2
    assert sum(counts.values()) == draws and set(counts) <= set(expected)
    observed, wanted, rest_obs, rest_exp = [], [], 0, 0.0
    for key, p in expected.items():  # pool rare cells so that every expected count is >= 5
        if p * draws >= 5:
            observed.append(counts[key])
            wanted.append(p * draws)
        else:
            rest_obs, rest_exp = rest_obs + counts[key], rest_exp + p * draws
    observed.append(rest_obs)
    wanted.append(rest_exp)
    wanted = [w * draws / sum(wanted) for w in wanted]  # remove float round-off from the total
    assert len(observed) > 10
    assert chisquare(observed, wanted).pvalue > 0.001


def test_errors_are_clear():
    loaded = tiny_loaded("llama", 0)
    with pytest.raises(HastenError, match="--head"):
        hasten.generate(loaded, [2, 3, 4], "redrafter", max_new_tokens=4)
    with pytest.raises(HastenError, match="trained for a target"):
        hasten.generate(loaded, [2, 3, 4], "redrafter", max_new_tokens=4, head=random_head(vocab_size=70))
    with pytest.raises(HastenError, match="beam-width"):
        hasten.generate(loaded, [2, 3, 4], "redrafter", max_new_tokens=4, head=random_head(), beam_width=0)
    with pytest.raises(HastenError, match="not a ReDrafter head"):
        hasten.generate(loaded, [2, 3, 4], "redrafter", max_new_tokens=4, head="/nonexistent")


def fake_distill_data(model, count: int = 24, length: int = 24, seed: int = 0) -> DistillData:
    """Self-distillation data from a tiny model's own greedy answers, in the shared shard format."""
    sequences, masks = [], []
    for prompt in random_prompts(count, seed=seed, repeat=False):
        answer = greedy_reference(model, prompt, length)
        sequences.append(prompt + answer)
        mask = torch.zeros(len(prompt) + len(answer), dtype=torch.bool)
        mask[len(prompt) - 1 : -1] = True
        masks.append(mask)
    loaded = type("Loaded", (), {"model": model})()
    forced = teacher_force(loaded, sequences, top_k=8)
    lengths = torch.tensor([0] + [len(s) for s in sequences])
    return DistillData(
        meta={"model": "tiny", "top_k": 8}, tokens=torch.tensor([t for s in sequences for t in s]),
        seq_starts=lengths.cumsum(0), loss_mask=torch.cat(masks),
        hidden=torch.cat([f["hidden"] for f in forced]), topk_ids=torch.cat([f["topk_ids"] for f in forced]),
        topk_logprobs=torch.cat([f["topk_logprobs"] for f in forced]),
    )


def test_training_learns_saves_and_resumes(tmp_path):
    loaded = tiny_loaded("llama", seed=2)
    data = fake_distill_data(loaded.model)
    config = TrainConfig(steps=60, batch_size=64, lr=1e-2, horizon=3, draft_vocab=40, state_size=32, holdout=0.0)
    report = train(data, loaded.model, tmp_path / "a", config, progress=False)
    assert report["last_loss"] < 0.85 * report["first_loss"]
    head = ReDrafterHead.load(tmp_path / "a")
    assert head.config.draft_vocab_size == 40 and head.config.horizon == 3
    assert json.loads((tmp_path / "a" / "config.json").read_text())["state_size"] == 32

    # Stopping after 30 steps and resuming gives the same head as 60 steps in one go.
    train(data, loaded.model, tmp_path / "b", config, progress=False, pause_after=30)
    assert torch.load(tmp_path / "b" / STATE_FILE, weights_only=True)["step"] == 30
    train(data, loaded.model, tmp_path / "b", config, resume=True, progress=False)
    one_go = torch.load(tmp_path / "a" / STATE_FILE, weights_only=True)["head"]
    resumed = torch.load(tmp_path / "b" / STATE_FILE, weights_only=True)["head"]
    for name, value in one_go.items():
        assert torch.allclose(value, resumed[name], atol=1e-5), name

    # The trained head is exact (of course) and drafts tokens the target accepts, unlike a random one
    # (fixed sizes: what the head earns, not what the adaptive gate makes of it, is compared).
    trained, untrained = [], []
    for prompt in random_prompts(6, seed=40, repeat=False):
        reference = greedy_reference(loaded.model, prompt, 24)
        result = hasten.generate(loaded, prompt, "redrafter", max_new_tokens=24, head=tmp_path / "a",
                                 beam_width=3, beam_length=4, adaptive=False)
        assert result.token_ids == reference
        trained.append(result.mean_accepted)
        untrained.append(hasten.generate(loaded, prompt, "redrafter", max_new_tokens=24, head=random_head(),
                                         beam_width=3, beam_length=4, adaptive=False).mean_accepted)
    assert sum(trained) > sum(untrained) + 0.5


def test_training_records_a_held_out_curve_across_a_resume(tmp_path):
    loaded = tiny_loaded("llama", seed=2)
    data = fake_distill_data(loaded.model)
    config = TrainConfig(steps=40, batch_size=64, lr=1e-2, horizon=3, draft_vocab=40, state_size=32, holdout=0.2)
    train(data, loaded.model, tmp_path, config, progress=False, pause_after=20, eval_every=10)
    report = train(data, loaded.model, tmp_path, config, resume=True, progress=False, eval_every=10)
    assert [point["step"] for point in report["curve"]] == [10, 20, 30, 40]
    assert report["curve"][-1]["top1"] == report["heldout"]["top1"]  # the last point is the final evaluation
    assert report["curve"][-1]["loss"] < report["curve"][0]["loss"]


def test_resume_without_state_is_an_error(tmp_path):
    loaded = tiny_loaded("llama", seed=2)
    with pytest.raises(HastenError, match="nothing to resume"):
        train(fake_distill_data(loaded.model, count=2), loaded.model, tmp_path, TrainConfig(steps=1), resume=True)


@pytest.mark.slow
def test_default_model_hf_greedy_exact_with_shipped_head(default_model_hf):
    from hasten.models import encode_prompt

    assert (SHIPPED_HEAD / "head.safetensors").is_file()
    passes = []
    for prompt in ("What is the capital of France? Answer in two sentences.",
                   "Write a Python function that returns the sum of a list of numbers."):
        ids = encode_prompt(default_model_hf.tokenizer, prompt)
        ref_ids = torch.tensor([ids])
        out = default_model_hf.model.generate(ref_ids, attention_mask=torch.ones_like(ref_ids), max_new_tokens=48,
                                           do_sample=False, eos_token_id=sorted(default_model_hf.eos_token_ids))
        reference = out[0, len(ids):].tolist()
        result = hasten.generate(default_model_hf, prompt, "redrafter", max_new_tokens=48,
                                     adaptive=False)  # fixed beams: not gated by a cost curve measured under load
        assert result.token_ids == reference
        passes.append(result.mean_accepted)
    # the shipped head drafts tokens the target accepts: some on chat, many on code (fixed beams: 1.33 and 3.69)
    assert min(passes) > 1.05 and max(passes) > 2
