"""The model core on every supported backbone: end index, padding invariance, factory, critic loading."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import ARCHITECTURES, save_tiny_backbone, tokenizer_dir

from model_utils import create_critic_model, load_tokenizer, padded_vocab_size
from model_utils.checkpoint import CheckpointError, read_state_dict
from model_utils.hf_reward_model import last_token_index, position_ids_from_mask
from model_utils.model_factory import configure_dropout
from model_utils.reward_model import RewardModel
from model_utils.tokenizer import DEFAULT_PAD_TOKEN

TEXTS = [
    "the cat has a red hat </s>",
    "what color is the box of the dog ? blue </s>",
    "yes </s>",
    "the bird sits on the green box and likes one two three four five </s>",
]


def pad_batch(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids, mask = [], []
    for row in rows:
        padding = [pad_id] * (width - len(row))
        ids.append(padding + row if side == "left" else row + padding)
        real = [1] * len(row)
        mask.append([0] * len(padding) + real if side == "left" else real + [0] * len(padding))
    return torch.tensor(ids), torch.tensor(mask)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def backbone_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return save_tiny_backbone(str(folder), request.param)


def build_reward_model(path: str, **kwargs) -> tuple[RewardModel, object]:
    tokenizer = load_tokenizer(tokenizer_dir(path))
    reward_model = create_critic_model(path, tokenizer, dropout=0.0, **kwargs).eval()
    return reward_model, tokenizer


def test_last_token_index_left_right_unpadded_and_truncated():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]
    assert last_token_index(mask, num_padding_at_beginning=2).tolist() == [2, 4, 4, 2]


def test_position_ids_restart_after_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]


def test_rewards_equal_for_left_right_and_unpadded(backbone_dir):
    reward_model, tokenizer = build_reward_model(backbone_dir)
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    with torch.no_grad():
        unpadded = torch.cat([reward_model(torch.tensor([row])) for row in rows])
        left = reward_model(*pad_batch(rows, tokenizer.pad_token_id, "left"))
        right = reward_model(*pad_batch(rows, tokenizer.pad_token_id, "right"))
    assert unpadded.shape == (len(TEXTS),)
    assert torch.allclose(left, unpadded, atol=1e-5, rtol=0), (left - unpadded).abs().max()
    assert torch.allclose(right, unpadded, atol=1e-5, rtol=0), (right - unpadded).abs().max()
    # The rewards depend on the text (the head is not reading a constant position).
    assert unpadded.unique().numel() == len(TEXTS)


def test_forward_value_matches_forward_and_prompt_length(backbone_dir):
    reward_model, tokenizer = build_reward_model(backbone_dir)
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    input_ids, attention_mask = pad_batch(rows, tokenizer.pad_token_id, "right")
    with torch.no_grad():
        rewards = reward_model(input_ids, attention_mask)
        output = reward_model.forward_value(input_ids, attention_mask)
        values_only = reward_model.forward_value(input_ids, attention_mask, return_value_only=True)
        long_prompt = reward_model.forward_value(input_ids, attention_mask, prompt_length=4)
    assert output["values"].shape == input_ids.shape
    assert torch.equal(values_only, output["values"])
    assert torch.allclose(output["chosen_end_scores"], rewards, atol=1e-6)
    # Row 2 ("yes </s>") has 2 tokens: with a 4-token prompt nothing was generated, read the prompt's end.
    assert torch.allclose(long_prompt["chosen_end_scores"][2], output["values"][2, 3], atol=1e-6)


def test_vocab_padded_to_multiple_of_eight_and_pad_is_not_eos(backbone_dir):
    reward_model, tokenizer = build_reward_model(backbone_dir)
    assert tokenizer.pad_token == DEFAULT_PAD_TOKEN and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == 41  # 40 + the added pad
    embeddings = reward_model.backbone.get_input_embeddings().weight
    assert embeddings.shape[0] == padded_vocab_size(tokenizer) == 48
    assert reward_model.config.pad_token_id == tokenizer.pad_token_id


def test_vocab_is_never_shrunk(tmp_path):
    path = save_tiny_backbone(str(tmp_path), "llama", vocab_size=72)
    reward_model, tokenizer = build_reward_model(path)
    assert padded_vocab_size(tokenizer) == 48
    assert reward_model.backbone.get_input_embeddings().weight.shape[0] == 72


def test_vocab_grows_when_tokenizer_is_larger(tmp_path):
    path = save_tiny_backbone(str(tmp_path), "qwen2", vocab_size=40)
    reward_model, _ = build_reward_model(path)
    assert reward_model.backbone.get_input_embeddings().weight.shape[0] == 48
    assert reward_model.config.vocab_size == 48


def test_existing_real_pad_token_is_kept(tmp_path):
    path = save_tiny_backbone(str(tmp_path), "gpt2", with_pad=True)
    tokenizer = load_tokenizer(tokenizer_dir(path))
    assert tokenizer.pad_token == "<pad>"
    assert len(tokenizer) == 41


def test_dropout_zero_disables_every_dropout(backbone_dir):
    tokenizer = load_tokenizer(tokenizer_dir(backbone_dir))
    reward_model = create_critic_model(backbone_dir, tokenizer, dropout=0.0).train()
    input_ids = torch.tensor([tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reward_model(input_ids), reward_model(input_ids))
    dropout_values = [module.p for module in reward_model.modules() if isinstance(module, torch.nn.Dropout)]
    assert all(value == 0.0 for value in dropout_values)


def test_configure_dropout_none_keeps_config():
    from transformers import GPT2Config

    config = GPT2Config(resid_pdrop=0.3)
    configure_dropout(config, None)
    assert config.resid_pdrop == 0.3
    configure_dropout(config, 0.0)
    assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.0, 0.0, 0.0)


def test_head_width_follows_opt_projection(tmp_path):
    path = save_tiny_backbone(str(tmp_path), "opt")
    reward_model, _ = build_reward_model(path, num_padding_at_beginning=1)
    assert reward_model.v_head.weight.shape == (1, 16)


def test_gradient_checkpointing_passes_through(tmp_path):
    path = save_tiny_backbone(str(tmp_path), "llama")
    reward_model, tokenizer = build_reward_model(path)
    reward_model.gradient_checkpointing_enable()
    assert reward_model.is_gradient_checkpointing
    reward_model.train()
    input_ids = torch.tensor([tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]])
    reward_model(input_ids).sum().backward()
    assert reward_model.v_head.weight.grad is not None
    reward_model.gradient_checkpointing_disable()
    assert not reward_model.is_gradient_checkpointing


def test_bf16_head_shares_backbone_dtype(tmp_path):
    path = save_tiny_backbone(str(tmp_path), "llama")
    reward_model, _ = build_reward_model(path, dtype=torch.bfloat16)
    assert reward_model.v_head.weight.dtype == torch.bfloat16
    assert next(reward_model.backbone.parameters()).dtype == torch.bfloat16


# --- critic loading (rlhf_training=True) -----------------------------------------------------------------


def trained_reward_model(path: str) -> tuple[RewardModel, object]:
    reward_model, tokenizer = build_reward_model(path)
    with torch.no_grad():
        for parameter in reward_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return reward_model, tokenizer


def save_layout(reward_model: RewardModel, tokenizer, folder: str, layout: str) -> str:
    """Write the reward model as DeepSpeed-Chat / transformers / we would (config + tokenizer + weights)."""
    os.makedirs(folder, exist_ok=True)
    reward_model.config.save_pretrained(folder)
    tokenizer.save_pretrained(tokenizer_dir(folder))
    state_dict = {name: tensor.contiguous() for name, tensor in reward_model.state_dict().items()}
    prefix = reward_model.backbone.base_model_prefix
    if layout == "ours":
        save_file(state_dict, os.path.join(folder, "model.safetensors"))
    elif layout in ("rwtransformer", "rwtranrsformer"):
        renamed = {name.replace("backbone.", f"{layout}.", 1): tensor for name, tensor in state_dict.items()}
        torch.save(renamed, os.path.join(folder, "pytorch_model.bin"))
    elif layout == "hf":
        renamed = {name.replace("backbone.", f"{prefix}.", 1): tensor for name, tensor in state_dict.items()}
        renamed["score.weight"] = renamed.pop("v_head.weight")
        save_file(renamed, os.path.join(folder, "model.safetensors"))
    return folder


@pytest.mark.parametrize("layout", ["ours", "rwtransformer", "rwtranrsformer", "hf"])
def test_critic_loads_every_layout_with_identical_rewards(backbone_dir, tmp_path, layout):
    reward_model, tokenizer = trained_reward_model(backbone_dir)
    folder = save_layout(reward_model, tokenizer, str(tmp_path / layout), layout)
    critic = create_critic_model(
        folder, load_tokenizer(tokenizer_dir(folder)), rlhf_training=True, dropout=0.0
    ).eval()
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    batch = pad_batch(rows, tokenizer.pad_token_id, "right")
    with torch.no_grad():
        assert torch.equal(critic(*batch), reward_model(*batch))
    for name, tensor in reward_model.state_dict().items():
        assert torch.equal(critic.state_dict()[name], tensor), name


def test_critic_missing_head_raises_naming_key(tmp_path):
    path = save_tiny_backbone(str(tmp_path / "base"), "llama")
    reward_model, tokenizer = trained_reward_model(path)
    folder = save_layout(reward_model, tokenizer, str(tmp_path / "rm"), "ours")
    state_dict = read_state_dict(folder)
    del state_dict["v_head.weight"]
    save_file(state_dict, os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: v_head\.weight"):
        create_critic_model(folder, load_tokenizer(tokenizer_dir(folder)), rlhf_training=True)


def test_critic_renamed_and_extra_keys_raise(tmp_path):
    path = save_tiny_backbone(str(tmp_path / "base"), "gpt2")
    reward_model, tokenizer = trained_reward_model(path)
    folder = save_layout(reward_model, tokenizer, str(tmp_path / "rm"), "ours")
    state_dict = read_state_dict(folder)
    state_dict["value_head.weight"] = state_dict.pop("v_head.weight")
    save_file(state_dict, os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys: value_head\.weight"):
        create_critic_model(folder, load_tokenizer(tokenizer_dir(folder)), rlhf_training=True)


def test_causal_lm_checkpoint_is_not_a_reward_model(tmp_path):
    """A plain LM checkpoint (no head) must not load as a critic with a random head."""
    path = save_tiny_backbone(str(tmp_path / "base"), "qwen2")
    with pytest.raises(CheckpointError, match="v_head.weight"):
        create_critic_model(path, load_tokenizer(tokenizer_dir(path)), rlhf_training=True)


def test_head_of_wrong_shape_raises(tmp_path):
    path = save_tiny_backbone(str(tmp_path / "base"), "llama")
    reward_model, tokenizer = trained_reward_model(path)
    folder = save_layout(reward_model, tokenizer, str(tmp_path / "rm"), "ours")
    state_dict = read_state_dict(folder)
    state_dict["v_head.weight"] = torch.zeros(2, 32)
    save_file(state_dict, os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape mismatches: v_head\.weight \(checkpoint \(2, 32\)"):
        create_critic_model(folder, load_tokenizer(tokenizer_dir(folder)), rlhf_training=True)


class NotATensor:
    """Any class: a pickle that would construct it is refused by `weights_only=True`."""


def test_bin_is_read_with_weights_only(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with open(path, "wb") as file:
        pickle.dump({"v_head.weight": NotATensor()}, file)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read weights"):
        read_state_dict(str(path))


def test_truncated_safetensors_raises(tmp_path):
    path = save_tiny_backbone(str(tmp_path / "base"), "llama")
    reward_model, tokenizer = trained_reward_model(path)
    folder = save_layout(reward_model, tokenizer, str(tmp_path / "rm"), "ours")
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "r+b") as file:
        file.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read weights"):
        create_critic_model(folder, load_tokenizer(tokenizer_dir(folder)), rlhf_training=True)


def test_reward_model_import_does_not_import_deepspeed():
    import subprocess
    import sys

    code = (
        "import sys, model_utils.reward_model, model_utils.model_factory; print('deepspeed' in sys.modules)"
    )
    output = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert output.stdout.strip() == "False"
