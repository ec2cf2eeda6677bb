"""Downstream tasks per checkpoint or release: lm-evaluation-harness (the ``eval`` extra) on local task
directories, through a harness model over lrpath's own forward; the release gate that holds back a release
that regressed on a named task."""
