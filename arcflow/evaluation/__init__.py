"""Evaluation of a distilled student against its teacher with the field's metrics (``arcflow eval``)."""
