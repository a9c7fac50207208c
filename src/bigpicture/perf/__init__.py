"""The performance model and planner: predicted peak memory and time of a plan on any device, and
the tile (schedule) that minimises the predicted time under a memory budget.

cost (FLOPs and bytes per op) + devices (table) + rates (calibrated or datasheet) --> steps (per
tile) --> grid (tile classes) --> predict (a plan's memory and time) --> schedule (the tile choice)
"""
