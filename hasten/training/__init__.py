"""Training of drafters from the target's own outputs (self-distillation data, draft models)."""
