"""The layout planner: what a training layout needs per GPU and how fast it runs, on paper
(hardware.py: GPU specs; memory.py: memory by component; communication.py: a step's bytes
per group)."""
