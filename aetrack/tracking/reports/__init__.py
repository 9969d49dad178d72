"""What a reader is shown of runs already made: the compare report and its figures (compare, figures), and a
study's verdicts computed from its record (verdicts)."""
