"""Load saved tokenizers the way transformers 4.x users do (AutoTokenizer; DeepSpeed-Chat's `load_hf_tokenizer`).

Runs INSIDE another environment (transformers 4.51) and imports nothing from this repository. Prints one JSON
object: per folder, per loader, the class, special tokens, ids of the texts and the chat renderings (or the
error).

    python tests/consumers/tokenizer_load.py CASES.json FOLDER...

CASES.json: `{"texts": [...], "conversations": [[messages], ...]}`.
"""

from __future__ import annotations

import json
import os
import sys

import transformers
from transformers import AutoTokenizer


def deepspeed_chat_tokenizer(folder: str):
    """DeepSpeed-Chat step 3's `dschat/utils/utils.py::load_hf_tokenizer` for a local folder (non-llama path):
    the name in `config.json` `_name_or_path` (else the folder), `AutoTokenizer.from_pretrained(name,
    fast_tokenizer=True)`, pad set to EOS, right padding."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as file:
        name = json.load(file).get("_name_or_path", folder)
    tokenizer = AutoTokenizer.from_pretrained(name, fast_tokenizer=True)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def describe(tokenizer, cases: dict) -> dict:
    return {
        "class": type(tokenizer).__name__,
        "special_tokens": {
            "bos": tokenizer.bos_token,
            "eos": tokenizer.eos_token,
            "unk": tokenizer.unk_token,
            "pad": tokenizer.pad_token,
            "additional": list(tokenizer.additional_special_tokens),
        },
        "length": len(tokenizer),
        "input_ids": [tokenizer(text)["input_ids"] for text in cases["texts"]],
        "chat": [
            tokenizer.apply_chat_template(messages, tokenize=False) for messages in cases["conversations"]
        ],
    }


def main(cases_path: str, folders: list[str]) -> dict:
    with open(cases_path, encoding="utf-8") as file:
        cases = json.load(file)
    loaders = {"AutoTokenizer": AutoTokenizer.from_pretrained, "DeepSpeed-Chat": deepspeed_chat_tokenizer}
    results = {}
    for folder in folders:
        results[folder] = {}
        for name, load in loaders.items():
            try:
                results[folder][name] = describe(load(folder), cases)
            except Exception as error:  # the failure is the finding: report it, do not stop
                results[folder][name] = {"error": f"{type(error).__name__}: {error}"}
    return {"versions": {"transformers": transformers.__version__}, "folders": results}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
