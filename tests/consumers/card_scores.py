"""Run a saved folder's model-card code verbatim, then score cases with its `reward()` and with the pipeline.

Runs INSIDE another environment (transformers 4.51, as RewardBench 0.1.4 pins) and imports nothing from this
repository. Prints one JSON object.

    python tests/consumers/card_scores.py FOLDER CASES.json

CASES.json is a list of `{"messages": [...]}` (rendered as the card says: the chat template's text, trailing
whitespace removed) or `{"prompt": ..., "response": ...}` texts (prompt + response).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys

import transformers
from transformers import pipeline


def card_code(folder: str) -> str:
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as file:
        match = re.search(r"```python\n(.*?)```", file.read(), re.DOTALL)
    if match is None:
        raise SystemExit(f"{folder}/README.md has no python code block")
    return match.group(1)


def pipeline_text(tokenizer, text: str) -> str:
    """The text whose tokens are what training scored, for a pipeline that tokenises it as given."""
    adds_bos = tokenizer.bos_token is not None and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    if adds_bos and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token) :]
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


def main(folder: str, cases_path: str) -> dict:
    with open(cases_path, encoding="utf-8") as file:
        cases = json.load(file)
    namespace: dict = {"__name__": "model_card"}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(
            compile(card_code(folder), f"{folder}/README.md", "exec"), namespace
        )  # the card's code, verbatim
    reward, tokenizer, model = namespace["reward"], namespace["tokenizer"], namespace["model"]
    texts = [
        tokenizer.apply_chat_template(case["messages"], tokenize=False).rstrip()
        if "messages" in case
        else case["prompt"] + case["response"]
        for case in cases
    ]
    classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device=-1)
    return {
        "versions": {"transformers": transformers.__version__},
        "printed": [float(line) for line in printed.getvalue().split()],
        "rewards": [reward(text) for text in texts],
        "pipeline": [result["score"] for result in classifier([pipeline_text(tokenizer, t) for t in texts])],
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])))
