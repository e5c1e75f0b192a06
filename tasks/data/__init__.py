"""The data layer under the data stages, no stage in it: which files a corpus is (files.py), how each format is
read (readers.py, records.py), what a load piece holds (layout.py) and how pieces are built and assembled
(pieces.py), near-duplicates (shingles.py, minhash.py, near_pieces.py), contamination (contamination.py), the
held-out text's file (held_out_text.py) and Arrow helpers (arrow.py)."""
