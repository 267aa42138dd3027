"""K responses per prompt: formats, every comparison in one forward pass (exact against each response alone),
losses, ranking metrics, ZeRO 0-3 and resume with K-wise rows."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from launch_utils import read_metrics, run_command, torchrun, train_rm_args
from tiny_models import make_tokenizer, save_tiny_backbone, tiny_config, write_tiny_pairs, write_tiny_ranked
from transformers import AutoModel

from model_utils import RewardModel, segment_attention
from model_utils.segment_attention import use_segment_attention
from training.data import DataError, load_preference_data, read_preference_rows
from training.data.collate import PackedCollator, PaddedCollator
from training.data.listwise import comparisons_of
from training.data.records import ListwiseOptions, RankedRow
from training.layout import MASK, SEGMENTS, BatchLayout, batch_rewards
from training.losses import comparison_loss, pairwise_loss, plackett_luce_loss
from training.metrics import RewardTable, ranking_statistics

MULTI = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "data"
    / "alpaca-eval-multi"
    / "responses.jsonl.gz"
)
TOLERANCE = 1e-5
PAD = 0


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# --- formats and validation -----------------------------------------------------------------------------------


def test_scored_rows_compare_every_pair_above_the_gap(tmp_path):
    path = write_jsonl(
        tmp_path / "scored.jsonl",
        [{"prompt": "Q?", "responses": [" a", " b", " c", " d"], "scores": [1.0, 3.0, 1.05, 2.0]}],
    )
    (row,) = read_preference_rows(path, listwise=ListwiseOptions(min_score_gap=0.1)).rows
    assert isinstance(row, RankedRow) and row.responses == [" a", " b", " c", " d"]
    assert sorted(row.comparisons) == [(1, 0), (1, 2), (1, 3), (3, 0), (3, 2)]  # a vs c is a near-tie
    (row,) = read_preference_rows(path).rows
    assert (2, 0) in row.comparisons and len(row.comparisons) == 6


def test_ultrafeedback_nectar_and_ranking_layouts(tmp_path):
    completion = lambda text, overall, helpful: {  # noqa: E731
        "response": text,
        "overall_score": overall,
        "annotations": {"helpfulness": {"Rating": helpful, "Rationale": "..."}},
    }
    ultra = write_jsonl(
        tmp_path / "ultra.jsonl",
        [{"instruction": "Q?", "completions": [completion("a", 7.5, "4"), completion("b", 9, "N/A"),
                                                completion("c", 3, "2")]}],
    )  # fmt: skip
    (row,) = read_preference_rows(ultra).rows
    assert row.responses == ["a", "b", "c"] and row.scores == [7.5, 9.0, 3.0]
    source = read_preference_rows(ultra, listwise=ListwiseOptions(ultrafeedback_score="helpfulness"))
    assert source.rows[0].responses == ["a", "c"] and source.responses_dropped == {"unrated": 1}
    nectar = write_jsonl(
        tmp_path / "nectar.jsonl",
        [{"prompt": "\n\nHuman: Q?\n\nAssistant:", "answers": [
            {"answer": "second", "model": "m", "rank": 2}, {"answer": "first", "model": "n", "rank": 1}]}],
    )  # fmt: skip
    (row,) = read_preference_rows(nectar).rows
    assert row.responses == [" second", " first"] and row.comparisons == [(1, 0)]
    ranked = write_jsonl(
        tmp_path / "ranked.jsonl", [{"prompt": "Q?", "ranking": ["best", ["tie1", "tie2"], "last"]}]
    )
    (row,) = read_preference_rows(ranked).rows
    assert (
        row.scores == [0.0, -1.0, -1.0, -2.0] and (1, 2) not in row.comparisons and len(row.comparisons) == 5
    )


def test_chat_message_rows_and_column_map(tmp_path):
    rows = [
        {
            "question": [{"role": "user", "content": "Q?"}],
            "answers": [[{"role": "assistant", "content": "yes"}], [{"role": "assistant", "content": "no"}]],
            "ratings": [1, 0],
        }
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    (row,) = read_preference_rows(
        path, column_map={"prompt": "question", "responses": "answers", "scores": "ratings"}
    ).rows
    assert row.prompt == rows[0]["question"] and row.comparisons == [(0, 1)]


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"prompt": "Q", "responses": ["a", "b"], "scores": [1]}, "scores", "expected 2 numbers"),
        (
            {"prompt": "Q", "responses": ["a", "b"], "scores": [1, "x"]},
            "scores",
            "score 1: expected a number",
        ),
        ({"prompt": "Q", "responses": "a", "scores": [1]}, "responses", "expected a list"),
        ({"prompt": "Q", "responses": ["a", 3], "scores": [1, 0]}, "responses", "response 1"),
        ({"prompt": "Q", "responses": ["a", "b"], "scores": [1, float("nan")]}, "scores", "finite"),
    ],
)
def test_invalid_rows_name_file_line_and_field(tmp_path, row, field, problem):
    good = {"prompt": "Q", "responses": ["a", "b"], "scores": [1, 0]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_preference_rows(str(path))
    message = str(error.value)
    assert f"bad.jsonl line 2: field '{field}'" in message and problem in message, message


def test_dropped_responses_and_rows_without_a_comparison_are_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"prompt": "Q", "responses": ["a", " ", "a", "b"], "scores": [2, 1, 2, 1]},  # empty, duplicate
            {"prompt": "Q", "responses": ["a", "b"], "scores": [1, 1]},  # a tie
            {"prompt": "Q", "responses": ["a", ""], "scores": [1, 0]},  # one response left
            # "c" scored twice, differently: every copy goes, and "d" is left alone.
            {"prompt": "Q", "responses": ["c", "d", "c"], "scores": [1, 5, 9]},
        ],
    )
    source = read_preference_rows(path)
    assert len(source.rows) == 1 and source.rows[0].responses == ["a", "b"]
    assert source.responses_dropped == {"empty": 2, "duplicate": 1, "conflicting_scores": 2}
    assert source.skipped_by_rule == {"no_score_gap": 1, "fewer_than_two_responses": 2}


def test_chat_responses_are_their_own_turns_for_empty_and_repeats(tmp_path):
    user = {"role": "user", "content": "what color"}
    answer = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "prompt": [user],
                # An empty answer behind the repeated prompt; "blue" bare, behind the prompt, and behind the
                # prompt written with other whitespace: one response.
                "responses": [[user, answer("")], [answer("blue")], [user, answer("blue")],
                              [{"role": "user", "content": "what  color\n"}, answer("blue")], [answer("red")]],
                "scores": [9, 5, 5, 5, 1],
            }
        ],
    )  # fmt: skip
    source = read_preference_rows(path)
    (row,) = source.rows
    assert row.responses == [[answer("blue")], [answer("red")]] and row.comparisons == [(0, 1)]
    assert source.responses_dropped == {"empty": 1, "duplicate": 2}


@pytest.mark.parametrize(
    "rating, problem",
    [
        ("nan", "finite"),
        (True, "expected a number"),
        ("four", "Rating is 'four'"),
        ([{"Rating": "4"}], "annotations.helpfulness: expected an object"),
    ],
)
def test_ultrafeedback_ratings_are_validated(tmp_path, rating, problem):
    aspect = rating if isinstance(rating, list) else {"Rating": rating}
    rows = [
        {"instruction": "Q", "completions": [
            {"response": "a", "overall_score": 1, "annotations": {"helpfulness": {"Rating": "4"}}},
            {"response": "b", "overall_score": 2, "annotations": {"helpfulness": aspect}}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    with pytest.raises(DataError) as error:
        read_preference_rows(path, listwise=ListwiseOptions(ultrafeedback_score="helpfulness"))
    message = str(error.value)
    assert "uf.jsonl line 1: field 'completions': item 1: " in message and problem in message, message


def test_ultrafeedback_rating_text_and_prompt_column(tmp_path):
    rows = [
        {"instruction": "I", "system": "S", "completions": [
            {"response": "a", "overall_score": 1, "annotations": {"helpfulness": {"Rating": " 4"}}},
            {"response": "b", "overall_score": 2, "annotations": {"helpfulness": {"Rating": 2}}}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    (row,) = read_preference_rows(path, listwise=ListwiseOptions(ultrafeedback_score="helpfulness")).rows
    assert row.prompt == "I" and row.scores == [4.0, 2.0]
    (row,) = read_preference_rows(path, column_map={"prompt": "system"}).rows
    assert row.prompt == "S" and row.comparisons == [(1, 0)]


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"question": "Q", "ranking": ["a", "b"]}, "prompt", "the ranking holds texts"),
        ({"prompt": "Q", "responses": ["x", "y"], "ranking": ["1", "0"]}, "ranking", "not indices"),
    ],
)
def test_ranking_rows_that_would_train_on_the_wrong_texts_are_refused(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "ranked.jsonl", [row])
    with pytest.raises(DataError) as error:
        read_preference_rows(path)
    message = str(error.value)
    assert f"ranked.jsonl line 1: field '{field}'" in message and problem in message, message


def test_ranking_of_whole_conversations_needs_no_prompt(tmp_path):
    conversation = lambda text: [{"role": "user", "content": "Q"}, {"role": "assistant", "content": text}]  # noqa: E731
    path = write_jsonl(tmp_path / "ranked.jsonl", [{"ranking": [conversation("a"), conversation("b")]}])
    (row,) = read_preference_rows(path).rows
    assert row.prompt == "" and row.comparisons == [(0, 1)]


def test_one_score_gap_rule_for_comparisons_and_decimal_scores(tmp_path):
    # Gaps equal to --min_score_gap count, however the decimals round in binary.
    assert comparisons_of([0.3, 0.2, 0.1], 0.1) == [(0, 1), (0, 2), (1, 2)]
    assert comparisons_of([8.1, 8.0, 1.0], 0.1) == [(0, 1), (0, 2), (1, 2)]
    assert comparisons_of([0.1 + 0.2, 0.3], 0.0) == []  # equal up to rounding: a tie
    # End to end: a row whose only gap equals the threshold trains under Plackett-Luce (it used to raise).
    path = write_jsonl(
        tmp_path / "gap.jsonl", [{"prompt": "Q", "responses": [" a", " b"], "scores": [3.0, 2.9]}]
    )
    data = load_preference_data([path], make_tokenizer(with_pad=True), 32, eval_fraction=0.0,
                                listwise=ListwiseOptions(min_score_gap=0.1))  # fmt: skip
    batch = PaddedCollator(PAD)(list(data.train))
    loss = plackett_luce_loss(
        torch.tensor([0.5, 0.0]), batch["better"], batch["worse"], batch["response_group"]
    )
    torch.testing.assert_close(loss, pairwise_loss(torch.tensor([0.5]), torch.tensor([0.0])))


def test_plackett_luce_trains_pairs_beside_groups_at_any_score_gap(tmp_path):
    # A pair's preference is given, not scored: a gap above 1 used to put both its responses on one level and
    # raise. Pair + group in one batch: the mean of the pair's Bradley-Terry loss and the group's ranking loss.
    tokenizer = make_tokenizer(with_pad=True)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": " a", "rejected": " b"}])
    groups = write_jsonl(
        tmp_path / "groups.jsonl",
        [{"prompt": "R", "responses": [" a", " b", " c"], "scores": [9.0, 5.0, 1.0]}],
    )
    data = load_preference_data([pairs, groups], tokenizer, 32, eval_fraction=0.0,
                                listwise=ListwiseOptions(min_score_gap=2.0))  # fmt: skip
    batch = PaddedCollator(PAD)(list(data.train))
    rewards = torch.tensor([0.4, 2.0, -0.3, 1.0, 0.5])  # branch-major: first responses, then second ones, ...
    loss = plackett_luce_loss(rewards, batch["better"], batch["worse"], batch["response_group"])
    pair, group = (batch["response_group"] == index for index in (0, 1))
    chosen, rejected = rewards[pair]
    r = rewards[group]
    ranking = (-r[0] + torch.logsumexp(r, 0)) + (-r[1] + torch.logsumexp(r[1:], 0))
    torch.testing.assert_close(loss, (pairwise_loss(chosen[None], rejected[None]) + ranking) / 2)


def test_pairs_and_kwise_rows_mix_in_one_run(tmp_path):
    tokenizer = make_tokenizer(with_pad=True)
    pairs = write_tiny_pairs(str(tmp_path / "pairs.jsonl"), 10)
    ranked = write_tiny_ranked(str(tmp_path / "ranked.jsonl"), 10)
    data = load_preference_data([pairs, ranked], tokenizer, 64, eval_fraction=0.0 + 0.2)
    kinds = {("response_ids" in example) for example in data.train}
    assert kinds == {True, False}
    stats = data.stats
    assert stats["train_examples"] == len(data.train) and stats["train_pairs"] > stats["train_examples"]
    group = next(example for example in data.train if "response_ids" in example)
    tokens = [group["prompt_ids"] + response for response in group["response_ids"]]
    assert all(sequence[-1] == tokenizer.eos_token_id for sequence in tokens)
    assert len(group["response_ids"]) == len(group["scores"]) >= 3


@pytest.mark.skipif(not MULTI.exists(), reason="shared alpaca-eval-multi data absent")
def test_alpaca_eval_multi_loads_with_a_score_gap():
    with gzip.open(MULTI, "rt", encoding="utf-8") as file:
        first = json.loads(file.readline())
    source = read_preference_rows(f"{MULTI}[:50]", listwise=ListwiseOptions(min_score_gap=0.05))
    assert len(source.rows) == 50 and source.responses_dropped.get("empty", 0) >= 0
    row = source.rows[0]
    assert row.prompt == first["prompt"] and len(row.responses) == len(first["responses"])
    gaps = [row.scores[b] - row.scores[w] for b, w in row.comparisons]
    assert min(gaps) >= 0.05 and len(row.comparisons) < len(row.responses) * (len(row.responses) - 1) / 2


# --- one forward for every comparison, exact --------------------------------------------------------------------


def make_examples(seed: int = 0) -> list[dict]:
    """Pairs and groups of 3-5 responses, different lengths, an empty prompt, one-token responses."""
    generator = torch.Generator().manual_seed(seed)

    def ids(length: int) -> list[int]:
        return torch.randint(3, 44, (length,), generator=generator).tolist()

    examples = [
        {"prompt_ids": ids(5), "chosen_ids": ids(2) + [1], "rejected_ids": ids(4) + [1], "margin": 0.5},
        {"prompt_ids": ids(3), "response_ids": [ids(2) + [1], [1], ids(5) + [1]], "scores": [2.0, 0.0, 1.0],
         "comparisons": [[0, 1], [0, 2], [2, 1]]},
        {"prompt_ids": [], "response_ids": [ids(3) + [1], ids(1) + [1], ids(2) + [1], ids(6) + [1], [1]],
         "scores": [1.0, 1.0, 0.0, 3.0, 2.0], "comparisons": [[0, 2], [1, 2], [3, 0], [3, 1], [3, 2], [3, 4], [4, 0]]},
        {"prompt_ids": ids(8), "chosen_ids": [1], "rejected_ids": ids(2) + [1], "margin": None},
    ]  # fmt: skip
    return examples


def build_model(architecture: str) -> RewardModel:
    torch.manual_seed(0)
    model = RewardModel(
        AutoModel.from_config(tiny_config(architecture), dtype=torch.float32, attn_implementation="sdpa")
    )
    torch.nn.init.normal_(model.v_head.weight, std=0.5)
    return model.eval()


def alone(model: RewardModel, examples: list[dict]) -> torch.Tensor:
    """Every response scored as `prompt + response` alone, in the batch's response order."""
    batch = PaddedCollator(PAD)(examples)
    return torch.stack(
        [
            model(row[mask.bool()][None], torch.ones(1, int(mask.sum()), dtype=torch.long))[0]
            for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
    )


LAYOUTS = {
    "padded": (BatchLayout(), None),
    "packed rows": (BatchLayout(packing=True, attention=MASK, max_tokens_per_row=16), None),
    "shared rows": (BatchLayout(share_prompt=True, attention=MASK), None),
    "shared rows, split groups": (BatchLayout(packing=True, share_prompt=True, attention=MASK, max_tokens_per_row=12), None),
    "segments": (BatchLayout(packing=True, attention=SEGMENTS), 0),
    "shared segments": (BatchLayout(packing=True, share_prompt=True, attention=SEGMENTS), 0),
    "shared segment blocks": (BatchLayout(packing=True, share_prompt=True, attention=SEGMENTS), 16),
}  # fmt: skip


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2", "opt", "gpt_neox"])
def test_every_layout_scores_each_response_as_if_alone(architecture):
    model = build_model(architecture)
    examples = make_examples()
    with torch.no_grad():
        expected = alone(model, examples)
    gradients = {}
    for name, (layout, block_tokens) in LAYOUTS.items():
        if layout.attention == SEGMENTS:
            use_segment_attention(model)
        batch = layout.collator(PAD)(examples)
        model.zero_grad(set_to_none=True)
        with mock.patch.object(segment_attention, "SEGMENT_BLOCK_TOKENS", block_tokens or 0):
            rewards = batch_rewards(model, batch, layout)
        torch.testing.assert_close(
            rewards, expected.float(), atol=TOLERANCE, rtol=0, msg=f"{architecture} {name}"
        )
        comparison_loss(
            rewards, batch["better"], batch["worse"], batch["comparison_group"], batch.get("margin")
        ).backward()
        gradients[name] = [parameter.grad.clone() for parameter in model.parameters()]
    for name, grads in gradients.items():
        for got, want in zip(grads, gradients["padded"], strict=True):
            torch.testing.assert_close(
                got, want, atol=TOLERANCE, rtol=0, msg=f"{architecture} {name} gradient"
            )


def test_shared_groups_compute_each_prompt_once_and_split_when_too_long():
    examples = make_examples()
    shared = PackedCollator(PAD, None, share_prompt=True, segment_attention=True)(examples)
    prompts = [len(example["prompt_ids"]) for example in examples]
    responses = [sum(map(len, example.get("response_ids", [example.get("chosen_ids"), example.get("rejected_ids")])))
                 for example in examples]  # fmt: skip
    assert shared["input_ids"].numel() == sum(prompts) + sum(responses)
    segments = shared["segments"].tolist()  # (start, prompt, branch lengths...), zeros past a row's K
    assert segments[1][1:] == [3, 3, 1, 6, 0, 0] and segments[2][1:] == [0, 4, 2, 3, 7, 1]
    split = PackedCollator(PAD, 12, share_prompt=True)(examples)
    # The 5-response group with an empty prompt and the 3-response one do not fit 12 tokens: split, each part with
    # the prompt; every response still appears exactly once.
    assert split["input_ids"].ne(PAD).sum() > sum(prompts) + sum(responses)
    assert len(split["reward_index"]) == len(shared["reward_index"]) == 12


# --- losses and metrics -----------------------------------------------------------------------------------------


def test_comparison_loss_weighs_each_prompt_once_and_is_the_pairwise_loss_for_pairs():
    rewards = torch.tensor([0.3, -0.2, 1.0, 0.1, 0.5, -1.0])
    pairs = comparison_loss(
        rewards, torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([0, 1, 2])
    )
    assert torch.equal(pairs, pairwise_loss(rewards[:3], rewards[3:]))
    # Group 0 has three comparisons, group 1 one: each group weighs one half.
    better, worse, group = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4]), torch.tensor([0, 0, 0, 1])
    per = -torch.nn.functional.logsigmoid(rewards[better] - rewards[worse])
    expected = (per[:3].mean() + per[3]) / 2
    torch.testing.assert_close(comparison_loss(rewards, better, worse, group), expected)


