"""Training: loops (loop.py), schedules (schedules.py), Fast Geometric Ensembling (fge.py), parent–child
spawning (spawn.py) and the one resume mechanism they share (state.py)."""
