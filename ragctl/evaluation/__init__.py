"""Evaluation (`ragctl eval`): scoring answers and evidence against a dataset's references
(`metrics`); rebuilding the datasets in the common JSONL layout from their original public
releases (`download`); the systems compared (`systems`); running them on one controller
(`runner`, and the whole `eval run` in `run`); and the report: typed summaries and ratios from
the sample rows (`summaries`, `ratios`), the run's files (`writers`), figures (`plots`) and
tables (`render`). `cli` is the typer front."""
