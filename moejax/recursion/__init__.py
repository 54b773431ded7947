"""Recursive (parameter-shared) transformers: sharing strategies, Mixture-of-Recursions,
relaxed (per-loop LoRA) recursion and conversion from untied models."""
