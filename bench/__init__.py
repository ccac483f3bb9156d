"""The fan-out benchmark: ``python -m bench --help``."""

# bench_ticks (bench/workflows.py) has this many steps; each process of it sends the process
# list one message per step plus Start, the worker picking it up, and Done.
TICKS = 9
LIST_MESSAGES_PER_PROCESS = TICKS + 3
