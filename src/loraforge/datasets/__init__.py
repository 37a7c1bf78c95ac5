"""Data shipped with loraforge: BANKING77 (CC-BY 4.0, see banking77/SOURCE.md) and evaluation sets."""
