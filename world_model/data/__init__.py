"""Recorded data: recorders, on-disk episode format, windowed loaders."""
