"""Synthetic training data: generate with a stronger model through any OpenAI-compatible endpoint, then
verify it (record checks, JSON Schema, dedup and test-set contamination, refusals, an optional judge).

    from loraforge.synth.spec import load_spec
    from loraforge.synth.run import synth
    report = synth(load_spec("synth.yaml"), "out.jsonl")

A stage of its own after `eval` (it reuses data's checks and dedup and eval's judge client); it imports
neither train, export, serve nor the CLI. See run.py for the files it writes.
"""
