"""Score conversations with a saved `hf` reward-model folder the way transformers 4.x users (RewardBench) do.

Runs INSIDE another environment (transformers 4.51, as RewardBench 0.1.4 pins) and imports nothing from this
repository: the folder is read only through transformers' public API. Prints one JSON object.

    python tests/consumers/transformers_scores.py FOLDER CONVERSATIONS.json

CONVERSATIONS.json is a list of chat-message lists; each is rendered with the folder's own chat template.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline


class Records(logging.Handler):
    """Keep every message transformers logs at WARNING or above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def rewardbench_scores(model, tokenizer, texts: list[str]) -> list[float]:
    """RewardBench 0.1.4's default path for sequence classifiers, on CPU.

    `rewardbench.py` sets `tokenizer.padding_side = "left"`; `models/pipeline.py::RewardBenchPipeline.__call__`
    tokenizes the chat-templated texts with `truncation`, `max_length=2048`, `padding=True` and returns
    `model(**inputs).logits`; the score of a row is its single logit.
    """
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, truncation=False, max_length=2048, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits[:, 0].tolist()


def text_classification_scores(model, tokenizer, texts: list[str]) -> list[float]:
    """`pipeline("text-classification")` as users call it: raw rewards, since the saved config says
    `problem_type: regression` (with none, the pipeline applies a sigmoid to a single label)."""
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device=-1)
    return [result["score"] for result in classifier(texts, batch_size=1)]


def main(folder: str, conversations_path: str) -> dict:
    records = Records()
    transformers.logging.get_logger().addHandler(records)
    transformers.logging.set_verbosity_warning()
    with open(conversations_path, encoding="utf-8") as file:
        conversations = json.load(file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            folder, output_loading_info=True, torch_dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations]
    input_ids, attention_mask, scores = {}, {}, {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            scores[side] = model(**batch).logits[:, 0].tolist()
            if side == "left":
                # Absolute-position backbones (GPT-2) need positions from the mask under left padding.
                positions = position_ids_from_mask(batch["attention_mask"])
                scores["left_with_position_ids"] = (
                    model(**batch, position_ids=positions).logits[:, 0].tolist()
                )
        input_ids[side] = batch["input_ids"].tolist()
        attention_mask[side] = batch["attention_mask"].tolist()
    config = model.config
    return {
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "model_class": type(model).__name__,
        "tokenizer_class": type(tokenizer).__name__,
        "loading_info": {key: sorted(map(str, value)) for key, value in loading_info.items()},
        "warnings": records.messages + [str(warning.message) for warning in caught],
        "config": {
            "num_labels": config.num_labels,
            "pad_token_id": config.pad_token_id,
            "rope_theta": getattr(config, "rope_theta", None),
            "torch_dtype": str(config.torch_dtype),
        },
        "tokenizer": {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id},
        "texts": texts,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "scores": scores,
        "rewardbench": rewardbench_scores(model, tokenizer, texts),
        "text_classification": text_classification_scores(model, tokenizer, texts),
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])))
