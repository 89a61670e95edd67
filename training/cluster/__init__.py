"""Where a run executes: process groups (parallel), local launch (launch), SLURM submission (slurm) and the
layout/memory planner (plan)."""
