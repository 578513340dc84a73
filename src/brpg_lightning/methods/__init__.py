"""Training methods (SupOnly, mean teacher, FixMatch, CPS) as LightningModules, and the pure pieces of their step."""
