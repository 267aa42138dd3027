"""File and key names of the saved layouts, in one place (no imports: the CLI's flag choices read them)."""

SAVE_FORMATS = ("hf", "auto_map", "dschat")

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PYTORCH_FILE = "pytorch_model.bin"
PYTORCH_INDEX_FILE = "pytorch_model.bin.index.json"
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODEL_CARD_FILE = "README.md"
AUTO_MAP_MODULE = "modeling_reward_model"

# `RewardModel`'s own names.
BACKBONE_PREFIX = "backbone."
HEAD_NAME = "v_head.weight"
# transformers' <Arch>ForSequenceClassification head.
HF_HEAD_NAME = "score.weight"
# DeepSpeed-Chat's backbone attribute, and its old misspelling (accepted on load).
DSCHAT_BACKBONE_PREFIX = "rwtransformer."
DSCHAT_BACKBONE_PREFIXES = (DSCHAT_BACKBONE_PREFIX, "rwtranrsformer.")

# DeepSpeed checkpoints: the file naming the newest tag, and each rank's module states.
LATEST_FILE = "latest"
MODEL_STATES_PATTERN = "*model_states.pt"
