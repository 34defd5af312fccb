"""Training, evaluation and export of the grading model."""
