"""Evaluation: scoring answers and evidence against a dataset's references (`metrics`), and
rebuilding the datasets in the common JSONL layout from their original public releases
(`download`). Pure code; nothing here talks to an engine."""
