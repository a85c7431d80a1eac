"""Ray Tune + Optuna over any family, and export of the best trial."""
