"""Recipes: how a run of the pipeline is wired from its parameters (which models, which data,
which checkpoint identity, in which order), so that a stage only reads params, calls one
recipe and logs what it returns."""
