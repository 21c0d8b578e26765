"""Neighbour search over the support set: FAISS flat / IVF / HNSW indexes and their device placement
(:mod:`.index`), and the exact-search building blocks they share (:mod:`.exhaustive`)."""
