"""What is loaded: model versions as live deployments, the pool that loads and evicts them."""