def test_plackett_luce_says_that_the_datas_margins_go_unused(tmp_path, caplog):
    from training.arguments import parse_args
    from training.train_rm import load_data

    rows = [{"prompt": "Q", "chosen": f" a{i}", "rejected": " b", "margin": 2.0} for i in range(4)]
    path = write_jsonl(tmp_path / "margins.jsonl", rows)
    for loss, warned in (("pairs", False), ("plackett_luce", True)):
        config = parse_args(["--data_path", path, "--output_dir", str(tmp_path / loss), "--listwise_loss", loss,
                             "--eval_fraction", "0.5", "--data_cache_dir", str(tmp_path / "cache")])  # fmt: skip
        caplog.clear()
        with caplog.at_level("WARNING", logger="training.train_rm"):
            data = load_data(config, make_tokenizer(with_pad=True))
        assert data.train.has_margins
        assert ("margins are not used" in caplog.text) == warned, loss


def plackett_luce_of_scores(rewards: torch.Tensor, scores: list[float], gap: float = 0.0) -> torch.Tensor:
    """Plackett-Luce of one prompt whose responses have `scores` (comparisons as the data makes them)."""
    comparisons = comparisons_of(scores, gap)
    better, worse = (torch.tensor([c[i] for c in comparisons], dtype=torch.long) for i in (0, 1))
    return plackett_luce_loss(rewards, better, worse, torch.zeros(len(scores), dtype=torch.long))


