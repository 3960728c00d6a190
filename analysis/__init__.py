"""Offline analysis: replay of recorded sessions, policy comparisons and full-frame analyses."""
