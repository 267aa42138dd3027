"""One scoring path: `evaluate --score`, the model card's code and the text-classification pipeline give the
training reward, and saved tokenizers load in transformers 4.51 (RewardBench 0.1.4, DeepSpeed-Chat step 3).

The training reward of a response is `RewardModel`'s score of `prompt_ids + chosen_ids` from `tokenize_rows`,
the ids training sees. The tokenizer is the hard case: additional special tokens (as Llama 3 and Qwen have), a
BOS the tokenizer adds and a chat template that writes it again, and ChatML turns whose `<|im_end|>` is the EOS. The `slow` tests run the folder's own files in transformers 4.51
(`tests/test_consumers.py` builds that environment).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from test_consumers import run_consumer, write_json
from test_formats import trained
from tiny_models import make_tokenizer, save_tiny_backbone, tokenizer_dir
from tokenizers import processors
from transformers import AutoTokenizer, pipeline

from model_utils.checkpoint import save_reward_model
from training.data import PreferenceRow, tokenize_rows
from training.evaluate import main as evaluate_main

FORMATS = ("hf", "auto_map", "dschat")
TOLERANCE = 1e-5
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHATML = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
OTHER_RESPONSE = "three four five"  # the rejected side of the reference pairs: never a case's response


def human(text: str) -> dict:
    return {"role": "human", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


CASES = [
    {"messages": [human("the cat has a red hat"), assistant("yes")]},
    {"messages": [human("what color is the box"), assistant("blue"), human("and the hat"), assistant("red")]},
    {"prompt": "who likes the hat", "response": " the dog likes the hat"},
    {"prompt": "is the box green", "response": " no"},
]
TEXTS = ["the cat <|im_start|> has a hat <|im_end|>", "<s> the dog </s> red"]


def chatml_tokenizer():
    """`make_tokenizer` with additional special tokens, an added BOS, ChatML turns and `<|im_end|>` as EOS."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    bos = ("<s>", tokenizer.convert_tokens_to_ids("<s>"))
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[bos]
    )
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    return tokenizer


def case_parts(case: dict) -> tuple:
    """(prompt, response) of a case: a conversation's final assistant turn is its response."""
    if "messages" in case:
        return case["messages"][:-1], case["messages"][-1:]
    return case["prompt"], case["response"]


