"""Checkpoint directory layout and (in save.py / load.py) torch_dist save and load."""
