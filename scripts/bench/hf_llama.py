"""The Llama-3.2-1B shape as an HF transformers LlamaConfig, shared by the HF reference scripts
(hf_train_step.py, hf_loss_run.py); flexcp's preset `llama3.2-1b` is the same architecture."""
from transformers import LlamaConfig


def llama32_1b():
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000,
                       eos_token_id=128001,
                       rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       attn_implementation="sdpa")
