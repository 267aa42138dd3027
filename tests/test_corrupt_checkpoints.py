"""Corrupt or foreign checkpoints fail loudly in every loader we own; nothing in a checkpoint runs code.

Loaders: `create_critic_model(rlhf_training=True)`, `python -m training.evaluate`, `python -m model_utils.convert`.
Each broken folder must give a `CheckpointError` (the CLIs: exit status 2 and one line naming the folder, no
traceback), never a model with random weights. Pickles are read only with the weights-only unpickler, even
inside DeepSpeed's `zero_to_fp32`; `trust_remote_code` is off everywhere, so an `auto_map` folder's modelling
file never runs unless asked for.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import json
import os
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tokenizer, save_tiny_backbone, tokenizer_dir

from model_utils import convert, create_critic_model, create_hf_model, load_tokenizer
from model_utils.checkpoint import CheckpointError, save_reward_model
from training import evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("model_utils", "training")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: folder} of healthy tiny reward models, the tokenizer, and a data file."""
    root = tmp_path_factory.mktemp("corrupt")
    folders = {}
    for architecture in ("llama", "gpt2"):
        base = save_tiny_backbone(str(root / f"base_{architecture}"), architecture)
        tokenizer = load_tokenizer(tokenizer_dir(base))
        reward_model = create_critic_model(base, tokenizer, dropout=0.0)
        for save_format in ("hf", "dschat", "auto_map"):
            name = f"{architecture}_{save_format}"
            folders[name] = save_reward_model(reward_model, tokenizer, str(root / name), save_format)
    data = root / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "the cat", "chosen": " red", "rejected": " blue"}) + "\n")
    big_tokenizer = make_tokenizer(with_pad=True)
    big_tokenizer.add_tokens([f"extra{index}" for index in range(20)])
    big_tokenizer.save_pretrained(str(root / "big_tokenizer"))
    return {"root": root, "data": str(data), "big_tokenizer": str(root / "big_tokenizer"), **folders}


def copy_of(models, name: str, new_name: str) -> pathlib.Path:
    target = models["root"] / new_name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(models[name], target)
    return target


def edit_config(folder: pathlib.Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: pathlib.Path, **tensors) -> None:
    state_dict = load_file(folder / "model.safetensors")
    state_dict.update(tensors)
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})


def truncated_safetensors(models, folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def empty_safetensors(models, folder):
    (folder / "model.safetensors").write_bytes(b"")


def gpt2_weights_llama_config(models, folder):
    shutil.copy(pathlib.Path(models["llama_hf"]) / "config.json", folder / "config.json")


def config_vocab_differs_from_weights(models, folder):
    edit_config(folder, vocab_size=64)


def head_of_wrong_shape(models, folder):
    hidden = load_file(folder / "model.safetensors")["score.weight"].shape[1]
    edit_weights(folder, **{"score.weight": torch.zeros(2, hidden)})


def head_missing(models, folder):
    state_dict = load_file(folder / "model.safetensors")
    del state_dict["score.weight"]
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})


def nan_in_head(models, folder):
    hidden = load_file(folder / "model.safetensors")["score.weight"].shape[1]
    edit_weights(folder, **{"score.weight": torch.full((1, hidden), float("nan"))})


def config_not_json(models, folder):
    (folder / "config.json").write_text("{this is not json")


def config_is_a_list(models, folder):
    (folder / "config.json").write_text("[1, 2]")


def config_missing(models, folder):
    (folder / "config.json").unlink()


def config_unknown_model_type(models, folder):
    edit_config(folder, model_type="not_an_architecture")


def config_field_of_wrong_type(models, folder):
    edit_config(folder, hidden_size="big")


def config_zero_heads(models, folder):
    edit_config(folder, num_attention_heads=0)


