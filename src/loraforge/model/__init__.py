"""Model stage: resolve and load the base model and tokenizer (load), attach/save/load adapters (adapters)."""
