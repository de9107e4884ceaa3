"""Retrieval: dataset cards and data (`collection`), chunking in serving-model tokens
(`chunking`), embedding backends (`embeddings`) and the persisted FAISS index (`index`).

`open_retriever(settings, dataset, tokenizer)` is the entry point for everything above."""
