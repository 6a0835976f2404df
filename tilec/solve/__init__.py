"""Choosing a plan: which groups, split lines, devices and keep-or-recompute.

``cpsat`` is the optimiser (the only module of tilec that imports
OR-Tools); ``exact`` holds the cross-checks (a shortest path without
memory limits, an exhaustive search for small instances); ``explain`` turns
an infeasible cluster into a message a user can act on. All of them choose
among the same :mod:`tilec.cost.candidates`.
"""
from dataclasses import dataclass

from tilec.errors import PlanError


class InfeasibleError(PlanError):
    """No plan fits the cluster's memory; the message says who cannot hold what."""


@dataclass
class Solution:
    path: list  # [(group index, recompute)] in layer order
    choices: list  # [(Group, recompute)]
    prediction: object  # tilec.cost.model.Prediction
    solver: str
    status: str
    objective_s: float
    bound_s: float
    wall_s: float
    booleans: int = 0
    # where a plan of less memory was taken instead of the fastest: the fastest's predicted step and peak
    fastest_s: float = None
    fastest_bytes: int = None

    @property
    def gap(self):
        return 0.0 if self.objective_s <= 0 else max(0.0, (self.objective_s - self.bound_s) / self.objective_s)

    def stats(self):
        return {"solver": self.solver, "status": self.status, "objective_s": round(float(self.objective_s), 6),
                "bound_s": round(float(self.bound_s), 6), "gap": round(float(self.gap), 6),
                "wall_s": round(float(self.wall_s), 3), "booleans": int(self.booleans),
                **({} if self.fastest_s is None else {"fastest_s": round(float(self.fastest_s), 6),
                                                      "fastest_bytes": int(self.fastest_bytes)})}


def solution_from_path(cands, path, **info):
    choices = [(cands.groups[gi], rec) for gi, rec in path]
    return Solution(path=list(path), choices=choices, prediction=cands.model.evaluate(choices), **info)