@torch.no_grad()
def training_rewards(reward_model, tokenizer, cases: list[dict]) -> torch.Tensor:
    """The reward training reads for each case's response: the chosen side of a tokenised pair."""
    rows = []
    for case in cases:
        prompt, response = case_parts(case)
        rejected = [assistant(OTHER_RESPONSE)] if isinstance(response, list) else f" {OTHER_RESPONSE}"
        rows.append(PreferenceRow(prompt, response, rejected, None, "case"))
    pairs, _ = tokenize_rows(tokenizer, rows, 128)
    return torch.cat(
        [reward_model(torch.tensor([pair["prompt_ids"] + pair["chosen_ids"]])) for pair in pairs]
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(reward model, tokenizer, {format: folder}, training rewards of CASES) on a tiny llama."""
    root = tmp_path_factory.mktemp("scoring")  # no "llama" in the path: DeepSpeed-Chat treats those apart
    backbone = save_tiny_backbone(str(root / "base"), "llama")
    chatml_tokenizer().save_pretrained(tokenizer_dir(backbone))
    reward_model, tokenizer = trained(backbone)
    folders = {name: save_reward_model(reward_model, tokenizer, str(root / name), name) for name in FORMATS}
    return reward_model, tokenizer, folders, training_rewards(reward_model, tokenizer, CASES)


def assert_rewards(label: str, actual, expected: torch.Tensor) -> None:
    difference = (torch.as_tensor(actual, dtype=torch.float32) - expected).abs().max().item()
    print(f"{label}: max |difference| {difference:.2e}")
    assert difference < TOLERANCE, f"{label}: {actual} vs {expected.tolist()}"


def card_code(folder: str) -> str:
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as file:
        return re.search(r"```python\n(.*?)```", file.read(), re.DOTALL).group(1)


def card_text(tokenizer, case: dict) -> str:
    """What the card says to score: the chat template's text without trailing whitespace, or prompt + response."""
    if "messages" in case:
        return tokenizer.apply_chat_template(case["messages"], tokenize=False).rstrip()
    return case["prompt"] + case["response"]


# --- in this environment (transformers 5) ---------------------------------------------------------------


def test_the_test_tokenizer_exercises_bos_and_eos_handling(saved):
    _, tokenizer, _, _ = saved
    rendered = tokenizer(tokenizer.apply_chat_template(CASES[0]["messages"], tokenize=False))["input_ids"]
    assert rendered[:2] == [tokenizer.bos_token_id] * 2  # a double BOS that training collapses
    assert rendered[-1] == tokenizer.eos_token_id  # chat rows end on the template's EOS, text rows get one
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.extra_special_tokens == SPECIAL_TOKENS


@pytest.mark.parametrize("save_format", FORMATS)
def test_saved_tokenizer_has_no_keys_transformers_4_cannot_read(saved, save_format):
    _, tokenizer, folders, _ = saved
    with open(os.path.join(folders[save_format], "tokenizer_config.json"), encoding="utf-8") as file:
        values = json.load(file)
    assert values["additional_special_tokens"] == SPECIAL_TOKENS
    assert not {"extra_special_tokens", "is_local", "local_files_only"} & values.keys()
    reloaded = AutoTokenizer.from_pretrained(folders[save_format])  # and transformers 5 still reads it
    assert reloaded.all_special_tokens == tokenizer.all_special_tokens
    assert [reloaded(text)["input_ids"] for text in TEXTS] == [tokenizer(text)["input_ids"] for text in TEXTS]
    conversation = CASES[1]["messages"]
    assert reloaded.apply_chat_template(conversation, tokenize=False) == tokenizer.apply_chat_template(
        conversation, tokenize=False
    )


@pytest.mark.parametrize("save_format", ["hf", "auto_map"])
def test_card_code_gives_the_training_reward(saved, save_format, capsys):
    reward_model, tokenizer, folders, expected = saved
    namespace = {"__name__": "model_card"}
    exec(compile(card_code(folders[save_format]), "README.md", "exec"), namespace)  # verbatim
    printed = [float(line) for line in capsys.readouterr().out.split()]
    assert len(printed) == 2  # its chat and text examples ran
    assert_rewards(
        f"{save_format} card", [namespace["reward"](card_text(tokenizer, c)) for c in CASES], expected
    )
    # Without the EOS that training appends, the score is another number: why the card's code exists.
    model = namespace["model"]
    bare = model(**tokenizer(card_text(tokenizer, CASES[2]), return_tensors="pt")).logits[0, 0].item()
    assert abs(bare - expected[2].item()) > 1e-3


@pytest.mark.parametrize("save_format", ["hf", "auto_map"])
def test_pipeline_returns_the_raw_training_reward(saved, save_format):
    _, tokenizer, folders, expected = saved
    with open(os.path.join(folders[save_format], "config.json"), encoding="utf-8") as file:
        assert json.load(file)["problem_type"] == "regression"
    trust = {"trust_remote_code": True} if save_format == "auto_map" else {}
    classifier = pipeline("text-classification", model=folders[save_format], device=-1, **trust)
    texts = [
        card_text(tokenizer, case).removeprefix("<s>") + ("" if "messages" in case else tokenizer.eos_token)
        for case in CASES
    ]  # the card: the same tokens (one BOS, a final EOS); no sigmoid
    assert_rewards(f"{save_format} pipeline", [result["score"] for result in classifier(texts)], expected)


def scored(capsys) -> list[float]:
    """The rewards evaluate printed, one JSON line per input (its final line holds them all again)."""
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines[-1]["scores"] == [line["reward"] for line in lines[:-1]]
    return lines[-1]["scores"]


def test_evaluate_score_takes_texts_messages_and_files_and_gives_the_training_reward(saved, tmp_path, capsys):
    _, _, folders, expected = saved
    model = ["--model_name_or_path", folders["hf"], "--score"]
    messages = [argument for case in CASES[:2] for argument in ("--messages", json.dumps(case["messages"]))]
    assert evaluate_main([*model, *messages]) == 0
    assert_rewards("--messages", scored(capsys), expected[:2])
    texts = ["--prompt", CASES[2]["prompt"], "--response", CASES[2]["response"]]
    assert (
        evaluate_main([*model, *texts, "--prompt", CASES[3]["prompt"], "--response", CASES[3]["response"]])
        == 0
    )
    assert_rewards("--prompt/--response", scored(capsys), expected[2:])
    reward_model, tokenizer = saved[0], saved[1]
    conversation = [{"role": "user", "content": "the cat has a red hat"}, assistant("yes")]
    uf_style = {"prompt": "the cat has a red hat\n", "response": conversation}  # UltraFeedback's whitespace
    expected = torch.cat([expected, training_rewards(reward_model, tokenizer, [{"messages": conversation}])])
    split_conversation = {"prompt": CASES[1]["messages"][:-1], "response": CASES[1]["messages"][-1:]}
    lines = [*CASES, uf_style, split_conversation]
    score_file = tmp_path / "to_score.jsonl"
    score_file.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    assert evaluate_main([*model, "--score_file", str(score_file)]) == 0
    assert_rewards("--score_file", scored(capsys), torch.cat([expected, expected[1:2]]))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--messages", "[{"], "--messages 1: not valid JSON"),
        (
            ["--messages", json.dumps([human("hi")])],
            "--messages 1: field 'messages': must end with an assistant",
        ),
        (["--messages", json.dumps([{"role": "human"}])], "--messages 1: field 'messages': message 0 needs"),
        (["--score_file", "FILE"], "to_score.jsonl line 2: field 'response': missing"),
    ],
)
def test_evaluate_score_bad_input_exits_2_naming_it(saved, tmp_path, capsys, arguments, message):
    _, _, folders, _ = saved
    score_file = tmp_path / "to_score.jsonl"
    score_file.write_text(
        json.dumps(CASES[2]) + "\n" + json.dumps({"prompt": "the"}) + "\n", encoding="utf-8"
    )
    arguments = [str(score_file) if argument == "FILE" else argument for argument in arguments]
    assert evaluate_main(["--model_name_or_path", folders["hf"], "--score", *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


# --- transformers 4.51, in its own environment -----------------------------------------------------------


@pytest.mark.slow
def test_transformers_451_loads_every_saved_tokenizer(saved, tmp_path):
    _, tokenizer, folders, _ = saved
    unfixed = str(tmp_path / "before_the_fix")  # v5's file with only the class name made 4.x's, as before
    tokenizer.save_pretrained(unfixed)
    with open(os.path.join(unfixed, "tokenizer_config.json"), encoding="utf-8") as file:
        values = {**json.load(file), "tokenizer_class": "PreTrainedTokenizerFast"}
    for name, value in (("tokenizer_config.json", values), ("config.json", {})):
        with open(os.path.join(unfixed, name), "w", encoding="utf-8") as file:
            json.dump(value, file)
    cases = {"texts": TEXTS, "conversations": [case["messages"] for case in CASES[:2]]}
    result = run_consumer(
        "tf451", "tokenizer_load.py", write_json(tmp_path / "cases.json", cases), unfixed, *folders.values()
    )
    assert result["versions"]["transformers"] == "4.51.0"
    # 4.51 reads a list under extra_special_tokens as a dict and fails (AttributeError: 'list' object has no
    # attribute 'keys'; without protobuf it falls back to a slow tokenizer and fails on that instead).
    assert "error" in result["folders"][unfixed]["AutoTokenizer"]
    for save_format, folder in folders.items():
        for loader, loaded in result["folders"][folder].items():
            label = f"{save_format} {loader}"
            assert "error" not in loaded, f"{label}: {loaded}"
            assert loaded["class"] == "PreTrainedTokenizerFast", label
            specials = loaded["special_tokens"]
            assert specials["additional"] == SPECIAL_TOKENS, label
            assert (specials["bos"], specials["eos"]) == (tokenizer.bos_token, tokenizer.eos_token), label
            assert loaded["length"] == len(tokenizer), label
            assert loaded["input_ids"] == [tokenizer(text)["input_ids"] for text in TEXTS], label
            assert loaded["chat"] == [
                tokenizer.apply_chat_template(c, tokenize=False) for c in cases["conversations"]
            ]


@pytest.mark.slow
@pytest.mark.parametrize("save_format", ["hf", "auto_map"])
def test_transformers_451_card_code_and_pipeline_give_the_training_reward(saved, tmp_path, save_format):
    _, _, folders, expected = saved
    result = run_consumer(
        "tf451", "card_scores.py", folders[save_format], write_json(tmp_path / "c.json", CASES)
    )
    assert result["versions"]["transformers"] == "4.51.0" and len(result["printed"]) == 2
    assert_rewards(f"{save_format} card code in transformers 4.51", result["rewards"], expected)
    assert_rewards(f"{save_format} pipeline in transformers 4.51", result["pipeline"], expected)
