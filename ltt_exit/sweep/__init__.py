"""The threshold sweep: decode each calibration prompt once per candidate λ, write a loss table."""
from ltt_exit.sweep.run import DEFAULT_GRID, SweepSpec, run_sweep, sweep_config_key

__all__ = ["DEFAULT_GRID", "SweepSpec", "run_sweep", "sweep_config_key"]
