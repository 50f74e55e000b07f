"""Training: losses, samplers' consumers, and the loops for the global model and the reranker."""
