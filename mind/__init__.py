"""MIND (Multi-Interest Network with Dynamic routing) recommender built on `mind_kernels`.

Subpackages and modules: `mind.data` (loaders, synthetic data, ComiRec-protocol splits),
`mind.evaluate` (full-corpus retrieval and Recall/HitRate/NDCG@N), and the model, loss,
training loop, serving and CLI. Importing `mind` itself imports nothing heavy.
"""
