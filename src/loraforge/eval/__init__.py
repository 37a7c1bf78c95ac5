"""Evaluation: batched generation, scoring metrics, statistics, LLM-as-judge and regression checks.

Import the submodule you need (`loraforge.eval.metrics`, `.stats`, `.llm_judge`, `.regression`); this
package imports nothing so that the scoring side stays free of torch.
"""
