"""maas's own runner for Llama-family decoder-only transformers: config, weights, model,
tokenizer and sampling. Knows tensors, not requests (the engine schedules those)."""
