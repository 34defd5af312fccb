"""Explanations: where in the fundus the model's evidence lies."""