def plackett_luce_of_ranking(rewards: torch.Tensor) -> torch.Tensor:
    """Plackett-Luce's negative log-likelihood of `rewards` listed best first, written out stage by stage."""
    return sum(-rewards[k] + torch.logsumexp(rewards[k:], 0) for k in range(len(rewards) - 1))


def test_plackett_luce_is_the_ranking_likelihood_for_strict_rankings_and_batches():
    rewards = torch.tensor([1.5, -0.5])
    torch.testing.assert_close(
        plackett_luce_of_scores(rewards, [1.0, 0.0]), pairwise_loss(rewards[:1], rewards[1:])
    )
    # Random strict rankings of 2-9 responses, several prompts in one batch in shuffled order: the mean of the
    # prompts' likelihoods, each written out stage by stage.
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        sizes = torch.randint(
            2, 10, (int(torch.randint(1, 5, (1,), generator=generator)),), generator=generator
        )
        group = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        order = torch.randperm(len(group), generator=generator)
        group = group[order]
        rewards = torch.randn(len(group), generator=generator) * 3
        scores = torch.randperm(len(group), generator=generator).double()  # distinct: a strict ranking
        pairs = [(i, j) for i in range(len(group)) for j in range(len(group))
                 if group[i] == group[j] and scores[i] > scores[j]]  # fmt: skip
        better, worse = (torch.tensor([pair[side] for pair in pairs]) for side in (0, 1))
        expected = torch.stack([
            plackett_luce_of_ranking(rewards[group == g][scores[group == g].argsort(descending=True)])
            for g in range(len(sizes))]).mean()  # fmt: skip
        torch.testing.assert_close(plackett_luce_loss(rewards, better, worse, group), expected)


