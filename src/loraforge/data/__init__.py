"""Data stage: read and normalise records (formats), render them through the chat template with a
loss mask (templates), split and batch them (batching). Never imports the model stage."""
