"""The layout planner: what a training layout needs per GPU and how fast it runs, on paper
(hardware.py: GPU specs; memory.py: memory by component; communication.py: a step's bytes
per group; step_time.py: the step-time model; published.py: the runs it is checked
against). docs/planner.md says what is validated and what is not built yet."""
