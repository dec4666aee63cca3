"""RL hand-off on the Megatron side: weight syncs of the live model (`sync.py`) and the bridge for
veRL's Megatron engine (`mbridge_bridge.py`, needs mbridge; imported only by that route)."""
