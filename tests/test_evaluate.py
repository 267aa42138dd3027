"""training.evaluate: reward statistics, the CLI on every saved layout, padding sides, scoring, plots, errors."""

import json
import os

import pytest
import torch
from tiny_models import save_tiny_backbone, tokenizer_dir

from model_utils import create_critic_model, load_tokenizer
from model_utils.checkpoint import save_reward_model
from training.data import PaddedCollator, read_preference_rows, tokenize_rows
from training.evaluate import main
from training.metrics import reward_statistics

PAIRS = [
    ("the cat has", " a red hat", " a blue box"),
    ("what color is the dog ?", " green", " the bird sits on the box"),
    ("where is the box", " on the dog", " no"),
    ("who likes the bird", " the cat likes the bird", " two three four"),
    ("is the hat red", " yes", " no"),
    ("which one", " the green one", " the red one and the blue one"),
]


def write_jsonl(path, pairs) -> str:
    with open(path, "w", encoding="utf-8") as file:
        for prompt, chosen, rejected in pairs:
            file.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(reward model, tokenizer, {format: folder}, data file) on a tiny llama."""
    root = tmp_path_factory.mktemp("evaluate")
    base = save_tiny_backbone(str(root / "base"), "llama")
    tokenizer = load_tokenizer(tokenizer_dir(base))
    reward_model = create_critic_model(base, tokenizer, dropout=0.0).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for parameter in reward_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    folders = {
        save_format: save_reward_model(reward_model, tokenizer, str(root / save_format), save_format)
        for save_format in ("hf", "auto_map", "dschat")
    }
    return reward_model, tokenizer, folders, write_jsonl(root / "pairs.jsonl", PAIRS)


def final_record(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_reward_statistics_ties_count_as_wrong():
    stats = reward_statistics(torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.tensor([1.0, 0.0, 1.5, 1.0]))
    assert stats["accuracy"] == 0.5
    assert stats["num_pairs"] == 4
    assert stats["chosen_mean"] == pytest.approx(1.625)
    assert stats["rejected_mean"] == pytest.approx(0.875)
    assert stats["margin_mean"] == pytest.approx(0.75)
    both = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.0, 1.5, 1.0], dtype=torch.float64)
    assert stats["reward_mean"] == pytest.approx(both.mean().item())
    assert stats["reward_std"] == pytest.approx(both.std(unbiased=False).item())


def test_reward_statistics_rejects_mismatched_or_empty():
    with pytest.raises(ValueError, match="differ in shape"):
        reward_statistics(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="no pairs"):
        reward_statistics(torch.zeros(0), torch.zeros(0))


def expected_statistics(reward_model, tokenizer, data_path: str) -> dict:
    pairs, _ = tokenize_rows(tokenizer, read_preference_rows(data_path).rows, 512)
    batch = PaddedCollator(tokenizer.pad_token_id)(pairs)
    with torch.no_grad():
        rewards = reward_model(batch["input_ids"], batch["attention_mask"])
    return reward_statistics(*rewards.chunk(2))


@pytest.mark.parametrize("save_format", ["hf", "auto_map", "dschat"])
def test_every_layout_gives_the_reward_models_statistics(setup, capsys, save_format):
    reward_model, tokenizer, folders, data_path = setup
    arguments = ["--model_name_or_path", folders[save_format], "--data_path", data_path]
    assert main([*arguments, "--per_device_eval_batch_size", "4"]) == 0
    record = final_record(capsys)
    expected = expected_statistics(reward_model, tokenizer, data_path)
    assert record["num_pairs"] == len(PAIRS)
    for key in ("accuracy", "chosen_mean", "rejected_mean", "margin_mean", "reward_mean", "reward_std"):
        assert record[key] == pytest.approx(expected[key], abs=1e-6), key


def test_left_and_right_padding_give_the_same_numbers(setup, capsys):
    _, _, folders, data_path = setup
    records = {}
    for side in ("left", "right"):
        arguments = ["--model_name_or_path", folders["hf"], "--data_path", data_path, "--padding_side", side]
        assert main([*arguments, "--per_device_eval_batch_size", "3"]) == 0
        records[side] = final_record(capsys)
    for key, value in records["right"].items():
        assert records["left"][key] == pytest.approx(value, abs=1e-5), key


def test_folder_source_uses_its_eval_split(setup, tmp_path, capsys):
    _, _, folders, _ = setup
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    write_jsonl(tmp_path / "test.jsonl", PAIRS[:2])
    assert main(["--model_name_or_path", folders["hf"], "--data_path", str(tmp_path)]) == 0
    assert final_record(capsys)["num_pairs"] == 2


def test_score_prints_the_reward_of_each_response(setup, capsys):
    reward_model, tokenizer, folders, _ = setup
    arguments = ["--model_name_or_path", folders["auto_map"], "--score", "--prompt", "the cat has"]
    assert main([*arguments, "--response", " a red hat", "--response", " no"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    for line, response in zip(lines[:2], (" a red hat", " no"), strict=True):
        input_ids = torch.tensor(
            [tokenizer("the cat has" + response)["input_ids"] + [tokenizer.eos_token_id]]
        )
        with torch.no_grad():
            assert line["reward"] == pytest.approx(reward_model(input_ids).item(), abs=1e-5)
    assert len(lines[-1]["scores"]) == 2


def test_plot_draws_histograms_and_training_curves(setup, tmp_path, capsys):
    _, _, folders, data_path = setup
    with open(tmp_path / "metrics.jsonl", "w", encoding="utf-8") as file:
        for step in range(1, 5):
            file.write(json.dumps({"step": step, "loss": 0.7 - 0.1 * step}) + "\n")
        file.write(json.dumps({"step": 4, "eval_accuracy": 0.5, "eval_margin_mean": 0.1}) + "\n")
    plot = str(tmp_path / "rewards.png")
    arguments = ["--model_name_or_path", folders["hf"], "--data_path", data_path, "--plot", plot]
    assert main([*arguments, "--training_output", str(tmp_path)]) == 0
    assert final_record(capsys)["plot"] == plot
    with open(plot, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_exit_2_naming_the_problem(setup, tmp_path, capsys):
    _, _, folders, data_path = setup
    missing_data = str(tmp_path / "absent.jsonl")
    assert main(["--model_name_or_path", folders["hf"], "--data_path", missing_data]) == 2
    error = capsys.readouterr().err
    assert "absent.jsonl" in error and "Traceback" not in error
    assert main(["--model_name_or_path", str(tmp_path / "nomodel"), "--data_path", data_path]) == 2
    assert "nomodel" in capsys.readouterr().err
    not_a_reward_model = save_tiny_backbone(str(tmp_path / "base"), "llama")
    arguments = ["--model_name_or_path", not_a_reward_model, "--data_path", data_path]
    assert main([*arguments, "--tokenizer_name_or_path", tokenizer_dir(not_a_reward_model)]) == 2
    assert "v_head.weight" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n', encoding="utf-8")
    assert main(["--model_name_or_path", folders["hf"], "--data_path", str(tmp_path / "bad.jsonl")]) == 2
    assert "rejected" in capsys.readouterr().err
    assert os.path.isdir(folders["hf"])


def test_multi_split_folder_is_refused_until_a_split_is_named(setup, tmp_path, capsys):
    _, _, folders, _ = setup
    (tmp_path / "data").mkdir()
    for split, pairs in (("train_prefs", PAIRS), ("train_sft", PAIRS), ("test_prefs", PAIRS[:3])):
        write_jsonl(tmp_path / "data" / f"{split}-00000-of-00001.jsonl", pairs)
    model = ["--model_name_or_path", folders["hf"], "--data_path"]
    assert main([*model, str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "several training splits (train_prefs, train_sft)" in error and "Traceback" not in error
    for source, num_pairs in (
        (f"{tmp_path}:test_prefs", 3),  # an evaluation split: all its rows
        (f"{tmp_path}:train_prefs", 3),  # its paired evaluation split, test_prefs
        (f"{tmp_path}:train_sft[:2]", 2),  # no test_sft: the split's own rows
    ):
        assert main([*model, source]) == 0
        assert final_record(capsys)["num_pairs"] == num_pairs, source


def test_a_backbone_whose_rope_switches_with_the_batch_is_named_on_stderr(tmp_path, capsys):
    """Dynamic NTK rope past `max_position_embeddings` makes a reward depend on its evaluation batch: said on
    stderr, and the evaluation still runs; not said where `--max_seq_len` stays within the switch."""
    from tiny_models import make_tokenizer, tiny_config
    from transformers import AutoModel

    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    base = str(tmp_path / "base")
    AutoModel.from_config(
        tiny_config("llama", max_position_embeddings=8, rope_parameters=rope)
    ).save_pretrained(base)
    tokenizer = make_tokenizer(with_pad=True)
    reward_model = create_critic_model(base, tokenizer, dropout=0.0)
    folder = save_reward_model(reward_model, tokenizer, str(tmp_path / "dynamic"), "hf")
    data_path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    for max_seq_len, warning in (
        (32, "max_position_embeddings=8 tokens, and --max_seq_len allows 32"),
        (8, None),
    ):
        arguments = [
            "--model_name_or_path",
            folder,
            "--data_path",
            data_path,
            "--max_seq_len",
            str(max_seq_len),
        ]
        assert main(arguments) == 0
        error = capsys.readouterr().err
        if warning:
            assert error.count("rewardspeed-evaluate: warning: llama: rope_type 'dynamic'") == 1, error
            assert warning in error and "and on earlier, longer passes" in error, error
        else:
            assert "rope_type" not in error, error
