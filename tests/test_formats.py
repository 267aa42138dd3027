"""One saved reward model, every consumer: hf (no remote code), auto_map, dschat, the critic loader, convert.

transformers' `<Arch>ForSequenceClassification` finds the last token from `input_ids != pad_token_id` and
does not derive positions from the attention mask. Rotary (llama, qwen2, gpt_neox) and ALiBi (bloom)
attention depend only on relative positions, and OPT derives its positions from the mask, so left padding
needs nothing; GPT-2's absolute positions need `position_ids` from the mask for left-padded batches.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model import TEXTS, pad_batch
from tiny_models import ARCHITECTURES, save_tiny_backbone, tokenizer_dir
from transformers import AutoModelForSequenceClassification

from model_utils import create_critic_model, load_tokenizer
from model_utils.checkpoint import CheckpointError, read_state_dict, save_reward_model
from model_utils.checkpoint.names import PYTORCH_FILE, SAFETENSORS_FILE
from model_utils.convert import main as convert_main
from model_utils.hf_reward_model import position_ids_from_mask
from model_utils.reward_model import RewardModel

FORMATS = ("hf", "auto_map", "dschat")
ABSOLUTE_POSITION_ARCHITECTURES = {"gpt2"}
METADATA = {
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "data": ["hh-rlhf"],
    "steps": 12,
    "eval_accuracy": 0.75,
    "reward_mean": 0.25,
    "reward_std": 1.5,
}


def trained(path: str) -> tuple[RewardModel, object]:
    tokenizer = load_tokenizer(tokenizer_dir(path))
    reward_model = create_critic_model(path, tokenizer, dropout=0.0).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in reward_model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return reward_model, tokenizer


@pytest.fixture(scope="module", params=ARCHITECTURES)
def saved(request, tmp_path_factory):
    """(architecture, reward model, tokenizer, {format: folder}) for one architecture."""
    root = tmp_path_factory.mktemp(request.param)
    reward_model, tokenizer = trained(save_tiny_backbone(str(root / "base"), request.param))
    folders = {
        save_format: save_reward_model(
            reward_model, tokenizer, str(root / save_format), save_format, METADATA
        )
        for save_format in FORMATS
    }
    return request.param, reward_model, tokenizer, folders


def batches(tokenizer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    return {side: pad_batch(rows, tokenizer.pad_token_id, side) for side in ("left", "right")}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < 1e-5, (actual - expected).abs().max()


@pytest.mark.parametrize("save_format", FORMATS)
def test_critic_from_every_format_scores_like_the_reward_model(saved, save_format):
    _, reward_model, tokenizer, folders = saved
    critic = create_critic_model(folders[save_format], tokenizer, rlhf_training=True, dropout=0.0).eval()
    with torch.no_grad():
        for input_ids, attention_mask in batches(tokenizer).values():
            assert_close(critic(input_ids, attention_mask), reward_model(input_ids, attention_mask))
    for name, tensor in reward_model.state_dict().items():
        assert torch.equal(critic.state_dict()[name], tensor), name


def test_hf_format_loads_natively_and_scores_the_same(saved):
    architecture, reward_model, tokenizer, folders = saved
    model = AutoModelForSequenceClassification.from_pretrained(folders["hf"]).eval()
    assert type(model).__module__.startswith("transformers.models.")
    assert type(model).__name__.endswith("ForSequenceClassification")
    with torch.no_grad():
        for side, (input_ids, attention_mask) in batches(tokenizer).items():
            extra = {}
            if side == "left" and architecture in ABSOLUTE_POSITION_ARCHITECTURES:
                extra["position_ids"] = position_ids_from_mask(attention_mask)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
            assert logits.shape == (len(TEXTS), 1)
            assert_close(logits[:, 0], reward_model(input_ids, attention_mask))


def test_auto_map_format_loads_with_remote_code_and_scores_the_same(saved):
    _, reward_model, tokenizer, folders = saved
    model = AutoModelForSequenceClassification.from_pretrained(folders["auto_map"], trust_remote_code=True)
    assert type(model).__name__.endswith("RewardModel")
    with torch.no_grad():
        for input_ids, attention_mask in batches(tokenizer).values():
            logits = model.eval()(input_ids=input_ids, attention_mask=attention_mask).logits
            assert logits.shape == (len(TEXTS), 1)
            assert_close(logits[:, 0], reward_model(input_ids, attention_mask))


def test_hf_folder_has_what_other_tools_need(saved):
    architecture, reward_model, tokenizer, folders = saved
    folder = folders["hf"]
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as file:
        config = json.load(file)
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as file:
        tokenizer_config = json.load(file)
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert len(config["id2label"]) == 1
    assert config["pad_token_id"] == tokenizer.pad_token_id != config["eos_token_id"]
    assert config["vocab_size"] == 48 == reward_model.backbone.get_input_embeddings().weight.shape[0]
    assert (config["reward_mean"], config["reward_std"]) == (0.25, 1.5)
    assert config["torch_dtype"] == "float32"
    if "rope_parameters" in config:
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]
    assert tokenizer_config["chat_template"] == tokenizer.chat_template
    weights = load_file(os.path.join(folder, SAFETENSORS_FILE))
    assert weights["score.weight"].shape == reward_model.v_head.weight.shape
    assert all(tensor.numel() > 0 for tensor in weights.values())
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as file:
        card = file.read()
    for fact in ("HuggingFaceTB/SmolLM2-135M-Instruct", "hh-rlhf", "12", "0.75"):
        assert fact in card


def test_dschat_folder_layout(saved):
    _, reward_model, _, folders = saved
    weights = torch.load(os.path.join(folders["dschat"], PYTORCH_FILE), weights_only=True)
    assert "v_head.weight" in weights
    backbone_keys = {key for key in weights if key != "v_head.weight"}
    assert all(key.startswith("rwtransformer.") for key in backbone_keys)
    assert len(weights) == len(reward_model.state_dict())


def test_round_trip_hf_auto_map_dschat_hf_is_bit_identical(saved, tmp_path):
    _, _, _, folders = saved
    previous = folders["hf"]
    for save_format in ("auto_map", "dschat", "hf"):
        output = str(tmp_path / save_format)
        assert convert_main(["--input", previous, "--output", output, "--format", save_format]) == 0
        previous = output
    original, final = load_file(os.path.join(folders["hf"], SAFETENSORS_FILE)), read_state_dict(previous)
    assert original.keys() == final.keys()
    for name, tensor in original.items():
        assert final[name].dtype == tensor.dtype and torch.equal(final[name], tensor), name


@pytest.mark.parametrize("spelling", ["rwtransformer", "rwtranrsformer"])
def test_folder_written_by_deepspeed_chat_converts(tmp_path, spelling):
    """DeepSpeed-Chat writes config.json + pytorch_model.bin (+ vocabulary files only): tokenizer given apart."""
    base = save_tiny_backbone(str(tmp_path / "base"), "opt")
    reward_model, tokenizer = trained(base)
    dschat = tmp_path / "dschat"
    dschat.mkdir()
    reward_model.config.to_json_file(str(dschat / "config.json"))
    state_dict = {
        name.replace("backbone.", f"{spelling}.", 1): tensor
        for name, tensor in reward_model.state_dict().items()
    }
    torch.save(state_dict, dschat / PYTORCH_FILE)
    output = str(tmp_path / "hf")
    arguments = ["--input", str(dschat), "--output", output, "--tokenizer_name_or_path", tokenizer_dir(base)]
    assert convert_main(arguments) == 0
    model = AutoModelForSequenceClassification.from_pretrained(output).eval()
    input_ids, attention_mask = batches(tokenizer)["right"]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        assert_close(logits[:, 0], reward_model(input_ids, attention_mask))


def break_head(folder: str, mode: str) -> None:
    """Delete or rename the head tensor of a saved folder, whatever its layout."""
    path = os.path.join(folder, SAFETENSORS_FILE)
    weights = load_file(path) if os.path.exists(path) else torch.load(os.path.join(folder, PYTORCH_FILE))
    head = next(name for name in weights if name in ("score.weight", "v_head.weight"))
    tensor = weights.pop(head)
    if mode == "renamed":
        weights["value_head.weight"] = tensor
    if os.path.exists(path):
        save_file(weights, path, metadata={"format": "pt"})
    else:
        torch.save(weights, os.path.join(folder, PYTORCH_FILE))


@pytest.mark.parametrize("mode", ["missing", "renamed"])
@pytest.mark.parametrize("save_format", FORMATS)
def test_broken_head_fails_in_every_loader_naming_the_keys(tmp_path, save_format, mode, capsys):
    reward_model, tokenizer = trained(save_tiny_backbone(str(tmp_path / "base"), "llama"))
    folder = save_reward_model(reward_model, tokenizer, str(tmp_path / "rm"), save_format)
    break_head(folder, mode)
    with pytest.raises(CheckpointError, match=r"missing keys: v_head\.weight") as error:
        create_critic_model(folder, tokenizer, rlhf_training=True)
    if mode == "renamed":
        assert "unexpected keys: value_head.weight" in str(error.value)
    assert convert_main(["--input", folder, "--output", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "v_head.weight" in message and "Traceback" not in message
    if save_format == "auto_map":
        with pytest.raises(ValueError, match=r"missing keys: \['v_head\.weight'\]"):
            AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)


def test_hf_format_refuses_a_pad_token_equal_to_eos(tmp_path):
    reward_model, tokenizer = trained(save_tiny_backbone(str(tmp_path / "base"), "llama"))
    tokenizer.pad_token = tokenizer.eos_token
    with pytest.raises(CheckpointError, match="pad token is its EOS"):
        save_reward_model(reward_model, tokenizer, str(tmp_path / "rm"))


def test_unknown_format_is_refused(tmp_path):
    reward_model, tokenizer = trained(save_tiny_backbone(str(tmp_path / "base"), "gpt2"))
    with pytest.raises(CheckpointError, match="unknown save format 'onnx'"):
        save_reward_model(reward_model, tokenizer, str(tmp_path / "rm"), save_format="onnx")


def test_convert_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    assert convert_main(["--input", str(tmp_path / "absent"), "--output", str(tmp_path / "o")]) == 2
    assert "absent: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert convert_main(["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "pass --model_name_or_path" in capsys.readouterr().err
    base = save_tiny_backbone(str(tmp_path / "base"), "llama")
    assert convert_main(["--input", base, "--output", str(tmp_path / "o")]) == 2
    assert "no value head" in capsys.readouterr().err


# --- ZeRO-3, 2 processes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """Run tests/scripts/zero3_formats.py once: (base folder, output folder, per-rank results)."""
    from launch_utils import SCRIPTS, read_rank_results, torchrun

    root = tmp_path_factory.mktemp("zero3")
    base = save_tiny_backbone(str(root / "base"), "llama")
    out = str(root / "out")
    script = os.path.join(SCRIPTS, "zero3_formats.py")
    torchrun([script, "--model_dir", base, "--tokenizer_dir", tokenizer_dir(base), "--out", out])
    return base, out, read_rank_results(out)


@pytest.mark.distributed
def test_zero3_save_writes_full_tensors_equal_to_the_gathered_model(zero3_run):
    base, out, (rank0, rank1) = zero3_run
    assert rank0["returned"] == {save_format: os.path.join(out, save_format) for save_format in FORMATS}
    assert rank1["returned"] == dict.fromkeys(FORMATS)
    reference = load_file(os.path.join(out, "reference.safetensors"))
    tokenizer = load_tokenizer(tokenizer_dir(base))
    for save_format in FORMATS:
        assert all(tensor.numel() > 0 for tensor in read_state_dict(os.path.join(out, save_format)).values())
        critic = create_critic_model(os.path.join(out, save_format), tokenizer, rlhf_training=True).eval()
        state_dict = critic.state_dict()
        assert state_dict.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(state_dict[name], tensor), (save_format, name)


@pytest.mark.distributed
@pytest.mark.parametrize("save_format", FORMATS)
def test_zero3_critic_from_every_format_runs_a_value_loss_step(zero3_run, save_format):
    _, _, ranks = zero3_run
    for result in ranks:
        critic = result["critics"][save_format]
        assert critic["partitioned"]
        assert critic["end_scores"] == pytest.approx(result["trained_end_scores"], abs=1e-6)
        assert torch.isfinite(torch.tensor(critic["value_loss"]))
        assert critic["values_changed"]


@pytest.mark.distributed
def test_zero_checkpoint_folder_converts_to_the_same_tensors(zero3_run, tmp_path):
    base, out, _ = zero3_run
    output = str(tmp_path / "from_checkpoint")
    arguments = ["--input", os.path.join(out, "checkpoints"), "--output", output]
    assert (
        convert_main(
            [*arguments, "--model_name_or_path", base, "--tokenizer_name_or_path", tokenizer_dir(base)]
        )
        == 0
    )
    reference = load_file(os.path.join(out, "reference.safetensors"))
    converted = create_critic_model(
        output, load_tokenizer(tokenizer_dir(base)), rlhf_training=True
    ).state_dict()
    for name, tensor in reference.items():
        assert torch.equal(converted[name], tensor), name
