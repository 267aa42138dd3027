"""One saved folder, the real consumers: transformers 4.51 (RewardBench), TRL, DeepSpeed-Chat step 3.

    python -m pytest tests/test_consumers.py -m slow -q   # the other environments (the DeepSpeed-Chat check runs by default)

The transformers and TRL checks run `tests/consumers/*.py` inside their own virtual environments (built on first
use under `$REWARDSPEED_VENV_DIR`, default `~/.cache/rewardspeed/venvs`, and reused while their pinned requirements
are unchanged); those scripts import nothing from this repository and print JSON, which is compared here with
`RewardModel`'s scores for the same tokens. Without a reachable package index these tests skip.

- `tf451`: transformers 4.51.0, the version RewardBench 0.1.4 pins (with accelerate, which it needs).
- `trl019`: TRL 0.19.1 (the newest TRL with `PPOTrainer`/`get_reward` in `trl.trainer` and GRPO's string reward
  functions, on the same transformers 4.51.0).

The DeepSpeed-Chat check needs no install: it rebuilds DeepSpeed-Chat's step-3 `create_critic_model(...,
rlhf_training=True)` (`dschat/utils/model/model_utils.py`, `reward_model.py`) here, as it loads a folder.

Position handling: transformers' GPT-2 takes absolute positions 0..T-1 unless `position_ids` are passed, so a
left-padded GPT-2 batch (RewardBench pads left; DeepSpeed-Chat left-pads prompts) shifts every real token and
scores differently from the unpadded text; `RewardModel` derives positions from the mask. Rotary backbones
(llama, qwen2) are unaffected. The GPT-2 checks therefore compare left-padded rows only where positions are
given, and RewardBench rows only where they are unpadded.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_formats import trained
from tiny_models import ARCHITECTURES, make_tokenizer, tiny_config, tokenizer_dir
from torch import nn
from transformers import AutoConfig, AutoModel

from model_utils.checkpoint import save_reward_model, write_reward_model
from model_utils.checkpoint.layouts import sequence_classification_class
from model_utils.checkpoint.names import PYTORCH_FILE
from model_utils.reward_model import RewardModel

CONSUMERS = Path(__file__).parent / "consumers"
VENV_ROOT = Path(os.environ.get("REWARDSPEED_VENV_DIR", Path.home() / ".cache" / "rewardspeed" / "venvs"))
# torch first and alone: the local CPU build satisfies it, so nothing later pulls a multi-GB CUDA build.
TORCH_REQUIREMENT = "torch==2.13.0"
ENVIRONMENTS = {
    # transformers 4.51.0's from_pretrained needs accelerate (without it: NameError init_empty_weights);
    # RewardBench installs it anyway.
    "tf451": ("transformers==4.51.0", "accelerate==1.7.0", "safetensors"),
    "trl019": ("transformers==4.51.0", "trl==0.19.1", "accelerate==1.7.0", "datasets==3.6.0", "safetensors"),
}
UNREACHABLE_INDEX = (
    "No matching distribution found",
    "Could not find a version",
    "NewConnectionError",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Max retries exceeded",
    "ProxyError",
    "timed out",
)
TOLERANCE = 1e-4
# Not the 10000 default: a rope_theta that transformers 4.x silently defaulted would change every score.
ROPE_THETA = 5000.0
CONSUMER_ARCHITECTURES = ("llama", "gpt2", "qwen2")
ABSOLUTE_POSITION_ARCHITECTURES = {"gpt2"}

CONVERSATIONS = [
    [{"role": "human", "content": "the cat has a red hat"}, {"role": "assistant", "content": "yes"}],
    [
        {"role": "human", "content": "what color is the box of the dog"},
        {"role": "assistant", "content": "blue and the bird sits on the green box"},
    ],
    [{"role": "human", "content": "who likes the hat"}, {"role": "assistant", "content": "not the dog"}],
]
PROMPTS = [conversation[:1] for conversation in CONVERSATIONS]
RESPONSES = [conversation[1]["content"] for conversation in CONVERSATIONS]


# --- environments ---------------------------------------------------------------------------------------------


def pip_install(python: Path, packages: tuple[str, ...]) -> None:
    """`pip install packages`; skip the test when the index cannot be reached, fail on anything else."""
    command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *packages]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip install {' '.join(packages)} timed out")
    if completed.returncode == 0:
        return
    shutil.rmtree(python.parent.parent, ignore_errors=True)
    output = completed.stdout + completed.stderr
    tail = "\n".join(line for line in output.splitlines() if not line.startswith("WARNING"))[-800:]
    if any(marker in output for marker in UNREACHABLE_INDEX):
        pytest.skip(f"pip cannot install {' '.join(packages)} (no package index?): {tail}")
    pytest.fail(f"pip install {' '.join(packages)} failed:\n{tail}")


@contextlib.contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def consumer_python(name: str) -> Path:
    """The python of venv `name` with `ENVIRONMENTS[name]` installed; built once, reused while they match."""
    venv = VENV_ROOT / name
    python = venv / "bin" / "python"
    marker = venv / "rewardspeed-requirements.txt"
    wanted = "\n".join((TORCH_REQUIREMENT, *ENVIRONMENTS[name])) + "\n"
    with file_lock(VENV_ROOT / f"{name}.lock"):
        if python.exists() and marker.exists() and marker.read_text() == wanted:
            return python
        shutil.rmtree(venv, ignore_errors=True)
        # No --system-site-packages: the venv must not see this environment's transformers 5.
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        pip_install(python, (TORCH_REQUIREMENT,))
        pip_install(python, ENVIRONMENTS[name])
        marker.write_text(wanted)
    return python


def run_consumer(environment: str, script: str, *arguments: str) -> dict:
    """Run `tests/consumers/<script>` in `environment` (isolated, offline); its last stdout line is JSON."""
    python = consumer_python(environment)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        WANDB_DISABLED="true",
    )
    completed = subprocess.run(
        [str(python), "-I", str(CONSUMERS / script), *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- the saved models ---------------------------------------------------------------------------------------


def save_backbone(folder: Path, architecture: str, vocab_size: int = 44) -> str:
    """A tiny random backbone (rotary ones with a non-default rope theta) and its tokenizer, as `tiny_models`."""
    config = tiny_config(architecture, vocab_size)
    if getattr(config, "rope_parameters", None):
        config.rope_parameters = {**config.rope_parameters, "rope_theta": ROPE_THETA}
    torch.manual_seed(0)
    AutoModel.from_config(config, dtype=torch.float32).save_pretrained(str(folder))
    make_tokenizer().save_pretrained(tokenizer_dir(str(folder)))
    return str(folder)


@pytest.fixture(scope="module", params=CONSUMER_ARCHITECTURES)
def saved(request, tmp_path_factory):
    """(architecture, reward model, tokenizer, hf folder, scratch folder) for one architecture."""
    root = tmp_path_factory.mktemp(f"consumers_{request.param}")
    reward_model, tokenizer = trained(save_backbone(root / "base", request.param))
    folder = save_reward_model(reward_model, tokenizer, str(root / "hf"), "hf")
    return request.param, reward_model, tokenizer, folder, root


def write_json(path: Path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def max_difference(actual, expected: torch.Tensor) -> float:
    actual = torch.as_tensor(actual, dtype=torch.float32)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return (actual - expected).abs().max().item()


def assert_scores(label: str, actual, expected: torch.Tensor) -> None:
    difference = max_difference(actual, expected)
    print(f"{label}: max |difference| {difference:.2e}")
    assert difference < TOLERANCE, f"{label}: {actual} vs {expected.tolist()}"


@torch.no_grad()
def our_rewards(reward_model: RewardModel, input_ids, attention_mask) -> torch.Tensor:
    return reward_model(torch.as_tensor(input_ids), torch.as_tensor(attention_mask))


# --- transformers 4.51 / RewardBench --------------------------------------------------------------------------


@pytest.mark.slow
def test_transformers_451_loads_the_hf_folder_as_is_and_scores_the_same(saved):
    architecture, reward_model, tokenizer, folder, root = saved
    result = run_consumer(
        "tf451", "transformers_scores.py", folder, write_json(root / "conversations.json", CONVERSATIONS)
    )
    assert result["versions"]["transformers"] == "4.51.0"
    assert result["model_class"] == sequence_classification_class(reward_model.config).__name__
    assert result["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert all(not keys for keys in result["loading_info"].values()), result["loading_info"]
    assert result["warnings"] == []  # none, in particular no "newly initialized" weights
    config = result["config"]
    assert (config["num_labels"], config["pad_token_id"]) == (1, tokenizer.pad_token_id)
    assert config["pad_token_id"] != result["tokenizer"]["eos_token_id"]
    if architecture not in ABSOLUTE_POSITION_ARCHITECTURES:
        assert config["rope_theta"] == ROPE_THETA
    texts = [tokenizer.apply_chat_template(messages, tokenize=False) for messages in CONVERSATIONS]
    assert result["texts"] == texts
    for side in ("left", "right"):
        ours = tokenizer(texts, padding=True, padding_side=side, return_tensors="pt")
        assert result["input_ids"][side] == ours["input_ids"].tolist()
        assert result["attention_mask"][side] == ours["attention_mask"].tolist()
        expected = our_rewards(reward_model, ours["input_ids"], ours["attention_mask"])
        scores = result["scores"][side]
        if side == "left" and architecture in ABSOLUTE_POSITION_ARCHITECTURES:
            scores = result["scores"]["left_with_position_ids"]
        assert_scores(f"{architecture} transformers 4.51 {side}-padded", scores, expected)
    # RewardBench 0.1.4 (left padding, logits[:, 0]) and the text-classification pipeline (defaults: raw scores).
    left = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    expected = our_rewards(reward_model, left["input_ids"], left["attention_mask"])
    rewardbench = torch.tensor(result["rewardbench"])
    if architecture in ABSOLUTE_POSITION_ARCHITECTURES:
        unpadded = left["attention_mask"].all(dim=-1)
        assert unpadded.any()
        rewardbench, expected_rewardbench = rewardbench[unpadded], expected[unpadded]
    else:
        expected_rewardbench = expected
    assert_scores(f"{architecture} RewardBench", rewardbench, expected_rewardbench)
    assert_scores(f"{architecture} text-classification pipeline", result["text_classification"], expected)


# --- TRL -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trl_grpo_reward_function_and_ppo_get_reward_score_like_the_reward_model(saved):
    architecture, reward_model, tokenizer, folder, root = saved
    cases = {
        "grpo": [
            {"prompt": prompt, "completion": response}
            for prompt, response in zip(PROMPTS, RESPONSES, strict=True)
        ],
        "ppo": {"queries": PROMPTS, "responses": RESPONSES},
    }
    work = root / "trl"
    work.mkdir(exist_ok=True)
    result = run_consumer(
        "trl019", "trl_scores.py", folder, write_json(work / "cases.json", cases), str(work)
    )
    assert result["versions"]["trl"] == "0.19.1"

    # GRPOTrainer(reward_funcs=folder): TRL loads the folder itself and scores chat-templated, right-padded text.
    grpo = result["grpo"]
    assert grpo["reward_model_class"] == sequence_classification_class(reward_model.config).__name__
    assert (grpo["num_labels"], grpo["pad_token_id"]) == (1, tokenizer.pad_token_id)
    texts = [
        tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        for prompt, response in zip(PROMPTS, RESPONSES, strict=True)
    ]
    assert grpo["texts"] == texts
    right = tokenizer(
        texts, padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt"
    )
    expected = our_rewards(reward_model, right["input_ids"], right["attention_mask"])
    assert_scores(f"{architecture} TRL GRPO reward_funcs=folder", grpo["rewards"], expected)

    # get_reward (PPO/RLOO): left-padded queries + responses ending in EOS, right-padded with our pad (!= EOS).
    ppo = result["ppo"]
    assert (ppo["pad_token_id"], ppo["eos_token_id"]) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    query_responses = torch.tensor(ppo["query_responses"])
    attention_mask = (query_responses != tokenizer.pad_token_id).long()
    end = torch.tensor(ppo["sequence_lengths"])
    assert torch.equal(
        query_responses.gather(1, end[:, None])[:, 0], torch.full_like(end, tokenizer.eos_token_id)
    )
    assert_scores(
        f"{architecture} TRL get_reward",
        ppo["rewards"],
        our_rewards(reward_model, query_responses, attention_mask),
    )
    with torch.no_grad():
        values = reward_model.values(query_responses, attention_mask)
    real = attention_mask.bool()
    assert_scores(
        f"{architecture} TRL get_reward per-token values (critic)",
        torch.tensor(ppo["values"])[real],
        values[real],
    )


# --- DeepSpeed-Chat step 3 ------------------------------------------------------------------------------------


class DeepSpeedChatRewardModel(nn.Module):
    """DeepSpeed-Chat's `RewardModel` as step 3 uses it (`dschat/utils/model/reward_model.py`), rebuilt here.

    `rwtransformer` + `v_head`; `forward_value` reads each row's end score at the token before the first pad
    after the prompt, with DeepSpeed-Chat's own per-row loop, and passes no position ids.
    """

    def __init__(self, base_model: nn.Module, tokenizer, num_padding_at_beginning: int = 0) -> None:
        super().__init__()
        self.config = base_model.config
        self.num_padding_at_beginning = num_padding_at_beginning
        if hasattr(self.config, "word_embed_proj_dim"):
            self.v_head = nn.Linear(self.config.word_embed_proj_dim, 1, bias=False)
        else:
            self.v_head = nn.Linear(self.config.hidden_size, 1, bias=False)
        self.rwtransformer = base_model
        self.pad_id = tokenizer.pad_token_id

    def forward_value(self, input_ids, attention_mask, prompt_length: int) -> dict[str, torch.Tensor]:
        hidden_states = self.rwtransformer(input_ids, attention_mask=attention_mask, use_cache=False)[0]
        values = self.v_head(hidden_states).squeeze(-1)
        end_scores = []
        for row, value in zip(input_ids, values, strict=True):
            pads = (row[prompt_length:] == self.pad_id).nonzero()
            end = pads[0].item() + prompt_length if len(pads) > 0 else input_ids.shape[1]
            end_scores.append(value[end - 1])
        return {"values": values, "chosen_end_scores": torch.stack(end_scores)}


def load_like_deepspeed_chat(model: nn.Module, state_dict: dict[str, torch.Tensor]):
    """DeepSpeed-Chat's `load_state_dict_into_model` (ZeRO stage < 3): `_load_from_state_dict` module by module.

    DeepSpeed-Chat throws the missing and unexpected keys away and never reads the size errors; they are
    returned here so the test can insist that all three are empty.
    """
    missing, unexpected, errors = [], [], []

    def load(module: nn.Module, prefix: str) -> None:
        if any(key.startswith(prefix) for key in state_dict):
            module._load_from_state_dict(state_dict, prefix, {}, True, missing, unexpected, errors)
        for name, child in module._modules.items():
            if child is not None:
                load(child, f"{prefix}{name}.")

    load(model, "")
    return missing, unexpected, errors


def deepspeed_chat_critic(folder: str, tokenizer, num_padding_at_beginning: int):
    """`create_critic_model(folder, tokenizer, ds_config, num_padding_at_beginning, rlhf_training=True)`."""
    config = AutoConfig.from_pretrained(folder)
    backbone = AutoModel.from_config(config)  # rlhf_training: the weights come from the checkpoint below
    backbone.config.end_token_id = tokenizer.eos_token_id
    backbone.config.pad_token_id = backbone.config.eos_token_id
    backbone.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))
    critic = DeepSpeedChatRewardModel(backbone, tokenizer, num_padding_at_beginning)
    state_dict = torch.load(os.path.join(folder, PYTORCH_FILE), map_location="cpu", weights_only=True)
    return critic.eval(), state_dict, load_like_deepspeed_chat(critic, state_dict)


def step3_batch(tokenizer, prompts: list[list[dict]]) -> tuple[torch.Tensor, int]:
    """Step 3's layout: prompts left-padded to one length, then answers ending in EOS, right-padded."""
    prompt_rows = [
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        for prompt in prompts
    ]
    answer_rows = [
        tokenizer(f" {response}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for response in RESPONSES
    ]
    prompt_length = max(map(len, prompt_rows))
    width = max(map(len, answer_rows)) + 1
    pad = tokenizer.pad_token_id
    rows = [
        [pad] * (prompt_length - len(prompt)) + prompt + answer + [pad] * (width - len(answer))
        for prompt, answer in zip(prompt_rows, answer_rows, strict=True)
    ]
    return torch.tensor(rows), prompt_length


@pytest.mark.parametrize("architecture", [*ARCHITECTURES, "qwen2-large-vocabulary", "llama-short-vocabulary"])
def test_deepspeed_chat_step3_loads_the_dschat_folder(tmp_path, architecture):
    """Every key lands, the vocabulary is DeepSpeed-Chat's `8 * ceil(len(tokenizer) / 8)`, scores are ours.

    The dschat folder must hold exactly that many rows, or DeepSpeed-Chat's loader silently skips the matrix:
    `qwen2-large-vocabulary` starts from more rows (as Qwen2's 151936 for 151665 tokens), `llama-short-vocabulary`
    writes a state dict with fewer (44 rows for 41 tokens, as a converted foreign checkpoint may have).
    """
    name, _, variant = architecture.partition("-")
    vocab_size = 64 if variant == "large-vocabulary" else 44
    reward_model, tokenizer = trained(save_backbone(tmp_path / "base", name, vocab_size))
    written = reward_model.state_dict()
    if variant == "short-vocabulary":
        embedding = reward_model.backbone.get_input_embeddings().weight
        key = next(f"backbone.{n}" for n, p in reward_model.backbone.named_parameters() if p is embedding)
        written = {**written, key: written[key][:44]}
        config = copy.deepcopy(reward_model.config)
        config.vocab_size = 44
        folder = write_reward_model(written, config, tokenizer, str(tmp_path / "dschat"), "dschat")
    else:
        folder = save_reward_model(reward_model, tokenizer, str(tmp_path / "dschat"), "dschat")
    num_padding_at_beginning = 1 if name == "opt" else 0  # DeepSpeed-Chat's convention for OPT
    reward_model.num_padding_at_beginning = num_padding_at_beginning

    critic, state_dict, (missing, unexpected, errors) = deepspeed_chat_critic(
        folder, tokenizer, num_padding_at_beginning
    )
    assert (missing, unexpected, errors) == ([], [], [])
    assert critic.state_dict().keys() == state_dict.keys()
    rows = critic.rwtransformer.get_input_embeddings().weight.shape[0]
    assert rows == 8 * math.ceil(len(tokenizer) / 8) == 48
    for key, tensor in critic.state_dict().items():
        expected = written[key.replace("rwtransformer.", "backbone.", 1)]
        shared = min(len(tensor), len(expected))  # rows beyond both belong to no token: dropped or zero
        assert torch.equal(tensor[:shared], expected[:shared]), key
        assert not tensor[shared:].any(), key

    batches = {"equal prompts": PROMPTS[:1] * len(RESPONSES)}
    # DeepSpeed-Chat passes no position ids: GPT-2 gets only unpadded prompts (module docstring).
    if name not in ABSOLUTE_POSITION_ARCHITECTURES:
        batches["left-padded prompts"] = PROMPTS
    for label, prompts in batches.items():
        input_ids, prompt_length = step3_batch(tokenizer, prompts)
        attention_mask = input_ids.ne(tokenizer.pad_token_id).long()
        with torch.no_grad():
            dschat = critic.forward_value(input_ids, attention_mask, prompt_length)["chosen_end_scores"]
            expected = reward_model.forward_value(input_ids, attention_mask, prompt_length=prompt_length)
        assert_scores(f"{architecture} DS-Chat step 3 ({label})", dschat, expected["chosen_end_scores"])
        assert_scores(
            f"{architecture} RewardModel ({label})", dschat, reward_model(input_ids, attention_mask)
        )
