import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=49152, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, initializer_range=0.02, torch_dtype="bfloat16")
m = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained("/tmp/qwen_shape")
AutoTokenizer.from_pretrained("/root/.cache/loraforge/models/smollm2-135m-instruct").save_pretrained("/tmp/qwen_shape")
print(sum(p.numel() for p in m.parameters()) / 1e6)