def test_plackett_luce_ties_give_no_term():
    # Scores (3, 1, 1, 0): the best is chosen from all four, each tied response from itself and the worst.
    rewards = torch.tensor([2.0, 0.5, 1.0, -1.0], requires_grad=True)
    loss = plackett_luce_of_scores(rewards, [3.0, 1.0, 1.0, 0.0])
    r = rewards.detach()
    expected = sum(
        -r[i] + torch.logsumexp(r[[i, *below]], 0) for i, below in ((0, [1, 2, 3]), (1, [3]), (2, [3]))
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert rewards.grad[0] < 0 < rewards.grad[3]  # the best is pushed up, the worst down
    # A near-tie within the gap is a tie.
    torch.testing.assert_close(plackett_luce_of_scores(r, [3.0, 1.0, 1.01, 0.0], 0.05), expected)
    # A tied last level costs nothing once the better response is well ahead, however far apart the tied
    # rewards are (Breslow's pull, which made m tied responses cost at least m log m, is gone).
    for spread in (0.0, 5.0):
        assert plackett_luce_of_scores(torch.tensor([30.0, 0.0, -spread]), [2.0, 1.0, 1.0]).item() < 1e-6
    # A gap is not transitive: at gap 0.1, only 3.0 > 2.84 is a comparison, and that is all the loss sees.
    r = torch.tensor([0.2, 1.0, -0.4])
    torch.testing.assert_close(
        plackett_luce_of_scores(r, [3.0, 2.92, 2.84], 0.1), pairwise_loss(r[:1], r[2:])
    )


def test_an_example_without_comparisons_is_left_out_of_the_losses():
    from training.losses import center_rewards_loss

    # Example 0 has no comparison (the loader drops such rows; the losses do not rely on it).
    rewards, group = torch.tensor([0.3, -0.2, 1.0, 0.1]), torch.tensor([0, 0, 1, 1])
    better, worse, comparison_group = torch.tensor([2]), torch.tensor([3]), torch.tensor([1])
    alone = pairwise_loss(rewards[2:3], rewards[3:])
    torch.testing.assert_close(plackett_luce_loss(rewards, better, worse, group), alone)
    torch.testing.assert_close(comparison_loss(rewards, better, worse, comparison_group), alone)
    assert center_rewards_loss(rewards[better], rewards[worse], comparison_group).item() == pytest.approx(
        1.21
    )


def test_ranking_statistics_top1_and_kendall_tau():
    # Prompt 0: rewards order 2 > 0 > 1, scores order 0 > 1 > 2; prompt 1: a pair ranked right.
    table = RewardTable(
        rewards=[1.0, 0.0, 2.0, 0.5, 0.1],
        groups=[0, 0, 0, 1, 1],
        better=[0, 0, 1, 3],
        worse=[1, 2, 2, 4],
    )
    stats = ranking_statistics(table)
    assert stats["num_pairs"] == 4 and stats["num_prompts"] == 2
    assert stats["accuracy"] == 0.5 and stats["top1_accuracy"] == 0.5
    assert stats["kendall_tau"] == pytest.approx(((1 - 2) / 3 + 1) / 2)


def test_ranking_statistics_measure_against_the_comparisons():
    # Scores 5, 4.95, 1 with a gap of 0.1 compare only (0, 2) and (1, 2): 0 and 1 are both best, their order
    # is no miss (as for accuracy). A pair whose rewards tie: accuracy and tau both count no agreement.
    table = RewardTable(
        rewards=[1.0, 2.0, 0.0, 0.3, 0.3], groups=[0, 0, 0, 1, 1], better=[0, 1, 3], worse=[2, 2, 4]
    )
    stats = ranking_statistics(table)
    assert stats["accuracy"] == pytest.approx(2 / 3) and stats["top1_accuracy"] == 0.5  # the tie: a miss
    assert stats["kendall_tau"] == pytest.approx((2 / (3 * 2) ** 0.5 + 0.0) / 2)


# --- training end to end ----------------------------------------------------------------------------------------

COMMON = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_seq_len", "32",
          "--learning_rate", "2e-3", "--dropout", "0.0", "--min_score_gap", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def ranked_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranked")
    model = save_tiny_backbone(str(root / "llama"), "llama")
    make_tokenizer().save_pretrained(model)
    return model, write_tiny_ranked(str(root / "ranked.jsonl"), 160)


def test_kwise_training_learns_and_evaluates_rankings(ranked_setup, tmp_path):
    model, data = ranked_setup
    for loss in ("pairs", "plackett_luce"):
        output = str(tmp_path / loss)
        result = run_command([sys.executable, *train_rm_args(model, data, output, *COMMON, "--num_train_epochs", "8",
                                                             "--listwise_loss", loss)])  # fmt: skip
        assert "prompt sharing True" in result.stderr
        _, evaluations = read_metrics(output)
        final = evaluations[-1]
        assert final["eval_num_pairs"] > final["eval_num_prompts"] == 16
        assert (
            final["eval_accuracy"] > 0.8
            and final["eval_top1_accuracy"] > 0.7
            and final["eval_kendall_tau"] > 0.5
        )
    evaluated = run_command(
        [sys.executable, "-m", "training.evaluate", "--model_name_or_path", output, "--data_path", data, "--min_score_gap", "1"]
    )  # fmt: skip
    record = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert {"top1_accuracy", "kendall_tau", "num_prompts"} <= record.keys() and record["num_prompts"] > 100


def test_train_accuracy_is_over_the_steps_comparisons_however_a_step_is_split(ranked_setup, tmp_path):
    # Groups give 2-10 comparisons each: a mean of per-micro-batch accuracies would weigh a pair's one comparison
    # like a group's ten, so 4 micro-batches of 1 would log another accuracy than 1 micro-batch of 4.
    model, data = ranked_setup
    accuracies = []
    for per_device, accumulation in ((4, 1), (1, 4)):
        output = str(tmp_path / f"split{accumulation}")
        flags = [*COMMON, "--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size",
                 str(per_device), "--gradient_accumulation_steps", str(accumulation)]  # fmt: skip
        run_command([sys.executable, *train_rm_args(model, data, output, *flags)])
        accuracies.append([record["train_accuracy"] for record in read_metrics(output)[0]])
    assert len(accuracies[0]) == 3 and accuracies[1] == pytest.approx(accuracies[0], abs=1e-6)


def test_resume_in_the_middle_of_a_kwise_epoch(ranked_setup, tmp_path):
    model, data = ranked_setup
    output = str(tmp_path / "out")
    flags = [*COMMON, "--max_steps", "10", "--save_interval", "4"]
    run_command([sys.executable, *train_rm_args(model, data, output, *flags, "--keep_checkpoints", "3")])
    uninterrupted, _ = read_metrics(output)
    checkpoints = os.path.join(output, "checkpoints")
    shutil.rmtree(os.path.join(checkpoints, "step_8"))
    with open(os.path.join(checkpoints, "latest"), "w") as file:
        file.write("step_4")  # a crash after step 4 of a 36-step epoch
    run_command([sys.executable, *train_rm_args(model, data, output, *flags, "--resume")])
    resumed, _ = read_metrics(output)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]


@pytest.mark.distributed
def test_zero_stages_give_identical_kwise_losses(ranked_setup, tmp_path):
    model, data = ranked_setup
    losses = {}
    for stage in (0, 1, 2, 3):
        output = str(tmp_path / f"zero{stage}")
        torchrun(train_rm_args(model, data, output, *COMMON, "--max_steps", "4", "--zero_stage", str(stage)))
        losses[stage] = [r["loss"] for r in read_metrics(output)[0]]
    assert len(losses[0]) == 4 and len(set(losses[0])) > 1
    for stage in (1, 2, 3):
        assert losses[stage] == pytest.approx(losses[0], abs=1e-5, rel=0), stage


def test_dschat_loss_refuses_kwise_rows(ranked_setup, tmp_path):
    model, data = ranked_setup
    result = run_command(
        [
            sys.executable,
            *train_rm_args(model, data, str(tmp_path / "out"), *COMMON, "--loss_type", "dschat"),
        ],
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and "pairs only" in result.stderr
