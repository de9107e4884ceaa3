"""Adapters that put ragctl inside other frameworks' applications.

- `ragctl.integrations.langchain`: any LangChain retriever as a ragctl retriever, and
  `RagctlRetrievalChain`, a drop-in for LangChain's `create_retrieval_chain` (needs
  langchain-core: `pip install 'ragctl[langchain]'`).

Each adapter is its own module, imported on demand, so ragctl itself never needs the framework.
"""
