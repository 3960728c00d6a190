"""The instrument side: synthetic Sm-BFO specimen, image formation and drivers that serve tiles."""
