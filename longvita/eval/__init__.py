"""Evaluation: V-NIAH (needle in a video haystack), local multiple-choice benchmark files, and
the adapters that make a checkpoint a model of lmms-eval and VLMEvalKit."""
