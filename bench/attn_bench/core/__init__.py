"""What every job shares: configs and result rows, the worker pool, the numerics gate, timing
and memory, the run directory's files, the machine record and a run's lifecycle."""
