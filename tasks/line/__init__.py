"""A training line's machinery, above the stages: its state (lines.py: drops and trainings; promotions.py: each
lineage's promoted model and releases), the drop gate a new drop passes before it joins the line
(drop_gate.py), and the lineage a run trains and is gated in (lineage.py)."""
