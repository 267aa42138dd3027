"""Everything about the reward model, no training loop. The public API, for a PPO stage or a script:

    from model_utils import create_critic_model, load_tokenizer
    tokenizer = load_tokenizer("output/rm")
    critic = create_critic_model("output/rm", tokenizer, ds_config, rlhf_training=True)

Names resolve lazily: importing `model_utils` imports neither DeepSpeed nor transformers.
"""

from model_utils.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "model_utils.reward_model": ("RewardModel",),
        "model_utils.model_factory": ("create_hf_model", "create_critic_model", "load_reward_model"),
        "model_utils.tokenizer": ("load_tokenizer", "padded_vocab_size"),
        "model_utils.checkpoint.save": ("save_reward_model", "write_reward_model"),
        "model_utils.checkpoint.load": ("load_reward_model_weights",),
        "model_utils.checkpoint.errors": ("CheckpointError",),
        "model_utils.checkpoint.names": ("SAVE_FORMATS",),
    },
)
