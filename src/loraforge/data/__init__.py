"""Data stage: read and normalise records of any supported format (readers, formats, checks), render
them through the chat template with a loss mask (templates), split, batch and pack them (batching,
split, packing), and curate files: validate, dedup (+ semantic), inspect (stats, report, render),
sample. Output files go through sinks. Never imports the model stage."""
