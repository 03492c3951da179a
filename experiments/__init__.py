"""Measurement scripts the documentation cites; run each from the repository root as
``python -m experiments.<name>`` (``--help`` lists its options)."""
