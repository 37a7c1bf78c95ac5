"""Ship a run: merge its adapter into the base, or write GGUF files for llama.cpp and Ollama.

    merge.py      base + adapter -> 16-bit safetensors folder (`loraforge merge RUN_DIR`)
    pipeline.py   run -> GGUF (+ Modelfile) (`loraforge export gguf RUN_DIR --quant f16|q8_0|q4_k_m`)
    gguf.py       the GGUF model writer and llama.cpp's quantizer (the only module that uses llama.cpp)
    lora_gguf.py  a PEFT adapter as a GGUF LoRA (`--adapter-only`)
    vocab.py      tokenizer metadata for GGUF; the chat template's end-of-turn token
    modelfile.py  the Ollama Modelfile (template, system prompt, stop tokens)

Nothing here is imported at package import time, so the CLI stays fast; export imports loraforge.model,
loraforge.config, loraforge.data (imatrix's calibration text) and train.run_files (the run's files, found
once: RunFiles).
"""