def weight_index_not_json(models, folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text("{oops")


def weight_index_points_outside(models, folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../x.safetensors"}})
    )


def no_weights(models, folder):
    (folder / "model.safetensors").unlink()


# (corruption, healthy folder it starts from, text the error must contain)
CASES = [
    (truncated_safetensors, "llama_hf", "cannot read weights"),
    (empty_safetensors, "llama_hf", "cannot read weights"),
    (gpt2_weights_llama_config, "gpt2_hf", "missing keys"),
    (config_vocab_differs_from_weights, "llama_hf", "shape mismatches"),
    (head_of_wrong_shape, "llama_hf", "v_head.weight (checkpoint (2, 32)"),
    (head_missing, "llama_hf", "no value head"),
    (nan_in_head, "llama_hf", "NaN or infinite"),
    (config_not_json, "llama_hf", "cannot read its config"),
    (config_is_a_list, "llama_hf", "cannot read its config"),
    (config_missing, "llama_hf", "config"),
    (config_unknown_model_type, "llama_hf", "cannot read its config"),
    (config_field_of_wrong_type, "llama_hf", "hidden_size"),
    (config_zero_heads, "llama_hf", "cannot read its config"),
    (weight_index_not_json, "llama_hf", "not a weight index"),
    (weight_index_points_outside, "llama_hf", "plain file names"),
    (no_weights, "llama_hf", "no weights found"),
]
# convert takes the vocabulary size from the weights by design (module docstring): a config that says
# otherwise is corrected, not an error.
CONVERT_ACCEPTS = {config_vocab_differs_from_weights}


def run_cli(module, arguments: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = module.main(arguments)
    return status, err.getvalue()


def assert_clean_cli_error(status: int, err: str, folder, words: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert str(folder) in err, err
    assert words in err, err


@pytest.mark.parametrize("corrupt, start, words", CASES, ids=[case[0].__name__ for case in CASES])
def test_every_loader_refuses_a_broken_folder(models, corrupt, start, words):
    folder = copy_of(models, start, corrupt.__name__)
    corrupt(models, folder)
    tokenizer = load_tokenizer(tokenizer_dir(models["root"] / f"base_{start.split('_')[0]}"))
    with pytest.raises(CheckpointError) as raised:
        create_critic_model(str(folder), tokenizer, rlhf_training=True)
    assert words in str(raised.value) and str(folder) in str(raised.value)

    status, err = run_cli(evaluate, ["--model_name_or_path", str(folder), "--data_path", models["data"]])
    assert_clean_cli_error(status, err, folder, words)

    output = models["root"] / f"{corrupt.__name__}_converted"
    status, err = run_cli(convert, ["--input", str(folder), "--output", str(output)])
    if corrupt in CONVERT_ACCEPTS:
        assert status == 0, err
        return
    assert_clean_cli_error(status, err, folder, "" if corrupt is config_missing else words)
    assert not (output / "model.safetensors").exists()


def test_a_tokenizer_larger_than_the_embeddings_is_refused(models):
    """A vocabulary that does not match the checkpoint's tokenizer: ids beyond the embedding rows."""
    folder, tokenizer_path = models["llama_hf"], models["big_tokenizer"]
    with pytest.raises(CheckpointError, match="shape mismatches"):
        create_critic_model(folder, load_tokenizer(tokenizer_path), rlhf_training=True)
    arguments = ["--model_name_or_path", folder, "--tokenizer_name_or_path", tokenizer_path]
    status, err = run_cli(evaluate, [*arguments, "--data_path", models["data"]])
    assert_clean_cli_error(status, err, folder, "shape mismatches")
    output = models["root"] / "big_tokenizer_converted"
    status, err = run_cli(
        convert, ["--input", folder, "--output", str(output), "--tokenizer_name_or_path", tokenizer_path]
    )
    assert status == 2 and "61 tokens but the embeddings only 48 rows" in err, err


def test_a_dschat_folder_with_a_garbage_bin_is_refused(models):
    folder = copy_of(models, "llama_dschat", "garbage_bin")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")
    tokenizer = load_tokenizer(str(folder))
    with pytest.raises(CheckpointError, match="cannot read weights"):
        create_critic_model(str(folder), tokenizer, rlhf_training=True)


# ---------------------------------------------------------------------------------------------------------
# Pickles


class CodeExecution:
    """Unpickling this calls `os.mkdir(marker)`: the stand-in for arbitrary code in a crafted checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def calls_in(path: pathlib.Path) -> list[tuple[str, int, ast.Call]]:
    """`("module.function", line, call)` for every `name.attr(...)` call in a source file."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
        ):
            calls.append((f"{node.func.value.id}.{node.func.attr}", node.lineno, node))
    return calls


def keyword(call: ast.Call, name: str):
    value = next((k.value for k in call.keywords if k.arg == name), None)
    return value.value if isinstance(value, ast.Constant) else value


def test_no_pickle_is_read_without_weights_only_and_no_code_asks_for_remote_code():
    """Every `torch.load(` in the package passes `weights_only=True`; no `pickle.load(s)`; no call passes
    `trust_remote_code=True` (docstrings may show users how to load an auto_map folder; code never does)."""
    sources = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    problems, torch_loads = [], 0
    for path in sources:
        where = path.relative_to(ROOT)
        for name, line, call in calls_in(path):
            if name == "torch.load":
                torch_loads += 1
                if keyword(call, "weights_only") is not True:
                    problems.append(f"{where}:{line}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                problems.append(f"{where}:{line}: {name}")
            if keyword(call, "trust_remote_code") is True:
                problems.append(f"{where}:{line}: trust_remote_code=True")
    assert torch_loads >= 2  # checkpoint.read_state_dict and convert.read_stage0_checkpoint are seen
    assert not problems, problems


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code_ran"
    yield path
    assert not path.exists(), "a checkpoint ran code"


def test_the_payload_is_real_when_unpickled_unsafely(tmp_path):
    """Control: the malicious file does run code under a plain unpickler, so the refusals below mean something."""
    marker = tmp_path / "control_marker"
    payload = tmp_path / "evil.bin"
    torch.save({"v_head.weight": torch.zeros(1, 32), "x": CodeExecution(str(marker))}, payload)
    torch.load(payload, weights_only=False)
    assert marker.is_dir()


def test_a_malicious_pytorch_model_bin_is_refused_by_every_loader(models, marker):
    folder = copy_of(models, "llama_dschat", "evil_bin")
    state_dict = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({**state_dict, "v_head.weight": CodeExecution(str(marker))}, folder / "pytorch_model.bin")
    tokenizer = load_tokenizer(str(folder))
    with pytest.raises(CheckpointError, match="weights-only unpickler refused it: .*posix.mkdir"):
        create_critic_model(str(folder), tokenizer, rlhf_training=True)
    status, err = run_cli(evaluate, ["--model_name_or_path", str(folder), "--data_path", models["data"]])
    assert_clean_cli_error(status, err, folder, "cannot read weights")
    status, err = run_cli(convert, ["--input", str(folder), "--output", str(folder) + "_out"])
    assert_clean_cli_error(status, err, folder, "cannot read weights")


@pytest.mark.parametrize("with_optimizer_states", [False, True], ids=["stage0", "stage1to3"])
def test_a_malicious_deepspeed_checkpoint_is_refused_by_convert(models, marker, with_optimizer_states):
    """DeepSpeed's zero_to_fp32 calls torch.load(weights_only=False); convert must not let that run code."""
    checkpoints = models["root"] / f"evil_checkpoints_{with_optimizer_states}"
    tag = checkpoints / "global_step1"
    tag.mkdir(parents=True, exist_ok=True)
    (checkpoints / "latest").write_text("global_step1")
    evil = {"module": {"v_head.weight": torch.zeros(1, 32)}, "x": CodeExecution(str(marker))}
    torch.save(evil, tag / "mp_rank_00_model_states.pt")
    if with_optimizer_states:
        torch.save(evil, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        torch.save(evil, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        (tag / "mp_rank_00_model_states.pt").unlink()
    arguments = ["--input", str(checkpoints), "--output", str(checkpoints) + "_out"]
    status, err = run_cli(convert, [*arguments, "--model_name_or_path", models["llama_hf"]])
    assert status == 2 and "Traceback" not in err, err
    assert "cannot read the DeepSpeed checkpoint" in err and "refused it" in err, err
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


# ---------------------------------------------------------------------------------------------------------
# trust_remote_code


def test_trust_remote_code_is_off_by_default_everywhere():
    for function in (create_critic_model, create_hf_model, load_tokenizer):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False, function
    from model_utils.checkpoint import read_config
    from training.arguments import TrainConfig

    assert inspect.signature(read_config).parameters["trust_remote_code"].default is False
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    assert fields["trust_remote_code"].default is False
    evaluate_args = evaluate.parse_args(["--model_name_or_path", "x", "--data_path", "y"])
    convert_args = convert.parse_args(["--input", "x", "--output", "y"])
    assert not getattr(evaluate_args, "trust_remote_code", False)
    assert not getattr(convert_args, "trust_remote_code", False)


def test_the_hf_format_needs_no_remote_code(models):
    from transformers import AutoModelForSequenceClassification

    folder = pathlib.Path(models["llama_hf"])
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    assert not list(folder.glob("*.py"))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=False)
    assert model.config.num_labels == 1


def test_an_auto_map_folder_never_runs_its_modelling_file_without_the_flag(models, marker):
    folder = copy_of(models, "llama_auto_map", "evil_auto_map")
    (folder / "modeling_reward_model.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    auto_map = {
        name: f"modeling_reward_model.{name}"
        for name in ("AutoConfig", "AutoModel", "AutoModelForSequenceClassification")
    }
    edit_config(folder, auto_map=auto_map)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["modeling_reward_model.Evil", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    with contextlib.suppress(CheckpointError):  # loading or refusing are both fine; running the file is not
        create_critic_model(str(folder), load_tokenizer(str(folder)), rlhf_training=True)
    status, err = run_cli(evaluate, ["--model_name_or_path", str(folder), "--data_path", models["data"]])
    assert status in (0, 2) and "Traceback" not in err, err
    status, err = run_cli(convert, ["--input", str(folder), "--output", str(folder) + "_out"])
    assert status in (0, 2) and "Traceback" not in err, err
    from transformers import AutoModelForSequenceClassification

    with contextlib.suppress(ValueError, OSError):
        AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=False)
    assert not marker.exists()
