"""Evaluation: V-NIAH (needle in a video haystack) and local multiple-choice benchmark files."""
