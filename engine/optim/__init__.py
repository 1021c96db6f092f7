"""Optimizers and what drives them: building the optimizer a recipe names, the learning-rate schedule,
and Muon on the torch side and under data-parallel runs."""
