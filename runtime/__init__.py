"""tilec_runtime: what runs on every device.

Needs numpy and the standard library only (and, later, the compiled
kernels). Nothing here imports the planner (`tilec`) or its dependencies:
a device reads a plan file (plain JSON) and executes it.

A model reaches the runtime as a *program*: a list of layer dicts in
execution order, each JSON-serialisable (see ``program.py``).
"""
