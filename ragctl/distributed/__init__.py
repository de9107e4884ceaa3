"""ragctl on a Ray cluster: the KV reservation ledger shared by every replica (`ledger`: a named
Ray actor) and the Ray Serve application that runs the OpenAI-compatible server as R replicas
(`serve`). Needs the `[ray]` extra; nothing here is imported unless Ray is used."""
