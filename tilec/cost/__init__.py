"""The cost model: pure functions from a program, a split and device
profiles to predicted seconds and bytes. No solver here (OR-Tools lives in
``tilec.solve``); the candidates the solver chooses from are built here so
that every solver, and every baseline, is priced by the same code."""
