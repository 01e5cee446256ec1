"""Run history, run directories and plots."""
