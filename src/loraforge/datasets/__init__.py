"""Data shipped with loraforge: BANKING77 (CC-BY 4.0, see banking77/SOURCE.md), a slice of Anthropic's
HH-RLHF harmless-base preference pairs (MIT, see hh_rlhf_harmless/SOURCE.md) and evaluation sets."""
