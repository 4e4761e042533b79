"""The engine: run settings, the plan of cells, calibration, compression, the budget search and the executors (local and Ray)."""
