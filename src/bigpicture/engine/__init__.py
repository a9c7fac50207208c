"""The engine: exact tiled execution of a captured graph.

model --capture--> fx graph --split--> tiled part + untiled tail --regions--> boxes per node
      --plan--> tiles (read and write boxes) --execute--> outputs and gradients, tile by tile

The engine never imports the performance model: a plan's prediction is attached by the planner
(``bigpicture.perf.schedule.for_run``) as a callback.
"""
